"""LoRA adapters for the tests: made with peft on the tiny transformer (random, non-zero: `init_lora_weights=False`),
saved as diffusers saves them; and hostile files made from one (a pickle, a cut file, a header that lies)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# every kind of Linear layer the splits treat apart: per token on a rank's share (to_q, ff.net...), the prompt's
# projections SP computes for its heads only (add_q_proj...), and proj_out, whose output the token gather follows
EVERY_SPLIT = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
               "ff.net.0.proj", "ff.net.2", "proj_out")


def make_adapter(path: Path, *, seed: int = 0, rank: int = 4, targets: tuple[str, ...] = TARGETS,
                 config: dict | None = None) -> Path:
    """A LoRA of the tiny transformer (or of a transformer with `config`) at `path` (.safetensors), its weights
    drawn from `seed` and large enough to change the tiny model's frames."""
    import torch
    from diffusers import MochiPipeline, MochiTransformer3DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from mochi_lab.pipelines.tiny import TINY_TRANSFORMER

    torch.manual_seed(0)
    transformer = MochiTransformer3DModel(**(config or TINY_TRANSFORMER))
    torch.manual_seed(seed)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets),
                                       init_lora_weights=False))
    state = get_peft_model_state_dict(transformer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    MochiPipeline.save_lora_weights(path.parent, transformer_lora_layers=state, weight_name=path.name)
    return path


def split(data: bytes) -> tuple[dict, bytes]:
    """A safetensors file's header (as JSON) and its data."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header: dict, body: bytes) -> bytes:
    """A safetensors file of `header` and `body`, whether or not the header tells the truth."""
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def lie(adapter: bytes, **entry) -> bytes:
    """The adapter with its first tensor's header entry changed as `entry` says (the data unchanged)."""
    header, body = split(adapter)
    first = next(k for k in header if k != "__metadata__")
    header[first] = {**header[first], **entry}
    return join(header, body)


def with_rank(adapter: bytes, rank: int) -> bytes:
    """A LoRA of the same modules with another rank (zeros: a check reads no value)."""
    header, _ = split(adapter)
    out, at = {}, 0
    for key, e in header.items():
        if key == "__metadata__":
            out[key] = e
            continue
        shape = [rank, e["shape"][1]] if ".lora_A." in key else [e["shape"][0], rank]
        n = shape[0] * shape[1] * 4
        out[key] = {"dtype": "F32", "shape": shape, "data_offsets": [at, at + n]}
        at += n
    return join(out, bytes(at))


def renamed(adapter: bytes, old: str, new: str) -> bytes:
    """The adapter with `old` replaced by `new` in every key."""
    header, body = split(adapter)
    return join({k.replace(old, new): v for k, v in header.items()}, body)
