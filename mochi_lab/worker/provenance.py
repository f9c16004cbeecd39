"""Which checkpoint made a video: a revision id recorded in every job's meta.

Nothing here imports torch; it reads files and the Hugging Face cache only.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

# Files up to this size are hashed by content; bigger ones (multi-GB weights) by name and size,
# because hashing tens of GB at every worker start would cost minutes.
_CONTENT_HASH_MAX = 64 * 2**20


@functools.lru_cache(maxsize=16)
def model_revision(source: str) -> str | None:
    """The hub commit of a cached snapshot, or `sha256:<16 hex>` of a local checkpoint folder.

    None when the revision cannot be told (a hub id with no local snapshot).
    """
    path = Path(source)
    if path.is_dir():
        if path.parent.name == "snapshots":  # a hub snapshot loaded by path: its folder is the commit
            return path.name
        return _folder_digest(path)
    return _hub_commit(source)


def _folder_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        size = file.stat().st_size
        if size <= _CONTENT_HASH_MAX:
            digest.update(file.read_bytes())
        else:
            digest.update(str(size).encode())
    return "sha256:" + digest.hexdigest()[:16]


def _hub_commit(repo_id: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - diffusers depends on huggingface_hub
        return None
    try:
        hit = try_to_load_from_cache(repo_id, "model_index.json")
    except Exception:  # a malformed id must not fail the job it describes
        return None
    # .../models--org--name/snapshots/<commit>/model_index.json
    return Path(hit).parent.name if isinstance(hit, str) else None


__all__ = ["model_revision"]
