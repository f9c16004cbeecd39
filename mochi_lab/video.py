"""Frames -> H.264 MP4 (PyAV) plus a PNG thumbnail of the middle frame; decoding through imageio's v3 API.

x264's defaults (CRF 23, preset medium): measured on a 19-frame 848x480 clip they give the same PSNR as
the CRF 18 "veryfast" this module used before (32.55 vs 32.66 dB) in a sixth of the bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import av
import imageio.v3 as iio
import numpy as np
from PIL import Image


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    width: int
    height: int
    fps: float
    codec: str


def write_mp4(frames: np.ndarray, path: str | os.PathLike, fps: int) -> Path:
    """Encode (T, H, W, 3) uint8 frames as H.264 yuv420p, atomically (a retried job writes one file)."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # PyAV itself, not imageio's writer: that one runs gc.collect() twice on close, which in a worker
    # holding a diffusers pipeline took 0.5 s of a tiny job's 0.6 s. faststart puts the index first
    # so browsers can play while loading.
    with av.open(str(tmp), "w", format="mp4", options={"movflags": "+faststart"}) as out:
        # x264's MB-tree rate control let the same frames encode differently within one process once other
        # work had run in between (a threaded decode; seen on small videos, tests/test_video.py): without
        # it a seed gives the same MP4 every time, for MB-tree's bit savings.
        stream = out.add_stream("libx264", rate=int(fps), options={"x264-params": "no-mbtree=1"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())  # flush the encoder's delayed frames
    os.replace(tmp, path)
    return path


def write_thumbnail(frames: np.ndarray, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(frames[len(frames) // 2]).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def read_frames(path: str | os.PathLike) -> np.ndarray:
    """Decode every frame as (T, H, W, 3) uint8."""
    return iio.imread(path, plugin="pyav", index=None)


def probe(path: str | os.PathLike) -> VideoInfo:
    """Facts about an MP4, by decoding it (frame count from decoded frames, not the header)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        n = sum(1 for _ in container.decode(video=0))
        return VideoInfo(
            frames=n,
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            fps=float(stream.average_rate or stream.guessed_rate),
            codec=stream.codec_context.name,
        )
