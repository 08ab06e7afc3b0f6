"""What becomes of a message once its handler is done: ack, retry later, dead letter.

``judge`` turns the handler's ending (it returned, or what it raised) into an ``Outcome``;
it is pure and knows no broker. A ``Settler`` carries an outcome out on one channel: a
retry is republished to a delay queue ``<queue>.retry.<ms>`` (contract §10), a dead letter
to ``<exchange>.dead``; each republish is publisher-confirmed before the original is acked,
so a message is never in neither place. Nothing here sleeps: a message waiting for its
retry waits in the broker, and the consumer goes on with the next one.

An original held unacked for its copy's confirm keeps its place in ``basic.qos``'s window:
at prefetch 1 the next message comes one confirm round trip after a failure. The window is
not widened meanwhile. Widening it would take RabbitMQ's channel-wide (``global``) prefetch,
since a per-consumer ``basic.qos`` applies only to consumers started after it, and the
broker coordinates a channel-wide prefetch with the queue on every delivery: measured on a
quiet machine, it cost every message about 30 % more broker CPU and 10-14 % of the
throughput at prefetch 1, to save about 0.1 ms per failed attempt (bench/README.md). The
window is the per-consumer ``max(prefetch, threads)``, set once per channel.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import pika
import pika.channel
import pika.frame
import pika.spec
from pika.adapters.select_connection import IOLoop

from edm.amqp.properties import carried_over
from edm.amqp.topology import Helpers, retry_queue
from edm.config import AmqpConfig
from edm.errors import LogWriteError
from edm.handlers.api import ATTEMPTS_HEADER, ERROR_HEADER, Message, Reject, Retry

log = logging.getLogger(__name__)

QUEUE_HEADER = "x-edm-queue"
ERROR_MAX = 1000  # characters of x-edm-error
WAIT = 0.2  # seconds a message waits, unacked, before going back while the helpers are down
# The broker's own dead-lettering history: ours is x-edm-attempts, and a copy of these on
# every pass through a delay queue would only grow the headers.
_BROKER_HEADERS = ("x-death", "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason")


class Kind(enum.Enum):
    ACK = "ack"  # the handler returned
    RETRY = "retry"  # to the delay queue, back on the main queue when its time is up
    DEAD = "dead"  # to <exchange>.dead: rejected, or out of retries
    HELD = "held"  # the log could not be written: back to the queue, not the message's fault
    BACK = "back"  # to the end of its own queue: the helper queues cannot be declared now


@dataclass(frozen=True)
class Outcome:
    kind: Kind
    error: str = ""
    attempts: int = 1
    delay: float = 0.0  # seconds, for a retry
    failure: LogWriteError | None = None
    rejected: bool = False  # dead because the handler raised Reject (not out of retries)


OK = Outcome(Kind.ACK)


@dataclass
class Tally:
    """What the settlers did, kept across channels for the status report."""

    dead: int = 0  # every dead letter, rejected ones included
    retried: int = 0
    rejected: int = 0  # the dead letters of a Reject


def pick_delay(delays: tuple[float, ...], attempts: int, asked: float | None) -> float:
    """The delay of the retry after attempt number ``attempts``.

    Without ``asked``, the schedule: the n-th retry waits ``delays[min(n, len) - 1]``. With it,
    the first configured delay that is at least ``asked``, else the largest: only configured
    delays have a queue.
    """
    if asked is None:
        return delays[min(attempts, len(delays)) - 1]
    fitting = [d for d in delays if d >= asked]
    return min(fitting) if fitting else max(delays)


def judge(message: Message, exc: BaseException, amqp: AmqpConfig) -> Outcome:
    """The outcome of a handler that raised ``exc`` on ``message``."""
    if isinstance(exc, LogWriteError):  # the disk's fault, not the message's
        return Outcome(Kind.HELD, error=str(exc), failure=exc)
    attempts = message.attempts
    if isinstance(exc, Reject):
        return Outcome(Kind.DEAD, error=f"Reject: {exc.reason}", attempts=attempts, rejected=True)
    asked = None
    if isinstance(exc, Retry):
        error = f"Retry: {exc.reason}" if exc.reason else "Retry"
        asked = exc.delay
    else:
        error = f"{type(exc).__name__}: {exc}"
    if attempts > amqp.max_retries:
        return Outcome(Kind.DEAD, error=error, attempts=attempts)
    return Outcome(
        Kind.RETRY, error=error, attempts=attempts, delay=pick_delay(amqp.retry_delays, attempts, asked)
    )


def republished_properties(message: Message, outcome: Outcome, queue: str) -> pika.BasicProperties:
    """The message's properties, persistent, with ``x-edm-attempts`` and ``x-edm-error`` set.

    A message sent back because the helper queues are down does not count the attempt it
    made: it was not its fault that its outcome could not be carried out.

    ``expiration`` is dropped (a dead letter must not vanish; a retry's wait is the delay
    queue's) and so is ``user_id`` (the broker refuses one that is not the connection's user).
    """
    old = message.properties
    headers = {
        k: v
        for k, v in message.headers.items()
        if k not in _BROKER_HEADERS and not k.startswith("x-last-death")
    }
    headers[ERROR_HEADER] = outcome.error[:ERROR_MAX]
    counted = outcome.attempts - 1 if outcome.kind is Kind.BACK else outcome.attempts
    if counted > 0:
        headers[ATTEMPTS_HEADER] = counted
    else:
        headers.pop(ATTEMPTS_HEADER, None)
    headers[QUEUE_HEADER] = queue
    return carried_over(old, headers)


def window(amqp: AmqpConfig) -> int:
    """The channel's ``basic.qos`` prefetch: ``amqp.prefetch``, and a message for every thread."""
    return max(amqp.prefetch, amqp.threads)


