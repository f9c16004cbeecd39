"""The client: what runs in a notebook or a script. The handle (`cluster`), jobs, experiments, the backend
interface, the direct backend (store and pool in this process) and the HTTP backend (a gateway).

Its public names are loaded on first use, as the package face's are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mochi_lab._moved import lazy_names

_HOMES: dict[str, str] = {
    "MochiCluster": "mochi_lab.client.cluster",
    "Rows": "mochi_lab.client.cluster",
    "Job": "mochi_lab.client.job",
    "JobCancelledError": "mochi_lab.client.job",
    "JobFailed": "mochi_lab.client.job",
    "Experiment": "mochi_lab.client.experiment",
    "ExperimentNotFound": "mochi_lab.client.experiment",
    "Backend": "mochi_lab.client.backend",
    "GatewayAuthError": "mochi_lab.client.wire_client",
    "GatewayBackend": "mochi_lab.client.http",
    "GatewayError": "mochi_lab.client.wire_client",
}

__all__ = [
    "Backend", "Experiment", "ExperimentNotFound", "GatewayAuthError", "GatewayBackend", "GatewayError", "Job",
    "JobCancelledError", "JobFailed", "MochiCluster", "Rows"
]

__getattr__, __dir__ = lazy_names(__name__, _HOMES)

if TYPE_CHECKING:
    from mochi_lab.client.backend import Backend
    from mochi_lab.client.cluster import MochiCluster, Rows
    from mochi_lab.client.experiment import Experiment, ExperimentNotFound
    from mochi_lab.client.http import GatewayBackend
    from mochi_lab.client.job import Job, JobCancelledError, JobFailed
    from mochi_lab.client.wire_client import GatewayAuthError, GatewayError
