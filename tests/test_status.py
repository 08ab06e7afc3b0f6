"""`edm status` and `status --json`: the daemon's own account, while consuming and after a crash."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

from conftest import EdmEnv, wait_for

from edm.cli.status import WORKER_KEYS, describe, document

MASKED = "amqp://guest:***@127.0.0.1:5672/%2F"
TOP_KEYS = {
    "status",
    "exit_code",
    "pid",
    "version",
    "config",
    "started",
    "uptime",
    "updated",
    "workers",
    "plugins",
    "error",
}


def status_json(env: EdmEnv, code: int = 0) -> dict[str, Any]:
    result = env.cli("status", "--json")
    assert result.returncode == code, result.stderr
    assert ":guest@" not in result.stdout, "the broker password leaked"
    doc: dict[str, Any] = json.loads(result.stdout)
    assert set(doc) == TOP_KEYS
    for worker in doc["workers"].values():
        assert set(worker) == set(WORKER_KEYS)
    return doc


def test_status_json_while_consuming(edm_env: EdmEnv) -> None:
    # Given 30 messages waiting before the daemon starts
    edm_env.publish([f"waiting {i}".encode() for i in range(30)])
    before = time.time()
    pid = edm_env.start()

    # Then the consumer reports the depth it found when it declared the queue
    wait_for(lambda: edm_env.state()["workers"]["consumer"].get("queue_depth") == 30, timeout=5)

    # When 5 more are published
    edm_env.publish([f"more {i}".encode() for i in range(5)])
    wait_for(lambda: len(edm_env.message_lines()) == 35, timeout=20)

    # Then status --json counts them, and the queue is seen empty within a depth interval
    def settled() -> dict[str, Any] | None:
        doc = status_json(edm_env)
        consumer = doc["workers"]["consumer"]
        ok = consumer["handled"] == 35 and consumer["queue_depth"] == 0 and consumer["state"] == "RUNNING"
        return doc if ok else None

    doc = wait_for(settled, timeout=15, interval=0.5)
    assert doc["status"] == "running" and doc["exit_code"] == 0
    assert doc["pid"] == pid
    assert doc["version"] == "0.1.0"
    assert doc["config"] == str(edm_env.config_path)
    assert before - 1 <= doc["started"] <= time.time()
    assert 0 <= doc["uptime"] <= time.time() - before + 1
    assert doc["plugins"] == {}
    assert list(doc["workers"]) == ["consumer"]
    consumer = doc["workers"]["consumer"]
    assert consumer["pid"] == edm_env.worker_pid() != pid
    assert consumer["activity"] == "consuming"
    assert (consumer["dead_lettered"], consumer["restarts"], consumer["last_error"]) == (0, 0, None)
    assert consumer["broker"] == MASKED
    assert consumer["queue"] == edm_env.queue

    # and the human form says the same
    text = edm_env.cli("status").stdout
    assert text.splitlines()[0] == f"edm is running (pid {pid})"
    counts = f"handled 35, dead lettered 0, restarts 0, broker {MASKED}, queue {edm_env.queue} (0 ready)"
    assert counts in text
    assert ":guest@" not in text
    assert edm_env.cli("stop").returncode == 0


def test_status_shows_how_many_handler_threads_are_busy(edm_env: EdmEnv) -> None:
    # Given 4 handler threads and 2 messages whose handler takes a while
    edm_env.doc["amqp"].update(handler="edm_thread_handlers:sleepy", threads=4)
    edm_env.write_config()
    edm_env.start()
    idle = status_json(edm_env)["workers"]["consumer"]
    assert (idle["threads"], idle["busy"]) == (4, 0)
    edm_env.publish([b"sleep=8 first", b"sleep=8 second"])

    # Then while both are in hand, status --json and status say 2 of the 4 are busy
    def busy() -> dict[str, Any] | None:
        consumer = status_json(edm_env)["workers"]["consumer"]
        return consumer if consumer["busy"] == 2 else None

    consumer = wait_for(busy, timeout=6, interval=0.2)
    assert consumer["threads"] == 4
    line = [line for line in edm_env.cli("status").stdout.splitlines() if line.startswith("  consumer:")]
    assert len(line) == 1 and ", consuming, 2 of 4 threads busy, handled 0," in line[0], line
    # and once they are done, none is
    wait_for(lambda: status_json(edm_env)["workers"]["consumer"]["busy"] == 0, timeout=15, interval=0.2)
    assert status_json(edm_env)["workers"]["consumer"]["handled"] == 2
    assert edm_env.cli("stop").returncode == 0


def test_status_json_after_the_worker_is_killed(edm_env: EdmEnv) -> None:
    pid = edm_env.start()
    first = status_json(edm_env)["workers"]["consumer"]
    assert first["restarts"] == 0

    # When the consumer worker is killed
    os.kill(first["pid"], signal.SIGKILL)

    # Then status shows a new worker, a restart, and the same main process
    def replaced() -> dict[str, Any] | None:
        doc = status_json(edm_env)
        consumer = doc["workers"]["consumer"]
        ok = consumer["pid"] not in (None, first["pid"]) and consumer["activity"] == "consuming"
        return doc if ok else None

    doc = wait_for(replaced, timeout=10, interval=0.2)
    consumer = doc["workers"]["consumer"]
    assert doc["pid"] == pid == edm_env.main_pid()
    assert consumer["restarts"] >= 1
    assert consumer["broker"] == MASKED
    assert consumer["handled"] == 0  # counters are the new worker's

    edm_env.publish([b"after the kill"])
    wait_for(lambda: status_json(edm_env)["workers"]["consumer"]["handled"] == 1, interval=0.2)
    assert edm_env.cli("stop").returncode == 0

    # And once stopped, the document keeps its shape
    stopped = status_json(edm_env, code=3)
    assert (stopped["status"], stopped["pid"], stopped["uptime"]) == ("stopped", None, None)
    assert stopped["workers"] == {} and stopped["plugins"] == {}


def test_status_json_while_the_broker_is_down(edm_env: EdmEnv) -> None:
    edm_env.doc["amqp"]["url"] = "amqp://guest:guest@127.0.0.1:1/%2F"
    edm_env.write_config()
    assert edm_env.cli("start").returncode == 0

    def retrying() -> dict[str, Any] | None:
        consumer = status_json(edm_env)["workers"]["consumer"]
        return consumer if consumer["activity"] in ("connecting", "backing off") else None

    consumer = wait_for(retrying, timeout=10, interval=0.2)
    assert consumer["broker"] == "amqp://guest:***@127.0.0.1:1/%2F"  # the one being tried
    assert consumer["queue_depth"] is None  # the broker does not answer: unknown, not 0
    assert edm_env.cli("stop").returncode == 0


def test_status_json_of_a_dead_daemon(edm_env: EdmEnv) -> None:
    pid = edm_env.start()
    for p in edm_env.all_pids():
        os.kill(p, signal.SIGKILL)
    wait_for(lambda: edm_env.cli("status").returncode == 1)
    doc = status_json(edm_env, code=1)
    assert (doc["status"], doc["exit_code"], doc["pid"]) == ("dead", 1, pid)


def test_status_json_with_an_unreadable_config(edm_env: EdmEnv) -> None:
    edm_env.config_path.write_text("amqp: [unclosed\n")
    result = edm_env.cli("status", "--json")
    assert result.returncode == 4
    doc = json.loads(result.stdout)
    assert set(doc) == TOP_KEYS
    assert doc["status"] == "unknown" and doc["error"]


# -- the rendering, without a daemon ---------------------------------------------------------


def _state(now: float, **worker: Any) -> dict[str, Any]:
    return {
        "pid": 10,
        "version": "0.1.0",
        "config": "/etc/edm/mq.yaml",
        "started": now - 3725,
        "updated": now,
        "workers": {"consumer": {"pid": 11, "state": "RUNNING", "activity": "backing off", **worker}},
    }


def test_describe_a_consumer_backing_off() -> None:
    now = 1_000_000.0
    doc = document("running", 10, 0, _state(now, handled=7, restarts=2, queue="email"), now)
    lines = describe(doc, now)
    assert lines[0] == "  uptime: 01:02:05"
    assert lines[1] == "  consumer: RUNNING, pid 11, backing off, handled 7, restarts 2, queue email"


def test_describe_consumer_processes_with_their_threads() -> None:
    now = 1_000_000.0
    state = _state(now, threads=1, busy=1)
    state["workers"]["consumer-2"] = {
        "pid": 13,
        "state": "RUNNING",
        "activity": "consuming",
        "threads": 8,
        "busy": 3,
    }
    state["workers"]["consumer-3"] = {"pid": None, "state": "BACKOFF", "threads": 8, "busy": 8}
    doc = document("running", 10, 0, state, now)
    assert [(w["threads"], w["busy"]) for w in doc["workers"].values()] == [(1, 1), (8, 3), (8, 8)]
    lines = describe(doc, now)
    assert lines[1] == "  consumer: RUNNING, pid 11, backing off, 1 of 1 thread busy"
    assert lines[2] == "  consumer-2: RUNNING, pid 13, consuming, 3 of 8 threads busy"
    assert lines[3] == "  consumer-3: BACKOFF"  # a dead process runs no handler, whatever it last said


def test_describe_the_fee_plugin() -> None:
    now = 1_000_000.0
    state = _state(now)
    state["workers"]["plugins"] = {
        "pid": 12,
        "state": "RUNNING",
        "activity": "running",
        "restarts": 0,
        "plugins": {
            "fee": {
                "busy": 0,
                "listen": "tcp://127.0.0.1:5555",
                "requests": 5,
                "state": "running",
                "stored": 4,
            },
        },
    }
    doc = document("running", 10, 0, state, now)
    assert doc["plugins"]["fee"]["stored"] == 4
    assert "plugins" not in doc["workers"]["plugins"]
    lines = describe(doc, now)
    assert lines[-2] == "  plugins: RUNNING, pid 12, running, restarts 0"
    assert lines[-1] == "    fee: running, listen tcp://127.0.0.1:5555, requests 5, stored 4, busy 0"


def test_describe_warns_when_the_status_file_is_old() -> None:
    now = 1_000_000.0
    state = _state(now)
    state["updated"] = now - 60
    lines = describe(document("running", 10, 0, state, now), now)
    assert any("last written 00:01:00 ago" in line for line in lines)
