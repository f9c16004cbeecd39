"""What the tests share about jobs: the smallest job, and reading a preview strip. A test that acts while a
job runs holds it at a gate (tests/support/gate.py), so no job needs to be long."""

from __future__ import annotations

from PIL import Image

# The smallest valid video: 7 frames (6k+1), 32x32 (multiples of 16), 2 steps.
TINY = {"num_frames": 7, "height": 32, "width": 32, "num_inference_steps": 2, "fps": 8}


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
