"""The fee spool: an append-only file of canonical fee lines, the durable buffer used while
the database is unreachable.

A request is answered TRUE only after its line is written and fsynced. Lines are replayed
into the table in file order; the file is removed once every line is committed. Replaying a
line twice (after a crash between commit and removal) is harmless: the table ignores a
ticket it already holds. A Spool is not thread-safe: the fee Sink makes its writers take
turns.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from edm.logs import escape_body
from edm.paths import make_dirs
from edm.plugins.fee.parse import Fee, MalformedRequest, parse_request

log = logging.getLogger(__name__)

_READ_CHUNK = 1 << 16
_MOVE_CHUNK = 1 << 20


class Spool:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._size = 0  # bytes in the file
        self._offset = 0  # bytes already replayed into the table
        self.records = 0  # lines not yet replayed

    @property
    def pending(self) -> bool:
        return self._size > self._offset

    def recover(self) -> int:
        """Adopt a spool left by an earlier run; cut a torn last line (it was never answered)."""
        self.close()
        self._offset = self._size = self.records = 0
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return 0
        end = data.rfind(b"\n") + 1
        if end < len(data):
            log.warning(
                "The fee spool %s ends with an incomplete line (%d bytes) that was never acknowledged; "
                "cutting it.",
                self.path,
                len(data) - end,
            )
            os.truncate(self.path, end)
        self._size = end
        self.records = data.count(b"\n", 0, end)
        return self.records

    def append(self, fees: Sequence[Fee]) -> None:
        """Write the fees' lines and fsync; raises OSError when the spool cannot be written."""
        self._write("".join(f"{fee.line()}\n" for fee in fees).encode(), len(fees))

    def take_over(self, old: Spool) -> int:
        """Move what ``old`` holds unreplayed to the end of this spool, then remove ``old``'s
        file; the number of fees moved. Used when a reload changes ``plugins.fee.spool``.

        Moving, rather than replaying into the table first, works while the database is down,
        which is when a spool holds anything. The lines are copied as they are and fsynced
        before the old file goes: a crash in between leaves them in both files, and a fee
        replayed twice is harmless. On OSError this spool is cut back to what it held and
        ``old`` is untouched."""
        self.recover()  # what the new path may already hold stays first
        if old.path.exists() and self.path.exists() and os.path.samefile(old.path, self.path):
            return 0  # the same file under another name: nothing to move
        if not old.pending:
            if old.path.exists():
                old._remove()  # an empty leftover
            return 0
        size, records = self._size, self.records
        moved = 0
        try:
            with open(old.path, "rb") as source:
                source.seek(old._offset)
                left = old._size - old._offset
                while left > 0:
                    chunk = source.read(min(_MOVE_CHUNK, left))
                    if not chunk:
                        raise OSError(f"{old.path} is shorter than it was")
                    self._write(chunk, chunk.count(b"\n"))
                    moved += chunk.count(b"\n")
                    left -= len(chunk)
        except OSError:
            self.close()
            if self.path.exists():
                os.truncate(self.path, size)
            self._size, self.records = size, records
            raise
        old._remove()
        return moved

    def _write(self, data: bytes, records: int) -> None:
        fd = self._open()
        view = memoryview(data)
        written = 0
        try:
            while written < len(data):
                written += os.write(fd, view[written:])
            os.fsync(fd)
        except OSError:
            # Leave no half-written line behind: the next append would glue onto it.
            self.close()
            os.truncate(self.path, self._size)
            raise
        self._size += len(data)
        self.records += records

    def read(self, limit: int) -> tuple[list[Fee], int]:
        """Up to ``limit`` fees after the replayed part, and the offset just past them."""
        fees: list[Fee] = []
        offset = self._offset
        with open(self.path, "rb") as f:
            f.seek(offset)
            while len(fees) < limit and offset < self._size:
                line = f.readline(min(_READ_CHUNK, self._size - offset))
                if not line.endswith(b"\n"):
                    break
                offset += len(line)
                try:
                    fees.append(parse_request(line[:-1]))
                except MalformedRequest as exc:
                    log.error(
                        "Skipping an unreadable line in the fee spool %s (%s): %s",
                        self.path,
                        exc.reason,
                        escape_body(line),
                    )
                    self.records -= 1
        return fees, offset

    def replayed(self, offset: int, count: int) -> None:
        """Mark everything before ``offset`` as committed; remove the file when all is."""
        self._offset = offset
        self.records -= count
        if self._offset >= self._size:
            self._remove()

    def _remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)
        _fsync_dir(self.path.parent)
        self._offset = self._size = self.records = 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self) -> int:
        if self._fd is None:
            make_dirs(self.path.parent)
            created = not self.path.exists()
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
            self._fd = os.open(self.path, flags, 0o600)
            if created:
                os.fchmod(self._fd, 0o600)
                _fsync_dir(self.path.parent)
        return self._fd


def _fsync_dir(path: Path) -> None:
    """Make a file's creation or removal durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
