"""The one WorkerLoop, on its select() reactor with a stand-in service: the control protocol
every worker speaks (reload, stop, reopen, state ticks, the failure check), without a broker.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
import yaml

from edm.config import Config, load
from edm.daemon.spawn import EXIT_CRASH, EXIT_OK, Command
from edm.logs import DailyLog
from edm.worker import loop
from edm.worker.loop import WORKER_SIGNALS, SelectReactor, WorkerLoop


class Service:
    """Applies a reload unless told to refuse it; fails when told to."""

    def __init__(self) -> None:
        self.refuse: str | None = None
        self.broken: str | None = None
        self.applied: list[Config] = []
        self.closed = False

    def apply(self, new: Config, running: Config) -> tuple[Config, str | None]:
        self.applied.append(new)
        return (running, self.refuse) if self.refuse else (new, None)

    def snapshot(self) -> dict[str, Any]:
        return {"state": "serving", "applied": len(self.applied)}

    def failure(self) -> str | None:
        return self.broken

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Config, Path]]:
    """A config file, with the process's signal handlers and logging restored afterwards."""
    path = tmp_path / "mq.yaml"
    doc = {"amqp": {}, "log": {"dir": str(tmp_path / "logs"), "level": "INFO"}, "daemon": {}}
    path.write_text(yaml.safe_dump(doc))
    handlers = {sig: signal.getsignal(sig) for sig in WORKER_SIGNALS}
    root = logging.getLogger()
    saved = list(root.handlers), root.level, logging.root.manager.disable
    yield load(path), path
    signal.set_wakeup_fd(-1)
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    logging.disable(saved[2])


def run(config: Config, service: Service, *commands: tuple[Command, Any]) -> tuple[int, list[dict[str, Any]]]:
    """Queue ``commands``, run the loop to its end; its exit code and every event it sent."""
    ours, theirs = Pipe()
    for command, payload in commands:
        ours.send((command.value, payload))
    daily = DailyLog(config.log.dir, config.log.name)
    daily.open()
    code = WorkerLoop(theirs, config, daily, SelectReactor(), service).run()
    daily.close()
    return code, _events(ours, theirs)


def _events(ours: Connection, theirs: Connection) -> list[dict[str, Any]]:
    got = []
    while ours.poll():
        got.append(ours.recv())
    ours.close()
    theirs.close()
    return got


def test_reload_then_stop(world: tuple[Config, Path]) -> None:
    config, path = world
    doc = yaml.safe_load(path.read_text())
    doc["log"]["level"] = "DEBUG"
    path.write_text(yaml.safe_dump(doc))
    new = load(path)
    service = Service()
    code, events = run(config, service, (Command.RELOAD, new), (Command.STOP, None))
    assert code == EXIT_OK and service.closed
    kinds = [e["event"] for e in events]
    assert kinds[0] == "ready" and kinds[-1] == "state"
    (reloaded,) = [e for e in events if e["event"] == "reloaded"]
    assert reloaded["config"] == new and reloaded["error"] is None
    assert service.applied == [new]
    # the whole log section applied: DEBUG is on again (logging.disable lifted)
    assert logging.getLogger("edm.anything").isEnabledFor(logging.DEBUG)
    assert events[-1] == {"event": "state", "state": "serving", "applied": 1}


def test_a_reload_the_service_cannot_apply_answers_with_the_running_config(
    world: tuple[Config, Path],
) -> None:
    config, path = world
    service = Service()
    service.refuse = "plugins.fee.listen: cannot bind tcp://x:1: in use; keeping tcp://x:2"
    new = load(path)
    _, events = run(config, service, (Command.RELOAD, new), (Command.STOP, None))
    (reloaded,) = [e for e in events if e["event"] == "reloaded"]
    assert reloaded["config"] is not new and reloaded["config"] == config
    assert reloaded["error"] == service.refuse


def test_a_service_that_no_longer_serves_ends_the_worker_to_be_restarted(
    world: tuple[Config, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    config, _ = world
    monkeypatch.setattr(loop, "STATE_INTERVAL", 0.01)
    service = Service()
    service.broken = "The fee plugin no longer serves (its thread died)"
    with caplog.at_level(logging.ERROR, logger="edm.worker.loop"):
        code, events = run(config, service)
    assert code == EXIT_CRASH and service.closed
    assert "The fee plugin no longer serves (its thread died); exiting to be restarted." in caplog.text
    assert [e["event"] for e in events][:2] == ["ready", "state"]


def test_a_closed_channel_stops_the_worker(world: tuple[Config, Path]) -> None:
    """The supervisor is gone (its end closed): the worker stops instead of serving alone."""
    config, _ = world
    ours, theirs = Pipe()
    ours.close()
    daily = DailyLog(config.log.dir, config.log.name)
    service = Service()
    assert WorkerLoop(theirs, config, daily, SelectReactor(), service).run() == EXIT_OK
    assert service.closed
    theirs.close()


def test_the_select_reactor_runs_timers_in_order() -> None:
    reactor = SelectReactor()
    fired: list[str] = []
    reactor.call_later(0.02, lambda: fired.append("second"))
    reactor.call_later(0.01, lambda: fired.append("first"))
    reactor.call_later(0.03, reactor.stop)
    reactor.run()
    assert fired == ["first", "second"]
