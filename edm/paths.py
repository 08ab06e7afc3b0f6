"""Creating the directories edm writes to (pidfile, logs, spool)."""

from __future__ import annotations

import os
from pathlib import Path


def make_dirs(path: Path, mode: int = 0o750, owner: tuple[int, int] | None = None) -> None:
    """Create the missing directories of ``path``, every level with ``mode`` (os.makedirs
    applies it to the last only) and, when ``owner`` (uid, gid) is given, owned by it."""
    missing = []
    current = path
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=mode)
        except FileExistsError:
            continue
        if owner is not None:
            os.chown(directory, *owner)
