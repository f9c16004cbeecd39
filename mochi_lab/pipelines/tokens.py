"""Prompt token counts from a tokenizer already on this machine (never the network, never torch)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any


@lru_cache(maxsize=8)
def local_tokenizer(model: str, cache_dir: Path) -> Any | None:
    """`model`'s tokenizer from local files, or None when it is not here (the worker checks then)."""
    from mochi_lab.pipelines.tiny import tiny_checkpoint_dir
    from mochi_lab.settings import known_models

    source = known_models().get(model)
    if source is None:
        return None
    if model == "tiny":
        source = str(tiny_checkpoint_dir(cache_dir))
        if not Path(source, "tokenizer").is_dir():  # not built yet: building it needs torch
            return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, subfolder="tokenizer", local_files_only=True)
    except (OSError, ValueError):
        return None
