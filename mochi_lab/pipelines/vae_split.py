"""The VAE decode split by latent frames over a gang's ranks (`split_decoder`): exact, because every causal
convolution takes its missing past frames from the previous rank and the decoder's other layers work frame
by frame.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

if TYPE_CHECKING:
    from mochi_lab.pipelines.cfg_parallel import Parallel


@contextlib.contextmanager
def split_decoder(vae: Any, plan: Parallel, latent_frames: int) -> Iterator[int]:
    """Within it, each call of `vae.decoder` (one per spatial tile with tiling) is split by latent frames
    over the first `ranks` ranks of `plan` (yielded): rank k decodes its contiguous frames, every causal
    convolution taking its missing past frames (the kernel's time context) from rank k - 1 instead of
    replicating its first frame, and rank 0 gathers the outputs. The decoder's other layers work frame by
    frame (its group norms normalise each frame), so the split is exact. Ranks from `ranks` up take no part."""
    from diffusers.models.autoencoders.autoencoder_kl_cogvideox import CogVideoXCausalConv3d

    convs = [m for m in vae.decoder.modules() if isinstance(m, CogVideoXCausalConv3d)]
    context = max((m.time_kernel_size - 1 for m in convs), default=1)
    if any(m.pad_mode != "replicate" for m in convs):
        raise ValueError("the split decode needs the VAE's one-shot decode (replicate padding), not framewise decoding")
    ranks = max(1, min(plan.world, latent_frames // max(context, 1)))
    if ranks == 1 or plan.rank >= ranks:
        yield ranks
        return
    me = plan.rank
    base, extra = divmod(latent_frames, ranks)
    sizes = [base + (r < extra) for r in range(ranks)]
    start = sum(sizes[:me])
    group_device = plan.device

    def peer(r: int) -> int:
        return dist.get_global_rank(plan.group, r)

    def halo_conv(conv: Any) -> Callable:
        def forward(inputs: torch.Tensor, conv_cache: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
            pad = conv.time_kernel_size - 1
            ops, halo = [], None
            if me + 1 < ranks and pad:  # this rank's last frames are the next rank's missing past
                ops.append(dist.P2POp(dist.isend, inputs[:, :, -pad:].contiguous().to(group_device), peer(me + 1)))
            if me > 0 and pad:
                halo = torch.empty((*inputs.shape[:2], pad, *inputs.shape[3:]), dtype=inputs.dtype, device=group_device)
                ops.append(dist.P2POp(dist.irecv, halo, peer(me - 1)))
            if ops:
                plan._exchange("halo_s", ops)
            if halo is not None:
                x = torch.cat([halo.to(inputs.device), inputs], dim=2)
                x = F.pad(x, (conv.width_pad, conv.width_pad, conv.height_pad, conv.height_pad, 0, 0), mode="replicate")
            else:
                x = F.pad(inputs, conv.time_causal_padding, mode="replicate")
            return conv.conv(x), None

        return forward

    decoder = vae.decoder
    inner = decoder.forward

    def split_forward(hidden_states: torch.Tensor, conv_cache: dict | None = None) -> tuple[torch.Tensor, dict]:
        out, _ = inner(hidden_states[:, :, start:start + sizes[me]])
        per_frame = out.shape[2] // sizes[me]  # the decoder's temporal expansion
        if me == 0:
            parts = [torch.empty((*out.shape[:2], sizes[r] * per_frame, *out.shape[3:]), dtype=out.dtype,
                                 device=group_device) for r in range(1, ranks)]
            plan._exchange("decode_gather_s", [dist.P2POp(dist.irecv, part, peer(r))
                                               for r, part in enumerate(parts, start=1)])
            return torch.cat([out, *(part.to(out.device) for part in parts)], dim=2), {}
        plan._exchange("decode_gather_s", [dist.P2POp(dist.isend, out.contiguous().to(group_device), peer(0))])
        # the tiles' blending on this rank needs the full shape; its result is dropped
        return torch.empty((*out.shape[:2], latent_frames * per_frame, *out.shape[3:]), dtype=out.dtype,
                           device=out.device), {}

    for conv in convs:
        conv.forward = halo_conv(conv)
    decoder.forward = split_forward
    try:
        yield ranks
    finally:
        for conv in convs:
            conv.__dict__.pop("forward", None)
        decoder.__dict__.pop("forward", None)


__all__ = ["split_decoder"]
