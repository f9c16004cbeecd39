"""Job sizes the tests share.

TINY is the smallest job. SECONDS is for tests that must act while a job runs (cancel it, read its
preview, see it busy): the tiny model takes about 5 ms a step at 32x32 on the 2-core VM, and less on
faster machines, so many small steps can end before a test acts.
"""

TINY = {"num_frames": 7, "height": 32, "width": 32, "num_inference_steps": 2, "fps": 8}
# 16 latent frames x 200 steps: ~1.9 s of denoising and ~2.3 s of decoding on the 2-core VM
SECONDS = {"num_frames": 91, "height": 64, "width": 96, "num_inference_steps": 200, "fps": 8}
