"""mochi_lab: notebook-first, distributed text-to-video generation with Mochi 1 on Ray."""

from mochi_lab.client import MochiCluster, WorkerRows
from mochi_lab.experiment import Experiment, ExperimentNotFound
from mochi_lab.job import Job, JobCancelledError, JobFailed
from mochi_lab.params import GenerationParams, ParamsError
from mochi_lab.pipelines.config import PipelineConfig
from mochi_lab.settings import Settings
from mochi_lab.store import JobNotFound

__version__ = "0.1.0"

__all__ = [
    "Experiment", "ExperimentNotFound", "GenerationParams", "Job", "JobCancelledError", "JobFailed", "JobNotFound", "MochiCluster",
    "ParamsError", "PipelineConfig", "Settings", "WorkerRows", "__version__",
]
