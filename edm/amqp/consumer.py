"""The AMQP consumer: wires the connection, the declarations, the handler and the outcomes.

It follows pika's reconnecting asynchronous consumer, with one difference that matters for
speed: the handler runs inline, in the thread that drives the I/O loop, so a fast handler
costs no thread hand-off (at prefetch 1 every microsecond per message is throughput); the
keeper (``edm.amqp.keeper``) serves the loop while a handler is slow. The parts:

- ``connection.Link``: one connection at a time, URL after URL, with back-off;
- ``topology``: the main queue on the consuming channel, the helper queues (``.dead``, the
  delay queues) on a channel of their own;
- ``outcomes``: what the handler's ending means, and the republish-confirm-ack it takes;
- ``holdoff``: a log that cannot be written holds deliveries off until it can;
- ``pool``: with ``amqp.threads`` > 1, handler threads instead of the inline call.

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
from typing import Any

import pika.channel
import pika.exceptions
import pika.frame
import pika.spec
from pika.adapters.select_connection import IOLoop

from edm.amqp.connection import ConnectionFactory, Link, State
from edm.amqp.fastlane import Lane, LaneConnection, decode_properties
from edm.amqp.holdoff import HoldOff
from edm.amqp.ioloop import FlushingIOLoop, io_loop
from edm.amqp.keeper import Keeper, slow_after
from edm.amqp.outcomes import OK, Outcome, Settler, Tally, judge, window
from edm.amqp.params import describe, insecure_tls_warning
from edm.amqp.pool import Pool
from edm.amqp.topology import Helpers, MainDeclaration
from edm.config import AmqpConfig
from edm.errors import LogWriteError
from edm.handlers.api import Message
from edm.handlers.loader import Bound, HandlerFactory
from edm.metrics import Latency
from edm.redact import mask_url

log = logging.getLogger(__name__)

Emit = Callable[[dict[str, Any]], None]

DEPTH_INTERVAL = 5.0  # seconds between passive declares that read the queue's depth for status
HELPERS_WAIT = 2.0  # seconds the first consume waits at most for the helper queues' declaration

# (generation, delivery tag, message)
_Delivery = tuple[int, int, Message]


class Consumer:
    """Consumes ``amqp.queue`` until stopped; survives connection loss on its own."""

    def __init__(
        self,
        amqp: AmqpConfig,
        handlers: HandlerFactory,
        emit: Emit,
        ioloop: IOLoop | None = None,
        connection_factory: ConnectionFactory | None = None,
    ) -> None:
        self.amqp = amqp
        self.handlers = handlers
        self._bounds = build(handlers, amqp.threads)  # raises ConfigError naming amqp.handler
        self.handler = self._bounds[0].call  # the inline path's (threads: 1)
        self.ioloop = ioloop or io_loop(amqp.fast_lane)
        self._emit = emit
        self._link = Link(
            amqp, self.ioloop, self._on_open, self._on_down, self._set_state, self._show, connection_factory
        )
        self._helpers = Helpers(amqp, self._on_helpers_done)
        self._settler: Settler | None = None
        self._tally = Tally()
        self._channel: pika.channel.Channel | None = None
        self._consumer_tag: str | None = None
        self._generation = 0
        self._state = State.STARTING
        self._shown = ""
        self._stopping = False
        self._pending: tuple[AmqpConfig, HandlerFactory, list[Bound]] | None = None
        self._draining = False
        # The I/O loop belongs to whoever holds _io: the main thread, or the keeper while a
        # handler is slow. Deliveries wait in _deliveries for the main thread.
        self._io = threading.Lock()
        self._deliveries: deque[_Delivery] = deque()
        self._in_hand = False
        self._running = False
        self._keeper = Keeper(self.ioloop, self._io, slow_after(amqp.heartbeat))
        self._pool = self._make_pool()
        self._hold = HoldOff(self.ioloop, amqp.retry_max, self._on_log_works, self._show)
        self.handled = 0
        self.latency = Latency()  # handler call durations, shipped with the status reports
        self.since = time.time()
        self.queue_depth: int | None = None  # messages ready in the queue; None while unknown
        self._depth_asked = False
        self._withheld = -1  # the channel generation whose consume waits for the log to work
        self._qos_set = -1  # the channel generation whose consume waits for the helper queues

    @property
    def dead(self) -> int:
        return self._tally.dead

    @property
    def retried(self) -> int:
        return self._tally.retried

    # -- public, called from the I/O loop's thread -------------------------------------------

    def start(self) -> None:
        """Make the first connection attempt (the loop runs in ``run``)."""
        self._running = True
        self._warn_insecure()
        with self._io:
            self._link.connect()
            self.ioloop.call_later(DEPTH_INTERVAL, self._poll_depth)

    def run(self) -> None:
        """Drive the I/O loop and handle deliveries until ``stop`` has finished."""
        self._keeper.start()
        if self._pool is not None:
            self._pool.start()
        self.ioloop.activate_poller()
        try:
            while self._running:
                with self._io:
                    self.ioloop.poll()
                    if not self._deliveries:
                        self.ioloop.process_timeouts()
                        continue
                # A delivery first: the broker waits for its ack, the timers can wait for it.
                if self._pool is None:
                    self._handle_deliveries()
                else:
                    self._dispatch()
                with self._io:
                    self.ioloop.process_timeouts()
        finally:
            self._running = False
            self._keeper.stop()
            if self._pool is not None:
                self._pool.stop()
            self.ioloop.deactivate_poller()

    def stop(self) -> None:
        """Graceful stop: finish the message in hand, ack it, close cleanly, end ``run``."""
        if self._stopping:
            return
        self._stopping = True
        self._hold.cancel()
        log.info("Stopping the consumer after the message in hand.")
        self._drain()

    def reload(self, amqp: AmqpConfig, handlers: HandlerFactory) -> None:
        """Apply new AMQP settings: drain, close, reconnect with them. Nothing is lost.

        The new handler is built at once (ConfigError, and nothing changes, if it cannot be);
        it replaces the running one, which is closed, once the message in hand is finished.
        """
        if amqp == self.amqp and handlers == self.handlers:
            return
        bounds = build(handlers, amqp.threads)
        if self._pending is not None:
            release(self._pending[2])  # a reload that never applied: its handlers go
        self._pending = (amqp, handlers, bounds)
        log.info("Applying new AMQP settings (queue %s).", amqp.queue)
        self._drain()

    def snapshot(self) -> dict[str, Any]:
        url = self._link.url
        return {
            "state": self._activity(),
            "handled": self.handled,
            "dead_lettered": self._tally.dead,
            "retried": self._tally.retried,
            "rejected": self._tally.rejected,  # of dead_lettered: by a Reject, not out of retries
            "latency": self.latency.report(),
            "threads": self.amqp.threads,
            "busy": self._pool.busy if self._pool is not None else int(self._keeper.busy_since is not None),
            "connected": self._link.open,
            "queue": self.amqp.queue,
            "queue_depth": self.queue_depth,
            # the broker in use, or the one being tried while connecting or backing off
            "broker": mask_url(url) if url else None,
            "since": self.since,
        }

    # -- state ---------------------------------------------------------------------------------

    def _activity(self) -> str:
        """What ``status`` shows: the state, unless the broker or the log holds us back."""
        if self._state is State.STOPPED:
            return str(self._state.value)
        if self._link.blocked is not None:
            return f"blocked by the broker: {self._link.blocked}"
        if self._hold.failure is not None and self._state is State.CONSUMING:
            return self._hold.failure.activity
        return str(self._state.value)

    def _set_state(self, state: State) -> None:
        self._state = state
        self._show()

    def _show(self) -> None:
        shown = self._activity()
        if shown != self._shown:
            self._shown = shown
            self.since = time.time()
            self._emit(self.snapshot())

    def _warn_insecure(self) -> None:
        warning = insecure_tls_warning(self.amqp.url, self.amqp.tls)
        if warning:
            log.warning("%s.", warning)

    # -- connection ----------------------------------------------------------------------------

    def _on_open(self, connection: LaneConnection) -> None:
        self._helpers.attach(connection, self.amqp)
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_down(self, reason: BaseException | None) -> None:
        """The connection closed (``reason``) or an attempt failed (None): what next."""
        self._channel = None
        self._settler = None
        self._consumer_tag = None
        self._helpers.attach(None, self.amqp)
        if reason is not None:
            self._generation += 1
            self.queue_depth = None
            if self._stopping or self._pending is not None:
                log.info("Closed the connection to %s.", mask_url(self._link.url))
            else:
                log.warning("Lost the connection to %s: %s.", mask_url(self._link.url), describe(reason))
        if self._stopping:
            self._set_state(State.STOPPED)
            self._release_handlers()
            if self._pending is not None:
                release(self._pending[2])
            self._running = False
            self.ioloop.add_callback_threadsafe(_noop)
        elif self._pending is not None:
            self._apply_pending()
        else:
            self._draining = False
            self._link.next()

    def _apply_pending(self) -> None:
        assert self._pending is not None
        self._release_handlers()
        self.amqp, self.handlers, self._bounds = self._pending
        self.handler = self._bounds[0].call
        self._pending = None
        self._pool = self._make_pool()
        if self._pool is not None:
            self._pool.start()
        self._keeper.slow_after = slow_after(self.amqp.heartbeat)
        self._warn_insecure()
        self._draining = False
        self._link.restart(self.amqp)

    def _drain(self) -> None:
        """Stop taking messages; close once the one in hand and every republish are done."""
        self._draining = True
        connection = self._link.connection
        if connection is None:
            self._link.cancel()
            self._on_down(None)
            return
        self._set_state(State.DRAINING)
        connection.close_lane()
        if self._channel is not None and self._channel.is_open and self._consumer_tag:
            self._channel.basic_cancel(self._consumer_tag)
        if self._pool is not None:
            self._pool.take_back()  # not started: the channel's close gives them back
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        """While draining: close once no message is in hand and no republish is owed."""
        if not self._draining:
            return  # the common case, after every message: one test
        connection = self._link.connection
        busy = self._in_hand or (self._settler is not None and self._settler.busy)
        busy = busy or (self._pool is not None and self._pool.in_hand > 0)
        if busy or connection is None:
            return
        if connection.is_open:
            connection.close()
        elif connection.is_closed:
            self._link.closed(connection, pika.exceptions.ConnectionClosedByClient(200, "OK"))

    # -- channel -------------------------------------------------------------------------------

    def _on_channel_open(self, channel: pika.channel.Channel) -> None:
        self._channel = channel
        self._depth_asked = False
        channel.add_on_close_callback(self._on_channel_closed)
        self._settler = Settler(
            channel, self.amqp, self._helpers, self.ioloop, self._tally, self._close_if_idle
        )
        self._helpers.declare()
        MainDeclaration(channel, self.amqp, self._on_declared).start()

    def _on_declared(self, declared: pika.frame.Method) -> None:
        self._on_depth(declared)
        assert self._settler is not None
        self._settler.start(self._on_qos)

    def _on_qos(self, _frame: pika.frame.Method) -> None:
        """Consume once the helper queues are declared (or failed), but never wait long for them.

        Their declarations answer at once on a healthy broker; consuming after them keeps their
        replies from arriving among the first deliveries (which then take pika's slower path).
        """
        self._qos_set = self._generation
        if self._helpers.declaring:
            self.ioloop.call_later(HELPERS_WAIT, self._start_consuming)
        else:
            self._start_consuming()

    def _start_consuming(self) -> None:
        channel = self._channel
        if self._qos_set != self._generation or channel is None or not channel.is_open:
            return
        self._qos_set = -1
        self._consume()

    def _consume(self) -> None:
        assert self._channel is not None
        if self._draining:
            self._close_if_idle()
            return
        if self._hold.failure is not None:
            self._withheld = self._generation  # _on_log_works consumes once the log works
            self._set_state(State.CONSUMING)
            return
        self._consumer_tag = self._channel.basic_consume(self.amqp.queue, self._on_message, auto_ack=False)
        connection = self._link.connection
        if connection is not None:
            connection.open_lane(
                Lane(self._channel.channel_number, self._consumer_tag, self._on_fast_delivery)
            )
        self._link.settled()
        a = self.amqp
        log.info(
            "Consuming from queue %s (exchange %s, routing key %s, prefetch %d%s).",
            a.queue,
            a.exchange,
            a.routing_key,
            window(a),
            f", {a.threads} handler threads" if a.threads > 1 else "",
        )
        self._set_state(State.CONSUMING)

    def _on_channel_closed(self, channel: pika.channel.Channel, reason: BaseException) -> None:
        if channel is not self._channel:
            return
        connection = self._link.connection
        if connection is not None:
            connection.close_lane()
        self._channel = None
        self._settler = None
        self._consumer_tag = None
        self._generation += 1
        if connection is not None and connection.is_open:
            if not (self._stopping or self._pending is not None):
                log.error("The broker closed the channel: %s.", describe(reason))
            connection.close()

    def _on_helpers_done(self) -> None:
        if self._settler is not None:
            self._settler.flush()
        self._start_consuming()

    # -- queue depth, for status ---------------------------------------------------------------

    def _poll_depth(self) -> None:
        """Every DEPTH_INTERVAL, one passive declare on the open channel (never two in flight).

        It runs on the I/O loop between deliveries, so the message path never waits for it.
        """
        if self._stopping:
            return
        self.ioloop.call_later(DEPTH_INTERVAL, self._poll_depth)
        channel = self._channel
        if self._depth_asked or self._draining:
            return
        if self._consumer_tag is None and self._withheld != self._generation:
            return  # not consuming, nor held off on a channel whose topology is complete
        if channel is None or not channel.is_open:
            return
        self._depth_asked = True
        channel.queue_declare(self.amqp.queue, passive=True, callback=self._on_depth)

    def _on_depth(self, frame: pika.frame.Method) -> None:
        self._depth_asked = False
        count = getattr(frame.method, "message_count", None)
        if isinstance(count, int):
            self.queue_depth = count

    # -- messages ------------------------------------------------------------------------------

    def _on_message(
        self,
        channel: pika.channel.Channel,
        method: pika.spec.Basic.Deliver,
        properties: pika.BasicProperties,
        body: bytes,
    ) -> None:
        message = Message(body, method.routing_key, method.redelivered, properties)
        self._deliveries.append((self._generation, method.delivery_tag, message))

    def _on_fast_delivery(
        self, delivery_tag: int, redelivered: bool, routing_key: str, properties: bytes, body: bytes
    ) -> None:
        """The fast lane's delivery: the same as ``_on_message``, properties still encoded."""
        message = Message(body, routing_key, redelivered, properties, decode_properties)
        self._deliveries.append((self._generation, delivery_tag, message))

    def _handle_deliveries(self) -> None:
        """Run the handler for each waiting delivery, in this (the main) thread, and ack."""
        deliveries = self._deliveries
        keeper = self._keeper
        while True:
            with self._io:
                if not deliveries or self._draining or not self._running or self._hold.failure:
                    return
                generation, tag, message = deliveries.popleft()
                if generation != self._generation:
                    continue  # from a closed channel: the broker redelivers it
                self._in_hand = True
            keeper.busy_since = time.monotonic()
            outcome = self._handle(message)
            keeper.busy_since = None
            if keeper.active:
                keeper.wake()  # end the keeper's poll now
            with self._io:
                self._in_hand = False
                self._on_done(generation, tag, message, outcome)
                if isinstance(self.ioloop, FlushingIOLoop):
                    self.ioloop.flush()  # the ack leaves now: the broker waits for it

    def _dispatch(self) -> None:
        """Hand each waiting delivery to the handler threads (``amqp.threads`` > 1)."""
        assert self._pool is not None
        deliveries = self._deliveries
        with self._io:
            while deliveries and not self._draining and self._running and not self._hold.failure:
                job = deliveries.popleft()
                if job[0] == self._generation:  # else from a closed channel: redelivered
                    self._pool.submit(job)

    def _on_thread_done(
        self, generation: int, tag: int, message: Message, outcome: Outcome, seconds: float | None
    ) -> None:
        """A handler thread finished a message: on the I/O loop's thread, ack or settle it."""
        if seconds is not None:
            self.latency.observe(seconds)
        self._on_done(generation, tag, message, outcome)
        if isinstance(self.ioloop, FlushingIOLoop):
            self.ioloop.flush()

    def _make_pool(self) -> Pool | None:
        if self.amqp.threads == 1:
            return None
        return Pool(self._bounds, self.amqp, self.ioloop, self._on_thread_done)

    def _release_handlers(self) -> None:
        """Stop the handler threads (each closes its handler), or close the inline handler."""
        if self._pool is not None:
            self._pool.stop()
        else:
            release(self._bounds)

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

    def _on_done(self, generation: int, tag: int, message: Message, outcome: Outcome) -> None:
        channel = self._channel
        if generation == self._generation and channel is not None and channel.is_open:
            if outcome is OK:
                connection = self._link.connection
                assert connection is not None  # an open channel has its connection
                connection.send_ack(channel.channel_number, tag)
                self.handled += 1
            else:
                assert self._settler is not None
                self._settler.settle(tag, message, outcome)
        if outcome is not OK and outcome.failure is not None:
            self._hold_off(outcome.failure)
        self._close_if_idle()

    # -- a log that cannot be written -----------------------------------------------------------

    def _hold_off(self, error: LogWriteError) -> None:
        """Stop taking deliveries and give back the prefetched ones (the one in hand went back
        already); ``HoldOff`` probes the log and ``_on_log_works`` resumes."""
        if self._stopping:
            return
        self._hold.begin(error, relapse=self.handled == self._hold.handled_at_resume)
        if self._draining:
            return  # the channel closes anyway; _consume holds off on the next one
        channel = self._channel
        connection = self._link.connection
        if channel is not None and channel.is_open and self._consumer_tag is not None:
            if connection is not None:
                connection.close_lane()
            # pika rejects (requeues) what still arrives for a cancelled consumer
            channel.basic_cancel(self._consumer_tag)
            self._consumer_tag = None
            self._withheld = self._generation
        waiting = [*self._deliveries, *(self._pool.take_back() if self._pool is not None else ())]
        self._deliveries.clear()
        for generation, tag, _message in waiting:
            if generation == self._generation and channel is not None and channel.is_open:
                channel.basic_nack(tag, requeue=True)
        self._show()

    def _on_log_works(self) -> None:
        self._hold.handled_at_resume = self.handled
        channel = self._channel
        withheld, self._withheld = self._withheld, -1
        if withheld == self._generation and channel is not None and channel.is_open and not self._draining:
            self._consume()
        else:
            self._show()


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


def _noop() -> None:
    """Wakes the I/O loop's poll."""
