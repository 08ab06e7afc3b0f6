"""Daily log files and the message-line escaping.

Every line is one ``os.write`` to a file opened with O_APPEND, so the supervisor and its
workers can share a day's file without interleaving. The file's date is taken when each
line is written, so a line written after midnight lands in the next day's file.
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
        """Write one record whose text (the parts, joined) is UTF-8 and holds no newline."""
        now = self.clock()
        second = int(now)
        with self._lock:
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
            if sum(map(len, parts)) < 65536:
                _write_all(self._fd, b"".join((head, *parts, b"\n")))
            else:  # one writev: no copy of a huge line, still one append
                _writev_all(self._fd, [head, *parts, b"\n"])
            if self.fsync:
                os.fsync(self._fd)

    def _switch(self, date: str) -> None:
        self._close()
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o750)
        self._fd = os.open(
            self.path_for(date),
            os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
            0o600,
        )
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


def _write_all(fd: int, data: bytes) -> None:
    written = os.write(fd, data)
    if written == len(data):
        return
    view = memoryview(data)[written:]
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _writev_all(fd: int, parts: list[bytes | bytearray]) -> None:
    views = [memoryview(p) for p in parts if p]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


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
