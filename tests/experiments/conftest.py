"""Experiment-layer fixtures: a store on each backend (SQLite file, Redis under a unique prefix)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mochi_lab.store import Store, open_store


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """One backend's url; Redis keys live under a fresh prefix, deleted afterwards (the shared Redis:
    skipped, naming its install line, where none answers)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.sqlite3'}"
        return
    url = f"{request.getfixturevalue('redis_url')}?prefix=mochi-exp-test-{uuid.uuid4().hex[:12]}"
    yield url
    cleanup = open_store(url)
    cleanup.drop_all()  # type: ignore[attr-defined]
    cleanup.close()


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = open_store(store_url)
    yield s
    s.close()


@pytest.fixture(scope="session")
def sample_mp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 7-frame H.264 file, for views that copy or play videos without running a model."""
    from mochi_lab.video import write_mp4

    frames = np.random.default_rng(0).integers(0, 255, size=(7, 32, 32, 3), dtype=np.uint8)
    return write_mp4(frames, tmp_path_factory.mktemp("mp4") / "sample.mp4", fps=8)
