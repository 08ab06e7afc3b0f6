"""The main process: owns the pidfile, reacts to signals, keeps its workers alive.

Modelled on gunicorn's arbiter (signal handlers only enqueue; the loop drains the queue and
acts; a bad config on reload keeps the old one) and on Supervisor's process states: a
worker is STARTING until it has stayed up for ``STARTSECS``, then RUNNING; a death puts it
in BACKOFF with a growing delay (never above ``BACKOFF_MAX``, so a dead consumer is back
within seconds); repeated deaths before RUNNING end in FATAL, which a reload clears.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from edm import __version__, metrics, plugins
from edm.config import Config, load
from edm.daemon.pidfile import Pidfile
from edm.daemon.spawn import EXIT_BOOT, spawn
from edm.daemon.statusfile import remove_state, status_path, write_state
from edm.errors import ConfigError
from edm.logs import DailyLog
from edm.worker.main import WORKERS, SignalPipe

log = logging.getLogger(__name__)

STARTSECS = 1.0
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 4.0
FATAL_AFTER = 5  # consecutive deaths before RUNNING
STATE_INTERVAL = 1.0


@dataclass
class Worker:
    name: str
    pid: int | None = None
    conn: Connection | None = None
    state: str = "STOPPED"  # STARTING RUNNING BACKOFF FATAL STOPPING STOPPED
    started_at: float = 0.0
    ready: bool = False
    boot_failures: int = 0
    deaths: list[float] = field(default_factory=list)
    restart_at: float = 0.0
    restarts: int = 0
    last_error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    # The config the worker runs when a reload setting could not be applied (it kept the
    # running value); it is restarted with this one. None: the supervisor's.
    config: Config | None = None


def describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"killed by {name}"
    return f"exited with code {os.waitstatus_to_exitcode(status)}"


class Supervisor:
    def __init__(self, config: Config, pidfile: Pidfile, daily: DailyLog) -> None:
        self.config = config
        self.pidfile = pidfile
        self.daily = daily
        self.workers: dict[str, Worker] = {}
        self.signals: SignalPipe | None = None
        self.stopping = False
        self.started = time.time()
        self.state_file = status_path(config.daemon.pidfile)
        self._next_state = 0.0
        self.exporter = metrics.Exporter()

    # -- start ---------------------------------------------------------------------------------

    def wanted(self) -> list[str]:
        return ["consumer"] + (["plugins"] if plugins.enabled(self.config) else [])

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
            self._spawn(self.workers[name])
        deadline = time.monotonic() + timeout
        while any(not w.ready for w in self.workers.values()):
            if time.monotonic() > deadline:
                return "the workers did not start in time (see the log)"
            self._poll(0.2)
            for w in self.workers.values():
                if w.state in ("BACKOFF", "FATAL") and w.last_error:
                    return w.last_error
                if w.state in ("BACKOFF", "FATAL"):
                    return f"the {w.name} worker died during start (see the log)"
        self._write_state()
        return None

    def _spawn(self, worker: Worker) -> None:
        target = WORKERS[worker.name]
        pid, conn = spawn(target, worker.config or self.config, self._close_in_child)
        worker.pid, worker.conn = pid, conn
        worker.state, worker.started_at, worker.ready = "STARTING", time.monotonic(), False
        worker.info = {}
        log.info("Started the %s worker (pid %d).", worker.name, pid)

    def _close_in_child(self) -> None:
        self.pidfile.close_inherited()
        self.exporter.close_in_child()
        for w in self.workers.values():
            if w.conn is not None:
                w.conn.close()
        if self.signals is not None:
            os.close(self.signals.read_fd)
            os.close(self.signals.write_fd)

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until TERM/INT; returns the process's exit code."""
        while not self.stopping:
            self._poll(0.5)
            self._manage()
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
        if time.monotonic() >= self._next_state:
            self._write_state()
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
            self._broadcast("reopen", None)
            log.info("Received SIGUSR1; reopened the log files.")
        # SIGCHLD only wakes the loop; _reap runs every turn.

    def _read_events(self, worker: Worker) -> None:
        assert worker.conn is not None
        try:
            while worker.conn.poll():
                event = worker.conn.recv()
                kind = event.pop("event", None)
                if kind == "ready":
                    worker.ready = True
                elif kind == "fatal":
                    worker.last_error = str(event.get("error"))
                    log.error("The %s worker cannot start: %s", worker.name, worker.last_error)
                elif kind == "reloaded":
                    # A setting the worker could not apply keeps its running value.
                    worker.last_error = event.get("error")
                    worker.config = event.get("config") if worker.last_error else None
                    self._next_state = 0.0
                elif kind == "state":
                    if event.get("state") != worker.info.get("state"):
                        self._next_state = 0.0  # a change of activity shows in status at once
                    worker.info = event
                    self.exporter.ledger.report(worker.name, event)
        except (EOFError, OSError):
            worker.conn.close()
            worker.conn = None

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for w in self.workers.values():
                if w.pid == pid:
                    self._on_death(w, status)

    def _on_death(self, worker: Worker, status: int) -> None:
        if worker.conn is not None:
            self._read_events(worker)
            if worker.conn is not None:
                worker.conn.close()
        worker.pid, worker.conn = None, None
        self.exporter.ledger.bank(worker.name)  # its counts stay counted; the next life adds to them
        if worker.state == "STOPPING":
            worker.state = "STOPPED"
            return
        now = time.monotonic()
        reason = describe_exit(status)
        booted = worker.ready and now - worker.started_at >= STARTSECS
        worker.boot_failures = 0 if booted else worker.boot_failures + 1
        worker.deaths = [t for t in worker.deaths if now - t < 60] + [now]
        boot_error = os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_BOOT
        if worker.boot_failures >= FATAL_AFTER:
            worker.state = "FATAL"
            log.critical(
                "The %s worker %s and failed %d times in a row at start; giving up (FATAL) until a reload.",
                worker.name,
                reason,
                worker.boot_failures,
            )
            return
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (len(worker.deaths) - 1))
        if boot_error:
            delay = max(delay, 1.0)
        worker.state, worker.restart_at = "BACKOFF", now + delay
        log.error("The %s worker %s; restarting it in %.1f s.", worker.name, reason, delay)

    def _manage(self) -> None:
        now = time.monotonic()
        for worker in self.workers.values():
            if worker.state == "BACKOFF" and now >= worker.restart_at:
                worker.restarts += 1
                self._spawn(worker)
            elif worker.state == "STARTING" and worker.ready and now - worker.started_at >= STARTSECS:
                worker.state = "RUNNING"
                self._next_state = 0.0  # publish the transition at once

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
        lc = new.log
        self.daily.reconfigure(lc.dir, lc.name, keep_days=lc.keep_days, fsync=lc.fsync)
        logging.getLogger().setLevel(lc.level)
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
            if worker.state in ("FATAL", "STOPPED"):
                worker.boot_failures = 0
                worker.last_error = None
                self._spawn(worker)
            elif worker.conn is not None:
                self._send(worker, "reload", new)
        for name, worker in self.workers.items():
            if name not in wanted and worker.pid is not None:
                worker.state = "STOPPING"
                self._send(worker, "stop", None)

    def _send(self, worker: Worker, command: str, payload: Any) -> None:
        if worker.conn is None:
            return
        try:
            worker.conn.send((command, payload))
        except OSError:
            pass

    def _broadcast(self, command: str, payload: Any) -> None:
        for worker in self.workers.values():
            self._send(worker, command, payload)

    # -- stop ----------------------------------------------------------------------------------

    def shutdown(self) -> int:
        timeout = self.config.daemon.stop_timeout
        for worker in self.workers.values():
            if worker.pid is not None:
                worker.state = "STOPPING"
                self._send(worker, "stop", None)
                _kill(worker.pid, signal.SIGTERM)
            elif worker.state != "STOPPED":
                worker.state = "STOPPED"
        deadline = time.monotonic() + timeout
        while any(w.pid is not None for w in self.workers.values()) and time.monotonic() < deadline:
            self._poll(0.1)
        for worker in self.workers.values():
            if worker.pid is not None:
                log.warning(
                    "The %s worker (pid %d) did not stop within %g s; sending SIGKILL.",
                    worker.name,
                    worker.pid,
                    timeout,
                )
                _kill(worker.pid, signal.SIGKILL)
                os.waitpid(worker.pid, 0)
                worker.pid = None
        remove_state(self.state_file)
        self.exporter.stop()
        log.info("edm stopped (pid %d).", os.getpid())
        return 0

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
                    "state": w.state,
                    "restarts": w.restarts,
                    "last_error": w.last_error,
                }
                for name, w in self.workers.items()
            },
        }

    def _write_state(self) -> None:
        self._next_state = time.monotonic() + STATE_INTERVAL
        try:
            write_state(self.state_file, self.snapshot())
        except OSError as exc:
            log.warning("Cannot write the status file %s: %s", self.state_file, exc.strerror)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


ReportFn = Callable[[bytes], None]
