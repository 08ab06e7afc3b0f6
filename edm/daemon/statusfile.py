"""Files the main process writes beside the pidfile for the CLI to read.

* the report (``edm.pid`` → ``edm.status.json``): the daemon's own account of itself,
  rewritten atomically every second for `edm status`. The CLI never guesses: what it shows
  beyond the pidfile's lock comes from here.
* the stop record (``edm.stopped.json``): written as the daemon stops when it had to SIGKILL
  a worker that did not stop in time, so that `edm stop` can say so without reading the log.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def report_path(pidfile: Path) -> Path:
    return pidfile.with_name(pidfile.stem + ".status.json")


def stop_record_path(pidfile: Path) -> Path:
    return pidfile.with_name(pidfile.stem + ".stopped.json")


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write to a temporary file and rename it over the old one, so readers never see half."""
    _write_json(path, report)


def read_report(path: Path) -> dict[str, Any] | None:
    data = _read_json(path)
    return data if isinstance(data, dict) else None


def remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


@dataclass(frozen=True)
class Killed:
    """A worker the main process had to SIGKILL on its way out."""

    worker: str
    pid: int
    timeout: float
    hung: tuple[str, ...] = ()  # its handler threads still busy, e.g. "edm-handler-3 (handling for 31 s)"

    @property
    def message(self) -> str:
        within = f"{self.timeout:g} s"
        text = f"The {self.worker} worker (pid {self.pid}) did not stop within {within}"
        if self.hung:
            text += "; still in a handler: " + ", ".join(self.hung)
        return text + "; sending SIGKILL."


def hung_threads(handling: Any, now: float) -> tuple[str, ...]:
    """``edm-handler-3 (handling for 31 s)`` for each [thread, wall time begun] a worker reported."""
    found = []
    for item in handling if isinstance(handling, list) else []:
        try:
            name, began = str(item[0]), float(item[1])
        except (IndexError, TypeError, ValueError):
            continue
        found.append(f"{name} (handling for {max(now - began, 0):.0f} s)")
    return tuple(found)


@dataclass(frozen=True)
class StopRecord:
    pid: int  # the main process that stopped
    killed: tuple[Killed, ...]


def write_stop_record(path: Path, record: StopRecord) -> None:
    killed = [
        {"worker": k.worker, "pid": k.pid, "timeout": k.timeout, "hung": list(k.hung)} for k in record.killed
    ]
    _write_json(path, {"pid": record.pid, "killed": killed})


def read_stop_record(path: Path) -> StopRecord | None:
    """The record, or None when there is none or it cannot be read whole."""
    data = _read_json(path)
    if not isinstance(data, dict):
        return None
    try:
        killed = tuple(
            Killed(str(k["worker"]), int(k["pid"]), float(k["timeout"]), tuple(map(str, k.get("hung", ()))))
            for k in data["killed"]
        )
        return StopRecord(int(data["pid"]), killed)
    except (KeyError, TypeError, ValueError):
        return None


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    encoded = json.dumps(data, sort_keys=True, default=str).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, encoded)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
