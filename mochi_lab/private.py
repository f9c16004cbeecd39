"""The data dir holds one user's prompts (the store) and videos: nothing mochi_lab creates there is readable
by another local user. Folders it creates are 0700 and files 0600; a folder or file that already exists
keeps the mode its owner gave it (a data dir the user made and shares on purpose stays shared).

Processes that belong to mochi_lab alone (the local runtime's daemon, with its Ray, and each pool worker)
run under `PRIVATE_UMASK`; a user's own process (a notebook kernel, the CLI) keeps its umask, and what it
creates in the data dir goes through these functions instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

PRIVATE_UMASK = 0o077


def private_dir(path: Path) -> Path:
    """`path` as a folder, created 0700 if missing (missing parents get the usual mode)."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def create_private(path: Path) -> None:
    """Create `path` empty and 0600 if it does not exist yet; an existing file is left as it is. SQLite
    then creates the database's -wal and -shm files with the database file's mode."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


def open_private(path: Path, mode: str = "a") -> IO:
    """`open(path, mode)` for appending ("a" or "ab"), creating the file 0600."""
    if mode not in ("a", "ab"):
        raise ValueError(f"mode must be 'a' or 'ab', got {mode!r}")
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), mode)


__all__ = ["PRIVATE_UMASK", "create_private", "open_private", "private_dir"]
