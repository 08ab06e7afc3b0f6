"""A broker that blocks publishing (a memory alarm): ``edm publish`` and the daemon say so and lose nothing.

The alarm is raised on the system broker by lowering its memory watermark, which blocks every
publishing connection of every test running at the same time: each window is kept to the few
seconds the test needs, and the watermark read at the start is restored whatever happens
(after each test, at the end of the module, and at exit).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import AMQP_URL, ROOT, EdmEnv, wait_for

from edm.amqp.consumer import Consumer
from edm.amqp.ioloop import FlushingIOLoop
from edm.config import AmqpConfig
from edm.handlers.loader import HandlerFactory

LOW_WATERMARK = ("absolute", "1MB")  # below what any broker uses: the alarm goes off at once
LOW_SETTING = "{absolute,1000000}"  # how the broker reports LOW_WATERMARK back
REASON = "low on memory"


def rabbitmqctl(*args: str) -> str:
    result = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise AssertionError(f"rabbitmqctl {' '.join(args)} failed: {result.stderr or result.stdout}")
    return result.stdout.strip()


def _watermark_args(setting: str) -> list[str]:
    """``rabbitmqctl set_vm_memory_high_watermark`` arguments for a setting as the broker reports it."""
    absolute = re.fullmatch(r"\{absolute,(\d+)\}", setting)
    if absolute:
        return ["absolute", absolute.group(1)]
    relative = re.fullmatch(r"\{relative,([0-9.]+)\}", setting)
    if relative:
        return [relative.group(1)]
    if re.fullmatch(r"[0-9.]+", setting):
        return [setting]
    raise AssertionError(f"cannot read the broker's memory watermark setting: {setting!r}")


def _current_watermark() -> str:
    setting = rabbitmqctl("eval", "vm_memory_monitor:get_vm_memory_high_watermark().")
    if setting == LOW_SETTING:
        # An earlier run was killed with the alarm on: go back to the configured value.
        configured = rabbitmqctl("eval", "application:get_env(rabbit, vm_memory_high_watermark).")
        found = re.fullmatch(r"\{ok,(.+)\}", configured)
        setting = found.group(1) if found else "0.4"
    _watermark_args(setting)  # fail now, before any alarm, if it cannot be restored
    return setting


_ORIGINAL: list[str] = []


def _restore_watermark() -> None:
    if _ORIGINAL:
        rabbitmqctl("set_vm_memory_high_watermark", *_watermark_args(_ORIGINAL[0]))


@pytest.fixture(scope="module", autouse=True)
def _watermark_restored() -> Iterator[None]:
    """The safety net: the module ends with the broker's own watermark, even after an interruption."""
    _ORIGINAL[:] = [_current_watermark()]
    atexit.register(_restore_watermark)
    try:
        yield
    finally:
        _restore_watermark()
        atexit.unregister(_restore_watermark)


class Alarm:
    def __init__(self) -> None:
        self.on = False

    def raise_(self) -> None:
        self.on = True
        rabbitmqctl("set_vm_memory_high_watermark", *LOW_WATERMARK)

    def lift(self) -> None:
        if self.on:
            _restore_watermark()
            self.on = False


@contextmanager
def memory_alarm() -> Iterator[Alarm]:
    """The broker's memory alarm for the duration of the block (or until ``lift``)."""
    alarm = Alarm()
    try:
        alarm.raise_()
        yield alarm
    finally:
        alarm.lift()


class Process:
    """An ``edm`` command whose stderr lines are collected as they come, with their arrival times."""

    def __init__(self, env: EdmEnv, *args: str) -> None:
        environ = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests' / 'support'}"}
        environ.pop("EDM_CONFIG", None)
        self.started = time.monotonic()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "edm", "--config", str(env.config_path), *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=environ,
            cwd=str(env.base),
        )
        self.lines: list[tuple[float, str]] = []
        self.took = 0.0  # seconds from start to exit, once waited for
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.popen.stderr is not None
        for raw in self.popen.stderr:
            self.lines.append((time.monotonic() - self.started, raw.decode("utf-8", "replace").rstrip("\n")))

    @property
    def stderr(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def wait(self, timeout: float) -> int:
        code = self.popen.wait(timeout=timeout)
        self.took = time.monotonic() - self.started
        self.reader.join(timeout=5)
        return code

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=10)


@pytest.fixture
def publish_process(edm_env: EdmEnv) -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        process.kill()


def test_publish_says_at_once_that_the_broker_blocks_it_and_gives_up_after_its_timeout(
    edm_env: EdmEnv, publish_process: list[Process]
) -> None:
    edm_env.publish([])  # the exchange and its queue exist
    with memory_alarm():
        # The alarm is on before the tool connects: the broker blocks it at its first publish.
        process = Process(edm_env, "publish", "--timeout", "2", "hello")
        publish_process.append(process)
        wait_for(lambda: process.lines, timeout=10)
        code = process.wait(timeout=30)
    first_at, first = process.lines[0]
    assert first == f"edm publish: the broker blocks publishing: {REASON}; waiting up to 2 s"
    assert first_at < 3.0, process.lines  # from the start of the process, its imports included
    assert code == 1, process.stderr
    assert (
        f"edm publish: the broker still blocks publishing after 2 s: {REASON}; 0 of 1 messages confirmed"
        in process.stderr
    )
    ended_at = process.lines[-1][0]
    assert 1.9 <= ended_at - first_at < 10.0, process.lines


