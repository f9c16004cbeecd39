"""One video on several ranks: classifier-free guidance (CFG) and sequence parallelism (SP) in a layout, the
attention processor they need, a First Block Cache decision every rank agrees on, and a VAE decode split by
frames.

A gang of W ranks runs each job in a `Layout(cfg, sp)` with cfg x sp = W. cfg=2 splits the guided batch
(unconditional, conditional) over two groups of ranks; sp splits the video's tokens over the ranks of a group
(Ulysses: an all-to-all turns "my tokens, every head" into "every token, my heads", so each rank attends over
the whole sequence for heads/sp heads). Rank r is CFG index r // sp and SP index r % sp. By default
(`default_layout`) a guided job runs CFG 2 x SP W/2 and a job without CFG runs SP over all W ranks.

The transformer is split without forking diffusers' code:
- its forward is wrapped: each CFG group takes its sample of the batch, and an all-gather over the CFG group
  puts the noise prediction back together (the sampler, scheduler and callbacks stay diffusers' own);
- a forward hook on `patch_embed` keeps this rank's tokens, padded at the end to a multiple of sp (85 frames at
  848x480 give 23,850 tokens, which 4 and 8 do not divide); one on `proj_out` all-gathers them over the SP group
  and drops the padding;
- every block's attention processor (`GangAttention`) moves q, k, v from tokens to heads and the output back.
  Padding is cut off before attention, so it is never a key or a query: exact, for every kernel. The text tokens
  stay on every rank; a rank projects only its own heads' text q, k, v, and the text output's heads are
  all-gathered over the SP group (Genmo's scheme).

A stop must stop every rank at the same step, or the others wait in the next collective: `synced_step` ends
every step with an all-reduce of a stop flag over the gang. A failing collective means a rank is gone: it
raises `PeerLost`, and the caller restarts the gang. Nothing here knows of Ray or Redis.

This module holds the layouts and the plan (`Parallel`); the attention processor is attention.py, one call's
token shards and all-to-alls ulysses.py, the decode split vae_split.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from mochi_lab._moved import moved_names
from mochi_lab.pipelines.attention import set_attention
from mochi_lab.pipelines.ulysses import SpCall
from mochi_lab.pipelines.vae_split import split_decoder

StepCallback = Callable[[int, int], None]


class PeerLost(RuntimeError):
    """A collective failed or timed out: another rank died or is stuck. Restart the gang."""


class StoppedByPeer(Exception):
    """Another rank stopped the job (a cancel, a lost lease, an error) at this step."""


class LayoutError(ValueError):
    """A layout this model or this job cannot run in; the message names the limit."""


@dataclass(frozen=True)
class Layout:
    """How one job's work is split: `cfg` groups (1, or 2 for a guided job's two samples) of `sp` ranks."""

    cfg: int = 1
    sp: int = 1

    @property
    def world(self) -> int:
        return self.cfg * self.sp

    @property
    def name(self) -> str:
        return f"cfg{self.cfg}xsp{self.sp}"

    def check(self, heads: int, tokens: int | None = None) -> None:
        """Raise LayoutError unless a transformer of `heads` attention heads (and a job of `tokens` visual
        tokens) can run in this layout."""
        if self.cfg not in (1, 2):
            raise LayoutError(f"layout {self.name}: the CFG degree must be 1 or 2 (a guided batch has 2 samples)")
        if self.sp < 1 or heads % self.sp:
            allowed = [d for d in range(1, heads + 1) if heads % d == 0]
            raise LayoutError(f"layout {self.name}: the SP degree must divide the transformer's {heads} attention "
                              f"heads (allowed: {allowed})")
        if tokens is not None and tokens < self.sp:
            raise LayoutError(f"layout {self.name}: the video has {tokens} visual tokens, fewer than its {self.sp} "
                              f"SP ranks (more ranks than tokens); make the video larger or the gang smaller")


def default_layout(world: int, guided: bool) -> Layout:
    """A guided job on an even gang: CFG 2 x SP world/2; anything else: SP over every rank."""
    return Layout(cfg=2, sp=world // 2) if guided and world % 2 == 0 else Layout(cfg=1, sp=world)


def visual_tokens(transformer_config: Any, num_frames: int, height: int, width: int) -> int:
    """The transformer's visual tokens for a video: latent frames x (height/16) x (width/16) for Mochi."""
    p = transformer_config.patch_size
    return ((num_frames - 1) // 6 + 1) * (height // 8 // p) * (width // 8 // p)


@dataclass
class _Job:
    """One job's layout on this rank, and its groups."""

    layout: Layout
    cfg_index: int
    sp_index: int
    cfg_group: Any  # None when cfg == 1
    sp_group: Any  # None when sp == 1


class Parallel:
    """A gang's plan: its group of ranks, and per job the layout that job runs in. How a gang uses it, on every
    rank r of W (one process per GPU):

        join_pair(rendezvous_store(r, port, timeout_s, world=W), r, backend_for(device), timeout_s, world=W)
        plan = Parallel(runner.device, timeout_s=timeout_s)  # collective: forms the layouts' subgroups
        runner.enable_parallel(plan)  # LayoutError if an SP degree does not divide the heads
        result = runner.generate(params, on_step, preview if r == 0 else None, layout=layout)  # per job

    with the same params and layout on every rank (layout None: `policy`, by default `default_layout`).
    Rank 0 gets the frames and `result.info["layout"]`; the others empty frames. LayoutError comes before any
    work and alike on every rank (the job fails; a retry would fail too); `StoppedByPeer` on every rank but
    the one whose `on_step` raised, at the same step; `PeerLost` when a collective fails (restart the gang).
    A runner loaded for another model takes the same plan (`enable_parallel` again)."""

    # whether each job's VAE decode is split over the ranks (PipelineConfig.parallel_decode can turn it off)
    split_decode = True

    def __init__(self, device: torch.device, group: dist.ProcessGroup | None = None, *,
                 layouts: tuple[Layout, ...] | None = None,
                 policy: Callable[[int, bool], Layout | None] = default_layout,
                 timeout_s: float | None = None):
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        self.device = device  # NCCL reduces CUDA tensors only: the stop flag and cache votes live here
        self.policy = policy
        if layouts is None:
            layouts = (default_layout(self.world, False),) + ((default_layout(self.world, True),)
                                                              if self.world % 2 == 0 else ())
        bad = [layout.name for layout in layouts if layout.world != self.world]
        if bad:
            raise LayoutError(f"layouts {bad} do not use this gang's {self.world} ranks")
        self.layouts = tuple(dict.fromkeys(layouts))
        timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
        self._groups = {layout: self._form(layout, timeout) for layout in self.layouts}
        self.job: _Job | None = None
        self.call: SpCall | None = None  # the transformer call under way, when it is split over an SP group
        self.decode_ranks = 0  # the ranks the last decode was split over
        self.stats: dict[str, float] = {}
        self.reset_stats()
        self.synced_stop = False  # per job: whether it ended in a stop every rank took at the same step

    def _form(self, layout: Layout, timeout: timedelta | None) -> tuple[list, list]:
        """The CFG groups (one per SP index) and SP groups (one per CFG index) of `layout`; the gang's own
        group where one spans every rank. Every rank forms every group, in the same order."""
        ranks = [dist.get_global_rank(self.group, r) for r in range(self.world)]

        def groups(members: list[list[int]]) -> list:
            if len(members[0]) == 1:
                return [None] * len(members)
            if len(members[0]) == self.world:
                return [self.group]
            return [dist.new_group([ranks[r] for r in m], timeout=timeout) for m in members]

        cfg_groups = groups([[c * layout.sp + s for c in range(layout.cfg)] for s in range(layout.sp)])
        sp_groups = groups([[c * layout.sp + s for s in range(layout.sp)] for c in range(layout.cfg)])
        return cfg_groups, sp_groups

    # -- the transformer -----------------------------------------------------------
    def wrap(self, transformer: torch.nn.Module, attention: str = "sdpa") -> None:
        """Route `transformer`'s forward, token split and attention (kernel `attention`) through this plan.
        Idempotent. Refuses (LayoutError) a layout whose SP degree does not divide the heads."""
        heads = transformer.config.num_attention_heads
        for layout in self.layouts:
            layout.check(heads)
        set_attention(transformer, attention, self if any(layout.sp > 1 for layout in self.layouts) else None)
        if getattr(transformer, "_gang", None) is not None:
            transformer._gang = self
            return
        inner = transformer.forward
        transformer._gang = self

        def shard_tokens(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
            # (B * frames, tokens per frame, C) -> this rank's (B, chunk, C); the transformer's next line,
            # unflatten(0, (B, -1)).flatten(1, 2), leaves that shape as it is
            call = transformer._gang.call
            return None if call is None else call.shard(output.reshape(call.batch, -1, output.shape[-1]))

        def gather_tokens(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
            call = transformer._gang.call  # this rank's (B, chunk, C) -> (B, tokens, C), padding dropped
            return None if call is None else call.gather(output)

        transformer._gang_hooks = [transformer.patch_embed.register_forward_hook(shard_tokens),
                                   transformer.proj_out.register_forward_hook(gather_tokens)]
        gathered = [transformer.proj_out]  # the module the gather hook is on (a list: not a submodule)

        def follow_proj_out() -> None:
            # a LoRA that targets proj_out wraps it (peft) after this wrap: the gather must be on the wrapper's
            # output, base and adapter summed, not inside it on the base layer's (shapes would then differ)
            if transformer.proj_out is not gathered[0]:
                transformer._gang_hooks[1].remove()
                transformer._gang_hooks[1] = transformer.proj_out.register_forward_hook(gather_tokens)
                gathered[0] = transformer.proj_out

        def forward(hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep: torch.Tensor,
                    encoder_attention_mask: torch.Tensor, attention_kwargs: dict | None = None,
                    return_dict: bool = True) -> Any:
            plan = transformer._gang
            job = plan.job
            follow_proj_out()
            if job is None:
                return inner(hidden_states, encoder_hidden_states, timestep, encoder_attention_mask,
                             attention_kwargs=attention_kwargs, return_dict=return_dict)
            batch = [hidden_states, encoder_hidden_states, timestep, encoder_attention_mask]
            split_cfg = job.layout.cfg == 2
            if split_cfg:
                if hidden_states.shape[0] != 2:
                    raise LayoutError(f"layout {job.layout.name} splits a guided batch of 2; this call has "
                                      f"{hidden_states.shape[0]}")
                batch = [t[job.cfg_index:job.cfg_index + 1] for t in batch]
            if job.sp_group is not None:
                _, _, frames, height, width = hidden_states.shape
                p = transformer.config.patch_size
                plan.call = SpCall(plan, job.sp_group, job.layout.sp, job.sp_index, batch[0].shape[0],
                                    frames * (height // p) * (width // p))
            try:
                out = inner(*batch, attention_kwargs=attention_kwargs, return_dict=False)[0]
            finally:
                plan.call = None
            plan.stats["calls"] += 1
            if split_cfg:
                parts = [torch.empty_like(out) for _ in range(2)]
                plan._collective("gather_s", dist.all_gather, parts, out.contiguous(), group=job.cfg_group)
                out = torch.cat(parts)
            if return_dict:
                from diffusers.models.modeling_outputs import Transformer2DModelOutput

                return Transformer2DModelOutput(sample=out)
            return (out,)

        transformer.forward = forward

    @staticmethod
    def unwrap(transformer: torch.nn.Module) -> None:
        """Back to the transformer's own forward and diffusers' attention processor."""
        for hook in transformer.__dict__.pop("_gang_hooks", []):
            hook.remove()
        transformer.__dict__.pop("forward", None)
        transformer.__dict__.pop("_gang", None)
        set_attention(transformer, "sdpa", None)

    # -- one job -------------------------------------------------------------------
    def begin(self, guided: bool, tokens: int, heads: int, layout: Layout | None = None) -> Layout | None:
        """Set up one job of `tokens` visual tokens: `layout`, or the policy's for a guided (or unguided) job.
        Returns the layout, or None when the job runs on rank 0 alone. LayoutError before any work when the
        job cannot run in it, on every rank alike."""
        layout = layout if layout is not None else self.policy(self.world, guided)
        self.job = None
        if layout is None:
            return None
        if layout not in self._groups:
            raise LayoutError(f"layout {layout.name} was not formed for this gang (formed: "
                              f"{', '.join(lay.name for lay in self.layouts)})")
        if layout.cfg == 2 and not guided:
            raise LayoutError(f"layout {layout.name} splits the CFG batch, and this job has no CFG "
                              f"(guidance_scale <= 1)")
        layout.check(heads, tokens)
        cfg_index, sp_index = divmod(self.rank, layout.sp)
        cfg_groups, sp_groups = self._groups[layout]
        self.job = _Job(layout, cfg_index, sp_index, cfg_groups[sp_index], sp_groups[cfg_index])
        return layout

    def end(self) -> None:
        self.job = None

    def synced_step(self, on_step: StepCallback | None) -> StepCallback:
        """A step callback that ends with an all-reduce of a stop flag over the gang: when `on_step` raises on
        any rank, that rank re-raises and the others raise StoppedByPeer, at the same step."""
        self.synced_stop = False

        def step(i: int, total: int) -> None:
            error: BaseException | None = None
            if on_step is not None:
                try:
                    on_step(i, total)
                except Exception as exc:
                    error = exc
            flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=self.device)
            self._collective("sync_s", dist.all_reduce, flag, op=dist.ReduceOp.MAX, group=self.group)
            self.synced_stop = error is not None or bool(flag.item())
            if error is not None:
                raise error
            if self.synced_stop:
                raise StoppedByPeer(f"stopped by another rank at step {i}/{total}")

        return step

    @torch.compiler.disable
    def agree_to_compute(self, residual: torch.Tensor, previous: torch.Tensor | None, threshold: float) -> bool:
        """First Block Cache's decision, the same on every rank: whether the first block's residual changed by
        more than `threshold` (relative mean) since the last full call, over the whole batch and sequence.
        Every rank's sums (padding left out) are gathered, so each decides on identical numbers; with different
        thresholds the smallest wins (a rank never skips where another computes)."""
        if self.call is not None:
            residual = residual[:, :self.call.valid]
            previous = previous[:, :self.call.valid] if previous is not None else None
        mine = torch.zeros(4, dtype=torch.float64, device=self.device)
        mine[3] = threshold
        if previous is None:
            mine[2] = 1
        else:
            mine[0] = (residual.float() - previous.float()).abs().sum()
            mine[1] = previous.float().abs().sum()
        every = [torch.empty_like(mine) for _ in range(self.world)]
        self._collective("sync_s", dist.all_gather, every, mine, group=self.group)
        total = torch.stack(every).cpu()
        if total[:, 2].any() or total[:, 1].sum() == 0:
            return True
        return bool(total[:, 0].sum() / total[:, 1].sum() > total[:, 3].min())

    # -- the decode ----------------------------------------------------------------
    def decode(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor | None:
        """The pipeline's VAE decode of `latents` (the same on every rank), split by latent frames over as
        many ranks as have at least the decoder's causal context each: rank 0 returns the video, (1, 3,
        frames, H, W) in [0, 1]; the others None. See `split_decoder`."""
        from mochi_lab.pipelines.preview import decode_latents

        with split_decoder(pipe.vae, self, latents.shape[2]) as ranks:
            self.decode_ranks = ranks
            if self.rank >= ranks:  # no part in this decode
                return None
            video = decode_latents(pipe, latents)
        return video if self.rank == 0 else None

    # -- collectives -----------------------------------------------------------------
    def _collective(self, stat: str, collective: Callable, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return collective(*args, **kwargs)
        except (RuntimeError, dist.DistError) as exc:  # gloo: "Connection closed by peer", timeouts
            raise PeerLost(f"rank {self.rank}: {collective.__name__} failed: {exc}") from exc
        finally:
            self.stats[stat] += time.perf_counter() - t0

    def _exchange(self, stat: str, ops: list) -> None:
        """Point-to-point sends and receives, all started at once, then waited for."""
        def batch_isend_irecv() -> None:
            for request in dist.batch_isend_irecv(ops):
                request.wait()

        self._collective(stat, batch_isend_irecv)

    def reset_stats(self) -> None:
        self.stats.update(calls=0, gather_s=0.0, sync_s=0.0, a2a_s=0.0, sp_gather_s=0.0, halo_s=0.0,
                          decode_gather_s=0.0)


class CfgParallel(Parallel):
    """Two ranks, the guided batch split over them (`Layout(cfg=2)`); a job without CFG runs on rank 0 alone
    and rank 0 decodes alone. What `gpus_per_worker=2` ran before sequence parallelism; a gang now runs a
    `Parallel` (mochi_lab.pool.gang). The CFG-parallel benchmark and its tests still use this plan."""

    split_decode = False

    def __init__(self, device: torch.device, group: dist.ProcessGroup | None = None):
        if dist.get_world_size(group) != 2:
            raise ValueError(f"CFG parallelism needs a group of 2 ranks, got {dist.get_world_size(group)}")
        super().__init__(device, group, layouts=(Layout(cfg=2),),
                         policy=lambda world, guided: Layout(cfg=2) if guided else None)


# The attention processor and its kernels had their home here (attention.py).
__getattr__ = moved_names(__name__)


def rendezvous_store(rank: int, port: int, timeout_s: float, host: str = "127.0.0.1", world: int = 2) -> dist.TCPStore:
    """The gang's rendezvous store: rank 0 hosts it (port 0: any free port, read back from `.port` and told
    to the others), the other ranks connect to it."""
    return dist.TCPStore(host, port, world_size=world, is_master=rank == 0, timeout=timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def join_pair(store: dist.TCPStore, rank: int, backend: str, timeout_s: float, world: int = 2) -> None:
    """Form the gang's default process group of `world` ranks (blocks until all join); collectives time out
    after `timeout_s`."""
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"
