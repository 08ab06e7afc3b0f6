"""Handlers the integration tests configure as amqp.handler (imported by the daemon)."""

from __future__ import annotations

import logging
import time

from edm.handlers import Message, log_message

log = logging.getLogger(__name__)


def slow(message: Message) -> None:
    """Sleep as many seconds as the body's ``sleep=N`` prefix asks, then log the message."""
    if message.body.startswith(b"sleep="):
        log.info("The slow handler started on %r.", message.body[:40])  # a test waits for this
        time.sleep(float(message.body.split(b" ", 1)[0][6:]))
    log_message(message)


def fail_poison(message: Message) -> None:
    """Raise for bodies that start with ``poison``; log the others."""
    if message.body.startswith(b"poison"):
        raise ValueError(f"cannot handle {message.body[:20]!r}")
    log_message(message)


def marked(message: Message) -> None:
    """Log the message with ``marked:`` before its body, so that this handler's lines show."""
    message.body = b"marked: " + message.body
    log_message(message)
