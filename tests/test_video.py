"""MP4 writing: decoded back, the file has the frames, size and fps asked for; the same frames, the same file."""

import av
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


def test_the_same_frames_give_the_same_file_every_time(tmp_path):
    """A seed's video is the same MP4 every time (README: `job.reproduce()`). With x264's MB-tree rate control,
    small videos came out different once other work had run in the process: here a multi-threaded decode
    runs between encodes (without the fix the third or so encode differed)."""
    ramp = np.linspace(0, 180, 32 * 32 * 3).reshape(32, 32, 3)
    frames = (np.random.default_rng(0).integers(0, 64, size=(7, 32, 32, 3)) + ramp).astype(np.uint8)
    first = write_mp4(frames, tmp_path / "first.mp4", fps=8).read_bytes()
    for i in range(60):
        again = write_mp4(frames, tmp_path / f"{i}.mp4", fps=8)
        with av.open(str(again)) as video:
            video.streams.video[0].thread_type = "AUTO"
            for frame in video.decode(video=0):
                frame.to_ndarray(format="rgb24")
        assert again.read_bytes() == first, f"encode {i + 2} differs from the first"
