"""The supervisor's restart state machine, on a fake clock with a fake fork: no processes.

STARTING → RUNNING after the grace time (STARTSECS) once the worker said it is ready;
a death → BACKOFF with a growing delay; FATAL after FATAL_AFTER fast failures, cleared by a
reload; restarts counted.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Iterator
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
import yaml

from edm.config import Config, load
from edm.daemon.lifecycle import (
    BACKOFF_FIRST,
    BACKOFF_MAX,
    BOOT_BACKOFF_MIN,
    FATAL_AFTER,
    STABLE_AFTER,
    STARTSECS,
    Worker,
    WorkerState,
)
from edm.daemon.pidfile import Pidfile
from edm.daemon.spawn import EXIT_BOOT, EXIT_CRASH
from edm.daemon.supervisor import Supervisor
from edm.logs import DailyLog
from edm.worker.kinds import Kind
from edm.worker.loop import apply_log_settings

CRASHED = EXIT_CRASH << 8  # waitpid statuses
CANNOT_START = EXIT_BOOT << 8
KILLED = int(signal.SIGKILL)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeSpawn:
    """Stands in for the fork: hands out PIDs and one end of a pipe, remembers each start."""

    def __init__(self) -> None:
        self.started: list[tuple[Callable[..., int], Config]] = []
        self._ends: list[Connection] = []

    def __call__(
        self, main: Callable[..., int], config: Config, _close: Callable[[], None]
    ) -> tuple[int, Connection]:
        ours, theirs = Pipe()
        self._ends += [ours, theirs]
        self.started.append((main, config))
        return 40000 + len(self.started), ours

    def close(self) -> None:
        for end in self._ends:
            end.close()


Machine = tuple[Supervisor, Clock, FakeSpawn]


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "mq.yaml"
    doc = {
        "amqp": {"queue": "never-used"},
        "log": {"dir": str(tmp_path / "logs"), "name": "edm", "level": "INFO"},
        "daemon": {"pidfile": str(tmp_path / "run" / "edm.pid")},
    }
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def machine(config_file: Path) -> Iterator[Machine]:
    """A supervisor whose one worker (the consumer) was started at the fake time 1000."""
    config = load(config_file)
    clock, spawner = Clock(), FakeSpawn()
    daily = DailyLog(config.log.dir, config.log.name)
    supervisor = Supervisor(config, Pidfile(config.daemon.pidfile), daily, clock=clock, spawner=spawner)
    supervisor.workers["consumer"] = Worker("consumer")
    supervisor.start_worker(supervisor.workers["consumer"])
    root = logging.getLogger()
    handlers, level, disabled = list(root.handlers), root.level, logging.root.manager.disable
    yield supervisor, clock, spawner
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.disable(disabled)
    spawner.close()
    daily.close()


def ready(supervisor: Supervisor, worker: Worker) -> None:
    supervisor.on_event(worker, {"event": "ready", "pid": worker.pid})


def run_until_running(supervisor: Supervisor, clock: Clock, worker: Worker) -> None:
    ready(supervisor, worker)
    clock.advance(STARTSECS)
    supervisor.manage()
    assert worker.state is WorkerState.RUNNING


def test_the_supervisor_hands_the_fork_a_kind_that_imports_its_main_there(machine: Machine) -> None:
    _, _, spawner = machine
    [(main, _config)] = spawner.started
    assert main == Kind("consumer")  # not the function: the main process never imports it


def test_starting_becomes_running_only_after_ready_and_the_grace_time(
    machine: Machine,
) -> None:
    supervisor, clock, _ = machine
    worker = supervisor.workers["consumer"]
    assert worker.state is WorkerState.STARTING
    # Given the grace time passed without a ready event, it is still STARTING
    clock.advance(STARTSECS * 3)
    supervisor.manage()
    assert worker.state is WorkerState.STARTING
    # When it says ready, it is RUNNING once it has been up for STARTSECS (it has)
    ready(supervisor, worker)
    supervisor.manage()
    assert worker.state is WorkerState.RUNNING
    assert supervisor.snapshot()["workers"]["consumer"]["state"] == "RUNNING"


def test_ready_early_still_waits_for_the_grace_time(machine: Machine) -> None:
    supervisor, clock, _ = machine
    worker = supervisor.workers["consumer"]
    ready(supervisor, worker)
    clock.advance(STARTSECS / 2)
    supervisor.manage()
    assert worker.state is WorkerState.STARTING
    clock.advance(STARTSECS / 2)
    supervisor.manage()
    assert worker.state is WorkerState.RUNNING


def test_deaths_back_off_with_a_growing_delay_and_count_restarts(
    machine: Machine,
) -> None:
    supervisor, clock, spawner = machine
    worker = supervisor.workers["consumer"]
    delays = []
    for _ in range(8):
        run_until_running(supervisor, clock, worker)  # a worker that ran: never FATAL
        supervisor.on_death(worker, KILLED)
        assert worker.state is WorkerState.BACKOFF and worker.pid is None
        delays.append(worker.restart_at - clock.now)
        # not before its time...
        clock.advance(delays[-1] * 0.99)
        supervisor.manage()
        assert worker.state is WorkerState.BACKOFF
        # ...then started again
        clock.now = worker.restart_at
        supervisor.manage()
        assert worker.state is WorkerState.STARTING
    assert delays == pytest.approx([min(BACKOFF_MAX, BACKOFF_FIRST * 2**n) for n in range(8)])
    assert delays[-1] == BACKOFF_MAX
    assert worker.restarts == 8 == len(spawner.started) - 1
    assert supervisor.snapshot()["workers"]["consumer"]["restarts"] == 8


def test_a_worker_that_ran_long_starts_the_back_off_over(
    machine: Machine,
) -> None:
    supervisor, clock, _ = machine
    worker = supervisor.workers["consumer"]
    for _ in range(4):
        run_until_running(supervisor, clock, worker)
        supervisor.on_death(worker, CRASHED)
        clock.now = worker.restart_at
        supervisor.manage()
    assert worker.backoff.peek() == BACKOFF_FIRST * 2**4
    run_until_running(supervisor, clock, worker)
    clock.advance(STABLE_AFTER)
    supervisor.on_death(worker, CRASHED)
    assert worker.restart_at - clock.now == pytest.approx(BACKOFF_FIRST)


def test_fatal_after_repeated_fast_failures_until_a_reload(
    machine: Machine, caplog: pytest.LogCaptureFixture
) -> None:
    supervisor, clock, spawner = machine
    worker = supervisor.workers["consumer"]
    for n in range(1, FATAL_AFTER):
        clock.advance(0.05)  # dies before it is ready
        supervisor.on_death(worker, CRASHED)
        assert worker.state is WorkerState.BACKOFF, n
        assert worker.boot_failures == n
        clock.now = worker.restart_at
        supervisor.manage()
    with caplog.at_level(logging.CRITICAL, logger="edm.daemon.supervisor"):
        supervisor.on_death(worker, CRASHED)
    assert worker.state is WorkerState.FATAL
    assert f"failed {FATAL_AFTER} times in a row at start; giving up (FATAL)" in caplog.text
    started = len(spawner.started)
    clock.advance(3600)
    supervisor.manage()
    assert worker.state is WorkerState.FATAL and len(spawner.started) == started
    # A reload clears FATAL: a fresh start with a fresh count
    supervisor.reload()
    assert worker.state is WorkerState.STARTING and len(spawner.started) == started + 1
    assert worker.boot_failures == 0 and worker.last_error is None


def test_a_failure_after_running_does_not_count_toward_fatal(
    machine: Machine,
) -> None:
    supervisor, clock, _ = machine
    worker = supervisor.workers["consumer"]
    for _ in range(FATAL_AFTER * 2):
        clock.advance(0.05)
        supervisor.on_death(worker, CRASHED)
        clock.now = worker.restart_at
        supervisor.manage()
        if worker.boot_failures == FATAL_AFTER - 1:
            run_until_running(supervisor, clock, worker)
            supervisor.on_death(worker, CRASHED)
            assert worker.boot_failures == 0
            clock.now = worker.restart_at
            supervisor.manage()
    assert worker.state is not WorkerState.FATAL


def test_a_worker_that_cannot_start_waits_at_least_a_second(
    machine: Machine,
) -> None:
    supervisor, clock, _ = machine
    worker = supervisor.workers["consumer"]
    supervisor.on_event(worker, {"event": "fatal", "error": "amqp.handler: no module named 'nope'"})
    supervisor.on_death(worker, CANNOT_START)
    assert worker.state is WorkerState.BACKOFF
    assert worker.restart_at - clock.now == pytest.approx(BOOT_BACKOFF_MIN)
    assert worker.last_error == "amqp.handler: no module named 'nope'"


def test_a_stopping_worker_that_dies_is_stopped_not_restarted(
    machine: Machine,
) -> None:
    supervisor, clock, spawner = machine
    worker = supervisor.workers["consumer"]
    run_until_running(supervisor, clock, worker)
    worker.stopping()
    supervisor.on_death(worker, 0)
    assert worker.state is WorkerState.STOPPED
    clock.advance(60)
    supervisor.manage()
    assert len(spawner.started) == 1 and worker.restarts == 0


def test_the_main_process_reload_applies_the_whole_log_section(machine: Machine, config_file: Path) -> None:
    """Given INFO at start (DEBUG calls switched off by logging.disable), a reload to DEBUG
    must turn DEBUG on again, not only set the root level."""
    supervisor, _, _ = machine
    supervisor.daily.open()
    # the start's log setup, as serve() does it
    apply_log_settings(supervisor.daily, supervisor.config)
    assert logging.getLogger("edm.test").isEnabledFor(logging.DEBUG) is False
    doc: dict[str, Any] = yaml.safe_load(config_file.read_text())
    doc["log"]["level"] = "DEBUG"
    config_file.write_text(yaml.safe_dump(doc))
    supervisor.reload()
    assert logging.getLogger("edm.test").isEnabledFor(logging.DEBUG) is True
    assert os.path.exists(supervisor.daily.current_path)


def set_workers(config_file: Path, count: int) -> None:
    doc: dict[str, Any] = yaml.safe_load(config_file.read_text())
    doc["amqp"]["workers"] = count
    config_file.write_text(yaml.safe_dump(doc))


def commands(worker: Worker, spawner: FakeSpawn) -> list[str]:
    """What the supervisor sent the worker (read from the far end of its fake channel)."""
    theirs = spawner._ends[spawner._ends.index(worker.conn) + 1] if worker.conn is not None else None
    got = []
    while theirs is not None and theirs.poll():
        got.append(theirs.recv()[0])
    return got


def test_a_reload_that_raises_amqp_workers_starts_only_the_new_ones(
    machine: Machine, config_file: Path
) -> None:
    supervisor, clock, spawner = machine
    first = supervisor.workers["consumer"]
    run_until_running(supervisor, clock, first)
    set_workers(config_file, 3)
    supervisor.reload()
    assert list(supervisor.workers) == ["consumer", "consumer-2", "consumer-3"]
    assert first.state is WorkerState.RUNNING and first.pid == 40001  # not restarted...
    assert commands(first, spawner) == ["reload"]  # ...told to reload
    assert [w.state for w in supervisor.workers.values()][1:] == [WorkerState.STARTING] * 2
    assert len(spawner.started) == 3


def test_a_reload_that_lowers_amqp_workers_stops_the_extra_ones(machine: Machine, config_file: Path) -> None:
    supervisor, clock, spawner = machine
    set_workers(config_file, 3)
    supervisor.reload()
    for worker in supervisor.workers.values():
        run_until_running(supervisor, clock, worker)
    set_workers(config_file, 1)
    supervisor.reload()
    second, third = supervisor.workers["consumer-2"], supervisor.workers["consumer-3"]
    assert second.state is third.state is WorkerState.STOPPING
    assert commands(second, spawner) == ["stop"]  # started by the first reload: only told to stop
    assert commands(supervisor.workers["consumer"], spawner)[-1] == "reload"
    supervisor.on_death(second, 0)
    assert list(supervisor.workers) == ["consumer", "consumer-3"]
    # One that does not stop within daemon.stop_timeout is killed (its pid is fake: gone)
    clock.advance(supervisor.config.daemon.stop_timeout)
    supervisor.manage()
    assert third.stop_deadline is None
    supervisor.on_death(third, KILLED)
    assert list(supervisor.workers) == ["consumer"]
    assert list(supervisor.snapshot()["workers"]) == ["consumer"]


def test_each_consumer_process_is_restarted_alone(machine: Machine, config_file: Path) -> None:
    supervisor, clock, _ = machine
    set_workers(config_file, 3)
    supervisor.reload()
    for worker in supervisor.workers.values():
        run_until_running(supervisor, clock, worker)
    pids = {name: w.pid for name, w in supervisor.workers.items()}
    second = supervisor.workers["consumer-2"]
    supervisor.on_death(second, KILLED)
    clock.now = second.restart_at
    supervisor.manage()
    assert second.state is WorkerState.STARTING and second.restarts == 1
    assert second.pid not in pids.values()
    others = {name: w.pid for name, w in supervisor.workers.items() if name != "consumer-2"}
    assert others == {name: pid for name, pid in pids.items() if name != "consumer-2"}
    assert [w["restarts"] for w in supervisor.snapshot()["workers"].values()] == [0, 1, 0]
