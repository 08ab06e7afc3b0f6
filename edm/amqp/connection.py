"""The consumer's connection to the broker, and its failover.

``Link`` tries the URLs of ``amqp.url`` in turn; after a whole round failed it backs off
(``edm.backoff``, doubling up to ``amqp.retry_max``) and starts the next round. It also says
when the broker blocks the connection (a memory or disk alarm) and when it lets go. It does
not decide whether to reconnect: the consumer does, knowing whether it is stopping or
reloading.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from typing import Any

import pika.frame
from pika.adapters.select_connection import IOLoop

from edm.amqp.fastlane import LaneConnection, connection_class
from edm.amqp.params import describe, parameters
from edm.backoff import Backoff
from edm.config import AmqpConfig
from edm.errors import BrokerError
from edm.redact import mask_url

log = logging.getLogger(__name__)

FIRST_DELAY = 0.25  # seconds before the second round of connection attempts; doubles


class State(enum.Enum):
    """The consumer's state, as ``status`` shows it."""

    STARTING = "starting"
    CONNECTING = "connecting"
    BACKING_OFF = "backing off"
    CONSUMING = "consuming"
    DRAINING = "draining"
    STOPPED = "stopped"


ConnectionFactory = Callable[..., Any]


class Link:
    """One connection at a time to one of ``amqp.url``; the next URL, or a back-off, after a failure."""

    def __init__(
        self,
        amqp: AmqpConfig,
        ioloop: IOLoop,
        on_open: Callable[[LaneConnection], None],
        on_down: Callable[[BaseException | None], None],
        on_state: Callable[[State], None],
        on_blocked: Callable[[], None],
        factory: ConnectionFactory | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.amqp = amqp
        self.ioloop = ioloop
        self.on_open = on_open
        self.on_down = on_down  # the connection closed (its reason), or an attempt failed (None)
        self.on_state = on_state
        self.on_blocked = on_blocked  # blocked or unblocked: the shown state changes
        self.factory = factory  # None: the class amqp.fast_lane picks, at each connect
        self.clock = clock
        self.connection: LaneConnection | None = None
        self.url = ""  # in use, or being tried
        self.open = False
        self.blocked: str | None = None  # the broker's reason while it blocks us
        self._blocked_since = 0.0
        self._index = 0
        self._backoff = Backoff(FIRST_DELAY, amqp.retry_max)
        self._timer: object | None = None

    def connect(self) -> None:
        """Open a connection to the current URL; ``on_open`` or ``on_down`` follows."""
        self._timer = None
        urls = self.amqp.url
        url = self.url = urls[self._index % len(urls)]
        self.on_state(State.CONNECTING)
        log.debug("Connecting to %s.", mask_url(url))
        try:
            params = parameters(url, self.amqp.heartbeat, self.amqp.tls)
        except BrokerError as exc:  # a certificate file gone or unreadable since the config check
            self._on_open_error(None, exc)
            return
        # A broker alarm blocks the connection only while it has a message to republish; the
        # connection waits it out instead of being torn down (a reconnect would redeliver the
        # message, fail it again and meet the same alarm). Heartbeats go on meanwhile.
        params.blocked_connection_timeout = None
        factory = self.factory or connection_class(self.amqp.fast_lane)
        connection = factory(
            params,
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self.closed,
            custom_ioloop=self.ioloop,
        )
        connection.add_on_connection_blocked_callback(self._on_blocked)
        connection.add_on_connection_unblocked_callback(self._on_unblocked)
        self.connection = connection
        self.blocked = None

    def next(self) -> None:
        """After a failure: the next URL of this round at once, or a back-off after the last."""
        self._index += 1
        if self._index % len(self.amqp.url):
            self.connect()
            return
        delay = self._backoff.next()
        self.on_state(State.BACKING_OFF)
        log.info("Reconnecting in %.1f s.", delay)
        self._timer = self.ioloop.call_later(delay, self.connect)

    def restart(self, amqp: AmqpConfig) -> None:
        """New settings: start again from the first URL, without back-off."""
        self.amqp = amqp
        self._index = 0
        self._backoff = Backoff(FIRST_DELAY, amqp.retry_max)
        self.connect()

    def settled(self) -> None:
        """Consuming again: the next failure starts a fresh round of quick attempts."""
        self._backoff.reset()

    def cancel(self) -> None:
        """No reconnect pending any more (stop or reload while backing off)."""
        if self._timer is not None:
            self.ioloop.remove_timeout(self._timer)
            self._timer = None

    def _on_open(self, connection: LaneConnection) -> None:
        self.open = True
        log.info("Connected to %s.", mask_url(self.url))
        self.on_open(connection)

    def _on_open_error(self, _connection: LaneConnection | None, error: BaseException | str) -> None:
        reason = describe(error) if isinstance(error, BaseException) else mask_url(str(error))
        log.warning("Cannot connect to %s: %s.", mask_url(self.url), reason)
        self.connection = None
        self.on_down(None)

    def closed(self, _connection: LaneConnection, reason: BaseException) -> None:
        """pika's on-close callback; also called for a connection found closed already."""
        self.connection = None
        self.open = False
        self.blocked = None
        self.on_down(reason)

    def _on_blocked(self, connection: LaneConnection, frame: pika.frame.Method) -> None:
        """The broker stopped reading this connection (a memory or disk alarm): say so once."""
        if connection is not self.connection or self.blocked is not None:
            return
        reason = str(getattr(frame.method, "reason", "") or "") or "no reason given"
        log.warning("The broker blocks publishing: %s.", reason)
        self.blocked = reason
        self._blocked_since = self.clock()
        self.on_blocked()

    def _on_unblocked(self, connection: LaneConnection, _frame: pika.frame.Method) -> None:
        """The alarm is over: what waited (a republish's confirm) goes on by itself."""
        if connection is not self.connection or self.blocked is None:
            return
        self.blocked = None
        seconds = self.clock() - self._blocked_since
        log.info("The broker no longer blocks publishing (blocked for %.1f s).", seconds)
        self.on_blocked()
