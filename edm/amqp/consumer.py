"""The AMQP consumer: connect, declare, consume, hand each message to the handler, ack.

It follows pika's reconnecting asynchronous consumer, with one difference that matters for
speed: the handler runs inline, in the thread that drives the SelectConnection's I/O loop,
so a fast handler costs no thread hand-off (at prefetch 1 every microsecond per message is
throughput). A slow handler does not cost the connection either: a keeper thread takes the
I/O loop over while a handler has been running for longer than ``slow_after`` (well under
the heartbeat interval), so heartbeats and broker frames are served until it returns. The
two threads never run the loop at once: it belongs to whoever holds ``_io``.

A message is acked only after its handler returned. Every channel gets a generation
number: a delivery from an older channel is never acked (the broker redelivers it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pika
import pika.channel
import pika.exceptions
import pika.frame
import pika.spec
from pika.adapters.select_connection import IOLoop

from edm.amqp.fastlane import Lane, LaneConnection, connection_class, decode_properties
from edm.amqp.ioloop import FlushingIOLoop, io_loop
from edm.amqp.params import describe, insecure_tls_warning, parameters
from edm.amqp.topology import helper_queue_arguments, inequivalent_helper
from edm.config import AmqpConfig
from edm.errors import BrokerError, LogWriteError
from edm.handlers.api import Message, Reject
from edm.handlers.loader import Bound, HandlerFactory
from edm.metrics import Latency
from edm.redact import mask_url

log = logging.getLogger(__name__)

Emit = Callable[[dict[str, Any]], None]

RETRY_DELAY = 0.2  # seconds before the first retry of a failing handler; doubles each time
RETRY_DELAY_MAX = 5.0
DEAD_RETRY_FIRST = 1.0  # seconds before a failed .dead declaration is tried again; doubles
DEPTH_INTERVAL = 5.0  # seconds between passive declares that read the queue's depth for status
PROBE_DELAY = 0.25  # seconds before the first probe of a failing log; doubles up to amqp.retry_max


# (generation, delivery tag, message)
_Delivery = tuple[int, int, Message]


@dataclass(frozen=True)
class _Outcome:
    # "ok" | "requeue" | "dead" | "held" (the log could not be written) | "back" (to the end
    # of the queue: .dead unavailable)
    kind: str
    error: str = ""
    attempts: int = 0
    failure: LogWriteError | None = None


_OK = _Outcome("ok", attempts=1)


@dataclass
class _LogFailure:
    """The log cannot be written: deliveries are held off until a probe write succeeds."""

    error: LogWriteError
    since: float  # time.monotonic() of the first failure
    delay: float  # before the next probe

    @property
    def activity(self) -> str:
        return f"log write failing: {self.error}"


class Consumer:
    """Consumes ``amqp.queue`` until stopped; survives connection loss on its own."""

    def __init__(
        self, amqp: AmqpConfig, handlers: HandlerFactory, emit: Emit, ioloop: IOLoop | None = None
    ) -> None:
        self.amqp = amqp
        self.handlers = handlers
        self.bound = handlers.build()  # raises ConfigError naming amqp.handler
        self.handler = self.bound.call
        self.ioloop = ioloop or io_loop(amqp.fast_lane)
        self._emit = emit
        self._connection: LaneConnection | None = None
        self._connection_url = ""
        self._blocked: tuple[str, float] | None = None  # while the broker blocks us: (state before, since)
        self._channel: pika.channel.Channel | None = None
        self._consumer_tag: str | None = None
        self._generation = 0
        self._url_index = 0
        self._round = 0
        self._reconnect_timer: object | None = None
        self._state = "starting"
        self._stopping = False
        self._pending: tuple[AmqpConfig, HandlerFactory, Bound] | None = None
        self._draining = False
        self._interrupt = threading.Event()  # ends a retry's wait early on stop
        self._publish_seq = 0
        self._dead_pending: dict[int, tuple[int, int, _Outcome]] = {}
        # The dead-letter topology, declared on a channel of its own (see _declare_dead).
        self._dead_ready = False
        self._dead_declaring = False
        self._dead_waiting: list[tuple[int, int, Message, _Outcome]] = []
        self._dead_problem: str | None = None  # the last failure logged, so each is logged once
        self._dead_retry_at = 0.0  # monotonic time before which no declaration is tried again
        self._dead_backoff = DEAD_RETRY_FIRST
        self._back_logged = False  # "went back to the queue" was logged since the last failure
        # The I/O loop belongs to whoever holds _io: the main thread, or the keeper while
        # a handler is slow. Deliveries wait in _deliveries for the main thread.
        self._io = threading.Lock()
        self._deliveries: deque[_Delivery] = deque()
        self._in_hand = False
        self._busy_since: float | None = None
        self._keeper_active = False
        self._running = False
        self._keeper_tick = threading.Event()
        heartbeat = amqp.heartbeat
        self.slow_after = min(1.0, heartbeat / 4) if heartbeat > 0 else 1.0
        self.handled = 0
        self.dead = 0
        self.retried = 0  # handler calls after a failure (each retry counts)
        self.latency = Latency()  # handler call durations, shipped with the status reports
        self.connected_url: str | None = None
        self.since = time.time()
        self.queue_depth: int | None = None  # messages ready in the queue; None while unknown
        self._depth_asked = False
        self._log_failure: _LogFailure | None = None
        self._withheld = -1  # the channel generation whose consume waits for the log to work
        self._handled_at_resume = -1
        self._last_delay = PROBE_DELAY

    # -- public, called from the I/O loop's thread -------------------------------------------

    def start(self) -> None:
        """Make the first connection attempt (the loop runs in ``run``)."""
        self._running = True
        self._warn_insecure()
        with self._io:
            self._connect()
            self.ioloop.call_later(DEPTH_INTERVAL, self._poll_depth)

    def run(self) -> None:
        """Drive the I/O loop and handle deliveries until ``stop`` has finished."""
        keeper = threading.Thread(target=self._keep_alive, name="edm-keeper", daemon=True)
        keeper.start()
        self.ioloop.activate_poller()
        try:
            while self._running:
                with self._io:
                    self.ioloop.poll()
                    if not self._deliveries:
                        self.ioloop.process_timeouts()
                        continue
                # A delivery first: the broker waits for its ack, the timers can wait for it.
                self._handle_deliveries()
                with self._io:
                    self.ioloop.process_timeouts()
        finally:
            self._running = False
            self._keeper_tick.set()
            keeper.join(timeout=5)
            self.ioloop.deactivate_poller()

    def _warn_insecure(self) -> None:
        warning = insecure_tls_warning(self.amqp.url, self.amqp.tls)
        if warning:
            log.warning("%s.", warning)

    def _end_loop(self) -> None:
        self._running = False
        self.ioloop.add_callback_threadsafe(_noop)

    def stop(self) -> None:
        """Graceful stop: finish the message in hand, ack it, close cleanly, end ``run``."""
        if self._stopping:
            return
        self._stopping = True
        self._interrupt.set()
        log.info("Stopping the consumer after the message in hand.")
        self._drain()

    def reload(self, amqp: AmqpConfig, handlers: HandlerFactory) -> None:
        """Apply new AMQP settings: drain, close, reconnect with them. Nothing is lost.

        The new handler is built at once (ConfigError, and nothing changes, if it cannot be);
        it replaces the running one, which is closed, once the message in hand is finished.
        """
        if amqp == self.amqp and handlers == self.handlers:
            return
        bound = handlers.build()
        if self._pending is not None:
            self._pending[2].release()  # a reload that never applied: its handler goes
        self._pending = (amqp, handlers, bound)
        log.info("Applying new AMQP settings (queue %s).", amqp.queue)
        self._drain()

    def snapshot(self) -> dict[str, Any]:
        return {
            "state": self._state,
            "handled": self.handled,
            "dead_lettered": self.dead,
            "retried": self.retried,
            "latency": self.latency.report(),
            "connected": self.connected_url is not None,
            "queue": self.amqp.queue,
            "queue_depth": self.queue_depth,
            # the broker in use, or the one being tried while connecting or backing off
            "broker": mask_url(self._connection_url) if self._connection_url else None,
            "since": self.since,
        }

    # -- connection ----------------------------------------------------------------------------

    def _set_state(self, state: str) -> None:
        if state != self._state:
            self._state = state
            self.since = time.time()
            self._emit(self.snapshot())

    def _connect(self) -> None:
        self._reconnect_timer = None
        urls = self.amqp.url
        url = urls[self._url_index % len(urls)]
        self._set_state("connecting")
        log.debug("Connecting to %s.", mask_url(url))
        try:
            params = parameters(url, self.amqp.heartbeat, self.amqp.tls)
        except BrokerError as exc:  # a certificate file gone or unreadable since the config check
            self._connection_url = url
            self._on_open_error(None, exc)
            return
        # A broker alarm blocks the connection only while it has a dead letter to take; the
        # connection waits it out instead of being torn down (a reconnect would redeliver the
        # message, fail it again and meet the same alarm). Heartbeats go on meanwhile.
        params.blocked_connection_timeout = None
        connection = connection_class(self.amqp.fast_lane)(
            params,
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_closed,
            custom_ioloop=self.ioloop,
        )
        connection.add_on_connection_blocked_callback(self._on_blocked)
        connection.add_on_connection_unblocked_callback(self._on_unblocked)
        self._connection = connection
        self._connection_url = url
        self._blocked = None

    def _on_open(self, connection: LaneConnection) -> None:
        self.connected_url = self._connection_url
        log.info("Connected to %s.", mask_url(self._connection_url))
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_blocked(self, connection: LaneConnection, frame: pika.frame.Method) -> None:
        """The broker stopped reading this connection (a memory or disk alarm): say so once."""
        if connection is not self._connection or self._blocked is not None:
            return
        reason = str(getattr(frame.method, "reason", "") or "") or "no reason given"
        log.warning("The broker blocks publishing: %s.", reason)
        self._blocked = (self._state, time.monotonic())
        self._set_state(f"blocked by the broker: {reason}")

    def _on_unblocked(self, connection: LaneConnection, _frame: pika.frame.Method) -> None:
        """The alarm is over: what waited (a dead letter's confirm) goes on by itself."""
        if connection is not self._connection or self._blocked is None:
            return
        before, since = self._blocked
        self._blocked = None
        log.info("The broker no longer blocks publishing (blocked for %.1f s).", time.monotonic() - since)
        if self._state.startswith("blocked by the broker: "):
            # A log that began failing meanwhile is what holds the consumer back now.
            self._set_state(self._log_failure.activity if self._log_failure is not None else before)

    def _on_open_error(self, connection: LaneConnection | None, error: BaseException | str) -> None:
        reason = describe(error) if isinstance(error, BaseException) else mask_url(str(error))
        log.warning("Cannot connect to %s: %s.", mask_url(self._connection_url), reason)
        self._connection = None
        self._after_close()

    def _on_closed(self, connection: LaneConnection, reason: BaseException) -> None:
        self._connection = None
        self._channel = None
        self._consumer_tag = None
        self._generation += 1
        if self._stopping or self._pending is not None:
            log.info("Closed the connection to %s.", mask_url(self._connection_url))
        else:
            log.warning("Lost the connection to %s: %s.", mask_url(self._connection_url), describe(reason))
        self.connected_url = None
        self.queue_depth = None
        self._after_close()

    def _after_close(self) -> None:
        self._fail_dead_pending()
        if self._stopping:
            self._set_state("stopped")
            self.bound.release()
            if self._pending is not None:
                self._pending[2].release()
            self._end_loop()
            return
        if self._pending is not None:
            old = self.bound
            self.amqp, self.handlers, self.bound = self._pending
            self.handler = self.bound.call
            self._pending = None
            old.release()
            self._warn_insecure()
            self._draining = False
            self._url_index = 0
            self._round = 0
            self._connect()
            return
        self._draining = False
        self._url_index += 1
        if self._url_index % len(self.amqp.url):
            self._connect()  # try the next URL of this round at once
            return
        delay = min(self.amqp.retry_max, 0.25 * 2**self._round)
        self._round += 1
        self._set_state("backing off")
        log.info("Reconnecting in %.1f s.", delay)
        self._reconnect_timer = self.ioloop.call_later(delay, self._connect)

    def _drain(self) -> None:
        """Stop taking messages; close once the one in hand is finished."""
        self._draining = True
        if self._connection is None:
            if self._reconnect_timer is not None:
                self.ioloop.remove_timeout(self._reconnect_timer)
            self._after_close()
            return
        self._set_state("draining")
        self._connection.close_lane()
        if self._channel is not None and self._channel.is_open and self._consumer_tag:
            self._channel.basic_cancel(self._consumer_tag)
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        idle = not self._in_hand and not self._dead_pending and not self._dead_waiting
        if self._draining and idle and self._connection is not None:
            if self._connection.is_open:
                self._connection.close()
            elif self._connection.is_closed:
                self._on_closed(self._connection, pika.exceptions.ConnectionClosedByClient(200, "OK"))

    # -- channel and topology ------------------------------------------------------------------

    def _on_channel_open(self, channel: pika.channel.Channel) -> None:
        self._channel = channel
        self._publish_seq = 0
        self._depth_asked = False
        self._dead_ready = False
        channel.add_on_close_callback(self._on_channel_closed)
        a = self.amqp
        channel.exchange_declare(
            a.exchange, a.exchange_type, durable=a.durable, callback=lambda _f: self._declare_queue()
        )
        self._declare_dead()

    def _declare_queue(self) -> None:
        a = self.amqp
        assert self._channel is not None
        channel = self._channel
        channel.queue_declare(
            a.queue,
            durable=a.durable,
            arguments=dict(a.queue_arguments) or None,
            callback=lambda frame: self._bind_queue(channel, frame),
        )

    def _bind_queue(self, channel: pika.channel.Channel, declared: pika.frame.Method) -> None:
        self._on_depth(declared)
        a = self.amqp
        channel.queue_bind(a.queue, a.exchange, a.routing_key, callback=lambda _f: self._set_qos())

    def _declare_dead(self) -> None:
        """Declare ``<exchange>.dead`` and ``<queue>.dead`` on a channel of their own.

        A failed declaration closes its channel: a ``.dead`` queue whose node is down (404), or
        one declared otherwise by an earlier version (406), must cost the dead letters at
        most, never the consumption of the main queue. So the main channel never declares it;
        a failure is logged, and the declaration is tried again when a message needs it.
        """
        connection = self._connection
        if self._dead_declaring or connection is None or not connection.is_open:
            return
        self._dead_declaring = True
        generation = self._generation
        connection.channel(on_open_callback=lambda channel: self._on_dead_channel_open(channel, generation))

    def _on_dead_channel_open(self, channel: pika.channel.Channel, generation: int) -> None:
        a = self.amqp
        dead_exchange, dead_queue = f"{a.exchange}.dead", f"{a.queue}.dead"
        arguments = helper_queue_arguments(a.queue_arguments)
        channel.add_on_close_callback(lambda _c, reason: self._on_dead_channel_closed(generation, reason))
        channel.exchange_declare(
            dead_exchange,
            "direct",
            durable=True,
            callback=lambda _f: channel.queue_declare(
                dead_queue,
                durable=True,
                arguments=arguments or None,
                callback=lambda _g: channel.queue_bind(
                    dead_queue,
                    dead_exchange,
                    a.routing_key,
                    callback=lambda _h: self._on_dead_declared(channel, generation),
                ),
            ),
        )

    def _on_dead_declared(self, channel: pika.channel.Channel, generation: int) -> None:
        self._dead_declaring = False
        if channel.is_open:
            channel.close()
        if generation != self._generation:
            return
        self._dead_ready = True
        self._dead_backoff = DEAD_RETRY_FIRST
        if self._dead_problem is not None:
            log.info("Declared %s.dead: dead letters go there again.", self.amqp.queue)
            self._dead_problem = None
        self._flush_dead_waiting()

    def _on_dead_channel_closed(self, generation: int, reason: BaseException) -> None:
        if not isinstance(reason, pika.exceptions.ChannelClosedByBroker):
            # closed by us once declared, or with its connection (whose end clears the rest)
            if not self._dead_ready:
                self._dead_declaring = False
            return
        self._dead_declaring = False
        if generation != self._generation:
            return
        a = self.amqp
        dead_queue = f"{a.queue}.dead"
        if reason.reply_code == 406:
            vhost = self._connection.params.virtual_host if self._connection is not None else "/"
            problem = inequivalent_helper(
                dead_queue, vhost, reason.reply_text, helper_queue_arguments(a.queue_arguments)
            )
            level = logging.ERROR
        else:
            problem = (
                f"Cannot declare the dead-letter queue {dead_queue}: {describe(reason)}. Consuming goes "
                f"on; the declaration is tried again when a message needs it."
            )
            level = logging.WARNING
        if problem != self._dead_problem:
            log.log(level, "%s", problem)
            self._dead_problem = problem
        # The next message to dead-letter tries again, but not at once: a poison message
        # coming round an otherwise empty queue must not turn into a loop of declarations.
        self._dead_retry_at = time.monotonic() + self._dead_backoff
        self._dead_backoff = min(self._dead_backoff * 2, max(self.amqp.retry_max, DEAD_RETRY_FIRST))
        self._back_logged = False
        self._flush_dead_waiting()

    def _flush_dead_waiting(self) -> None:
        """Dead-letter what waits for ``.dead`` if it is declared, else send it back to its queue."""
        if self._dead_declaring:
            return  # the declaration's end flushes
        waiting, self._dead_waiting = self._dead_waiting, []
        channel = self._channel
        for held_in, tag, message, outcome in waiting:
            if held_in != self._generation or channel is None or not channel.is_open:
                continue  # from a closed channel: the broker redelivers it
            if self._dead_ready:
                self._dead_letter(held_in, tag, message, outcome)
            else:
                self._back_to_queue(held_in, tag, message, outcome)
        self._close_if_idle()

    def _set_qos(self) -> None:
        assert self._channel is not None
        self._channel.confirm_delivery(self._on_confirm)
        self._channel.basic_qos(prefetch_count=self.amqp.prefetch, callback=lambda _f: self._consume())

    def _consume(self) -> None:
        assert self._channel is not None
        if self._draining:
            self._close_if_idle()
            return
        if self._log_failure is not None:
            self._withheld = self._generation  # _resume consumes once the log can be written
            self._set_state(self._log_failure.activity)
            return
        self._consumer_tag = self._channel.basic_consume(self.amqp.queue, self._on_message, auto_ack=False)
        if self._connection is not None:
            lane = Lane(self._channel.channel_number, self._consumer_tag, self._on_fast_delivery)
            self._connection.open_lane(lane)
        self._round = 0
        log.info(
            "Consuming from queue %s (exchange %s, routing key %s, prefetch %d).",
            self.amqp.queue,
            self.amqp.exchange,
            self.amqp.routing_key,
            self.amqp.prefetch,
        )
        self._set_state("consuming")

    def _on_channel_closed(self, channel: pika.channel.Channel, reason: BaseException) -> None:
        if channel is not self._channel:
            return
        if self._connection is not None:
            self._connection.close_lane()
        self._channel = None
        self._consumer_tag = None
        self._generation += 1
        if self._connection is not None and self._connection.is_open:
            if not (self._stopping or self._pending is not None):
                log.error("The broker closed the channel: %s.", describe(reason))
            self._connection.close()

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
        while True:
            with self._io:
                if not deliveries or self._draining or not self._running or self._log_failure:
                    return
                generation, tag, message = deliveries.popleft()
                if generation != self._generation:
                    continue  # from a closed channel: the broker redelivers it
                self._in_hand = True
            self._busy_since = time.monotonic()
            outcome = self._handle(message)
            self._busy_since = None
            if self._keeper_active:
                self.ioloop.add_callback_threadsafe(_noop)  # end the keeper's poll now
            with self._io:
                self._in_hand = False
                self._on_done(generation, tag, message, outcome)
                if isinstance(self.ioloop, FlushingIOLoop):
                    self.ioloop.flush()  # the ack leaves now: the broker waits for it

    def _keep_alive(self) -> None:
        """While a handler is slow, serve the I/O loop (heartbeats, broker frames) for it."""
        tick = self.slow_after / 2
        while self._running:
            since = self._busy_since
            if since is None or time.monotonic() - since < self.slow_after:
                self._keeper_tick.wait(tick)
                continue
            self._keeper_active = True
            try:
                while self._handler_busy():
                    with self._io:
                        if not self._handler_busy():
                            break
                        self.ioloop.poll()
                        self.ioloop.process_timeouts()
            finally:
                self._keeper_active = False

    def _handler_busy(self) -> bool:
        """Read afresh each time: the main thread clears it when the handler returns."""
        return self._busy_since is not None and self._running

    def _handle(self, message: Message) -> _Outcome:
        started = time.perf_counter()
        try:
            self.handler(message)
        except LogWriteError as exc:  # the disk's fault, not the message's
            return _Outcome("held", error=str(exc), failure=exc)
        except Reject as exc:
            self.latency.observe(time.perf_counter() - started)
            return _Outcome("dead", error=f"Reject: {exc.reason}", attempts=message.attempts)
        except Exception as exc:  # noqa: BLE001 - any handler failure is retried or dead-lettered
            self.latency.observe(time.perf_counter() - started)
            return self._retry(message, exc)
        self.latency.observe(time.perf_counter() - started)
        return _OK

    def _retry(self, message: Message, exc: Exception) -> _Outcome:
        attempts = 1
        delay = RETRY_DELAY
        while True:
            error = f"{type(exc).__name__}: {exc}"
            if attempts > self.amqp.max_retries:
                return _Outcome("dead", error=error, attempts=attempts)
            log.warning(
                "The handler failed (attempt %d of %d): %s; retrying in %.1f s.",
                attempts,
                self.amqp.max_retries + 1,
                error,
                delay,
            )
            if self._interrupt.wait(delay):
                return _Outcome("requeue", error=error, attempts=attempts)
            delay = min(delay * 2, RETRY_DELAY_MAX)
            attempts += 1
            self.retried += 1
            try:
                self.handler(message)
                return _Outcome("ok", attempts=attempts)
            except LogWriteError as failure:
                return _Outcome("held", error=str(failure), failure=failure)
            except Reject as rejected:
                return _Outcome("dead", error=f"Reject: {rejected.reason}", attempts=attempts)
            except Exception as again:  # noqa: BLE001
                exc = again

    def _on_done(self, generation: int, tag: int, message: Message, outcome: _Outcome) -> None:
        channel = self._channel
        if generation == self._generation and channel is not None and channel.is_open:
            if outcome is _OK or outcome.kind == "ok":
                assert self._connection is not None  # an open channel has its connection
                self._connection.send_ack(channel.channel_number, tag)
                self.handled += 1
            elif outcome.kind == "dead":
                self._dead_letter(generation, tag, message, outcome)
            else:  # "requeue", and "held": back to the queue, to be handled once the log works
                channel.basic_nack(tag, requeue=True)
        if outcome is not _OK and outcome.failure is not None:
            self._hold_off(outcome.failure)
        self._close_if_idle()

    # -- a log that cannot be written: hold off, probe, resume --------------------------------

    def _hold_off(self, error: LogWriteError) -> None:
        """Stop taking deliveries and give back the prefetched ones (the one in hand went back
        already); probe the log with back-off and resume by ourselves once it takes a record."""
        if self._stopping:
            return
        failure = self._log_failure
        if failure is None:
            # A relapse before any message got through (a probe line fits, a message does not)
            # goes on with the back-off where it was instead of probing quickly again.
            relapse = self.handled == self._handled_at_resume
            delay = self._probe_delay(self._last_delay) if relapse else PROBE_DELAY
            failure = self._log_failure = _LogFailure(error, time.monotonic(), delay)
            self.ioloop.call_later(delay, self._probe)
        failure.error = error
        if self._draining:
            return  # the channel closes anyway; _consume holds off on the next one
        channel = self._channel
        if channel is not None and channel.is_open and self._consumer_tag is not None:
            if self._connection is not None:
                self._connection.close_lane()
            # pika rejects (requeues) what still arrives for a cancelled consumer
            channel.basic_cancel(self._consumer_tag)
            self._consumer_tag = None
            self._withheld = self._generation
        while self._deliveries:
            generation, tag, _message = self._deliveries.popleft()
            if generation == self._generation and channel is not None and channel.is_open:
                channel.basic_nack(tag, requeue=True)
        self._set_state(failure.activity)

    def _probe(self) -> None:
        """Try to write the line that says the log works again; resume when it is written."""
        failure = self._log_failure
        if failure is None or self._stopping:
            return
        seconds = time.monotonic() - failure.since
        try:
            failure.error.write(
                "WARNING",
                f"Writing the log works again after {seconds:.1f} s of failure ({failure.error}); "
                "the messages held off meanwhile waited in the queue.",
            )
        except LogWriteError as exc:
            shown = failure.activity
            failure.error = exc
            failure.delay = self._probe_delay(failure.delay)
            self.ioloop.call_later(failure.delay, self._probe)
            if self._state == shown:
                self._set_state(failure.activity)  # the reason may have changed
            return
        self._resume()

    def _probe_delay(self, previous: float) -> float:
        return min(previous * 2, max(self.amqp.retry_max, PROBE_DELAY))

    def _resume(self) -> None:
        assert self._log_failure is not None
        self._last_delay = self._log_failure.delay
        self._log_failure = None
        self._handled_at_resume = self.handled
        channel = self._channel
        withheld, self._withheld = self._withheld, -1
        if withheld == self._generation and channel is not None and channel.is_open and not self._draining:
            self._consume()

    def _dead_letter(self, generation: int, tag: int, message: Message, outcome: _Outcome) -> None:
        """Publish to ``<exchange>.dead`` once its topology is declared; ack on the confirm.

        While ``<queue>.dead`` cannot be declared, the message goes to the end of its own
        queue instead (confirmed before the original is acked, like a dead letter): holding it,
        or a nack, which puts it back at the head, would stop the messages behind it at
        prefetch 1. It is dead-lettered at a later pass, once the declaration works.
        """
        if self._dead_ready:
            self._republish(
                generation, tag, message, outcome, f"{self.amqp.exchange}.dead", self.amqp.routing_key
            )
        elif time.monotonic() < self._dead_retry_at:
            # Not at once: with nothing else in the queue, a poison message would come round
            # as fast as the broker can carry it. Unacked, it holds back the next delivery.
            self._dead_waiting.append((generation, tag, message, outcome))
            self.ioloop.call_later(RETRY_DELAY, self._flush_dead_waiting)
        else:
            self._dead_waiting.append((generation, tag, message, outcome))
            self._declare_dead()

    def _back_to_queue(self, generation: int, tag: int, message: Message, outcome: _Outcome) -> None:
        back = _Outcome("back", outcome.error, outcome.attempts)
        self._republish(generation, tag, message, back, "", self.amqp.queue)

    def _republish(
        self, generation: int, tag: int, message: Message, outcome: _Outcome, exchange: str, routing_key: str
    ) -> None:
        """Publish a copy with ``x-edm-error`` and ``x-edm-attempts``; the confirm acks the original."""
        assert self._channel is not None
        a = self.amqp
        old = message.properties
        headers = dict(message.headers)
        headers["x-edm-error"] = outcome.error[:1000]
        headers["x-edm-attempts"] = outcome.attempts
        headers["x-edm-queue"] = a.queue
        properties = pika.BasicProperties(
            content_type=old.content_type,
            content_encoding=old.content_encoding,
            headers=headers,
            delivery_mode=pika.DeliveryMode.Persistent,
            correlation_id=old.correlation_id,
            message_id=old.message_id,
            timestamp=old.timestamp,
            type=old.type,
            app_id=old.app_id,
        )
        self._channel.basic_publish(exchange, routing_key, message.body, properties)
        self._publish_seq += 1
        self._dead_pending[self._publish_seq] = (generation, tag, outcome)

    def _on_confirm(self, frame: pika.frame.Method) -> None:
        method = frame.method
        acked = isinstance(method, pika.spec.Basic.Ack)
        seqs = (
            [s for s in self._dead_pending if s <= method.delivery_tag]
            if method.multiple
            else [method.delivery_tag]
        )
        for seq in seqs:
            entry = self._dead_pending.pop(seq, None)
            if entry is None:
                continue
            generation, tag, outcome = entry
            channel = self._channel
            if generation == self._generation and channel is not None and channel.is_open:
                if acked and outcome.kind == "back":
                    channel.basic_ack(tag)
                    # once per failed declaration: a poison message may come round many times
                    level = logging.DEBUG if self._back_logged else logging.ERROR
                    self._back_logged = True
                    log.log(
                        level,
                        "Cannot dead-letter a message after %d attempts (%s): %s.dead is not "
                        "available; the message went back to the end of the queue.",
                        outcome.attempts,
                        outcome.error,
                        self.amqp.queue,
                    )
                elif acked:
                    channel.basic_ack(tag)
                    self.dead += 1
                    log.error(
                        "Dead-lettered a message to %s.dead after %d attempts: %s",
                        self.amqp.queue,
                        outcome.attempts,
                        outcome.error,
                    )
                else:
                    channel.basic_nack(tag, requeue=True)
                    log.error("The broker refused a dead letter; the message was requeued.")
        self._close_if_idle()

    def _fail_dead_pending(self) -> None:
        """The channel closed with dead letters unconfirmed: the originals will be redelivered."""
        self._dead_pending = {}
        self._dead_waiting = []
        self._dead_declaring = False
        self._dead_ready = False


def _noop() -> None:
    """Wakes the I/O loop's poll."""
