"""The e-mail consumer worker: the AMQP consumer on the WorkerLoop.

Its reactor is the consumer's own pika IOLoop (the loop flushes acks): the signal pipe and
the control channel are two more descriptors on it.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import Any

from pika.adapters.select_connection import PollEvents

from edm.amqp.consumer import Consumer
from edm.config import Config
from edm.daemon.spawn import Event, send_event
from edm.errors import EdmError
from edm.handlers import counters
from edm.handlers import loader as handler_loader
from edm.handlers.log import MessageLog, use
from edm.logs import DailyLog
from edm.worker.loop import Callback, Reactor, Service, boot

log = logging.getLogger(__name__)


class ConsumerReactor:
    """The Reactor protocol over the consumer's IOLoop; ``stop`` is the consumer's graceful stop."""

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        self.ioloop = consumer.ioloop

    def watch(self, fd: int, callback: Callback) -> None:
        self.ioloop.add_handler(fd, lambda _fd, _events: callback(), PollEvents.READ)

    def unwatch(self, fd: int) -> None:
        self.ioloop.remove_handler(fd)

    def call_later(self, delay: float, callback: Callback) -> None:
        self.ioloop.call_later(delay, callback)

    def run(self) -> None:
        self.consumer.start()
        self.consumer.run()

    def stop(self) -> None:
        self.consumer.stop()


class ConsumerService:
    def __init__(self, consumer: Consumer, sink: MessageLog) -> None:
        self.consumer = consumer
        self.sink = sink

    def apply(self, new: Config, running: Config) -> tuple[Config, str | None]:
        self.sink.max_line = new.log.max_line
        try:
            self.consumer.reload(new.amqp, handlers(new))
        except EdmError as exc:
            # The new amqp settings may be meant for the new handler: keep them all.
            a, b = new.amqp, running.amqp
            others = replace(a, handler=b.handler, handler_options=b.handler_options) != b
            error = f"{exc}; keeping {b.handler}" + (" and the running amqp settings" if others else "")
            log.error("%s", error)
            return replace(new, amqp=running.amqp), error
        return new, None

    def snapshot(self) -> dict[str, Any]:
        return report(self.consumer.snapshot())

    def failure(self) -> str | None:
        return None  # the consumer reconnects by itself; a dead one is a dead process

    def close(self) -> None:
        log.info("The consumer stopped (%d messages handled).", self.consumer.handled)


def report(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The consumer's snapshot and the handlers' counts (e.g. ``smtp_replies``): every report has both."""
    return {**snapshot, **counters.report()}


def handlers(config: Config) -> handler_loader.HandlerFactory:
    return handler_loader.load(config.amqp.handler, config.amqp.handler_options)


def consumer_main(config: Config, conn: Connection) -> int:
    """The e-mail consumer worker."""

    def start(daily: DailyLog) -> tuple[Service, Reactor]:
        sink = MessageLog(daily, config.log.max_line)
        use(sink)
        consumer = Consumer(
            config.amqp, handlers(config), lambda snap: send_event(conn, Event.STATE, **report(snap))
        )
        return ConsumerService(consumer, sink), ConsumerReactor(consumer)

    return boot(conn, config, start)
