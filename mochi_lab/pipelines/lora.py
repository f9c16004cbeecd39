"""LoRA adapters in a loaded pipeline: loaded once, the `size` most recently used kept, applied for one job.

The base model is never reloaded: an adapter's layers are added to the loaded transformer (diffusers'
`load_lora_weights`, peft underneath), a job sets its adapters and their scales, and they are disabled again
when it ends, so a job with no adapter runs exactly the base model's layers (bit for bit the base frames).
Loading an adapter beyond `size` deletes the least recently used one not in use.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

log = logging.getLogger(__name__)


def adapter_name(sha256: str) -> str:
    """The name an adapter is loaded under in the transformer: its content's, so two names of one file load once."""
    return f"lora_{sha256[:32]}"


class LoraCache:
    """The adapters loaded into `pipe`'s transformer, by sha256, most recently used last."""

    def __init__(self, pipe: Any, size: int = 4):
        self.pipe, self.size = pipe, size
        self.loaded: OrderedDict[str, str] = OrderedDict()  # sha256 -> adapter name in the transformer

    def load(self, sha256: str, read: Callable[[], bytes]) -> float:
        """Make the adapter with `sha256` loaded (`read()` gives its checked file's bytes when it is not); the
        seconds its load took (0.0 when it was loaded already)."""
        if sha256 in self.loaded:
            self.loaded.move_to_end(sha256)
            return 0.0
        from safetensors.torch import load as load_tensors

        t0 = time.perf_counter()
        state = load_tensors(read())
        name = adapter_name(sha256)
        try:
            self.pipe.load_lora_weights(state, adapter_name=name)
        except BaseException:
            with contextlib.suppress(Exception):  # whatever part of it went in must not stay for the next job
                self.pipe.delete_adapters(name)
            raise
        self.loaded[sha256] = name
        return time.perf_counter() - t0

    def evict(self, keep: Sequence[str] = ()) -> None:
        """Delete the least recently used adapters beyond `size`, never one of `keep` (the job's)."""
        for sha in list(self.loaded):
            if len(self.loaded) <= self.size:
                return
            if sha not in keep:
                self.pipe.delete_adapters(self.loaded.pop(sha))
                log.info("unloaded LoRA %s (least recently used)", sha[:12])

    @contextlib.contextmanager
    def applied(self, adapters: Sequence[tuple[str, float]]) -> Iterator[None]:
        """The loaded adapters `adapters` ((sha256, scale) pairs, each loaded) set for the block, then disabled.
        With none, the block runs the base model (any loaded adapter disabled)."""
        if not adapters:
            if getattr(self.pipe.transformer, "_hf_peft_config_loaded", False):  # any adapter layer in it
                self.pipe.disable_lora()
            yield
            return
        self.pipe.enable_lora()
        self.pipe.set_adapters([self.loaded[sha] for sha, _ in adapters],
                               adapter_weights=[float(scale) for _, scale in adapters])
        try:
            yield
        finally:
            self.pipe.disable_lora()


__all__ = ["LoraCache", "adapter_name"]
