"""Sequence parallelism's data movement for one transformer call (Ulysses): this rank's shard of the visual
tokens, padded to a multiple of the SP degree; all-to-alls between "my tokens, every head" and "every token, my
heads" around attention; and the all-gathers that put tokens and the text's heads back together. Collectives
run through the plan (`Parallel._collective`): timed, and a failed one is `PeerLost`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

if TYPE_CHECKING:
    from mochi_lab.pipelines.cfg_parallel import Parallel


@dataclass
class SpCall:
    """One transformer call split over an SP group: this rank's slice [index * chunk, (index + 1) * chunk) of
    `tokens` visual tokens padded to `chunk * size`."""

    plan: "Parallel"
    group: Any
    size: int
    index: int
    batch: int
    tokens: int

    @property
    def chunk(self) -> int:
        return -(-self.tokens // self.size)

    @property
    def valid(self) -> int:
        """This rank's tokens that are not padding."""
        return max(0, min(self.chunk, self.tokens - self.index * self.chunk))

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """(B, tokens, C) -> this rank's (B, chunk, C), padding with zeros."""
        x = F.pad(x, (0, 0, 0, self.chunk * self.size - self.tokens))
        return x[:, self.index * self.chunk:(self.index + 1) * self.chunk]

    @torch.compiler.disable  # collectives stay eager inside a compiled block
    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's (B, chunk, C) -> everyone's (B, tokens, C)."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self.plan._collective("sp_gather_s", dist.all_gather, parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)[:, :self.tokens]

    @torch.compiler.disable
    def tokens_to_heads(self, qkv: torch.Tensor) -> torch.Tensor:
        """(3, B, chunk, H, D) -> (3, B, tokens, H/size, D): every rank's tokens for this rank's heads."""
        three, batch, chunk, heads, dim = qkv.shape
        send = qkv.reshape(three, batch, chunk, self.size, heads // self.size, dim).permute(3, 0, 1, 2, 4, 5)
        send = send.contiguous()  # send[r]: this rank's tokens, rank r's heads
        recv = torch.empty_like(send)
        self.plan._collective("a2a_s", dist.all_to_all_single, recv, send, group=self.group)
        # recv[r] holds rank r's tokens: in rank order they are the sequence
        out = recv.permute(1, 2, 0, 3, 4, 5).reshape(three, batch, self.size * chunk, heads // self.size, dim)
        return out[:, :, :self.tokens]

    @torch.compiler.disable
    def heads_to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, tokens, H/size, D) -> (B, chunk, H, D): this rank's tokens, every rank's heads."""
        x = F.pad(x, (0, 0, 0, 0, 0, self.chunk * self.size - self.tokens))
        batch, _, heads, dim = x.shape
        send = x.reshape(batch, self.size, self.chunk, heads, dim).transpose(0, 1).contiguous()
        recv = torch.empty_like(send)
        self.plan._collective("a2a_s", dist.all_to_all_single, recv, send, group=self.group)
        # recv[r] holds rank r's heads of this rank's tokens: in rank order they are the heads
        return recv.permute(1, 2, 0, 3, 4).reshape(batch, self.chunk, self.size * heads, dim)

    @torch.compiler.disable
    def gather_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, H/size, D) text output -> (B, L, H, D)."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self.plan._collective("sp_gather_s", dist.all_gather, parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=2)


__all__ = ["SpCall"]
