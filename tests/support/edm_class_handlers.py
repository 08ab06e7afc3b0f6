"""Handler classes the integration tests configure as amqp.handler (imported by the daemon)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from edm.handlers import Message, Reject, log_message

log = logging.getLogger(__name__)


class Tagged:
    """Logs each message with the ``tag`` option before its body; says when it is closed."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.tag = str(options["tag"])
        self.instance = f"{os.getpid()}-{id(self)}"
        log.info("Tagged handler %s built with tag %s.", self.instance, self.tag)

    def __call__(self, message: Message) -> None:
        if message.body.startswith(b"reject"):
            raise Reject(f"{self.tag} refuses {message.body.decode()}")
        message.body = f"{self.tag}: ".encode() + message.body
        log_message(message)

    def close(self) -> None:
        log.info("Tagged handler %s with tag %s closed.", self.instance, self.tag)


class Broken:
    """A handler class whose constructor raises."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        raise RuntimeError(f"no mail server at {options.get('server', 'nowhere')}")

    def __call__(self, message: Message) -> None:  # pragma: no cover - never built
        log_message(message)
