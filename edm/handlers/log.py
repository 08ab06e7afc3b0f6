"""The built-in ``log`` handler: each message as one escaped line of the daily log.

``log_message`` is a function, so that a handler of one's own can call it to log what it
handled. It writes to the message log the consumer worker binds with ``use`` before the first
message arrives and on every reload (one per process: the daily log is the process's).

``LogWriteError`` (the log cannot take the line: disk full, I/O error) is the one exception
that says nothing about the message: the consumer gives the message back to the queue and
holds off until the log can be written, without counting a handler failure. A handler that
writes the log must let it through unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edm.logs import DailyLog, message_text

if TYPE_CHECKING:
    from edm.handlers.api import Message


class MessageLog:
    """Writes a message's line: ``[redelivered] (+) <escaped body>``, in one append."""

    def __init__(self, daily: DailyLog, max_line: int = 0) -> None:
        self.daily = daily
        self.max_line = max_line

    def write(self, message: Message) -> None:
        marker = b"[redelivered] (+) " if message.redelivered else b"(+) "
        self.daily.write_bytes("INFO", marker, message_text(message.body, self.max_line))


_sink: MessageLog | None = None


def use(sink: MessageLog | None) -> None:
    """Set where log_message writes (the consumer worker does this at boot and on reload)."""
    global _sink
    _sink = sink


def log_message(message: Message) -> None:
    """Write the message's line and flush it (fsync too with log.fsync) before it is acked.

    Raises LogWriteError, with nothing of the line left in the file, when the log cannot take it.
    """
    if _sink is None:
        raise RuntimeError("edm.handlers.log_message: no message log is in use")
    _sink.write(message)
