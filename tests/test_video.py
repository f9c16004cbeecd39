"""MP4 writing: decoded back, the file has the frames, size and fps asked for."""

import numpy as np
from PIL import Image

from mochi_lab.video import probe, read_frames, write_mp4, write_thumbnail


def test_mp4_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    # smooth content, so H.264 keeps it close
    base = rng.integers(0, 255, size=(1, 4, 6, 3)).astype(np.float32)
    frames = np.repeat(np.repeat(base, 8, axis=1), 8, axis=2)
    frames = np.concatenate([frames + i * 3 for i in range(13)]).clip(0, 255).astype(np.uint8)
    path = write_mp4(frames, tmp_path / "v.mp4", fps=12)
    info = probe(path)
    assert (info.frames, info.height, info.width, info.fps, info.codec) == (13, 32, 48, 12.0, "h264")
    decoded = read_frames(path)
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames).mean() < 6
    assert not list(tmp_path.glob(".*.tmp"))
    head = path.read_bytes()
    assert head.index(b"moov") < head.index(b"mdat")  # faststart: a browser plays while it loads


def test_thumbnail_is_middle_frame(tmp_path):
    frames = np.zeros((7, 16, 16, 3), np.uint8)
    frames[3] = 200
    thumb = Image.open(write_thumbnail(frames, tmp_path / "t.png"))
    assert thumb.size == (16, 16)
    assert np.asarray(thumb).min() == 200
