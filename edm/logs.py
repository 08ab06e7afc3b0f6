"""Daily log files and the message-line escaping.

Every line is one ``os.write`` to a file opened with O_APPEND, so the supervisor and its
workers can share a day's file without interleaving. The file's date is taken when each
line is written, so a line written after midnight lands in the next day's file.

A record is written whole or not at all: a write that fails part-way (a full disk takes what
fits) or whose fsync fails is cut back to the last whole line and raises ``LogWriteError``.
Where the cut itself fails, the tail is mended before the next record is written.
"""

from __future__ import annotations

import codecs
import datetime as dt
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from edm.errors import LogWriteError
from edm.redact import mask_record

Clock = Callable[[], float]

_FILE_RE = re.compile(r"^(?P<name>.+)\.(?P<date>\d{4}-\d{2}-\d{2})\.log$")


def _escape_table() -> dict[int, str]:
    table: dict[int, str] = {ord("\\"): "\\\\", ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}
    for code in [*range(0x00, 0x20), 0x7F]:
        table.setdefault(code, f"\\x{code:02x}")
    for code in range(0x80, 0xA0):
        table[code] = f"\\u{code:04x}"
    # Bytes that are not valid UTF-8 arrive as lone surrogates U+DC80..U+DCFF
    # (errors="surrogateescape"); they are written as the original byte.
    for byte in range(0x80, 0x100):
        table[0xDC00 + byte] = f"\\x{byte:02x}"
    return table


_ESCAPES = _escape_table()
_PLAIN = re.compile(r"[\x20-\x5b\x5d-\x7e]*\Z")
_PLAIN_BYTES = re.compile(rb"[\x20-\x5b\x5d-\x7e]*\Z")  # printable ASCII but backslash


def escape_body(body: bytes) -> str:
    """Escape a message body so that it fits on one log line (see the contract's §5)."""
    text = body.decode("utf-8", "surrogateescape")
    if text.isascii() and _PLAIN.match(text):
        return text
    return text.translate(_ESCAPES)


_CHUNK = 64 * 1024


def escape_body_bytes(body: bytes) -> bytes | bytearray:
    """escape_body, UTF-8 encoded, built chunk by chunk so a huge body costs a small multiple of
    its size (the str of a whole binary body would take four bytes per byte, twice over)."""
    if len(body) <= _CHUNK:
        if _PLAIN_BYTES.match(body):
            return body  # nothing to escape: no decoding and encoding again
        return escape_body(body).encode("utf-8")
    decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
    out = bytearray()
    view = memoryview(body)
    for start in range(0, len(body), _CHUNK):
        text = decoder.decode(view[start : start + _CHUNK], final=start + _CHUNK >= len(body))
        out += text.translate(_ESCAPES).encode("utf-8")
    return out  # not bytes(out): that would copy up to four times the body once more


def message_text(body: bytes, max_line: int = 0) -> bytes | bytearray:
    """The escaped body for a message line, cut past ``max_line`` bytes as the contract says.

    With a limit only a prefix of the body is escaped: every byte escapes to at least one
    byte, so ``max_line + 3`` bytes of body (room for a split UTF-8 sequence) always suffice.
    """
    if max_line <= 0:
        return escape_body_bytes(body)
    prefix = body[: max_line + 3]
    escaped = escape_body(prefix).encode("utf-8")
    if len(prefix) == len(body) and len(escaped) <= max_line:
        return escaped
    head = escaped[:max_line].decode("utf-8", "ignore").encode("utf-8")
    digest = hashlib.sha256(body).hexdigest()
    return head + f" …[cut: {len(body)} bytes, sha256 {digest}]".encode()


_UNESCAPE = re.compile(r"\\(x[0-9a-f]{2}|u00[89][0-9a-f]|[\\nrt])")


def unescape_body(line: str) -> bytes:
    """The inverse of escape_body: the original bytes of an escaped body."""
    out = bytearray()
    pos = 0
    for m in _UNESCAPE.finditer(line):
        out += line[pos : m.start()].encode("utf-8")
        code = m.group(1)
        if code[0] == "x":
            out.append(int(code[1:], 16))
        elif code[0] == "u":
            out += chr(int(code[1:], 16)).encode("utf-8")
        else:
            out += {"\\": b"\\", "n": b"\n", "r": b"\r", "t": b"\t"}[code]
        pos = m.end()
    out += line[pos:].encode("utf-8")
    return bytes(out)


