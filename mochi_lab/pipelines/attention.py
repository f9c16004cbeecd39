"""The transformer's attention processor for one process or a gang (`GangAttention`), with the kernel
`PipelineConfig.attention` names: Mochi's joint attention over the visual tokens and the prompt's valid tokens.
Under sequence parallelism q, k and v go from "my tokens, every head" to "every token, my heads" and back
(`ulysses.SpCall`); a rank projects only its own heads' text q, k and v.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from mochi_lab.pipelines.cfg_parallel import Parallel

# q, k, v (batch, heads, tokens, head_dim) -> output of the same shape
AttentionKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def attention_kernel(name: str) -> AttentionKernel:
    """The kernel `PipelineConfig.attention` names, imported now (a missing library fails the load)."""
    from mochi_lab.pipelines.config import attention_module

    module = attention_module(name)
    if module is None:
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    if name == "sage":
        from sageattention import sageattn

        return lambda q, k, v: sageattn(q, k, v, tensor_layout="HND", is_causal=False)
    if module == "flash_attn_interface":
        from flash_attn_interface import flash_attn_func
    else:
        from flash_attn import flash_attn_func

    def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # it takes (B, S, H, D)
        out = out[0] if isinstance(out, tuple) else out  # some FA3 builds also return the softmax LSE
        return out.transpose(1, 2)

    return flash


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (even, odd) channel pair of `x` (B, S, H, D) by the angles of `cos`/`sin` (S, H, D/2), in
    float32, as Mochi's RoPE is defined."""
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2).to(x.dtype)


def _head_rows(linear: torch.nn.Linear, x: torch.Tensor, heads: slice, head_dim: int) -> torch.Tensor:
    """`linear(x)` for a slice of heads only: the rows of the weight (and bias) that make them."""
    rows = slice(heads.start * head_dim, heads.stop * head_dim)
    if hasattr(linear, "base_layer"):  # a LoRA wraps it (peft): its weight alone would leave the adapters out
        return linear(x)[..., rows].unflatten(-1, (-1, head_dim))
    bias = None if linear.bias is None else linear.bias[rows]
    return F.linear(x, linear.weight[rows], bias).unflatten(-1, (-1, head_dim))


class GangAttention:
    """Mochi's joint attention (visual tokens + the prompt's valid tokens) with a chosen kernel, split over the
    SP group when the plan runs one for this call; otherwise the same attention in one process."""

    def __init__(self, kernel: AttentionKernel, plan: "Parallel | None" = None):
        self.kernel, self.plan = kernel, plan

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor, image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        call = self.plan.call if self.plan is not None else None
        heads_all = attn.heads
        size, index = (call.size, call.index) if call is not None else (1, 0)
        local = heads_all // size
        mine = slice(index * local, (index + 1) * local)
        head_dim = attn.to_q.out_features // heads_all
        qkv = torch.stack([attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)])
        qkv = qkv.unflatten(-1, (heads_all, head_dim))  # (3, B, my tokens, H, D)
        if call is not None:
            qkv = call.tokens_to_heads(qkv)  # (3, B, all tokens, my heads, D)
        query, key, value = qkv.unbind(0)
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            cos, sin = (t[:, mine] for t in image_rotary_emb)
            query, key = _rope(query, cos, sin), _rope(key, cos, sin)
        text_q = attn.norm_added_q(_head_rows(attn.add_q_proj, encoder_hidden_states, mine, head_dim))
        text_k = attn.norm_added_k(_head_rows(attn.add_k_proj, encoder_hidden_states, mine, head_dim))
        text_v = _head_rows(attn.add_v_proj, encoder_hidden_states, mine, head_dim)

        tokens, text_len = query.shape[1], text_q.shape[1]
        visual_out, text_out = [], []
        for i in range(query.shape[0]):  # each sample attends to its own prompt's valid tokens only
            valid = torch.nonzero(attention_mask[i].flatten(), as_tuple=False).flatten()
            q = torch.cat([query[i:i + 1], text_q[i:i + 1, valid]], dim=1).transpose(1, 2)
            k = torch.cat([key[i:i + 1], text_k[i:i + 1, valid]], dim=1).transpose(1, 2)
            v = torch.cat([value[i:i + 1], text_v[i:i + 1, valid]], dim=1).transpose(1, 2)
            out = self.kernel(q, k, v).transpose(1, 2)  # (1, tokens + valid, my heads, D)
            visual_out.append(out[:, :tokens])
            # the valid tokens' outputs first, zeros after: the layout diffusers' Mochi processor gives
            text_out.append(F.pad(out[:, tokens:], (0, 0, 0, 0, 0, text_len - out.shape[1] + tokens)))
        visual, text = torch.cat(visual_out), torch.cat(text_out)
        if call is not None:
            visual = call.heads_to_tokens(visual)
        visual = attn.to_out[1](attn.to_out[0](visual.flatten(2)))
        if not hasattr(attn, "to_add_out"):  # the last block: its text output is never used, so not gathered
            return visual, text.flatten(2)
        if call is not None:
            text = call.gather_heads(text)
        return visual, attn.to_add_out(text.flatten(2))


def set_attention(transformer: torch.nn.Module, attention: str, plan: Parallel | None) -> None:
    """Every block's attention processor: diffusers' own for plain SDPA in one process, else `GangAttention`
    with kernel `attention`, split over `plan`'s SP groups. (diffusers' MochiTransformer3DModel has no
    `set_attn_processor`: each block's `attn1.processor` is set, which is what that method would do.)"""
    from diffusers.models.attention_processor import MochiAttnProcessor2_0

    kernel = attention_kernel(attention) if attention != "sdpa" or plan is not None else None
    for block in transformer.transformer_blocks:
        block.attn1.processor = MochiAttnProcessor2_0() if kernel is None else GangAttention(kernel, plan)


__all__ = ["AttentionKernel", "GangAttention", "attention_kernel", "set_attention"]
