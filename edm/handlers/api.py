"""What a handler sees and says: the message, and the two outcomes besides returning.

This module imports nothing of pika: a handler module that imports only ``edm.handlers``
stays light, and the consumer turns these outcomes into broker operations (contract §9).
The AMQP layer hands over the properties still encoded when it can, with the function that
decodes them; they and the headers are decoded on first use, so a handler that only reads
the body never pays for them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

# amqp.handler's built-in names and what they stand for
BUILT_IN_HANDLERS = {
    "log": "edm.handlers.log:log_message",
    "smtp": "edm.handlers.smtp:SmtpHandler",
}

ATTEMPTS_HEADER = "x-edm-attempts"
ERROR_HEADER = "x-edm-error"


class Message:
    """One delivery: ``body``, ``headers``, ``routing_key``, ``redelivered``, ``properties``,
    ``attempts`` (1 on the first delivery, counted across retries) and ``message_id``."""

    __slots__ = ("_decode", "_headers", "_properties", "body", "redelivered", "routing_key")

    def __init__(
        self,
        body: bytes,
        routing_key: str,
        redelivered: bool,
        properties: Any,
        decode: Callable[[bytes], Any] | None = None,
    ) -> None:
        self.body = body
        self.routing_key = routing_key
        self.redelivered = redelivered
        self._properties = properties
        self._decode = decode  # set while ``properties`` holds the encoded bytes
        self._headers: dict[str, Any] | None = None

    @property
    def properties(self) -> Any:
        """The AMQP basic properties (pika's ``BasicProperties``)."""
        if self._decode is not None:
            self._properties = self._decode(self._properties)
            self._decode = None
        return self._properties

    @property
    def headers(self) -> dict[str, Any]:
        if self._headers is None:
            self._headers = getattr(self.properties, "headers", None) or {}
        return self._headers

    @property
    def message_id(self) -> str | None:
        value = getattr(self.properties, "message_id", None)
        return value if isinstance(value, str) else None

    @property
    def attempts(self) -> int:
        """1 on the first delivery; a retry carries the count of the attempts before it."""
        before = self.headers.get(ATTEMPTS_HEADER, 0)
        return (before if isinstance(before, int) and before > 0 else 0) + 1

    def __repr__(self) -> str:
        return (
            f"Message(routing_key={self.routing_key!r}, redelivered={self.redelivered}, "
            f"{len(self.body)} bytes)"
        )


class Reject(Exception):
    """Dead-letter this message at once, never retry it; ``reason`` becomes ``x-edm-error``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Retry(Exception):
    """Try this message again, no sooner than ``delay`` seconds (else by ``amqp.retry_delays``)."""

    def __init__(self, reason: str = "", delay: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay = delay


class Handler(Protocol):
    """What the consumer calls: a function, or an instance of a handler class."""

    def __call__(self, message: Message, /) -> object: ...


class HandlerClass(Protocol):
    """A handler class: built once per handler thread with ``amqp.handler_options``."""

    def __call__(self, options: Mapping[str, Any], /) -> Handler: ...
