"""Prompt token counts, for validating prompt length before a job is queued."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=8)
def _tokenizer(model: str):
    from transformers import AutoTokenizer

    from mochi_lab.pipelines import resolve_source
    from mochi_lab.settings import Settings

    return AutoTokenizer.from_pretrained(resolve_source(model, Settings.from_env().cache_dir), subfolder="tokenizer")


def count_tokens(model: str, text: str) -> int:
    """Tokens `text` takes in `model`'s text encoder, end-of-sequence token included."""
    return len(_tokenizer(model)(text).input_ids)
