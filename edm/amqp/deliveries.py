"""The consuming channel's deliveries: received, handled, then acked or settled.

The I/O loop's thread receives each delivery (pika's callback or the fast lane's) into a
queue. The main thread runs the handler on them inline (``amqp.threads`` 1: no thread
hand-off, every microsecond per message is throughput at prefetch 1), or hands them to the
handler threads of ``pool``, whose endings come back on the I/O loop's thread. An ending is
an ack on the channel the delivery came from, or an outcome for that channel's ``Settler``.

A message is acked only after its handler returned, or once its retry or dead letter is
confirmed. Every channel gets a generation number: a delivery from an older channel is never
acked (the broker redelivers it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import pika.channel
import pika.spec
from pika.adapters.select_connection import IOLoop

from edm.amqp.fastlane import LaneConnection, decode_properties
from edm.amqp.ioloop import FlushingIOLoop
from edm.amqp.keeper import Keeper
from edm.amqp.outcomes import OK, Outcome, Settler, judge
from edm.amqp.pool import Pool
from edm.config import AmqpConfig
from edm.errors import LogWriteError
from edm.handlers.api import Message
from edm.handlers.loader import Bound, HandlerFactory
from edm.metrics import Latency

log = logging.getLogger(__name__)

# (generation, delivery tag, message)
Delivery = tuple[int, int, Message]


class Deliveries:
    """What the consumer received and has not finished yet, and the handlers that finish it.

    The consumer binds it to each channel it consumes on (``bind``) and moves the generation
    on when that channel is gone. ``may_take`` says whether a waiting delivery may start now
    (not while draining or holding off); ``on_failure`` hears of a log that cannot be written;
    ``after`` runs after every ending (the consumer closes there once it drained).
    """

    def __init__(
        self,
        amqp: AmqpConfig,
        bounds: list[Bound],
        ioloop: IOLoop,
        io: threading.Lock,
        keeper: Keeper,
        may_take: Callable[[], bool],
        on_failure: Callable[[LogWriteError], None],
        after: Callable[[], None],
    ) -> None:
        self.amqp = amqp
        self.bounds = bounds
        self.handler = bounds[0].call  # the inline path's (threads: 1)
        self.ioloop = ioloop
        self._io = io
        self._keeper = keeper
        self._may_take = may_take
        self._on_failure = on_failure
        self._after = after
        self.waiting: deque[Delivery] = deque()
        self.in_hand = False  # the inline handler runs
        self.generation = 0
        self.channel: pika.channel.Channel | None = None
        self.connection: LaneConnection | None = None
        self.settler: Settler | None = None
        self.handled = 0
        self.latency = Latency()  # handler call durations, shipped with the status reports
        self.pool = self._make_pool()

    # -- the channel -----------------------------------------------------------------------------

    def bind(self, channel: pika.channel.Channel, connection: LaneConnection, settler: Settler) -> None:
        self.channel, self.connection, self.settler = channel, connection, settler

    def unbind(self) -> None:
        """The channel is gone (or going): nothing more is acked or settled on it."""
        self.channel = self.connection = self.settler = None

    @property
    def busy(self) -> bool:
        """A message in a handler, or a republish owed for one."""
        busy = self.in_hand or (self.settler is not None and self.settler.busy)
        return busy or (self.pool is not None and self.pool.in_hand > 0)

    # -- in --------------------------------------------------------------------------------------

    def on_message(
        self,
        channel: pika.channel.Channel,
        method: pika.spec.Basic.Deliver,
        properties: pika.BasicProperties,
        body: bytes,
    ) -> None:
        """pika's delivery (``basic_consume``'s callback)."""
        message = Message(body, method.routing_key, method.redelivered, properties)
        self.waiting.append((self.generation, method.delivery_tag, message))

    def on_fast_delivery(
        self, delivery_tag: int, redelivered: bool, routing_key: str, properties: bytes, body: bytes
    ) -> None:
        """The fast lane's delivery: the same as ``on_message``, properties still encoded."""
        message = Message(body, routing_key, redelivered, properties, decode_properties)
        self.waiting.append((self.generation, delivery_tag, message))

    def take_back(self) -> list[Delivery]:
        """Every delivery not started yet, the handler threads' included; none waits after."""
        waiting = [*self.waiting, *(self.pool.take_back() if self.pool is not None else ())]
        self.waiting.clear()
        return waiting

    # -- through the handler ---------------------------------------------------------------------

    def handle(self) -> None:
        """Run the handler for each waiting delivery, in this (the main) thread, and ack."""
        waiting = self.waiting
        keeper = self._keeper
        while True:
            with self._io:
                if not waiting or not self._may_take():
                    return
                generation, tag, message = waiting.popleft()
                if generation != self.generation:
                    continue  # from a closed channel: the broker redelivers it
                self.in_hand = True
            keeper.busy_since = time.monotonic()
            outcome = self._handle(message)
            keeper.busy_since = None
            if keeper.active:
                keeper.wake()  # end the keeper's poll now
            with self._io:
                self.in_hand = False
                self._on_done(generation, tag, message, outcome)
                if isinstance(self.ioloop, FlushingIOLoop):
                    self.ioloop.flush()  # the ack leaves now: the broker waits for it

    def dispatch(self) -> None:
        """Hand each waiting delivery to the handler threads (``amqp.threads`` > 1)."""
        assert self.pool is not None
        waiting = self.waiting
        with self._io:
            while waiting and self._may_take():
                job = waiting.popleft()
                if job[0] == self.generation:  # else from a closed channel: redelivered
                    self.pool.submit(job)

    def _handle(self, message: Message) -> Outcome:
        started = time.perf_counter()
        try:
            self.handler(message)
        except LogWriteError as exc:  # the disk's fault, not the message's: not timed
            return judge(message, exc, self.amqp)
        except Exception as exc:  # noqa: BLE001 - any handler failure is retried or dead-lettered
            self.latency.observe(time.perf_counter() - started)
            return judge(message, exc, self.amqp)
        self.latency.observe(time.perf_counter() - started)
        return OK

    def _on_thread_done(
        self, generation: int, tag: int, message: Message, outcome: Outcome, seconds: float | None
    ) -> None:
        """A handler thread finished a message: on the I/O loop's thread, ack or settle it."""
        if seconds is not None:
            self.latency.observe(seconds)
        self._on_done(generation, tag, message, outcome)
        if isinstance(self.ioloop, FlushingIOLoop):
            self.ioloop.flush()

    # -- out -------------------------------------------------------------------------------------

    def _on_done(self, generation: int, tag: int, message: Message, outcome: Outcome) -> None:
        channel = self.channel
        if generation == self.generation and channel is not None and channel.is_open:
            if outcome is OK:
                connection = self.connection
                assert connection is not None  # bound with its channel
                connection.send_ack(channel.channel_number, tag)
                self.handled += 1
            else:
                assert self.settler is not None
                self.settler.settle(tag, message, outcome)
        if outcome is not OK and outcome.failure is not None:
            self._on_failure(outcome.failure)
        self._after()

    # -- the handlers ----------------------------------------------------------------------------

    def replace(self, amqp: AmqpConfig, bounds: list[Bound]) -> None:
        """Handlers of new settings, between two connections (the old ones are released)."""
        self.release()
        self.amqp, self.bounds, self.handler = amqp, bounds, bounds[0].call
        self.pool = self._make_pool()
        if self.pool is not None:
            self.pool.start()

    def release(self) -> None:
        """Stop the handler threads (each closes its handler), or close the inline handler."""
        if self.pool is not None:
            self.pool.stop()
        else:
            release(self.bounds)

    def _make_pool(self) -> Pool | None:
        if self.amqp.threads == 1:
            return None
        return Pool(self.bounds, self.amqp, self.ioloop, self._on_thread_done)


def build(handlers: HandlerFactory, threads: int) -> list[Bound]:
    """One handler per thread; if one cannot be built, those built already are closed."""
    bounds: list[Bound] = []
    try:
        for _ in range(threads):
            bounds.append(handlers.build())
    except BaseException:
        release(bounds)
        raise
    return bounds


def release(bounds: list[Bound]) -> None:
    for bound in bounds:
        bound.release()