class DailyLog:
    """Writes whole lines to ``<dir>/<name>.<YYYY-MM-DD>.log``, switching files at midnight."""

    def __init__(
        self,
        directory: Path,
        name: str,
        *,
        keep_days: int = 0,
        fsync: bool = False,
        clock: Clock = time.time,
    ) -> None:
        self.directory = directory
        self.name = name
        self.keep_days = keep_days
        self.fsync = fsync
        self.clock = clock
        self._lock = threading.Lock()
        self._fd = -1
        self._date = ""
        self._second = -1
        self._stamp = ""
        self._torn = False  # the file may end in part of a record

    def reconfigure(self, directory: Path, name: str, *, keep_days: int, fsync: bool) -> None:
        """Switch to another directory or name (reload); the next line goes to the new file."""
        with self._lock:
            if (directory, name) != (self.directory, self.name):
                self._close()
                self._date = ""
            self.directory, self.name = directory, name
            self.keep_days, self.fsync = keep_days, fsync

    def path_for(self, date: str) -> Path:
        return self.directory / f"{self.name}.{date}.log"

    @property
    def current_path(self) -> Path:
        return self.path_for(dt.date.fromtimestamp(self.clock()).isoformat())

    def open(self) -> None:
        """Open today's file now, so that a start fails early when the log is not writable."""
        with self._lock:
            self._switch(dt.date.fromtimestamp(self.clock()).isoformat())

    def reopen(self) -> None:
        """Close and reopen the file (SIGUSR1, after logrotate moved it)."""
        with self._lock:
            self._close()

    def close(self) -> None:
        with self._lock:
            self._close()

    def write(self, level: str, text: str) -> None:
        """Write one record; the caller guarantees ``text`` holds no newline."""
        self.write_bytes(level, text.encode("utf-8", "surrogateescape"))

    def write_bytes(self, level: str, *parts: bytes | bytearray) -> None:
        """Write one record whose text (the parts, joined) is UTF-8 and holds no newline.

        Raises LogWriteError (an OSError) when it cannot; the file then holds none of it.
        """
        now = self.clock()
        second = int(now)
        with self._lock:
            try:
                if second != self._second:
                    t = time.localtime(now)
                    self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", t)
                    date = self._stamp[:10]
                    self._second = second
                    if date != self._date or self._fd < 0:
                        self._switch(date)
                elif self._fd < 0:
                    self._switch(self._date or dt.date.fromtimestamp(now).isoformat())
                head = f"{self._stamp},{int(now * 1000) % 1000:03d} {level} ".encode()
                if self._torn:
                    head = self._mend() + head
                if sum(map(len, parts)) < 65536:
                    self._append(b"".join((head, *parts, b"\n")))
                else:  # one writev: no copy of a huge line, still one append
                    self._append_parts([head, *parts, b"\n"])
                self._torn = False
            except OSError as exc:
                self._second = -1  # take the date afresh next time: the switch may have failed
                path = self.path_for(dt.date.fromtimestamp(now).isoformat())
                raise LogWriteError(str(path), exc, self.write) from exc

    def _append(self, data: bytes) -> None:
        """Append one record: all of it, or (cut back) none of it."""
        fd = self._fd
        written = os.write(fd, data)  # when this raises, nothing was written
        start = -1
        try:
            if written < len(data):  # a full disk takes what fits, then refuses the rest
                start = os.lseek(fd, 0, os.SEEK_CUR) - written
                view = memoryview(data)
                while written < len(data):
                    written += os.write(fd, view[written:])
            if self.fsync:
                os.fsync(fd)
        except OSError:
            self._cut(start, written)
            raise

    def _append_parts(self, parts: list[bytes | bytearray]) -> None:
        """``_append`` for a huge record, with writev."""
        fd = self._fd
        views = [memoryview(p) for p in parts if p]
        written, start = 0, -1
        try:
            while views:
                n = os.writev(fd, views)
                if start < 0 and n < sum(map(len, views)):
                    start = os.lseek(fd, 0, os.SEEK_CUR) - written - n
                written += n
                while views and n >= len(views[0]):
                    n -= len(views[0])
                    views.pop(0)
                if views and n:
                    views[0] = views[0][n:]
            if self.fsync:
                os.fsync(fd)
        except OSError:
            if written:
                self._cut(start, written)
            raise

    def _cut(self, start: int, written: int) -> None:
        """Take back the ``written`` bytes of a record that failed, if nobody wrote after them.

        ``start`` is where they began (-1: they were one write, ending at the file offset).
        """
        fd = self._fd
        try:
            end = os.lseek(fd, 0, os.SEEK_CUR)
            start = end - written if start < 0 else start
            if end - start == written and os.fstat(fd).st_size == end:
                os.ftruncate(fd, start)
                return
        except OSError:
            pass
        self._torn = True  # the file may end in part of a record: mend it before the next one

    def _mend(self) -> bytes:
        """Cut a partial record off the end of the file (a cut that failed, a crash, an older edm).

        Returns what the next record must start with: nothing, or a newline where the file
        cannot be cut (an append-only file), so that the next record is a line of its own.
        """
        fd = self._fd
        size = end = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return b""
        keep = 0
        while end > 0:
            begin = max(0, end - _CHUNK)
            newline = os.pread(fd, end - begin, begin).rfind(b"\n")
            if newline >= 0:
                keep = begin + newline + 1
                break
            end = begin
        try:
            os.ftruncate(fd, keep)
        except OSError:
            return b"\n"
        return b""

    def _switch(self, date: str) -> None:
        self._close()
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o750)
        # read and write: mending a partial last record needs to read the file's end
        self._fd = os.open(
            self.path_for(date),
            os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
            0o600,
        )
        self._torn = True  # check the end of the file before the first record
        changed_day = self._date != date
        self._date = date
        if changed_day and self.keep_days > 0:
            self.prune(date)

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._second = -1

    def prune(self, today: str) -> list[Path]:
        """Delete this log's daily files dated more than keep_days before ``today``."""
        limit = dt.date.fromisoformat(today) - dt.timedelta(days=self.keep_days)
        removed: list[Path] = []
        try:
            entries = list(self.directory.iterdir())
        except OSError:
            return removed
        for entry in entries:
            m = _FILE_RE.match(entry.name)
            if not m or m.group("name") != self.name:
                continue
            try:
                date = dt.date.fromisoformat(m.group("date"))
            except ValueError:
                continue
            if date < limit:
                try:
                    entry.unlink()
                    removed.append(entry)
                except OSError:
                    pass
        return removed