@dataclass
class _Waiting:
    tag: int
    message: Message
    outcome: Outcome


@dataclass
class _Unconfirmed:
    tag: int  # of the original delivery, acked on the confirm
    outcome: Outcome
    routing_key: str
    body: bytes
    returned: bool = False  # the broker could not route the copy: the original must stay


@dataclass
class Settler:
    """Carries out the outcomes other than a plain ack on one channel (one per channel)."""

    channel: pika.channel.Channel
    amqp: AmqpConfig
    helpers: Helpers
    ioloop: IOLoop
    tally: Tally
    on_idle: Callable[[], None]  # called when the last confirm came back
    _seq: int = 0
    _unconfirmed: dict[int, _Unconfirmed] = field(default_factory=dict)
    _waiting: list[_Waiting] = field(default_factory=list)

    @property
    def busy(self) -> bool:
        return bool(self._unconfirmed or self._waiting)

    def start(self, on_qos: Callable[[pika.frame.Method], None]) -> None:
        """Confirms on, returns heard, and the channel's window set (``on_qos`` gets its qos-ok)."""
        self.channel.confirm_delivery(self._on_confirm)
        self.channel.add_on_return_callback(self._on_return)
        self.channel.basic_qos(prefetch_count=window(self.amqp), global_qos=False, callback=on_qos)

    def settle(self, tag: int, message: Message, outcome: Outcome) -> None:
        if outcome.kind is Kind.HELD:
            self.channel.basic_nack(tag, requeue=True)  # handled once the log works again
            return
        if self.helpers.ready:
            self._publish(tag, message, outcome)
            return
        # Unacked, a waiting message holds back the next delivery at prefetch 1: not forever,
        # and not in a tight loop either while the helper queues cannot be declared.
        self._waiting.append(_Waiting(tag, message, outcome))
        if self.helpers.may_try_now():
            self.helpers.declare()
        else:
            self.ioloop.call_later(WAIT, self.flush)

    def flush(self) -> None:
        """Publish what waited for the helper queues, or send it back to the end of its queue."""
        if self.helpers.declaring or not self.channel.is_open:
            return  # the declaration's end flushes; a closed channel's messages are redelivered
        waiting, self._waiting = self._waiting, []
        for item in waiting:
            outcome = item.outcome
            if not self.helpers.ready:
                outcome = Outcome(Kind.BACK, outcome.error, outcome.attempts)
            self._publish(item.tag, item.message, outcome)
        if not self.busy:
            self.on_idle()

    def _publish(self, tag: int, message: Message, outcome: Outcome) -> None:
        a = self.amqp
        if outcome.kind is Kind.DEAD:
            exchange, routing_key = f"{a.exchange}.dead", a.routing_key
        elif outcome.kind is Kind.RETRY:
            exchange, routing_key = "", retry_queue(a.queue, outcome.delay)
        else:
            exchange, routing_key = "", a.queue
        properties = republished_properties(message, outcome, a.queue)
        # mandatory: a helper queue deleted since it was declared must not swallow the copy
        self.channel.basic_publish(exchange, routing_key, message.body, properties, mandatory=True)
        self._seq += 1
        self._unconfirmed[self._seq] = _Unconfirmed(tag, outcome, routing_key, message.body)

    def _on_return(
        self,
        _channel: pika.channel.Channel,
        method: pika.spec.Basic.Return,
        _properties: pika.BasicProperties,
        body: bytes,
    ) -> None:
        """A copy the broker could not route: its original goes back to the queue on the confirm.

        A return carries no sequence number; it comes before its confirm, and any unconfirmed
        copy with the same routing key and body is as good as another.
        """
        for entry in self._unconfirmed.values():
            if not entry.returned and entry.routing_key == method.routing_key and entry.body == body:
                entry.returned = True
                break
        log.error(
            "The broker could not route a message to %s (%s); the message was requeued and the "
            "helper queues are declared again.",
            method.routing_key or method.exchange,
            method.reply_text,
        )
        self.helpers.lost()

    def _on_confirm(self, frame: pika.frame.Method) -> None:
        method = frame.method
        acked = isinstance(method, pika.spec.Basic.Ack)
        if method.multiple:
            seqs = [s for s in self._unconfirmed if s <= method.delivery_tag]
        else:
            seqs = [method.delivery_tag]
        for seq in seqs:
            entry = self._unconfirmed.pop(seq, None)
            if entry is None or not self.channel.is_open:
                continue
            if acked and not entry.returned:
                self._confirmed(entry.tag, entry.outcome)
            else:
                self._refused(entry.tag, returned=entry.returned)
        if not self.busy:
            self.on_idle()

    def _confirmed(self, tag: int, outcome: Outcome) -> None:
        self.channel.basic_ack(tag)
        queue = self.amqp.queue
        if outcome.kind is Kind.RETRY:
            self.tally.retried += 1
            log.warning(
                "The handler failed (attempt %d of %d): %s; retrying in %s s (%s).",
                outcome.attempts,
                self.amqp.max_retries + 1,
                outcome.error,
                f"{outcome.delay:g}",
                retry_queue(queue, outcome.delay),
            )
        elif outcome.kind is Kind.DEAD:
            self.tally.dead += 1
            self.tally.rejected += outcome.rejected
            log.error(
                "Dead-lettered a message to %s.dead after %d attempts: %s",
                queue,
                outcome.attempts,
                outcome.error,
            )
        else:
            self.helpers.report_back(outcome.attempts, outcome.error)

    def _refused(self, tag: int, returned: bool) -> None:
        self.channel.basic_nack(tag, requeue=True)
        if returned:
            return  # said at the return
        log.error(
            "The broker refused a republished message (a retry or a dead letter); the message was requeued."
        )
