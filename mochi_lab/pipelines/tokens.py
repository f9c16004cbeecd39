"""Prompt token counts from a tokenizer already on this machine (never the network, never torch).

A machine without the model's files (a gateway) keeps the tokenizer files a worker sent it
(`tokenizer_files` there, `keep_tokenizer_files` here) under `<cache_dir>/tokenizers/`.
"""

from __future__ import annotations

import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote


def _kept_dir(model: str, cache_dir: Path) -> Path:
    return Path(cache_dir) / "tokenizers" / quote(model, safe="")


@lru_cache(maxsize=8)
def local_tokenizer(model: str, cache_dir: Path) -> Any | None:
    """`model`'s tokenizer from local files, or None when it is not here (the worker checks then)."""
    from mochi_lab.config import known_models
    from mochi_lab.pipelines.tiny import tiny_checkpoint_dir

    source = known_models().get(model)
    if source is None:
        return None
    subfolder = "tokenizer"
    if _kept_dir(model, cache_dir).is_dir():  # sent by a worker
        source, subfolder = str(_kept_dir(model, cache_dir)), ""
    elif model == "tiny":
        source = str(tiny_checkpoint_dir(cache_dir))
        if not Path(source, "tokenizer").is_dir():  # not built yet: building it needs torch
            return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, subfolder=subfolder, local_files_only=True)
    except (OSError, ValueError):
        return None


def tokenizer_files(model: str, cache_dir: Path) -> dict[str, bytes] | None:
    """The files of `model`'s local tokenizer, as `save_pretrained` writes them (None: none here)."""
    tokenizer = local_tokenizer(model, Path(cache_dir))
    if tokenizer is None:
        return None
    with tempfile.TemporaryDirectory(prefix="mochi-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}


def keep_tokenizer_files(model: str, cache_dir: Path, files: dict[str, bytes]) -> Any | None:
    """Write `files` (from `tokenizer_files` on a worker) where `local_tokenizer` looks; returns the tokenizer."""
    kept = _kept_dir(model, cache_dir)
    kept.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=".staged-", dir=kept.parent))
    try:
        for name, data in files.items():
            if Path(name).name != name or name.startswith("."):  # a file name, nothing that leaves the folder
                raise ValueError(f"not a tokenizer file name: {name!r:.80}")
            (staged / name).write_bytes(data)
        staged.rename(kept)  # whole or not at all: a concurrent reader never sees half the files
    except OSError:  # another thread or process kept them first
        pass
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    local_tokenizer.cache_clear()  # it may have remembered that there was none
    return local_tokenizer(model, Path(cache_dir))
