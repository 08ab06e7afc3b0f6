"""Handlers for the retry tests: each says which attempt it saw, then fails, retries or logs."""

from __future__ import annotations

import logging

from edm.handlers import Message, Reject, Retry, log_message

log = logging.getLogger(__name__)


def _seen(message: Message) -> None:
    body = message.body.decode(errors="replace")
    log.info("Attempt %d of %s (message_id %s).", message.attempts, body, message.message_id)


def retry_twice(message: Message) -> None:
    """Ask for a retry after half a second on the first two attempts; log the third."""
    _seen(message)
    if message.attempts < 3:
        raise Retry("not yet", delay=0.5)
    log_message(message)


def fail_once(message: Message) -> None:
    """Raise on the first attempt; log the message on the next."""
    _seen(message)
    if message.attempts == 1:
        raise ConnectionError("the mail server went away")
    log_message(message)


def reject_bad(message: Message) -> None:
    """Reject bodies that start with ``bad``; log the others."""
    _seen(message)
    if message.body.startswith(b"bad"):
        raise Reject("field 'to' is missing")
    log_message(message)


def fail_bad(message: Message) -> None:
    """Raise for bodies that start with ``bad``; log the others."""
    if message.body.startswith(b"bad"):
        _seen(message)
        raise ValueError(f"cannot handle {message.body[:20]!r}")
    log_message(message)