def test_publish_ends_at_once_when_the_broker_confirms_everything_before_it_blocks(
    edm_env: EdmEnv, publish_process: list[Process]
) -> None:
    # An empty body is whole at its header frame: the broker takes and confirms it, then
    # blocks the connection, and would never answer a close.
    edm_env.publish([])
    with memory_alarm():
        process = Process(edm_env, "publish", "--timeout", "20", "")
        publish_process.append(process)
        code = process.wait(timeout=30)
    assert code == 0, process.stderr
    assert process.took < 10.0, process.lines  # well before the 20 s timeout
    assert [body for body, _ in edm_env.drain_queue()] == [b""]


def test_publish_goes_on_when_the_broker_lifts_the_block(
    edm_env: EdmEnv, publish_process: list[Process]
) -> None:
    edm_env.publish([])
    with memory_alarm() as alarm:
        process = Process(edm_env, "publish", "hello", "world")
        publish_process.append(process)
        wait_for(lambda: process.lines, timeout=10)
        alarm.lift()
        code = process.wait(timeout=30)
    assert process.lines[0][1] == f"edm publish: the broker blocks publishing: {REASON}; waiting up to 30 s"
    assert "edm publish: the broker no longer blocks publishing; going on" in process.stderr
    assert code == 0, process.stderr
    assert [body for body, _ in edm_env.drain_queue()] == [b"hello", b"world"]


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan", "inf"])
def test_a_bad_publish_timeout_is_a_usage_error(edm_env: EdmEnv, value: str) -> None:
    result = edm_env.cli("publish", "--timeout", value, "hello")
    assert result.returncode == 2
    assert "argument --timeout:" in result.stderr and "seconds" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_daemon_waits_out_an_alarm_on_its_connection_and_loses_nothing(edm_env: EdmEnv) -> None:
    """Acks pass an alarm; a dead letter waits for its end on the same connection, then goes."""
    edm_env.doc["amqp"]["handler"] = "edm_alarm_handlers:gated"
    edm_env.doc["amqp"]["max_retries"] = 0
    edm_env.write_config()
    edm_env.start()
    first, second = edm_env.base / "gate-1", edm_env.base / "gate-2"
    edm_env.publish(
        [f"gate={first} good 0".encode(), b"good 1", b"good 2", f"gate={second} poison 1".encode(), b"good 3"]
    )
    wait_for(lambda: Path(f"{first}.held").exists(), timeout=15)
    dead_queue = edm_env.queue + ".dead"

    def activity() -> str:
        return str(edm_env.state().get("workers", {}).get("consumer", {}).get("activity"))

    blocked = f"blocked by the broker: {REASON}"
    with memory_alarm():
        # A consumer that only acks is not blocked: good 0 to 2 are taken and acked.
        first.touch()
        wait_for(lambda: Path(f"{second}.held").exists(), timeout=15)
        assert edm_env.bodies_logged() == ["good 0", "good 1", "good 2"]
        assert activity() == "consuming"
        # The failed message's dead letter is the connection's first publish: now it is blocked.
        second.touch()
        wait_for(lambda: activity() == blocked, timeout=10)
        status = edm_env.cli("status")
        assert status.returncode == 0 and blocked in status.stdout, status.stdout
        document = json.loads(edm_env.cli("status", "--json").stdout)
        assert document["workers"]["consumer"]["activity"] == blocked
        assert edm_env.queue_depth(dead_queue) == 0  # the dead letter waits in the client
    wait_for(lambda: activity() == "consuming", timeout=15)
    wait_for(lambda: edm_env.queue_depth(dead_queue) == 1, timeout=15)
    wait_for(lambda: "good 3" in edm_env.bodies_logged(), timeout=15)
    assert edm_env.cli("stop").returncode == 0

    assert edm_env.queue_depth() == 0  # the original was acked once its dead letter was confirmed
    assert [body for body, _ in edm_env.drain_queue(dead_queue)] == [b"poison 1"]
    assert edm_env.bodies_logged() == ["good 0", "good 1", "good 2", "good 3"]
    log = edm_env.log_text()
    assert log.count(f" WARNING The broker blocks publishing: {REASON}.") == 1, log
    assert log.count(" WARNING ") == 1, log  # pika's own notice of the block stays out of the log
    assert log.count(" INFO The broker no longer blocks publishing") == 1, log
    assert log.count("Connected to") == 1, log
    assert "Lost the connection" not in log and "Reconnecting" not in log, log
    assert log.count(" ERROR Dead-lettered a message") == 1, log


def test_no_timer_tears_the_daemons_connection_down_during_a_long_alarm() -> None:
    """pika's blocked_connection_timeout would drop the connection, redeliver the failed message
    and meet the alarm again, in a loop; an alarm that long is not raised on a shared broker."""
    consumer = Consumer(
        AmqpConfig(url=(AMQP_URL,)),
        HandlerFactory("test:nothing", lambda _m: None),
        lambda _s: None,
        FlushingIOLoop(),
    )
    consumer.start()
    try:
        connection = consumer._link.connection
        assert connection is not None
        assert connection.params.blocked_connection_timeout is None
    finally:
        consumer.ioloop.close()
