"""What edm declares on the broker: the main queue, and the helper queues beside it.

The main exchange, queue and binding are declared on the consuming channel (``declare_main``).
The helper queues — ``<queue>.dead`` with its exchange, and the delay queues
``<queue>.retry.<ms>`` of ``amqp.retry_delays`` — are declared by ``Helpers`` on a channel of
their own: a failed declaration closes its channel, and a helper queue whose node is down
(404) or that an earlier version declared otherwise (406) must cost the retries and dead
letters at most, never the consumption of the main queue.

A helper queue lives where the main queue lives: a classic queue sits on one node, so beside a
quorum main queue it would make the node that holds it a single point of failure for the
whole fleet.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import pika.channel
import pika.exceptions
import pika.frame

from edm.amqp.fastlane import LaneConnection
from edm.amqp.params import describe
from edm.backoff import Backoff
from edm.config import AmqpConfig

log = logging.getLogger(__name__)

REPLICATED = ("quorum", "stream")
HELPERS_FIRST_RETRY = 1.0  # seconds before a failed helper declaration is tried again; doubles

Step = Callable[[Callable[[Any], None]], None]


def delay_ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def retry_queue(queue: str, seconds: float) -> str:
    """The delay queue of ``queue`` for a retry after ``seconds``: ``<queue>.retry.<ms>``."""
    return f"{queue}.retry.{delay_ms(seconds)}"


def retry_queue_arguments(main_arguments: Mapping[str, Any], queue: str, seconds: float) -> dict[str, Any]:
    """A delay queue: its messages expire after the delay, back to ``queue`` (contract §10)."""
    arguments = helper_queue_arguments(main_arguments, dead_letter_to=queue)
    arguments["x-message-ttl"] = delay_ms(seconds)
    return arguments


def helper_queue_arguments(
    main_arguments: Mapping[str, Any], dead_letter_to: str | None = None
) -> dict[str, Any]:
    """The ``queue.declare`` arguments of a queue edm declares for the main queue.

    The type follows the main queue's ``x-queue-type``: none (classic) stays none, so a
    ``.dead`` queue declared by an earlier version beside a classic main queue still matches;
    ``quorum`` and ``stream`` give ``quorum`` (a stream can neither dead-letter nor be read
    with ``basic.get``, and a helper queue must do both).

    ``dead_letter_to`` names the queue this one dead-letters into through the default
    exchange (a delay queue sends its expired messages back to the main queue). For a quorum
    queue that dead-letters, ``x-dead-letter-strategy: at-least-once`` keeps each message until
    the target queue has confirmed it; RabbitMQ honours it only with ``x-overflow:
    reject-publish``. ``<queue>.dead`` itself dead-letters nowhere: edm republishes into it with
    publisher confirms and acks the original only after the confirm, which is at-least-once by
    construction, and a quorum queue confirms once a majority of its nodes hold the message.
    """
    arguments: dict[str, Any] = {}
    queue_type = main_arguments.get("x-queue-type")
    replicated = queue_type in REPLICATED
    if replicated:
        arguments["x-queue-type"] = "quorum"
    if dead_letter_to is not None:
        arguments["x-dead-letter-exchange"] = ""
        arguments["x-dead-letter-routing-key"] = dead_letter_to
        if replicated:
            arguments["x-dead-letter-strategy"] = "at-least-once"
            arguments["x-overflow"] = "reject-publish"
    return arguments


def inequivalent_helper(queue: str, vhost: str, reply_text: str, arguments: Mapping[str, Any]) -> str:
    """One line for an operator: ``queue`` exists with other arguments (406), and what to do."""
    wanted = arguments.get("x-queue-type", "classic")
    return (
        f"The queue {queue} exists with other arguments than edm declares ({reply_text}); it was "
        f"declared by an earlier version or by hand. Consuming goes on; retries and dead letters "
        f"go back to the main queue until it is fixed: move its messages elsewhere if you keep them (a "
        f"shovel, see the README's 'Running a fleet'), then delete it with "
        f"`rabbitmqctl delete_queue --vhost {vhost} --if-empty {queue}`: edm declares it again "
        f"({wanted}) when the next message needs it."
    )


def _declare_queue(
    channel: pika.channel.Channel, name: str, arguments: dict[str, Any], then: Callable[[Any], None]
) -> None:
    channel.queue_declare(name, durable=True, arguments=arguments, callback=then)


class MainDeclaration:
    """Declare ``amqp.exchange``, ``amqp.queue`` and their binding on the consuming channel.

    ``done`` gets the queue's declare-ok (its message count). The queue is declared with
    ``queue_arguments`` as they are: a queue the PHP daemon declared (durable, no arguments)
    is never redeclared otherwise.
    """

    def __init__(
        self, channel: pika.channel.Channel, amqp: AmqpConfig, done: Callable[[pika.frame.Method], None]
    ):
        self.channel = channel
        self.amqp = amqp
        self.done = done
        self._declared: pika.frame.Method | None = None

    def start(self) -> None:
        a = self.amqp
        self.channel.exchange_declare(
            a.exchange, a.exchange_type, durable=a.durable, callback=self._declare_queue
        )

    def _declare_queue(self, _frame: pika.frame.Method) -> None:
        a = self.amqp
        arguments = dict(a.queue_arguments) or None
        self.channel.queue_declare(a.queue, durable=a.durable, arguments=arguments, callback=self._bind)

    def _bind(self, declared: pika.frame.Method) -> None:
        self._declared = declared
        a = self.amqp
        self.channel.queue_bind(a.queue, a.exchange, a.routing_key, callback=self._bound)

    def _bound(self, _frame: pika.frame.Method) -> None:
        assert self._declared is not None
        self.done(self._declared)


class Helpers:
    """``<exchange>.dead``, ``<queue>.dead`` and the delay queues, declared when needed.

    Declared at each new connection, on a channel of its own that is closed once done. While
    they cannot be declared, ``ready`` is false: the problem is logged once, and the next
    message that needs them tries again, no sooner than a doubling back-off allows.
    """

    def __init__(
        self, amqp: AmqpConfig, on_done: Callable[[], None], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.amqp = amqp
        self.on_done = on_done  # a declaration ended, ready or not: what waited may go on
        self.clock = clock
        self.ready = False
        self.declaring = False
        self._connection: LaneConnection | None = None
        self._epoch = 0  # one per connection: a late callback of an older one is ignored
        self._problem: str | None = None  # the last one logged, so that each is logged once
        self._backoff = Backoff(HELPERS_FIRST_RETRY, max(amqp.retry_max, HELPERS_FIRST_RETRY))
        self._retry_at = 0.0
        self._back_logged = False
        self._current = ""  # the queue being declared, for the error

    def attach(self, connection: LaneConnection | None, amqp: AmqpConfig) -> None:
        """A new connection (or none): everything is to be declared again on it."""
        self._connection = connection
        self.amqp = amqp
        self._epoch += 1
        self.ready = False
        self.declaring = False

    def lost(self) -> None:
        """A helper queue went missing since it was declared: declare again when next needed."""
        self.ready = False

    def may_try_now(self) -> bool:
        return self.clock() >= self._retry_at

    def declare(self) -> None:
        connection = self._connection
        if self.declaring or connection is None or not connection.is_open:
            return
        self.declaring = True
        epoch = self._epoch
        connection.channel(on_open_callback=lambda channel: self._on_channel_open(channel, epoch))

    def _steps(self, channel: pika.channel.Channel) -> list[tuple[str, Step]]:
        a = self.amqp
        dead_exchange, dead_queue = f"{a.exchange}.dead", f"{a.queue}.dead"
        dead_args = helper_queue_arguments(a.queue_arguments) or None
        steps: list[tuple[str, Step]] = [
            (
                dead_exchange,
                lambda then: channel.exchange_declare(dead_exchange, "direct", durable=True, callback=then),
            ),
            (
                dead_queue,
                lambda then: channel.queue_declare(
                    dead_queue, durable=True, arguments=dead_args, callback=then
                ),
            ),
            (
                dead_queue,
                lambda then: channel.queue_bind(dead_queue, dead_exchange, a.routing_key, callback=then),
            ),
        ]
        for seconds in sorted(set(a.retry_delays)):
            name = retry_queue(a.queue, seconds)
            args = retry_queue_arguments(a.queue_arguments, a.queue, seconds)
            steps.append((name, partial(_declare_queue, channel, name, args)))
        return steps

    def _on_channel_open(self, channel: pika.channel.Channel, epoch: int) -> None:
        channel.add_on_close_callback(lambda _c, reason: self._on_channel_closed(epoch, reason))
        self._run(channel, epoch, self._steps(channel))

    def _run(self, channel: pika.channel.Channel, epoch: int, steps: list[tuple[str, Step]]) -> None:
        """One declaration after the other, each started by the broker's reply to the one before."""
        if not steps:
            self._declared(channel, epoch)
            return
        (self._current, step), rest = steps[0], steps[1:]
        step(lambda _frame: self._run(channel, epoch, rest))

    def _declared(self, channel: pika.channel.Channel, epoch: int) -> None:
        self.declaring = False
        if channel.is_open:
            channel.close()
        if epoch != self._epoch:
            return
        self.ready = True
        self._backoff.reset()
        if self._problem is not None:
            log.info(
                "Declared %s.dead: dead letters go there again. Retries wait in the delay queues again.",
                self.amqp.queue,
            )
            self._problem = None
        self.on_done()

    def _on_channel_closed(self, epoch: int, reason: BaseException) -> None:
        if not isinstance(reason, pika.exceptions.ChannelClosedByBroker):
            # closed by us once declared, or with its connection (whose end clears the rest)
            if not self.ready and epoch == self._epoch:
                self.declaring = False
            return
        if epoch != self._epoch:
            return
        self.declaring = False
        self._failed(reason)
        self.on_done()

    def _failed(self, reason: pika.exceptions.ChannelClosedByBroker) -> None:
        a = self.amqp
        queue = self._current
        if reason.reply_code == 406:
            vhost = self._connection.params.virtual_host if self._connection is not None else "/"
            wanted = (
                retry_queue_arguments(a.queue_arguments, a.queue, 1)
                if ".retry." in queue
                else helper_queue_arguments(a.queue_arguments)
            )
            problem = inequivalent_helper(queue, vhost, reason.reply_text, wanted)
            level = logging.ERROR
        else:
            problem = (
                f"Cannot declare {queue}: {describe(reason)}. Consuming goes on; the declaration is "
                f"tried again when a message needs it."
            )
            level = logging.WARNING
        if problem != self._problem:
            log.log(level, "%s", problem)
            self._problem = problem
        # Not at once: a poison message coming round an otherwise empty queue must not turn
        # into a loop of declarations.
        self._retry_at = self.clock() + self._backoff.next()
        self._back_logged = False

    def report_back(self, attempts: int, error: str) -> None:
        """A message went back to the end of its queue: ERROR once per failed declaration."""
        level = logging.DEBUG if self._back_logged else logging.ERROR
        self._back_logged = True
        log.log(
            level,
            "Cannot retry or dead-letter a message after %d attempts (%s): the helper queues of %s "
            "are not available; the message went back to the end of the queue.",
            attempts,
            error,
            self.amqp.queue,
        )
