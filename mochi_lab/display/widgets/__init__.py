"""ipywidgets front ends for mochi_lab: a Studio to generate, a History browser, a Cluster panel.

They use only the public `MochiCluster`/`Job` handle, and update from the kernel's event loop
(never from threads, never by blocking a cell), so they stay live while the kernel is idle.
"""

from .card_stack import CardStack
from .cluster_panel import ClusterPanel, workers_html
from .history import History, HistoryRow, jobs_frame
from .job_card import JobCard
from .studio import Studio

__all__ = ["CardStack", "ClusterPanel", "History", "HistoryRow", "JobCard", "Studio", "jobs_frame", "workers_html"]
