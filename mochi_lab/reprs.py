"""HTML reprs of the handle and of jobs, rendered from small templates, from state already in memory."""

from __future__ import annotations

import html
from functools import lru_cache
from importlib import resources
from string import Template
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mochi_lab.client import MochiCluster
    from mochi_lab.store import JobRecord


@lru_cache(maxsize=None)
def _template(name: str) -> Template:
    return Template(resources.files("mochi_lab").joinpath("templates", name).read_text())


def job_html(r: "JobRecord") -> str:
    step = f"{r.step}/{r.total_steps}" if r.total_steps else ""
    return _template("job.html").substitute(
        id=html.escape(r.id),
        status=html.escape(r.status),
        stage=html.escape(r.stage),
        step=step,
        prompt=html.escape(str(r.params.get("prompt", ""))),
        seed=r.params.get("seed"),
        size=f"{r.params.get('width')}x{r.params.get('height')}x{r.params.get('num_frames')}",
        error=html.escape(r.error or ""),
    )


def cluster_html(c: "MochiCluster") -> str:
    return _template("cluster.html").substitute(
        ray=html.escape(str(c.ray_address)),
        store="redis" if c.settings.redis_url else "sqlite",
        account=html.escape(c.account),
        model=html.escape(c.model),
    )
