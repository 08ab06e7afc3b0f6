"""Handlers for the handler-thread tests: say when a message starts, wait, then log it."""

from __future__ import annotations

import logging
import threading
import time

from edm.handlers import Message, log_message

log = logging.getLogger(__name__)


def sleepy(message: Message) -> None:
    """Log ``Started <body> in <thread>``, sleep as the body's ``sleep=N`` prefix says, log it."""
    body = message.body.decode(errors="replace")
    log.info("Started %s in %s.", body, threading.current_thread().name)
    if message.body.startswith(b"sleep="):
        time.sleep(float(message.body.split(b" ", 1)[0][6:]))
    log_message(message)
