"""The main process: owns the pidfile, reacts to signals, keeps its workers alive.

Modelled on gunicorn's arbiter (signal handlers only enqueue; the loop drains the queue and
acts; a bad config on reload keeps the old one). Each worker's restarts follow the states of
``edm.daemon.lifecycle`` (STARTING, RUNNING, BACKOFF, FATAL); the clock and the fork are
parameters, so the state machine is tested without processes.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from edm import __version__, metrics, plugins
from edm.config import Config, load
from edm.daemon.lifecycle import PLUGINS, Exit, Worker, WorkerState, consumer_names, kind_of
from edm.daemon.pidfile import Pidfile
from edm.daemon.spawn import EXIT_BOOT, STATE_INTERVAL, Command, Event, WorkerMain, send_command, spawn
from edm.daemon.statusfile import (
    Killed,
    StopRecord,
    hung_threads,
    remove,
    report_path,
    stop_record_path,
    write_report,
    write_stop_record,
)
from edm.errors import ConfigError
from edm.logs import DailyLog
from edm.worker.kinds import Kind
from edm.worker.loop import SignalPipe, apply_log_settings

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Spawn = Callable[[WorkerMain, Config, Callable[[], None]], tuple[int, Connection]]


class Supervisor:
    def __init__(
        self,
        config: Config,
        pidfile: Pidfile,
        daily: DailyLog,
        clock: Clock = time.monotonic,
        spawner: Spawn = spawn,
    ) -> None:
        self.config = config
        self.pidfile = pidfile
        self.daily = daily
        self.clock = clock
        self.spawner = spawner
        self.workers: dict[str, Worker] = {}
        self.signals: SignalPipe | None = None
        self.stopping = False
        self.started = time.time()
        self.report_file = report_path(config.daemon.pidfile)
        self._next_report = 0.0
        self.exporter = metrics.Exporter()

    # -- start ---------------------------------------------------------------------------------

    def wanted(self) -> list[str]:
        """The worker processes the config asks for, by name."""
        return consumer_names(self.config.amqp.workers) + ([PLUGINS] if plugins.enabled(self.config) else [])

    def boot(self, timeout: float = 30.0) -> str | None:
        """Start the workers and wait until each reports ready; the error text if one cannot."""
        self.signals = SignalPipe(
            (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD)
        )
        log.info("edm %s starting (pid %d, config %s).", __version__, os.getpid(), self.config.path)
        try:
            self.exporter.start(self.config.metrics.listen)
        except OSError as exc:
            return str(exc)
        for name in self.wanted():
            self.workers[name] = Worker(name)
            self.start_worker(self.workers[name])
        deadline = self.clock() + timeout
        while any(not w.ready for w in self.workers.values()):
            if self.clock() > deadline:
                return "the workers did not start in time (see the log)"
            self._poll(0.2)
            for w in self.workers.values():
                if w.state in (WorkerState.BACKOFF, WorkerState.FATAL):
                    return w.last_error or f"the {w.name} worker died during start (see the log)"
        self._write_report()
        return None

    def start_worker(self, worker: Worker) -> None:
        pid, conn = self.spawner(
            Kind(kind_of(worker.name)), worker.config or self.config, self._close_in_child
        )
        worker.spawned(pid, conn, self.clock())
        log.info("Started the %s worker (pid %d).", worker.name, pid)

    def _close_in_child(self) -> None:
        self.pidfile.close_inherited()
        self.exporter.close_in_child()
        for w in self.workers.values():
            if w.conn is not None:
                w.conn.close()
        if self.signals is not None:
            self.signals.close()

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until TERM/INT; returns the process's exit code."""
        while not self.stopping:
            self._poll(0.5)
            self.manage()
        return self.shutdown()

    def _poll(self, timeout: float) -> None:
        assert self.signals is not None
        conns: list[Any] = [w.conn for w in self.workers.values() if w.conn is not None]
        try:
            ready = select.select([self.signals.read_fd, *conns], [], [], timeout)[0]
        except InterruptedError:
            ready = []
        for sig in self.signals.drain():
            self._on_signal(sig)
        for w in self.workers.values():
            if w.conn is not None and w.conn in ready:
                self._read_events(w)
        self._reap()
        if self.clock() >= self._next_report:
            self._write_report()
        if self.exporter.listen is not None:
            self.exporter.publish(self.snapshot())

    def _on_signal(self, sig: int) -> None:
        if sig in (signal.SIGTERM, signal.SIGINT):
            if not self.stopping:
                log.info("Received %s; stopping.", signal.Signals(sig).name)
            self.stopping = True
        elif sig == signal.SIGHUP:
            self.reload()
        elif sig == signal.SIGUSR1:
            self.daily.reopen()
            self._broadcast(Command.REOPEN)
            log.info("Received SIGUSR1; reopened the log files.")
        # SIGCHLD only wakes the loop; _reap runs every turn.

    def _read_events(self, worker: Worker) -> None:
        assert worker.conn is not None
        try:
            while worker.conn.poll():
                self.on_event(worker, worker.conn.recv())
        except (EOFError, OSError):
            worker.conn.close()
            worker.conn = None

    def on_event(self, worker: Worker, event: dict[str, Any]) -> None:
        kind = Event(event.pop("event", None))
        if kind is Event.READY:
            worker.ready = True
        elif kind is Event.FATAL:
            worker.last_error = str(event.get("error"))
            log.error("The %s worker cannot start: %s", worker.name, worker.last_error)
        elif kind is Event.RELOADED:
            # A setting the worker could not apply keeps its running value.
            worker.last_error = event.get("error")
            worker.config = event.get("config") if worker.last_error else None
            self._next_report = 0.0
        elif kind is Event.STATE:
            if event.get("state") != worker.info.get("state"):
                self._next_report = 0.0  # a change of activity shows in status at once
            worker.info = event
            self.exporter.ledger.report(worker.name, event)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for w in list(self.workers.values()):
                if w.pid == pid:
                    self.on_death(w, status)

    def on_death(self, worker: Worker, status: int) -> None:
        if worker.conn is not None:
            self._read_events(worker)
            if worker.conn is not None:
                worker.conn.close()
        self.exporter.ledger.bank(worker.name)  # its counts stay counted; the next life adds to them
        end = Exit.of(status, EXIT_BOOT)
        delay = worker.died(end, self.clock())
        if worker.state is WorkerState.STOPPED and worker.name not in self.wanted() and not self.stopping:
            del self.workers[worker.name]  # a reload lowered amqp.workers: it is gone, not stopped
            log.info("The %s worker stopped (no longer configured).", worker.name)
            return
        if worker.state is WorkerState.FATAL:
            log.critical(
                "The %s worker %s and failed %d times in a row at start; giving up (FATAL) until a reload.",
                worker.name,
                end.reason,
                worker.boot_failures,
            )
        elif delay is not None:
            log.error("The %s worker %s; restarting it in %.1f s.", worker.name, end.reason, delay)

    def manage(self) -> None:
        """Start the workers whose back-off is over; promote the ones that have stayed up."""
        now = self.clock()
        for worker in self.workers.values():
            if worker.due(now):
                self.start_worker(worker)
            elif worker.promote(now):
                self._next_report = 0.0  # publish the transition at once
            elif worker.pid is not None and worker.stop_deadline is not None and now >= worker.stop_deadline:
                log.warning("%s", self._killed(worker).message)
                worker.stop_deadline = None
                _kill(worker.pid, signal.SIGKILL)  # reaped by the loop

    # -- reload --------------------------------------------------------------------------------

    def reload(self) -> None:
        """Read the config again; an invalid one is refused whole. A valid one goes to every
        worker, which applies what it can and answers with the config it runs. The handler
        is loaded by the consumer, not here: an import may do anything, even exit."""
        try:
            new = load(self.config.path)
        except ConfigError as exc:
            log.error("Reload refused, keeping the running config: %s", exc)
            return
        old = self.config
        if (new.daemon.pidfile, new.daemon.user, new.daemon.group) != (
            old.daemon.pidfile,
            old.daemon.user,
            old.daemon.group,
        ):
            log.warning("daemon.pidfile, daemon.user and daemon.group apply at the next restart.")
        apply_log_settings(self.daily, new)
        self.config = new
        log.info("Reloaded the config from %s.", new.path)
        try:
            self.exporter.start(new.metrics.listen)
        except OSError as exc:
            log.error("%s; keeping %s.", exc, self.exporter.listen or "metrics off")
        self.exporter.publish(self.snapshot())
        wanted = self.wanted()
        for name in wanted:
            worker = self.workers.setdefault(name, Worker(name))
            worker.config = None
            if worker.state in (WorkerState.FATAL, WorkerState.STOPPED):
                worker.revive()
                self.start_worker(worker)
            elif worker.conn is not None:
                self._send(worker, Command.RELOAD, new)
        for name, worker in list(self.workers.items()):
            if name in wanted:
                continue
            if worker.pid is None:  # in BACKOFF or FATAL: nothing runs, nothing to restart
                del self.workers[name]
            elif worker.state is not WorkerState.STOPPING:
                worker.stopping()
                worker.stop_deadline = self.clock() + new.daemon.stop_timeout
                self._send(worker, Command.STOP)

    def _send(self, worker: Worker, command: Command, payload: Any = None) -> None:
        if worker.conn is not None:
            send_command(worker.conn, command, payload)

    def _broadcast(self, command: Command) -> None:
        for worker in self.workers.values():
            self._send(worker, command)

    # -- stop ----------------------------------------------------------------------------------

    def shutdown(self) -> int:
        timeout = self.config.daemon.stop_timeout
        for worker in self.workers.values():
            worker.stopping()
            if worker.pid is not None:
                self._send(worker, Command.STOP)
                _kill(worker.pid, signal.SIGTERM)
        deadline = self.clock() + timeout
        while any(w.pid is not None for w in self.workers.values()) and self.clock() < deadline:
            self._poll(0.1)
        killed = []
        for worker in self.workers.values():
            if worker.pid is not None:
                victim = self._killed(worker)
                log.warning("%s", victim.message)
                killed.append(victim)
                _kill(worker.pid, signal.SIGKILL)
                os.waitpid(worker.pid, 0)
                worker.pid = None
        stop_record = stop_record_path(self.config.daemon.pidfile)
        if killed:
            try:  # `edm stop` reads it to tell its user (the log has it too)
                write_stop_record(stop_record, StopRecord(os.getpid(), tuple(killed)))
            except OSError as exc:
                log.warning("Cannot write the stop record %s: %s", stop_record, exc.strerror)
        else:
            remove(stop_record)  # one of an earlier stop
        remove(self.report_file)
        self.exporter.stop()
        log.info("edm stopped (pid %d).", os.getpid())
        return 0

    def _killed(self, worker: Worker) -> Killed:
        """What to say of a worker about to be killed, naming its handler threads still busy
        (from its last state report, at most STATE_INTERVAL old)."""
        assert worker.pid is not None
        hung = hung_threads(worker.info.get("handling"), time.time())
        return Killed(worker.name, worker.pid, self.config.daemon.stop_timeout, hung)

    # -- status --------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "version": __version__,
            "config": str(self.config.path),
            "started": self.started,
            "updated": time.time(),
            "stopping": self.stopping,
            "workers": {
                name: {
                    **{k: v for k, v in w.info.items() if k not in ("state", "latency")},
                    # a dead worker does nothing, whatever it last reported
                    "activity": w.info.get("state") if w.pid is not None else None,
                    "pid": w.pid,
                    "state": w.state.value,
                    "restarts": w.restarts,
                    "last_error": w.last_error,
                }
                for name, w in self.workers.items()
            },
        }

    def _write_report(self) -> None:
        self._next_report = self.clock() + STATE_INTERVAL
        try:
            write_report(self.report_file, self.snapshot())
        except OSError as exc:
            log.warning("Cannot write the status file %s: %s", self.report_file, exc.strerror)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
