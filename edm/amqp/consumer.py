"""The AMQP consumer: wires the connection, the declarations, the handler and the outcomes.

It follows pika's reconnecting asynchronous consumer, with one difference that matters for
speed: the handler runs inline, in the thread that drives the I/O loop, so a fast handler
costs no thread hand-off (at prefetch 1 every microsecond per message is throughput); the
keeper (``edm.amqp.keeper``) serves the loop while a handler is slow. The parts:

- ``connection.Link``: one connection at a time, URL after URL, with back-off;
- ``topology``: the main queue on the consuming channel, the helper queues (``.dead``, the
  delay queues) on a channel of their own;
- ``outcomes``: what the handler's ending means, and the republish-confirm-ack it takes;
- ``deliveries``: what was received, through the handler (inline, or on the handler threads
  of ``pool`` with ``amqp.threads`` > 1), out as an ack or an outcome;
- ``holdoff``: a log that cannot be written holds deliveries off until it can.

A message is acked only after its handler returned, or once its retry or dead letter is
confirmed. Every channel gets a generation number: a delivery from an older channel is never
acked (the broker redelivers it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pika.channel
import pika.exceptions
import pika.frame
from pika.adapters.select_connection import IOLoop

from edm.amqp.connection import ConnectionFactory, Link, State
from edm.amqp.deliveries import Deliveries, build, release
from edm.amqp.depth import QueueDepth
from edm.amqp.fastlane import Lane, LaneConnection
from edm.amqp.holdoff import HoldOff
from edm.amqp.ioloop import io_loop
from edm.amqp.keeper import Keeper, slow_after
from edm.amqp.outcomes import Settler, Tally, window
from edm.amqp.params import describe, insecure_tls_warning
from edm.amqp.pool import Pool
from edm.amqp.topology import Helpers, MainDeclaration
from edm.config import AmqpConfig
from edm.errors import LogWriteError
from edm.handlers.loader import Bound, HandlerFactory
from edm.metrics import Latency
from edm.redact import mask_url

log = logging.getLogger(__name__)

Emit = Callable[[dict[str, Any]], None]

HELPERS_WAIT = 2.0  # seconds the first consume waits at most for the helper queues' declaration


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
        bounds = build(handlers, amqp.threads)  # raises ConfigError naming amqp.handler
        self.ioloop = ioloop or io_loop(amqp.fast_lane)
        self._emit = emit
        self._link = Link(
            amqp, self.ioloop, self._on_open, self._on_down, self._set_state, self._show, connection_factory
        )
        self._helpers = Helpers(amqp, self._on_helpers_done)
        self._tally = Tally()
        self._channel: pika.channel.Channel | None = None
        self._consumer_tag: str | None = None
        self._state = State.STARTING
        self._shown = ""
        self._stopping = False
        self._pending: tuple[AmqpConfig, HandlerFactory, list[Bound]] | None = None
        self._draining = False
        # The I/O loop belongs to whoever holds _io: the main thread, or the keeper while a
        # handler is slow. Deliveries wait in _flow for the main thread.
        self._io = threading.Lock()
        self._running = False
        self._keeper = Keeper(self.ioloop, self._io, slow_after(amqp.heartbeat))
        self._flow = Deliveries(
            amqp,
            bounds,
            self.ioloop,
            self._io,
            self._keeper,
            self._may_take,
            self._hold_off,
            self._close_if_idle,
        )
        self._hold = HoldOff(self.ioloop, amqp.retry_max, self._on_log_works, self._show)
        self.since = time.time()
        self._depth = QueueDepth(self.ioloop, self._depth_target)
        self._withheld = -1  # the channel generation whose consume waits for the log to work
        self._qos_set = -1  # the channel generation whose consume waits for the helper queues

    @property
    def handled(self) -> int:
        return self._flow.handled

    @property
    def latency(self) -> Latency:
        """Handler call durations, shipped with the status reports."""
        return self._flow.latency

    @property
    def _pool(self) -> Pool | None:
        return self._flow.pool

    @property
    def queue_depth(self) -> int | None:
        """Messages ready in the queue; None while unknown."""
        return self._depth.value

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
            self._depth.start()

    def run(self) -> None:
        """Drive the I/O loop and handle deliveries until ``stop`` has finished."""
        self._keeper.start()
        flow = self._flow
        if flow.pool is not None:
            flow.pool.start()
        self.ioloop.activate_poller()
        try:
            while self._running:
                with self._io:
                    self.ioloop.poll()
                    if not flow.waiting:
                        self.ioloop.process_timeouts()
                        continue
                # A delivery first: the broker waits for its ack, the timers can wait for it.
                if flow.pool is None:
                    flow.handle()
                else:
                    flow.dispatch()
                with self._io:
                    self.ioloop.process_timeouts()
        finally:
            self._running = False
            self._keeper.stop()
            if flow.pool is not None:
                flow.pool.stop()
            self.ioloop.deactivate_poller()

    def stop(self) -> None:
        """Graceful stop: finish the message in hand, ack it, close cleanly, end ``run``."""
        if self._stopping:
            return
        self._stopping = True
        self._depth.stop()
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
            # [thread name, wall time its handler began]: the main process names them if it must kill
            "handling": self._handling(),
            "connected": self._link.open,
            "queue": self.amqp.queue,
            "queue_depth": self.queue_depth,
            # the broker in use, or the one being tried while connecting or backing off
            "broker": mask_url(url) if url else None,
            "since": self.since,
        }

    def _handling(self) -> list[list[Any]]:
        if self._pool is not None:
            return [[name, since] for name, since in self._pool.handling()]
        began = self._keeper.busy_since  # the inline handler, in the main thread
        if began is None:
            return []
        return [[threading.main_thread().name, time.time() - (time.monotonic() - began)]]

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
        self._flow.unbind()
        self._consumer_tag = None
        self._helpers.attach(None, self.amqp)
        if reason is not None:
            self._flow.generation += 1
            self._depth.lost()
            if self._stopping or self._pending is not None:
                log.info("Closed the connection to %s.", mask_url(self._link.url))
            else:
                log.warning("Lost the connection to %s: %s.", mask_url(self._link.url), describe(reason))
        if self._stopping:
            self._set_state(State.STOPPED)
            self._flow.release()
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
        self.amqp, self.handlers, bounds = self._pending
        self._pending = None
        self._flow.replace(self.amqp, bounds)
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
        if self._flow.pool is not None:
            self._flow.pool.take_back()  # not started: the channel's close gives them back
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        """While draining: close once no message is in hand and no republish is owed."""
        if not self._draining:
            return  # the common case, after every message: one test
        connection = self._link.connection
        if self._flow.busy or connection is None:
            return
        if connection.is_open:
            connection.close()
        elif connection.is_closed:
            self._link.closed(connection, pika.exceptions.ConnectionClosedByClient(200, "OK"))

    # -- channel -------------------------------------------------------------------------------

    def _on_channel_open(self, channel: pika.channel.Channel) -> None:
        self._channel = channel
        self._depth.new_channel()
        channel.add_on_close_callback(self._on_channel_closed)
        connection = self._link.connection
        assert connection is not None  # the channel opened on it
        settler = Settler(channel, self.amqp, self._helpers, self.ioloop, self._tally, self._close_if_idle)
        self._flow.bind(channel, connection, settler)
        self._helpers.declare()
        MainDeclaration(channel, self.amqp, self._on_declared).start()

    def _on_declared(self, declared: pika.frame.Method) -> None:
        self._depth.on_declared(declared)
        assert self._flow.settler is not None
        self._flow.settler.start(self._on_qos)

    def _on_qos(self, _frame: pika.frame.Method) -> None:
        """Consume once the helper queues are declared (or failed), but never wait long for them.

        Their declarations answer at once on a healthy broker; consuming after them keeps their
        replies from arriving among the first deliveries (which then take pika's slower path).
        """
        self._qos_set = self._flow.generation
        if self._helpers.declaring:
            self.ioloop.call_later(HELPERS_WAIT, self._start_consuming)
        else:
            self._start_consuming()

    def _start_consuming(self) -> None:
        channel = self._channel
        if self._qos_set != self._flow.generation or channel is None or not channel.is_open:
            return
        self._qos_set = -1
        self._consume()

    def _consume(self) -> None:
        assert self._channel is not None
        if self._draining:
            self._close_if_idle()
            return
        if self._hold.failure is not None:
            self._withheld = self._flow.generation  # _on_log_works consumes once the log works
            self._set_state(State.CONSUMING)
            return
        flow = self._flow
        self._consumer_tag = self._channel.basic_consume(self.amqp.queue, flow.on_message, auto_ack=False)
        connection = self._link.connection
        if connection is not None:
            connection.open_lane(
                Lane(self._channel.channel_number, self._consumer_tag, flow.on_fast_delivery)
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
        self._flow.unbind()
        self._consumer_tag = None
        self._flow.generation += 1
        if connection is not None and connection.is_open:
            if not (self._stopping or self._pending is not None):
                log.error("The broker closed the channel: %s.", describe(reason))
            connection.close()

    def _on_helpers_done(self) -> None:
        if self._flow.settler is not None:
            self._flow.settler.flush()
        self._start_consuming()

    # -- queue depth, for status ---------------------------------------------------------------

    def _depth_target(self) -> tuple[pika.channel.Channel, str] | None:
        """The channel to read the queue's depth on: while consuming, or held off on a channel
        whose topology is complete; never while draining."""
        channel = self._channel
        if self._draining or channel is None or not channel.is_open:
            return None
        if self._consumer_tag is None and self._withheld != self._flow.generation:
            return None
        return channel, self.amqp.queue

    # -- messages ------------------------------------------------------------------------------

    def _may_take(self) -> bool:
        """Whether a waiting delivery may go to a handler now."""
        return not self._draining and self._running and not self._hold.failure

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
            self._withheld = self._flow.generation
        for generation, tag, _message in self._flow.take_back():
            if generation == self._flow.generation and channel is not None and channel.is_open:
                channel.basic_nack(tag, requeue=True)
        self._show()

    def _on_log_works(self) -> None:
        self._hold.handled_at_resume = self.handled
        channel = self._channel
        withheld, self._withheld = self._withheld, -1
        if (
            withheld == self._flow.generation
            and channel is not None
            and channel.is_open
            and not self._draining
        ):
            self._consume()
        else:
            self._show()


def _noop() -> None:
    """Wakes the I/O loop's poll."""
