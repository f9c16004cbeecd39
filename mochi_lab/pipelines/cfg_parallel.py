"""Classifier-free guidance on two ranks: one video, two devices.

MochiPipeline runs the transformer on a batch of 2 when it guides (unconditional, conditional). Both
ranks run the same pipeline call; the transformer's forward is wrapped so that rank r computes only
sample r of that batch and an all-gather puts the full noise prediction back together. The sampling
loop, scheduler and callbacks stay diffusers' own.

A stop on rank 0 (a cancel, a lost lease, a step's error) must stop rank 1 at the same step, or rank 1
waits in the next all-gather: `synced_step` makes every step end with one small all-reduce of a stop
flag. A failing collective means the other rank is gone: it raises `PeerLost`, and the caller restarts
the pair.

The seam for sequence parallelism is `_shard`/`_unshard`: a plan that splits tokens instead of the
batch (and gathers inside attention) fits the same wrapped forward. Nothing here knows of Ray or Redis.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
import torch.distributed as dist

StepCallback = Callable[[int, int], None]


class PeerLost(RuntimeError):
    """A collective failed or timed out: the other rank died or is stuck. Restart both ranks."""


class StoppedByPeer(Exception):
    """The other rank stopped the job (a cancel, a lost lease, an error) at this step."""


class CfgParallel:
    """Splits the CFG batch over the two ranks of `group` (the default group when None)."""

    def __init__(self, device: torch.device, group: dist.ProcessGroup | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        if self.world != 2:
            raise ValueError(f"CFG parallelism needs a group of 2 ranks, got {self.world}")
        self.device = device  # NCCL reduces CUDA tensors only: the stop flag lives here
        self.active = False  # per job: False for a job without CFG (batch 1), where rank 1 idles
        self.stats = {"calls": 0, "gather_s": 0.0, "sync_s": 0.0}
        self.synced_stop = False  # per job: whether it ended in a stop both ranks took at the same step

    def wrap(self, transformer: torch.nn.Module) -> None:
        """Route `transformer`'s forward through the split. Idempotent."""
        if getattr(transformer, "_cfg_parallel", None) is not None:
            transformer._cfg_parallel = self
            return
        inner = transformer.forward
        transformer._cfg_parallel = self

        def forward(hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep: torch.Tensor,
                    encoder_attention_mask: torch.Tensor, attention_kwargs: dict | None = None,
                    return_dict: bool = True) -> Any:
            plan = transformer._cfg_parallel
            if not plan.active or hidden_states.shape[0] != plan.world:
                return inner(hidden_states, encoder_hidden_states, timestep, encoder_attention_mask,
                             attention_kwargs=attention_kwargs, return_dict=return_dict)
            mine = plan._shard(hidden_states, encoder_hidden_states, timestep, encoder_attention_mask)
            out = inner(*mine, attention_kwargs=attention_kwargs, return_dict=False)[0]
            sample = plan._unshard(out)
            if return_dict:
                from diffusers.models.modeling_outputs import Transformer2DModelOutput

                return Transformer2DModelOutput(sample=sample)
            return (sample,)

        transformer.forward = forward

    @staticmethod
    def unwrap(transformer: torch.nn.Module) -> None:
        """Back to the transformer's own forward."""
        transformer.__dict__.pop("forward", None)
        transformer.__dict__.pop("_cfg_parallel", None)

    def _shard(self, *batch: torch.Tensor) -> list[torch.Tensor]:
        """This rank's sample of each batched input (rank 0: unconditional, rank 1: conditional)."""
        return [t[self.rank:self.rank + 1] for t in batch]

    def _unshard(self, out: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(out) for _ in range(self.world)]
        t0 = time.perf_counter()
        self._collective(dist.all_gather, parts, out.contiguous(), group=self.group)
        self.stats["gather_s"] += time.perf_counter() - t0
        self.stats["calls"] += 1
        return torch.cat(parts)

    def _collective(self, collective: Callable, *args: Any, **kwargs: Any) -> None:
        try:
            collective(*args, **kwargs)
        except (RuntimeError, dist.DistError) as exc:  # gloo: "Connection closed by peer", timeouts
            raise PeerLost(f"rank {self.rank}: {collective.__name__} failed: {exc}") from exc

    def synced_step(self, on_step: StepCallback | None) -> StepCallback:
        """A step callback that ends with an all-reduce of a stop flag: when `on_step` raises on
        either rank, that rank re-raises and the other raises StoppedByPeer, at the same step."""
        self.synced_stop = False

        def step(i: int, total: int) -> None:
            error: BaseException | None = None
            if on_step is not None:
                try:
                    on_step(i, total)
                except Exception as exc:
                    error = exc
            flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=self.device)
            t0 = time.perf_counter()
            self._collective(dist.all_reduce, flag, op=dist.ReduceOp.MAX, group=self.group)
            self.stats["sync_s"] += time.perf_counter() - t0
            self.synced_stop = error is not None or bool(flag.item())
            if error is not None:
                raise error
            if self.synced_stop:
                raise StoppedByPeer(f"stopped by the other rank at step {i}/{total}")

        return step

    def reset_stats(self) -> None:
        self.stats.update(calls=0, gather_s=0.0, sync_s=0.0)


def rendezvous_store(rank: int, port: int, timeout_s: float, host: str = "127.0.0.1") -> dist.TCPStore:
    """The pair's rendezvous store: rank 0 hosts it (port 0: any free port, read back from `.port`
    and told to rank 1), rank 1 connects to it."""
    from datetime import timedelta

    return dist.TCPStore(host, port, world_size=2, is_master=rank == 0, timeout=timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def join_pair(store: dist.TCPStore, rank: int, backend: str, timeout_s: float) -> None:
    """Form the two-rank default process group (blocks until both ranks join); collectives time out
    after `timeout_s`."""
    from datetime import timedelta

    dist.init_process_group(backend, store=store, rank=rank, world_size=2, timeout=timedelta(seconds=timeout_s))


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"
