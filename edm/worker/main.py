"""What runs inside each worker process: the e-mail consumer, and the plugins.

Signal handlers here only record the signal; the worker's loop reads the wakeup pipe and
acts. The supervisor talks to a worker over its channel: ("reload", Config), ("stop", None),
("reopen", None).

A worker applies what it can of a reload and answers with a ``reloaded`` event carrying the
config it now runs: a setting it cannot apply (a handler that cannot be loaded, a fee
endpoint in use) keeps its running value, named in one ERROR line and in the event's
``error``, and the supervisor restarts the worker with that config should it die.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import Any

from pika.adapters.select_connection import PollEvents

from edm import plugins
from edm.amqp.consumer import Consumer
from edm.config import Config
from edm.daemon.spawn import EXIT_BOOT, EXIT_CRASH, EXIT_OK, send_event
from edm.errors import EdmError
from edm.handlers import loader as handler_loader
from edm.handlers.log import MessageLog, use
from edm.logs import DailyLog, setup_logging
from edm.redact import secrets_of

log = logging.getLogger(__name__)

STATE_INTERVAL = 1.0


def open_daily(config: Config) -> DailyLog:
    lc = config.log
    daily = DailyLog(lc.dir, lc.name, keep_days=lc.keep_days, fsync=lc.fsync)
    daily.open()
    return daily


class SignalPipe:
    """Signal handlers that only enqueue; the owner drains ``pending`` from its loop."""

    def __init__(self, signals: tuple[signal.Signals, ...]) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)
        self.pending: list[int] = []
        signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        for sig in signals:
            signal.signal(sig, self._enqueue)

    def _enqueue(self, signum: int, _frame: object) -> None:
        self.pending.append(signum)

    def drain(self) -> list[int]:
        try:
            while os.read(self.read_fd, 512):
                pass
        except BlockingIOError:
            pass
        taken, self.pending = self.pending, []
        return taken


def consumer_main(config: Config, conn: Connection) -> int:
    """The e-mail consumer worker."""
    try:
        daily = open_daily(config)
        setup_logging(daily, config.log.level, secrets_of(config))
        sink = MessageLog(daily, config.log.max_line)
        use(sink)
        consumer = Consumer(config.amqp, _handlers(config), lambda snap: send_event(conn, "state", **snap))
    except (EdmError, OSError) as exc:
        send_event(conn, "fatal", error=str(exc))
        return EXIT_BOOT
    ioloop = consumer.ioloop  # the consumer's own loop (it flushes acks): signals share it
    signals = SignalPipe((signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP))
    parent = os.getppid()

    def apply(new: Config) -> None:
        nonlocal config
        lc = new.log
        daily.reconfigure(lc.dir, lc.name, keep_days=lc.keep_days, fsync=lc.fsync)
        sink.max_line = lc.max_line
        setup_logging(daily, lc.level, secrets_of(new))
        error = None
        try:
            consumer.reload(new.amqp, _handlers(new))
        except EdmError as exc:
            # The new amqp settings may be meant for the new handler: keep them all.
            a, b = new.amqp, config.amqp
            others = replace(a, handler=b.handler, handler_options=b.handler_options) != b
            error = f"{exc}; keeping {b.handler}" + (" and the running amqp settings" if others else "")
            log.error("%s", error)
            new = replace(new, amqp=config.amqp)
        config = new
        send_event(conn, "reloaded", config=new, error=error)

    def on_signal(_fd: int, _events: int) -> None:
        for signum in signals.drain():
            if signum in (signal.SIGTERM, signal.SIGINT):
                consumer.stop()
            elif signum == signal.SIGUSR1:
                daily.reopen()

    def on_control(_fd: int, _events: int) -> None:
        try:
            while conn.poll():
                command, payload = conn.recv()
                if command == "reload":
                    apply(payload)
                elif command == "stop":
                    consumer.stop()
                elif command == "reopen":
                    daily.reopen()
        except (EOFError, OSError):
            ioloop.remove_handler(conn.fileno())
            consumer.stop()

    def tick() -> None:
        if os.getppid() != parent:
            consumer.stop()
        send_event(conn, "state", **consumer.snapshot())
        ioloop.call_later(STATE_INTERVAL, tick)

    ioloop.add_handler(signals.read_fd, on_signal, PollEvents.READ)
    ioloop.add_handler(conn.fileno(), on_control, PollEvents.READ)
    ioloop.call_later(STATE_INTERVAL, tick)
    send_event(conn, "ready", pid=os.getpid())
    consumer.start()
    consumer.run()
    send_event(conn, "state", **consumer.snapshot())  # the last counts, for the metrics
    log.info("The consumer stopped (%d messages handled).", consumer.handled)
    return EXIT_OK


def _handlers(config: Config) -> handler_loader.HandlerFactory:
    return handler_loader.load(config.amqp.handler, config.amqp.handler_options)


def plugins_main(config: Config, conn: Connection) -> int:
    """The plugin worker: one shared database pool, every enabled plugin on top of it."""
    from edm.db import Database

    database: Database | None = None
    started: list[plugins.Plugin] = []
    try:
        daily = open_daily(config)
        setup_logging(daily, config.log.level, secrets_of(config))
        database = Database.open(config.database)
        for plugin in plugins.build(config, database):
            plugin.start()
            started.append(plugin)
    except (EdmError, OSError) as exc:
        send_event(conn, "fatal", error=str(exc))
        _stop_all(started, config.daemon.stop_timeout)
        if database is not None:
            database.close()
        return EXIT_BOOT
    signals = SignalPipe((signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP))
    send_event(conn, "ready", pid=os.getpid())
    parent = os.getppid()
    running = True
    code = EXIT_OK
    next_state = 0.0

    def status() -> dict[str, Any]:
        return {p.name: p.status() for p in started}

    def on_command(command: str, payload: Any) -> None:
        nonlocal running, config
        if command == "reload":
            running_plugins, running_database, config = config.plugins, config.database, payload
            if config.database != running_database:
                # The pool is opened once, at the worker's start: it keeps its settings.
                log.warning("database: the changed settings apply at the next restart of edm.")
                config = replace(config, database=running_database)
            lc = config.log
            daily.reconfigure(lc.dir, lc.name, keep_days=lc.keep_days, fsync=lc.fsync)
            setup_logging(daily, lc.level, secrets_of(config))
            errors = []
            for plugin in started:
                try:
                    plugin.reload(payload)
                except EdmError as exc:  # the plugin serves on with its running settings
                    log.error("%s", exc)
                    errors.append(str(exc))
                    kept = {plugin.name: getattr(running_plugins, plugin.name)}
                    config = replace(config, plugins=replace(config.plugins, **kept))
            send_event(conn, "reloaded", config=config, error="; ".join(errors) or None)
        elif command == "stop":
            running = False
        elif command == "reopen":
            daily.reopen()

    while running:
        now = time.monotonic()
        if now >= next_state:
            send_event(conn, "state", state="running", plugins=status())
            next_state = now + STATE_INTERVAL
            if os.getppid() != parent:
                running = False
        try:
            watched: list[Any] = [signals.read_fd, conn]
            ready, _, _ = select.select(watched, [], [], STATE_INTERVAL)
        except InterruptedError:
            ready = []
        if signals.read_fd in ready:
            for signum in signals.drain():
                if signum in (signal.SIGTERM, signal.SIGINT):
                    running = False
                elif signum == signal.SIGUSR1:
                    daily.reopen()
        if conn in ready:
            try:
                while conn.poll():
                    on_command(*conn.recv())
            except (EOFError, OSError):
                running = False
        for plugin in started:
            reason = plugin.failure()
            if reason is not None and code == EXIT_OK:
                log.error(
                    "The %s plugin no longer serves (%s); exiting to be restarted.", plugin.name, reason
                )
                running, code = False, EXIT_CRASH
    _stop_all(started, config.daemon.stop_timeout)
    if database is not None:
        database.close()
    log.info("The plugins stopped.")
    return code


def _stop_all(started: list[plugins.Plugin], timeout: float) -> None:
    for plugin in reversed(started):
        try:
            plugin.stop(timeout)
        except Exception:
            log.error("The %s plugin failed to stop cleanly.", plugin.name, exc_info=True)


WORKERS: dict[str, Callable[[Config, Connection], int]] = {
    "consumer": consumer_main,
    "plugins": plugins_main,
}
