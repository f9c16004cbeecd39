"""What the tests share about jobs: their sizes, and reading a preview strip.

TINY is the smallest job. SECONDS is for tests that must act while a job runs (cancel it, read its
preview, see it busy): the tiny model takes about 5 ms a step at 32x32 on the 2-core VM, and less on
faster machines, so many small steps can end before a test acts. LONG is for faults and scaling that
land mid-denoise.
"""

from __future__ import annotations

from PIL import Image

# The smallest valid video: 7 frames (6k+1), 32x32 (multiples of 16), 2 steps.
TINY = {"num_frames": 7, "height": 32, "width": 32, "num_inference_steps": 2, "fps": 8}
# 16 latent frames x 200 steps: ~1.9 s of denoising and ~2.3 s of decoding on the 2-core VM
SECONDS = {"num_frames": 91, "height": 64, "width": 96, "num_inference_steps": 200, "fps": 8}
# 6 latent frames of 16x28 x 200 steps: ~3.4 s of denoising and ~4.5 s of decoding there
LONG = {"num_frames": 31, "height": 128, "width": 224, "num_inference_steps": 200}


def strip_pictures(strip: Image.Image, fps: float = 4.0) -> int:
    """How many pictures an animated WebP preview made at `fps` (encode_strip's default, the worker's) shows.
    libwebp stores identical neighbours (the tiny model's near-flat previews have them) as one longer
    frame, so this counts time, not frames."""
    total_ms = 0
    for i in range(strip.n_frames):
        strip.seek(i)
        strip.load()
        total_ms += strip.info["duration"]
    return round(total_ms / int(1000 / fps))
