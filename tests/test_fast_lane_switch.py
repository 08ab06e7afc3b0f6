"""The daemon with ``amqp.fast_lane: false``: pika's plain path keeps every promise of the fast one.

At least once through a kill -9 of the whole tree, a message whose ack was lost redelivered
and marked so, and a reconnect after the broker closed this consumer's connection (and only
it: the broker and the other tests' connections stay as they are).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import EdmEnv, alive, wait_for

from edm.config import parse
from edm.errors import ConfigError

PLAIN = "amqp.fast_lane is false: the consumer runs on pika's plain SelectConnection and IOLoop."


def test_the_key_is_true_or_false_and_on_by_default(tmp_path: Path) -> None:
    path = tmp_path / "mq.yaml"
    assert parse({}, path, environ={}).amqp.fast_lane is True
    assert parse({"amqp": {"fast_lane": False}}, path, environ={}).amqp.fast_lane is False
    with pytest.raises(ConfigError, match=r"^amqp\.fast_lane: must be true or false$"):
        parse({"amqp": {"fast_lane": "no"}}, path, environ={})


def rabbitmqctl(*args: str) -> str:
    result = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def rows(*args: str) -> list[list[str]]:
    text = rabbitmqctl(*args, "--quiet", "--no-table-headers")
    return [line.split("\t") for line in text.splitlines() if line.strip()]


def consumer_connection(queue: str) -> str:
    """The broker's name of the connection of the one consumer of ``queue``."""
    channels = [pid for name, pid in rows("list_consumers", "queue_name", "channel_pid") if name == queue]
    assert len(channels) == 1, channels
    connections = [conn for pid, conn in rows("list_channels", "pid", "connection") if pid == channels[0]]
    assert len(connections) == 1, connections
    return connections[0]


def plain(make_env: Callable[..., EdmEnv], **amqp: object) -> EdmEnv:
    env = make_env({"amqp": {"fast_lane": False, **amqp}})
    env.start()
    assert PLAIN in env.log_text()
    return env


def assert_each_logged_once_or_redelivered(env: EdmEnv, expected: list[str]) -> None:
    lines = env.message_lines()
    counts = Counter(line.split(" (+) ", 1)[1] for line in lines)
    missing = [body for body in expected if counts[body] == 0]
    assert not missing, f"{len(missing)} messages lost, e.g. {missing[:3]}"
    for body, n in counts.items():
        marked = [line for line in lines if line.endswith(" (+) " + body) and "[redelivered]" in line]
        assert len(marked) >= n - 1, f"duplicate of {body!r} without [redelivered]"


def test_a_kill_9_of_the_whole_tree_loses_nothing(make_env: Callable[..., EdmEnv]) -> None:
    env = plain(make_env)
    bodies = [f"plain kill {i}" for i in range(1000)]
    publisher = threading.Thread(target=env.publish, args=([b.encode() for b in bodies],))
    publisher.start()
    wait_for(lambda: len(env.message_lines()) >= 300, timeout=60)
    pids = env.all_pids()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not any(alive(pid) for pid in pids))
    env.start()
    publisher.join(timeout=120)
    wait_for(lambda: env.queue_depth() == 0 and len(set(env.bodies_logged())) >= 1000, timeout=60)
    assert env.cli("stop").returncode == 0
    assert_each_logged_once_or_redelivered(env, bodies)


@pytest.mark.parametrize("prefetch", [1, 20])
def test_a_lost_ack_is_redelivered_marked_and_the_consumer_reconnects(
    make_env: Callable[..., EdmEnv], prefetch: int
) -> None:
    # Given edm on the plain path with a slow handler in hand
    env = plain(make_env, handler="edm_test_handlers:slow", prefetch=prefetch)
    connection = consumer_connection(env.queue)
    env.publish([b"sleep=5 held while cut", *(f"after {i}".encode() for i in range(50))])
    wait_for(lambda: "The slow handler started" in env.log_text(), timeout=15)

    # When the broker closes this consumer's connection (and no other) before the ack can go
    rabbitmqctl("close_connection", connection, "test: this consumer's connection cut")

    # Then the consumer reconnects; the message in hand comes again, marked, and nothing is lost
    wait_for(lambda: "Lost the connection" in env.log_text(), timeout=15)
    wait_for(lambda: env.queue_depth() == 0 and len(set(env.bodies_logged())) >= 51, timeout=40)
    held = [line for line in env.message_lines() if line.endswith(" (+) sleep=5 held while cut")]
    assert len(held) == 2 and "[redelivered]" in held[1], held
    assert env.log_text().count("Connected to") == 2
    assert_each_logged_once_or_redelivered(
        env, ["sleep=5 held while cut", *(f"after {i}" for i in range(50))]
    )
    assert env.cli("stop").returncode == 0
