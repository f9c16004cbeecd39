"""A tiny, randomly initialised Mochi, built offline in code and saved like a real checkpoint.

It has the real architecture (MochiTransformer3DModel, AutoencoderKLMochi, T5 encoder, T5 tokenizer,
flow-matching scheduler) at toy width, so every code path of the real model runs on a CPU in seconds.
"""

from __future__ import annotations

import os
import shutil
import string
import tempfile
from pathlib import Path

TINY_VERSION = "v3"  # bump when the architecture below changes, so caches rebuild
TINY_SEED = 0
# genmo/mochi-1-preview's scheduler: diffusers' Mochi conversion script builds
# FlowMatchEulerDiscreteScheduler(invert_sigmas=True), so every other field is the class default.
# invert_sigmas is the branch diffusers marks "only required in Mochi": the tiny model must take it too.
MOCHI_1_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "invert_sigmas": True,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "time_shift_type": "exponential",
    "stochastic_sampling": False,
}
# The tiny transformer's config (what mochi_lab.adapters checks an adapter's shapes against, without torch)
TINY_TRANSFORMER = {
    "patch_size": 2,
    "num_attention_heads": 4,  # 4 heads of 4 (width 16): sequence parallelism of 2 and 4 divides them
    "attention_head_dim": 4,
    "num_layers": 2,
    "pooled_projection_dim": 16,
    "in_channels": 12,
    "qk_norm": "rms_norm",
    "text_embed_dim": 32,
    "time_embed_dim": 4,
    "activation_fn": "swiglu",
    "max_sequence_length": 256,
}
_COMMON_WORDS = (
    "a an the of and in on at with to from by over under into is are cat dog bird fish horse car boat "
    "wave sea ocean beach sky cloud sun moon star night day city street forest tree mountain river snow "
    "rain fire light red blue green yellow white black orange purple pink slow motion close up wide shot "
    "camera video cinematic realistic 4k hd style painting robot astronaut surfing running flying walking "
    "dancing swimming playing sitting man woman child people portrait landscape"
).split()


def _tokenizer():
    from transformers import T5Tokenizer

    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -6.0) for c in chars] + [("\u2581" + c, -5.0) for c in chars]
    pieces += [("\u2581" + w, -3.0) for w in _COMMON_WORDS]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def build_tiny_mochi(path: str | os.PathLike) -> Path:
    """Build the tiny Mochi with a fixed seed and `save_pretrained` it into `path`."""
    import torch
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = _tokenizer()
    torch.manual_seed(TINY_SEED)
    transformer = MochiTransformer3DModel(**TINY_TRANSFORMER)
    torch.manual_seed(TINY_SEED)
    vae = AutoencoderKLMochi(
        latent_channels=12,
        out_channels=3,
        encoder_block_out_channels=(32, 32, 32, 32),
        decoder_block_out_channels=(32, 32, 32, 32),
        layers_per_block=(1, 1, 1, 1, 1),
    )
    torch.manual_seed(TINY_SEED)
    text_encoder = T5EncoderModel(
        T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                 feed_forward_proj="gated-gelu", decoder_start_token_id=0)
    )
    pipe = MochiPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**MOCHI_1_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    path = Path(path)
    pipe.save_pretrained(path)
    return path


def tiny_checkpoint_dir(cache_dir: str | os.PathLike) -> Path:
    return Path(cache_dir) / f"tiny-mochi-{TINY_VERSION}"


def ensure_tiny_mochi(cache_dir: str | os.PathLike) -> Path:
    """The saved tiny checkpoint under `cache_dir`, built once (atomically, safe across processes)."""
    target = tiny_checkpoint_dir(cache_dir)
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-mochi-", dir=target.parent))
    try:
        build_tiny_mochi(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; its copy is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
