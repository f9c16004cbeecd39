"""mochi_lab: notebook-first, distributed text-to-video generation with Mochi 1 on Ray.

The public API is what this module exports. It is lazy (PEP 562): `import mochi_lab` loads none of
torch, Ray or the HTTP client; each name is imported from its home on first use. Modules inside the
package import the defining module, never this face.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mochi_lab import _moved

# Public name -> the module that defines it.
_HOMES: dict[str, str] = {
    "MochiCluster": "mochi_lab.client.cluster",
    "Rows": "mochi_lab.client.cluster",
    "Adapters": "mochi_lab.client.cluster",
    "AdapterNotFound": "mochi_lab.adapters",
    "AdapterRejected": "mochi_lab.adapters",
    "Job": "mochi_lab.client.job",
    "JobCancelledError": "mochi_lab.client.job",
    "JobFailed": "mochi_lab.client.job",
    "Experiment": "mochi_lab.client.experiment",
    "ExperimentNotFound": "mochi_lab.client.experiment",
    "Backend": "mochi_lab.client.backend",
    "GatewayAuthError": "mochi_lab.client.wire_client",
    "GatewayBackend": "mochi_lab.client.http",
    "GatewayError": "mochi_lab.client.wire_client",
    "LIMITS": "mochi_lab.params",
    "GenerationParams": "mochi_lab.params",
    "ParamsError": "mochi_lab.params",
    "PipelineConfig": "mochi_lab.pipelines.config",
    "Settings": "mochi_lab.config",
    "CANCELLED": "mochi_lab.model",
    "DONE": "mochi_lab.model",
    "FAILED": "mochi_lab.model",
    "QUEUED": "mochi_lab.model",
    "RUNNING": "mochi_lab.model",
    "STATUSES": "mochi_lab.model",
    "JobNotFound": "mochi_lab.model",
    "JobRecord": "mochi_lab.model",
    "QuotaExceeded": "mochi_lab.model",
    "RecordTooLarge": "mochi_lab.model",
    "StoreUnavailable": "mochi_lab.model",
    "Studio": "mochi_lab.display.widgets.studio",
    "History": "mochi_lab.display.widgets.history",
    "ClusterPanel": "mochi_lab.display.widgets.cluster_panel",
    "__version__": "mochi_lab.version",
}

__all__ = [
    "AdapterNotFound", "AdapterRejected", "Adapters", "Backend", "CANCELLED", "ClusterPanel", "DONE", "Experiment",
    "ExperimentNotFound", "FAILED", "GatewayAuthError", "GatewayBackend", "GatewayError", "GenerationParams",
    "History", "Job", "JobCancelledError", "JobFailed", "JobNotFound", "JobRecord", "LIMITS", "MochiCluster",
    "ParamsError", "PipelineConfig", "QUEUED", "QuotaExceeded", "RUNNING", "RecordTooLarge", "Rows", "STATUSES",
    "Settings", "StoreUnavailable", "Studio", "__version__"
]

_moved.install()
__getattr__, __dir__ = _moved.lazy_names(__name__, _HOMES)

if TYPE_CHECKING:
    from mochi_lab.adapters import AdapterNotFound, AdapterRejected
    from mochi_lab.client.backend import Backend
    from mochi_lab.client.cluster import Adapters, MochiCluster, Rows
    from mochi_lab.client.experiment import Experiment, ExperimentNotFound
    from mochi_lab.client.http import GatewayBackend
    from mochi_lab.client.job import Job, JobCancelledError, JobFailed
    from mochi_lab.client.wire_client import GatewayAuthError, GatewayError
    from mochi_lab.config import Settings
    from mochi_lab.display.widgets.cluster_panel import ClusterPanel
    from mochi_lab.display.widgets.history import History
    from mochi_lab.display.widgets.studio import Studio
    from mochi_lab.model import (
        CANCELLED,
        DONE,
        FAILED,
        QUEUED,
        RUNNING,
        STATUSES,
        JobNotFound,
        JobRecord,
        QuotaExceeded,
        RecordTooLarge,
        StoreUnavailable,
    )
    from mochi_lab.params import LIMITS, GenerationParams, ParamsError
    from mochi_lab.pipelines.config import PipelineConfig
    from mochi_lab.version import __version__
