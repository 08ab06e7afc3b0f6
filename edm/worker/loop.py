"""The one loop every worker process runs: signals, the supervisor's commands, the state tick.

A worker is a ``Service`` (the consumer, the plugins) on a ``Reactor`` (the event loop it
already has: pika's IOLoop for the consumer, ``SelectReactor`` for the plugins). The
``WorkerLoop`` puts the signal pipe and the control channel on that reactor and answers them
the same way for every worker: TERM/INT and ``stop`` stop the reactor, USR1 and ``reopen``
reopen the log files, ``reload`` applies the log settings and hands the new config to the
service, and every STATE_INTERVAL it reports the service's snapshot, checks that the
supervisor still lives and that the service still serves.

A worker applies what it can of a reload and answers with a ``reloaded`` event carrying the
config it now runs: a setting it cannot apply (a handler that cannot be loaded, a fee
endpoint in use) keeps its running value, named in one ERROR line and in the event's
``error``, and the supervisor restarts the worker with that config should it die.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import select
import signal
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, Protocol

from edm.config import Config
from edm.daemon.spawn import EXIT_BOOT, EXIT_CRASH, EXIT_OK, STATE_INTERVAL, Command, Event, send_event
from edm.errors import EdmError
from edm.logs import DailyLog, setup_logging
from edm.redact import secrets_of

log = logging.getLogger(__name__)

Callback = Callable[[], None]
WORKER_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)


def open_logs(config: Config) -> DailyLog:
    """Open the daily log of ``config.log`` and route every logger to it."""
    lc = config.log
    daily = DailyLog(lc.dir, lc.name, keep_days=lc.keep_days, fsync=lc.fsync)
    daily.open()
    setup_logging(daily, lc.level, secrets_of(config))
    return daily


def apply_log_settings(daily: DailyLog, config: Config) -> None:
    """A reload's ``log`` section, whole: file, level (and ``logging.disable``), masked secrets."""
    lc = config.log
    daily.reconfigure(lc.dir, lc.name, keep_days=lc.keep_days, fsync=lc.fsync)
    setup_logging(daily, lc.level, secrets_of(config))


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

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


class Reactor(Protocol):
    """The part of an event loop the WorkerLoop needs."""

    def watch(self, fd: int, callback: Callback) -> None:
        """Call ``callback()`` whenever ``fd`` is readable."""

    def unwatch(self, fd: int) -> None: ...

    def call_later(self, delay: float, callback: Callback) -> None: ...

    def run(self) -> None:
        """Serve until ``stop``."""

    def stop(self) -> None:
        """End ``run`` once what is in hand is finished."""


class Service(Protocol):
    """What a worker serves; the WorkerLoop drives it."""

    def apply(self, new: Config, running: Config) -> tuple[Config, str | None]:
        """Apply a reload: the config now run, and what could not be applied (logged) or None."""

    def snapshot(self) -> dict[str, Any]:
        """The state event's fields (``state`` is the worker's activity)."""

    def failure(self) -> str | None:
        """Why the service no longer serves (the worker exits to be restarted), or None."""

    def close(self) -> None:
        """After the reactor stopped: release what the service holds."""


class SelectReactor:
    """A small select(2) loop for workers that have no event loop of their own."""

    def __init__(self) -> None:
        self._readers: dict[int, Callback] = {}
        self._timers: list[tuple[float, int, Callback]] = []
        self._order = itertools.count()
        self._running = False

    def watch(self, fd: int, callback: Callback) -> None:
        self._readers[fd] = callback

    def unwatch(self, fd: int) -> None:
        self._readers.pop(fd, None)

    def call_later(self, delay: float, callback: Callback) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._order), callback))

    def run(self) -> None:
        self._running = True
        while self._running:
            timeout = max(0.0, self._timers[0][0] - time.monotonic()) if self._timers else None
            try:
                ready, _, _ = select.select(list(self._readers), [], [], timeout)
            except InterruptedError:
                ready = []
            for fd in ready:
                callback = self._readers.get(fd)
                if callback is not None:
                    callback()
            while self._running and self._timers and self._timers[0][0] <= time.monotonic():
                heapq.heappop(self._timers)[2]()

    def stop(self) -> None:
        self._running = False


class WorkerLoop:
    """The control protocol and ticks of one worker process, on the worker's own reactor."""

    def __init__(
        self, conn: Connection, config: Config, daily: DailyLog, reactor: Reactor, service: Service
    ) -> None:
        self.conn = conn
        self.config = config
        self.daily = daily
        self.reactor = reactor
        self.service = service
        self.code = EXIT_OK
        self._parent = os.getppid()
        self._stopping = False

    def run(self) -> int:
        """Serve until told to stop; the worker's exit code."""
        signals = SignalPipe(WORKER_SIGNALS)
        self.reactor.watch(signals.read_fd, lambda: self._on_signals(signals.drain()))
        self.reactor.watch(self.conn.fileno(), self._on_control)
        self.reactor.call_later(STATE_INTERVAL, self._tick)
        send_event(self.conn, Event.READY, pid=os.getpid())
        self.reactor.run()
        send_event(self.conn, Event.STATE, **self.service.snapshot())  # the last counts, for metrics
        self.service.close()
        return self.code

    def stop(self) -> None:
        self._stopping = True
        self.reactor.stop()

    def _on_signals(self, signums: list[int]) -> None:
        for signum in signums:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.stop()
            elif signum == signal.SIGUSR1:
                self.daily.reopen()
            # SIGHUP goes to the main process, which sends the reload; a worker ignores its own.

    def _on_control(self) -> None:
        try:
            while self.conn.poll():
                command, payload = self.conn.recv()
                self.on_command(Command(command), payload)
        except (EOFError, OSError):
            self.reactor.unwatch(self.conn.fileno())
            self.stop()

    def on_command(self, command: Command, payload: Any) -> None:
        if command is Command.RELOAD:
            self._reload(payload)
        elif command is Command.STOP:
            self.stop()
        elif command is Command.REOPEN:
            self.daily.reopen()

    def _reload(self, new: Config) -> None:
        apply_log_settings(self.daily, new)
        try:
            runs, error = self.service.apply(new, self.config)
        except EdmError as exc:  # a service that could apply nothing keeps everything
            log.error("%s", exc)
            runs, error = self.config, str(exc)
        self.config = runs
        send_event(self.conn, Event.RELOADED, config=runs, error=error)

    def _tick(self) -> None:
        # Runs on while a stopping consumer finishes what it holds: the state still counts.
        if not self._stopping:
            reason = self.service.failure()
            if os.getppid() != self._parent:
                log.warning("The main process is gone; stopping.")
                self.stop()
            elif reason is not None:
                log.error("%s; exiting to be restarted.", reason)
                self.code = EXIT_CRASH
                self.stop()
        send_event(self.conn, Event.STATE, **self.service.snapshot())
        self.reactor.call_later(STATE_INTERVAL, self._tick)


def boot(conn: Connection, config: Config, start: Callable[[DailyLog], tuple[Service, Reactor]]) -> int:
    """Open the logs, start the service (``start`` undoes its own work when it fails), serve.

    A start that fails is told to the supervisor as ``fatal`` with the reason, and the worker
    exits with EXIT_BOOT so that it is not respawned blindly.
    """
    try:
        daily = open_logs(config)
        service, reactor = start(daily)
    except (EdmError, OSError) as exc:
        send_event(conn, Event.FATAL, error=str(exc))
        return EXIT_BOOT
    return WorkerLoop(conn, config, daily, reactor, service).run()
