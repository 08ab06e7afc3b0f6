"""Message handlers. The default one writes each message as one escaped line of the daily log.

A handler is any ``module:function`` called as ``handler(message)``; it returns to have the
message acked or raises to have it retried and, in the end, dead-lettered. The consumer
worker binds the message log before the first message arrives.

``LogWriteError`` (the log cannot take the line: disk full, I/O error) is the one exception
that says nothing about the message: the consumer gives the message back to the queue and
holds off until the log can be written, without counting a handler failure. A handler that
writes the log must let it through unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edm.logs import DailyLog, message_text

if TYPE_CHECKING:
    from edm.consumer import Message


class MessageLog:
    """Writes a message's line: ``[redelivered] (+) <escaped body>``, in one append."""

    def __init__(self, daily: DailyLog, max_line: int = 0) -> None:
        self.daily = daily
        self.max_line = max_line

    def line(self, body: bytes, redelivered: bool) -> bytes:
        marker = b"[redelivered] (+) " if redelivered else b"(+) "
        return marker + message_text(body, self.max_line)

    def write(self, message: Message) -> None:
        marker = b"[redelivered] (+) " if message.redelivered else b"(+) "
        self.daily.write_bytes("INFO", marker, message_text(message.body, self.max_line))


_sink: MessageLog | None = None


def bind(sink: MessageLog | None) -> None:
    """Set where log_message writes (the consumer worker does this at boot and on reload)."""
    global _sink
    _sink = sink


def log_message(message: Message) -> None:
    """Write the message's line and flush it (fsync too with log.fsync) before it is acked.

    Raises LogWriteError, with nothing of the line left in the file, when the log cannot take it.
    """
    if _sink is None:
        raise RuntimeError("edm.handlers.log_message: no message log is bound")
    _sink.write(message)
