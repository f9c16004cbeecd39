"""mochi_lab: notebook-first, distributed text-to-video generation with Mochi 1 on Ray.

The public API is what this module exports; front ends (widgets, the web page) use nothing else.
"""

from mochi_lab.backend import Backend
from mochi_lab.client import MochiCluster, Rows
from mochi_lab.experiment import Experiment, ExperimentNotFound
from mochi_lab.job import Job, JobCancelledError, JobFailed
from mochi_lab.params import LIMITS, GenerationParams, ParamsError
from mochi_lab.pipelines.config import PipelineConfig
from mochi_lab.remote import GatewayAuthError, GatewayBackend, GatewayError
from mochi_lab.settings import Settings
from mochi_lab.store.base import (
    CANCELLED, DONE, FAILED, QUEUED, RUNNING, STATUSES, JobNotFound, JobRecord, QuotaExceeded, StoreUnavailable,
)
from mochi_lab.version import __version__

__all__ = [
    "CANCELLED", "DONE", "FAILED", "LIMITS", "QUEUED", "RUNNING", "STATUSES",
    "Backend", "Experiment", "GatewayAuthError", "GatewayBackend", "GatewayError", "QuotaExceeded", "ExperimentNotFound", "GenerationParams", "Job", "JobCancelledError", "JobFailed",
    "JobNotFound", "JobRecord", "MochiCluster", "ParamsError", "PipelineConfig", "Settings", "StoreUnavailable",
    "Rows", "__version__",
]
