"""The status file: the daemon's own account of itself, rewritten atomically for `edm status`.

It lives beside the pidfile (``edm.pid`` → ``edm.status.json``). The CLI never guesses:
what it shows beyond the pidfile's lock comes from here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def status_path(pidfile: Path) -> Path:
    return pidfile.with_name(pidfile.stem + ".status.json")


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Write to a temporary file and rename it over the old one, so readers never see half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = json.dumps(state, sort_keys=True, default=str).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_state(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def remove_state(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
