"""Pipelines: diffusers' MochiPipeline for the real model, and a tiny Mochi for CPUs and tests.

Import cost matters (torch + diffusers take seconds): submodules are imported on first use.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from mochi_lab.config import known_models
from mochi_lab.pipelines.config import PipelineConfig

if TYPE_CHECKING:
    from mochi_lab.pipelines.mochi import MochiRunner


class JobCancelled(Exception):
    """Raise it from a step callback to stop denoising at once (a cancel request)."""


def resolve_source(model: str, cache_dir: str | os.PathLike) -> str:
    """A name from `known_models()` -> what `from_pretrained` takes (hub id or local dir)."""
    if model == "tiny":
        from mochi_lab.pipelines.tiny import ensure_tiny_mochi

        return str(ensure_tiny_mochi(Path(cache_dir)))
    models = known_models()
    if model not in models:
        raise ValueError(f"model must be one of {', '.join(sorted(models))}, got {model!r}")
    return models[model]


# Loading a model sets process-wide state for its duration (torch's default device while weights are created
# empty on "meta"), so two loads in one process at once break each other: workers that share a process
# (threads, as in the tests' cheap pool) load one at a time.
_ONE_LOAD = threading.Lock()


def load_runner(model: str, cache_dir: str | os.PathLike, config: PipelineConfig | None = None) -> "MochiRunner":
    """Load `model` once; the returned runner generates many videos."""
    from mochi_lab.pipelines.mochi import MochiRunner

    config = config or PipelineConfig()
    # genmo/mochi-1-preview ships bf16 copies of its weights: half the download, same values
    if model == "mochi-1-preview" and config.variant is None and config.bf16:
        config = config.model_copy(update={"variant": "bf16"})
    with _ONE_LOAD:
        return MochiRunner(resolve_source(model, cache_dir), config, name=model)


__all__ = ["JobCancelled", "PipelineConfig", "load_runner", "resolve_source"]