class DailyLogHandler(logging.Handler):
    """A logging handler that writes records to a DailyLog, one line each, passwords masked."""

    def __init__(self, daily: DailyLog, secrets: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.daily = daily
        self.secrets = secrets

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = mask_record(record, self.secrets)
            if "\n" in text or "\r" in text:
                text = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
            self.daily.write(record.levelname, text)
        except LogWriteError:
            pass  # the disk's fault, nothing of the record was left; the consumer shows it in status
        except Exception:  # noqa: BLE001 - logging must never take the daemon down
            self.handleError(record)


def setup_logging(daily: DailyLog, level: str, secrets: tuple[str, ...] = ()) -> DailyLogHandler:
    """Route the ``edm`` loggers (and pika's warnings) to the daily file."""
    handler = DailyLogHandler(daily, secrets)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # pika calls log.debug() several times per message; with DEBUG off this makes each call
    # return after one comparison instead of walking the logger hierarchy.
    logging.disable(logging.DEBUG if logging.getLevelName(level) > logging.DEBUG else logging.NOTSET)
    logging.getLogger("pika").setLevel(max(logging.WARNING, logging.getLevelName(level)))
    # pika logs every failed connection attempt at ERROR with its own stack; edm logs one
    # clear line per attempt itself ("Cannot connect to <masked url>: <cause>").
    for name in (
        "pika.adapters.utils.connection_workflow",
        "pika.adapters.utils.io_services_utils",
        "pika.adapters.base_connection",
    ):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return handler
