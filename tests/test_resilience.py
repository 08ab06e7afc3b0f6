"""Faults against the real broker: nothing is lost, nobody has to step in."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator

import pytest
from conftest import EdmEnv, alive, broker_answers, wait_for


def rabbitmqctl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def broker_restored() -> Iterator[None]:
    """Whatever a test does to the broker, it answers again afterwards."""
    yield
    if not broker_answers():
        rabbitmqctl("start_app")
    if not broker_answers():
        subprocess.run(["rabbitmq-server", "-detached"], capture_output=True, timeout=60)
    wait_for(broker_answers, timeout=120, interval=0.5)
    rabbitmqctl("await_startup")


def assert_all_logged_once_or_redelivered(env: EdmEnv, expected: list[str]) -> None:
    lines = env.message_lines()
    counts = Counter(line.split(" (+) ", 1)[1] for line in lines)
    missing = [body for body in expected if counts[body] == 0]
    assert not missing, f"{len(missing)} messages lost, e.g. {missing[:3]}"
    duplicated = {body for body, n in counts.items() if n > 1}
    for body in duplicated:
        marked = [line for line in lines if line.endswith(" (+) " + body) and "[redelivered]" in line]
        assert len(marked) >= counts[body] - 1, f"duplicate of {body!r} without [redelivered]"


def test_three_kill_9_of_the_whole_tree_lose_nothing(edm_env: EdmEnv) -> None:
    edm_env.start()
    bodies = [f"crash-test {i}" for i in range(2000)]
    publisher = threading.Thread(target=edm_env.publish, args=([b.encode() for b in bodies],))
    publisher.start()
    rng = random.Random(7)
    for round_ in range(3):
        target = (round_ + 1) * 400 + rng.randint(0, 150)
        wait_for(lambda t=target: len(edm_env.message_lines()) >= t, timeout=60)
        pids = edm_env.all_pids()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda p=pids: not any(alive(x) for x in p))
        assert edm_env.cli("status").returncode == 1
        edm_env.start()
    publisher.join(timeout=120)
    wait_for(lambda: edm_env.queue_depth() == 0 and len(edm_env.message_lines()) >= 2000, timeout=60)
    assert edm_env.cli("stop").returncode == 0
    assert_all_logged_once_or_redelivered(edm_env, bodies)


@pytest.mark.usefixtures("broker_restored")
def test_close_all_connections_and_stop_app_mid_stream(edm_env: EdmEnv) -> None:
    edm_env.start()
    bodies = [f"fault {i}" for i in range(600)]
    edm_env.publish([b.encode() for b in bodies[:200]])
    wait_for(lambda: len(edm_env.message_lines()) >= 50, timeout=30)
    result = rabbitmqctl("close_all_connections", "test: connection cut")
    assert result.returncode == 0, result.stderr
    wait_for(lambda: "Lost the connection" in edm_env.log_text(), timeout=10)
    edm_env.wait_consuming(timeout=20)
    edm_env.publish([b.encode() for b in bodies[200:400]])
    wait_for(lambda: len(edm_env.message_lines()) >= 250, timeout=30)

    assert rabbitmqctl("stop_app").returncode == 0
    wait_for(lambda: edm_env.log_text().count("Lost the connection") >= 2, timeout=30)
    assert rabbitmqctl("start_app").returncode == 0
    rabbitmqctl("await_startup")
    edm_env.wait_consuming(timeout=40)
    edm_env.publish([b.encode() for b in bodies[400:]])
    wait_for(lambda: edm_env.queue_depth() == 0 and len(set(edm_env.bodies_logged())) >= 600, timeout=60)
    assert_all_logged_once_or_redelivered(edm_env, bodies)
    log = edm_env.log_text()
    assert log.count("Lost the connection") >= 2
    assert "guest:guest" not in log
    assert edm_env.cli("stop").returncode == 0


@pytest.mark.usefixtures("broker_restored")
def test_broker_down_at_start_then_up(edm_env: EdmEnv) -> None:
    assert rabbitmqctl("stop_app").returncode == 0
    try:
        result = edm_env.cli("start")
        assert result.returncode == 0, result.stderr
        wait_for(lambda: "Cannot connect" in edm_env.log_text(), timeout=15)
        wait_for(lambda: "backing off" in edm_env.cli("status").stdout, timeout=10)
    finally:
        assert rabbitmqctl("start_app").returncode == 0
        rabbitmqctl("await_startup")
    edm_env.wait_consuming(timeout=30)
    edm_env.publish([b"after the broker came up"])
    wait_for(lambda: "after the broker came up" in edm_env.bodies_logged())
    assert edm_env.cli("stop").returncode == 0


def test_url_list_fails_over_to_the_live_broker(edm_env: EdmEnv) -> None:
    live = edm_env.doc["amqp"]["url"]
    edm_env.doc["amqp"]["url"] = ["amqp://guest:pw-closed@127.0.0.1:1/%2F", live]
    edm_env.write_config()
    edm_env.start()
    edm_env.publish([b"via the second url"])
    wait_for(lambda: "via the second url" in edm_env.bodies_logged())
    log = edm_env.log_text()
    assert "Cannot connect to amqp://guest:***@127.0.0.1:1/%2F" in log
    assert "pw-closed" not in log
    assert edm_env.cli("stop").returncode == 0


def test_slow_handler_keeps_its_connection(edm_env: EdmEnv) -> None:
    edm_env.doc["amqp"]["heartbeat"] = 2
    edm_env.doc["amqp"]["handler"] = "edm_test_handlers:slow"
    edm_env.write_config()
    edm_env.start()
    edm_env.publish([b"sleep=6 slow one", b"quick one"])
    wait_for(lambda: "quick one" in edm_env.bodies_logged(), timeout=30)
    assert edm_env.bodies_logged() == ["sleep=6 slow one", "quick one"]
    log = edm_env.log_text()
    assert log.count("Connected to") == 1, log
    assert "Lost the connection" not in log and "[redelivered]" not in log
    assert edm_env.queue_depth() == 0
    assert edm_env.cli("stop").returncode == 0


def test_poison_messages_are_dead_lettered(edm_env: EdmEnv) -> None:
    edm_env.doc["amqp"]["handler"] = "edm_test_handlers:fail_poison"
    edm_env.doc["amqp"]["max_retries"] = 2
    edm_env.doc["amqp"]["retry_delays"] = [1]
    edm_env.write_config()
    edm_env.start()
    bodies = [b"good 1", b"poison 1", b"good 2", b"poison 2", b"good 3"]
    edm_env.publish(bodies)
    wait_for(lambda: edm_env.queue_depth(edm_env.queue + ".dead") == 2, timeout=30)
    wait_for(lambda: len(edm_env.bodies_logged()) == 3)
    assert edm_env.bodies_logged() == ["good 1", "good 2", "good 3"]
    wait_for(lambda: edm_env.queue_depth() == 0)
    dead = edm_env.drain_queue(edm_env.queue + ".dead")
    assert [body for body, _ in dead] == [b"poison 1", b"poison 2"]
    for _, headers in dead:
        assert headers["x-edm-attempts"] == 3
        assert headers["x-edm-error"].startswith("ValueError: cannot handle b'poison")
    log = edm_env.log_text()
    assert log.count(" ERROR Dead-lettered a message") == 2
    # each retry waited in the broker's delay queue, one WARNING each
    assert log.count(" WARNING The handler failed (attempt") == 4
    assert log.count(f"retrying in 1 s ({edm_env.queue}.retry.1000)") == 4
    assert edm_env.cli("stop").returncode == 0


def test_reload_with_a_new_queue_during_a_stream(edm_env: EdmEnv) -> None:
    pid = edm_env.start()
    new_queue = edm_env.queue + "-b"
    edm_env.extra_queues.add(new_queue)
    # both queues exist and are bound before the stream starts, each to its own key
    from conftest import amqp_channel

    connection, channel = amqp_channel()
    channel.queue_declare(new_queue, durable=True)
    channel.queue_bind(new_queue, edm_env.exchange, new_queue)
    connection.close()
    old_bodies = [f"a {i}" for i in range(1000)]
    new_bodies = [f"b {i}" for i in range(300)]
    publisher = threading.Thread(target=edm_env.publish, args=([b.encode() for b in old_bodies],))
    publisher.start()
    wait_for(lambda: len(edm_env.message_lines()) >= 200, timeout=30)
    edm_env.doc["amqp"]["queue"] = new_queue
    edm_env.doc["amqp"]["routing_key"] = new_queue
    edm_env.write_config()
    assert edm_env.cli("reload").returncode == 0
    publisher.join(timeout=60)
    edm_env.publish([b.encode() for b in new_bodies], routing_key=new_queue)
    wait_for(lambda: sum(b.startswith("b ") for b in edm_env.bodies_logged()) == 300, timeout=30)
    logged = edm_env.bodies_logged()
    assert len(logged) == len(set(logged)), "a message was logged twice"
    left = [body.decode() for body, _ in edm_env.drain_queue()]
    assert sorted([b for b in logged if b.startswith("a ")] + left) == sorted(old_bodies)
    assert edm_env.main_pid() == pid
    assert edm_env.cli("stop").returncode == 0


def test_a_worker_that_keeps_failing_at_boot_goes_fatal_and_reload_recovers(edm_env: EdmEnv) -> None:
    pid = edm_env.start()
    worker = edm_env.worker_pid()
    assert worker is not None
    # Given a log directory that the next consumer cannot open (a file stands in its place)
    log_dir = edm_env.log_dir
    parked = log_dir.with_name("logs-parked")
    log_dir.rename(parked)
    log_dir.write_text("not a directory\n")
    try:
        os.kill(worker, signal.SIGKILL)

        def fatal() -> bool:
            return edm_env.state().get("workers", {}).get("consumer", {}).get("state") == "FATAL"

        wait_for(fatal, timeout=30)
        status = edm_env.cli("status")
        assert status.returncode == 0
        assert "consumer: FATAL" in status.stdout
        assert "last error:" in status.stdout
    finally:
        log_dir.unlink()
        parked.rename(log_dir)
    log = edm_env.log_text()
    assert "giving up (FATAL) until a reload" in log
    # When the cause is fixed, a reload brings the worker back; the main PID never changed
    assert edm_env.cli("reload").returncode == 0
    edm_env.wait_consuming(timeout=15)
    edm_env.publish([b"back from FATAL"])
    wait_for(lambda: "back from FATAL" in edm_env.bodies_logged())
    assert edm_env.main_pid() == pid
    assert edm_env.cli("stop").returncode == 0
