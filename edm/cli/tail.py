"""``edm tail``: print the end of today's log file and, with ``-f``, follow it.

Following survives what happens to daily log files: the change of day (the next day's file
is opened once it exists), logrotate moving or truncating the file, and a file deleted and
created again. A file is recognised by its inode, so a new file under the same name is
noticed; the old one is read to its end before the switch, so no line is skipped.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from edm.config import Config
from edm.logs import DailyLog

BLOCK = 64 * 1024


def run_tail(
    config: Config,
    lines: int = 10,
    follow: bool = False,
    *,
    clock: Callable[[], float] = time.time,
    out: TextIO = sys.stdout,
    poll: float = 0.2,
    stop: threading.Event | None = None,
) -> int:
    """Print the last ``lines`` lines of today's log; follow it when asked. Always returns 0."""
    daily = DailyLog(config.log.dir, config.log.name, clock=clock)
    tail = _Tail(daily, out)
    try:
        tail.start(max(0, lines), follow)
        if follow:
            tail.follow(stop if stop is not None else threading.Event(), poll)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        # The reader went away (``edm tail | head``): not an error. Point stdout at
        # /dev/null so the interpreter's final flush does not complain either.
        if out is sys.stdout:
            devnull = os.open(os.devnull, os.O_WRONLY)
            with contextlib.suppress(OSError):
                os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
    finally:
        tail.close()
    return 0


def last_lines(fd: int, size: int, count: int) -> tuple[list[bytes], bytes]:
    """The last ``count`` complete lines before ``size`` and the unterminated rest after them.

    Reads backwards block by block, so the cost does not depend on the file's length.
    """
    chunks: list[bytes] = []
    newlines = 0
    pos = size
    # One newline more than lines wanted proves the first wanted line starts after it.
    while pos > 0 and newlines <= count:
        step = min(BLOCK, pos)
        pos -= step
        chunk = os.pread(fd, step, pos)
        if len(chunk) < step:  # the file shrank under us: start again from what it is now
            return last_lines(fd, os.fstat(fd).st_size, count)
        chunks.append(chunk)
        newlines += chunk.count(b"\n")
    data = b"".join(reversed(chunks))
    segments = data.split(b"\n")
    partial = segments.pop()  # b"" when the data ends with a newline
    if count == 0:
        return [], partial
    return segments[-count:], partial


class _Tail:
    """One open log file, the read position in it and an unfinished last line."""

    def __init__(self, daily: DailyLog, out: TextIO) -> None:
        self.daily = daily
        self.out = out
        self.fd = -1
        self.identity: tuple[int, int] | None = None
        self.pos = 0
        self.partial = b""

    def start(self, count: int, follow: bool) -> None:
        path = self.daily.current_path
        if not self._open(path):
            return
        size = os.fstat(self.fd).st_size
        complete, partial = last_lines(self.fd, size, count)
        self.pos = size
        if follow:
            # The writer finishes that line soon; print it whole when it does.
            self.partial = partial
        elif partial and count:
            complete = [*complete, partial][-count:]
        self._emit(complete)

    def follow(self, stop: threading.Event, poll: float) -> None:
        while not stop.is_set():
            got = self._read_new()
            self._check_file()
            if not got:
                stop.wait(poll)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- internals ---------------------------------------------------------------------------
    def _open(self, path: Path) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return False
        self.close()
        st = os.fstat(fd)
        self.fd = fd
        self.identity = (st.st_dev, st.st_ino)
        self.pos = 0
        self.partial = b""
        return True

    def _read_new(self) -> bool:
        """Print the complete lines appended since the last read; True when any bytes came."""
        if self.fd < 0:
            return False
        got = False
        while True:
            data = os.pread(self.fd, BLOCK, self.pos)
            if not data:
                return got
            got = True
            self.pos += len(data)
            segments = (self.partial + data).split(b"\n")
            self.partial = segments.pop()
            self._emit(segments)

    def _check_file(self) -> None:
        """Switch to today's file when it is not the one open (new day, rotated, recreated)."""
        path = self.daily.current_path
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            # Not there (yet): keep reading the old file, whose writer may still append.
            return
        if self.fd >= 0 and (st.st_dev, st.st_ino) == self.identity:
            if st.st_size < self.pos:  # truncated in place (copytruncate)
                self.pos = 0
                self.partial = b""
            return
        if self.fd >= 0:
            self._read_new()
            if self.partial:
                self._emit([self.partial])
        self._open(path)

    def _emit(self, lines: list[bytes]) -> None:
        if not lines:
            return
        text = "".join(line.decode("utf-8", "replace") + "\n" for line in lines)
        try:
            self.out.write(text)
        except UnicodeEncodeError:  # a terminal that is not UTF-8: degrade, do not die
            encoding = getattr(self.out, "encoding", None) or "ascii"
            self.out.write(text.encode(encoding, "replace").decode(encoding))
        self.out.flush()
