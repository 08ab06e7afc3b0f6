"""A supervised worker's states, as Supervisor (the program) names them.

A worker is STARTING until it has reported ready and stayed up for ``STARTSECS``, then
RUNNING. A death puts it in BACKOFF with a growing delay (``edm.backoff.Backoff``, never
above ``BACKOFF_MAX``, so a dead consumer is back within seconds; a worker that ran for
``STABLE_AFTER`` starts the back-off over). ``FATAL_AFTER`` deaths in a row before RUNNING end
in FATAL, which only a reload clears. Pure: the time is passed in, nothing is forked here.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from enum import Enum
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from edm.backoff import Backoff

if TYPE_CHECKING:
    from edm.config import Config

STARTSECS = 1.0  # up this long after its ready event: RUNNING
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 4.0
BOOT_BACKOFF_MIN = 1.0  # a worker that said it cannot start waits at least this long
STABLE_AFTER = 60.0  # a worker that ran this long before dying starts the back-off over
FATAL_AFTER = 5  # deaths in a row before RUNNING


CONSUMER = "consumer"
PLUGINS = "plugins"


def consumer_names(count: int) -> list[str]:
    """``consumer``, ``consumer-2``, … : growing ``amqp.workers`` keeps the running ones."""
    return [CONSUMER] + [f"{CONSUMER}-{n}" for n in range(2, count + 1)]


def kind_of(name: str) -> str:
    """The worker kind (``consumer``, ``plugins``) of a worker name."""
    return name.partition("-")[0]


def is_consumer(name: str) -> bool:
    return kind_of(name) == CONSUMER


def name_order(name: str) -> tuple[str, int]:
    """Sort key: consumer, consumer-2, …, consumer-10, then plugins."""
    kind, _, number = name.partition("-")
    return kind, int(number) if number.isdigit() else 1


class WorkerState(str, Enum):
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    FATAL = "FATAL"
    STOPPING = "STOPPING"
    STOPPED = "STOPPED"


@dataclass(frozen=True)
class Exit:
    """How a worker process ended."""

    reason: str  # "killed by SIGKILL", "exited with code 3"
    boot_error: bool  # it exited saying it cannot start (EXIT_BOOT)

    @classmethod
    def of(cls, status: int, boot_code: int) -> Exit:
        """From a ``waitpid`` status."""
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = str(sig)
            return cls(f"killed by {name}", False)
        code = os.waitstatus_to_exitcode(status)
        return cls(f"exited with code {code}", code == boot_code)


@dataclass
class Worker:
    name: str
    pid: int | None = None
    conn: Connection | None = None
    state: WorkerState = WorkerState.STOPPED
    started_at: float = 0.0
    ready: bool = False
    boot_failures: int = 0  # deaths in a row before RUNNING
    backoff: Backoff = field(default_factory=lambda: Backoff(BACKOFF_FIRST, BACKOFF_MAX))
    restart_at: float = 0.0
    stop_deadline: float | None = None  # a worker a reload stopped is killed past this
    restarts: int = 0
    last_error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)  # its last state event
    # The config the worker runs when a reload setting could not be applied (it kept the
    # running value); it is restarted with this one. None: the supervisor's.
    config: Config | None = None

    def spawned(self, pid: int, conn: Connection, now: float) -> None:
        if self.state is WorkerState.BACKOFF:
            self.restarts += 1
        self.pid, self.conn = pid, conn
        self.state, self.started_at, self.ready = WorkerState.STARTING, now, False
        self.stop_deadline = None
        self.info = {}

    def promote(self, now: float) -> bool:
        """STARTING → RUNNING once ready and up for STARTSECS; True when it changed."""
        if self.state is WorkerState.STARTING and self.ready and now - self.started_at >= STARTSECS:
            self.state = WorkerState.RUNNING
            return True
        return False

    def due(self, now: float) -> bool:
        """Its back-off is over: time to start it again."""
        return self.state is WorkerState.BACKOFF and now >= self.restart_at

    def died(self, end: Exit, now: float) -> float | None:
        """Its process ended: the delay before it is started again, or None (stopped, FATAL)."""
        self.pid, self.conn = None, None
        if self.state is WorkerState.STOPPING:
            self.state = WorkerState.STOPPED
            return None
        booted = self.ready and now - self.started_at >= STARTSECS
        self.boot_failures = 0 if booted else self.boot_failures + 1
        if self.boot_failures >= FATAL_AFTER:
            self.state = WorkerState.FATAL
            return None
        if now - self.started_at >= STABLE_AFTER:
            self.backoff.reset()
        delay = self.backoff.next()
        if end.boot_error:
            delay = max(delay, BOOT_BACKOFF_MIN)
        self.state, self.restart_at = WorkerState.BACKOFF, now + delay
        return delay

    def stopping(self) -> None:
        self.state = WorkerState.STOPPING if self.pid is not None else WorkerState.STOPPED

    def revive(self) -> None:
        """A reload clears FATAL: a fresh start with a fresh count."""
        self.boot_failures = 0
        self.last_error = None
        self.backoff.reset()
