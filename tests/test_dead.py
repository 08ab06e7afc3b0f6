"""``edm dead list|replay|purge`` against the real RabbitMQ, with dead letters the daemon made."""

from __future__ import annotations

import collections
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pika
import pytest
from conftest import AMQP_URL, ROOT, EdmEnv, amqp_channel, free_port, wait_for

POISON_ERROR = "ValueError: cannot handle b'{}'"


def dead(env: EdmEnv) -> str:
    return env.queue + ".dead"


def failing(env: EdmEnv) -> None:
    """The daemon's handler raises for bodies that start with ``poison``; no retries."""
    env.doc["amqp"]["handler"] = "edm_test_handlers:fail_poison"
    env.doc["amqp"]["max_retries"] = 0
    env.write_config()


def publish(env: EdmEnv, bodies: list[bytes], **properties: Any) -> None:
    """Publish to the daemon's exchange, one message_id per body (``id-<n>``)."""
    connection, channel = amqp_channel()
    channel.exchange_declare(env.exchange, "direct", durable=True)
    channel.queue_declare(env.queue, durable=True)
    channel.queue_bind(env.queue, env.exchange, env.routing_key)
    channel.confirm_delivery()
    for n, body in enumerate(bodies):
        props = pika.BasicProperties(delivery_mode=2, message_id=f"id-{n}", **properties)
        channel.basic_publish(env.exchange, env.routing_key, body, props)
    connection.close()


def make_dead_letters(env: EdmEnv, bodies: list[bytes], **properties: Any) -> None:
    """Run the daemon with the failing handler until every ``poison`` body is in ``.dead``."""
    failing(env)
    env.start()
    publish(env, bodies, **properties)
    poison = sum(body.startswith(b"poison") for body in bodies)
    wait_for(lambda: env.queue_depth(dead(env)) == poison, timeout=120, interval=0.2)


def browse(queue: str) -> list[tuple[bytes, pika.BasicProperties]]:
    """Every message in ``queue``, in order, consumed."""
    connection, channel = amqp_channel()
    got = []
    try:
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return got
            got.append((body, properties))
    finally:
        connection.close()


def stdout_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


# -- list, then fix the handler and replay: the operator's walk-through ----------------------


def test_list_shows_dead_letters_oldest_first_and_replay_handles_each_once(edm_env: EdmEnv) -> None:
    # Given three dead letters the daemon made (one with bytes to escape, one long) among good ones
    long = b"poison " + b"x" * 300
    bodies = [b"poison 1", b"good 1", b"poison\ttab\\2 \xff\xc2\x85", long, b"good 2"]
    make_dead_letters(edm_env, bodies)
    wait_for(lambda: edm_env.bodies_logged() == ["good 1", "good 2"])
    queue = dead(edm_env)

    # When the operator lists them (while the daemon runs)
    lines = stdout_lines(edm_env.cli("dead", "list"))

    # Then each shows its attempts, error and escaped body, oldest first, and the total last
    assert lines[0] == f"attempts 1: {POISON_ERROR.format('poison 1')} (+) poison 1"
    assert lines[1].startswith("attempts 1: ValueError: cannot handle b'poison\\\\ttab")
    assert lines[1].endswith(" (+) poison\\ttab\\\\2 \\xff\\u0085")
    assert lines[2].endswith(f" (+) {'poison ' + 'x' * 93} …[cut: {len(long)} bytes]")
    assert lines[3] == f"3 dead letters in {queue}"
    assert len(lines) == 4
    # and nothing was removed or reordered: a second listing is the same
    assert edm_env.queue_depth(queue) == 3
    assert stdout_lines(edm_env.cli("dead", "list")) == lines
    assert stdout_lines(edm_env.cli("dead", "list", "-n", "1")) == [lines[0], lines[3]]
    assert stdout_lines(edm_env.cli("dead", "list", "-n", "0")) == [lines[3]]

    items = json.loads(edm_env.cli("dead", "list", "--json").stdout)
    assert [item["message_id"] for item in items] == ["id-0", "id-2", "id-3"]
    assert items[0]["attempts"] == 1 and items[0]["error"] == POISON_ERROR.format("poison 1")
    assert items[1]["body"] == "poison\\ttab\\\\2 \\xff\\u0085"
    assert len(items[2]["body"]) == 100 and items[2]["cut"] and items[2]["size"] == len(long)
    assert {"attempts", "error", "body", "message_id"} <= set(items[0])
    assert edm_env.queue_depth(queue) == 3

    # When replay is asked without saying how many, it is a usage error and moves nothing
    refused = edm_env.cli("dead", "replay")
    assert refused.returncode == 2 and "-n" in refused.stderr and "--all" in refused.stderr
    assert edm_env.queue_depth(queue) == 3

    # When the handler is fixed and the oldest two are replayed
    edm_env.doc["amqp"]["handler"] = "edm.handlers:log_message"
    edm_env.write_config()
    assert edm_env.cli("reload").returncode == 0
    wait_for(lambda: "Reloaded the config from" in edm_env.log_text())
    assert stdout_lines(edm_env.cli("dead", "replay", "-n", "2")) == ["replayed 2"]

    # Then exactly those two are handled, and the third still waits
    wait_for(lambda: len(edm_env.bodies_logged()) == 4)
    assert edm_env.bodies_logged()[2:] == ["poison 1", "poison\\ttab\\\\2 \\xff\\u0085"]
    assert edm_env.queue_depth(queue) == 1

    # When the rest is replayed
    assert stdout_lines(edm_env.cli("dead", "replay", "--all")) == ["replayed 1"]

    # Then every dead letter was handled exactly once and .dead is empty
    wait_for(lambda: len(edm_env.bodies_logged()) == 5)
    logged = edm_env.bodies_logged()
    assert collections.Counter(logged) == collections.Counter(
        ["good 1", "good 2", "poison 1", "poison\\ttab\\\\2 \\xff\\u0085", long.decode()]
    )
    assert edm_env.queue_depth(queue) == 0
    assert stdout_lines(edm_env.cli("dead", "list")) == [f"0 dead letters in {queue}"]
    assert edm_env.cli("stop").returncode == 0


def test_replay_counts_x_edm_replayed_and_keeps_the_message(edm_env: EdmEnv) -> None:
    # Given a dead letter with a message_id and a header of its own; the daemon stopped
    make_dead_letters(edm_env, [b"poison a"], headers={"trace": "abc"}, correlation_id="c-1")
    assert edm_env.cli("stop").returncode == 0

    # When it is replayed
    assert stdout_lines(edm_env.cli("dead", "replay", "--all")) == ["replayed 1"]

    # Then it is back in the queue with its properties, x-edm-replayed 1 and no attempts or error
    [(body, props)] = browse(edm_env.queue)
    assert body == b"poison a"
    assert props.message_id == "id-0" and props.correlation_id == "c-1" and props.delivery_mode == 2
    assert props.headers["trace"] == "abc" and props.headers["x-edm-replayed"] == 1
    assert "x-edm-attempts" not in props.headers and "x-edm-error" not in props.headers

    # When it fails again (the handler still broken), is dead-lettered and replayed once more
    publish_again = pika.BasicProperties(delivery_mode=2, message_id=props.message_id, headers=props.headers)
    connection, channel = amqp_channel()
    channel.confirm_delivery()
    channel.basic_publish("", edm_env.queue, body, publish_again)
    connection.close()
    edm_env.start()
    wait_for(lambda: edm_env.queue_depth(dead(edm_env)) == 1, timeout=30)
    assert edm_env.cli("stop").returncode == 0
    [item] = json.loads(edm_env.cli("dead", "list", "--json").stdout)
    assert item["replayed"] == 1 and item["attempts"] == 1
    assert stdout_lines(edm_env.cli("dead", "list"))[0].startswith("attempts 1, replayed 1: ValueError")
    assert stdout_lines(edm_env.cli("dead", "replay", "-n", "5")) == ["replayed 1"]

    # Then the count is previous + 1
    [(_, props)] = browse(edm_env.queue)
    assert props.headers["x-edm-replayed"] == 2 and props.message_id == "id-0"


# -- purge ----------------------------------------------------------------------------------


def test_purge_needs_yes_and_then_deletes_every_dead_letter(edm_env: EdmEnv) -> None:
    make_dead_letters(edm_env, [b"poison 1", b"poison 2", b"poison 3"])
    assert edm_env.cli("stop").returncode == 0
    queue = dead(edm_env)

    refused = edm_env.cli("dead", "purge")
    assert refused.returncode == 2
    assert "--yes" in refused.stderr and refused.stdout == ""
    assert edm_env.queue_depth(queue) == 3

    assert stdout_lines(edm_env.cli("dead", "purge", "--yes")) == [f"purged 3 dead letters from {queue}"]
    assert edm_env.queue_depth(queue) == 0
    assert stdout_lines(edm_env.cli("dead", "purge", "--yes")) == [f"purged 0 dead letters from {queue}"]


# -- errors ---------------------------------------------------------------------------------


def test_an_unreachable_broker_is_exit_1_naming_the_queue_and_the_masked_url(edm_env: EdmEnv) -> None:
    port = free_port()
    edm_env.doc["amqp"]["url"] = f"amqp://guest:s3cret-pw@127.0.0.1:{port}/%2F"
    edm_env.write_config()
    masked = f"amqp://guest:***@127.0.0.1:{port}/%2F"
    for args in (["list"], ["list", "--json"], ["replay", "--all"], ["purge", "--yes"]):
        result = edm_env.cli("dead", *args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert dead(edm_env) in result.stderr and masked in result.stderr, result.stderr
        assert "s3cret-pw" not in result.stderr + result.stdout
        assert "Traceback" not in result.stderr

    # A second URL that answers is used, as the daemon and publish do
    edm_env.doc["amqp"]["url"] = [f"amqp://guest:s3cret-pw@127.0.0.1:{port}/%2F", AMQP_URL]
    edm_env.write_config()
    make_dead_letters(edm_env, [b"poison 1"])
    assert stdout_lines(edm_env.cli("dead", "list"))[-1] == f"1 dead letters in {dead(edm_env)}"
    assert edm_env.cli("stop").returncode == 0


def test_missing_queues_are_said_plainly(edm_env: EdmEnv) -> None:
    # No .dead queue yet (the daemon never ran): nothing to list, replay or purge; not an error
    queue = dead(edm_env)
    assert stdout_lines(edm_env.cli("dead", "list")) == [
        f"0 dead letters in {queue} (the queue does not exist)"
    ]
    listed = edm_env.cli("dead", "list", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout) == []
    assert stdout_lines(edm_env.cli("dead", "replay", "--all")) == ["replayed 0"]

    # A .dead queue whose main queue is gone: exit 1 naming it, and the dead letter stays
    connection, channel = amqp_channel()
    channel.queue_declare(queue, durable=True)
    channel.confirm_delivery()
    channel.basic_publish("", queue, b"orphan", pika.BasicProperties(delivery_mode=2))
    connection.close()
    result = edm_env.cli("dead", "replay", "--all")
    assert result.returncode == 1 and result.stdout == "replayed 0\n"
    assert f"queue '{edm_env.queue}' does not exist" in result.stderr
    assert edm_env.queue_depth(queue) == 1


# -- quorum queues --------------------------------------------------------------------------


def test_list_and_replay_keep_the_order_of_quorum_queues(edm_env: EdmEnv) -> None:
    # Given a quorum main queue and a quorum .dead holding five dead letters as the daemon
    # writes them. (A quorum queue puts a returned message at its end: a list that took only
    # the first N and handed them back would reorder the queue.)
    quorum = {"x-queue-type": "quorum"}
    edm_env.doc["amqp"]["queue_arguments"] = quorum
    edm_env.write_config()
    queue = dead(edm_env)
    connection, channel = amqp_channel()
    channel.queue_declare(edm_env.queue, durable=True, arguments=quorum)
    channel.queue_declare(queue, durable=True, arguments=quorum)
    channel.confirm_delivery()
    for n in range(5):
        headers = {"x-edm-attempts": 4, "x-edm-error": f"RuntimeError: no {n}", "x-edm-queue": edm_env.queue}
        props = pika.BasicProperties(delivery_mode=2, message_id=f"q-{n}", headers=headers)
        channel.basic_publish("", queue, f"dead {n}".encode(), props)
    connection.close()

    # When the first two are listed, twice
    first = stdout_lines(edm_env.cli("dead", "list", "-n", "2"))
    second = stdout_lines(edm_env.cli("dead", "list", "-n", "2"))

    # Then both listings show the same oldest two, and the queue keeps all five in order
    assert (
        first
        == second
        == [
            "attempts 4: RuntimeError: no 0 (+) dead 0",
            "attempts 4: RuntimeError: no 1 (+) dead 1",
            f"5 dead letters in {queue}",
        ]
    )
    items = json.loads(edm_env.cli("dead", "list", "--json").stdout)
    assert [item["message_id"] for item in items] == [f"q-{n}" for n in range(5)]

    # When two, then the rest are replayed
    assert stdout_lines(edm_env.cli("dead", "replay", "-n", "2")) == ["replayed 2"]
    assert stdout_lines(edm_env.cli("dead", "list", "-n", "1"))[0].endswith("(+) dead 2")
    assert stdout_lines(edm_env.cli("dead", "replay", "--all")) == ["replayed 3"]

    # Then the main queue holds all five, oldest first, counted as replayed; .dead is empty
    back = browse(edm_env.queue)
    assert [body for body, _ in back] == [f"dead {n}".encode() for n in range(5)]
    assert [props.message_id for _, props in back] == [f"q-{n}" for n in range(5)]
    for _, props in back:
        assert props.headers["x-edm-replayed"] == 1 and "x-edm-attempts" not in props.headers
    assert edm_env.queue_depth(queue) == 0


# -- nothing lost when the broker closes the replay's connection ----------------------------


class GateProxy:
    """A TCP proxy for one AMQP client that can hold the client's traffic right after the
    client acknowledges a message (``hold_after_ack``) and let it go (``release``): what
    arrives meanwhile waits in the proxy. A test can so stop a client at the moment that
    matters, act on the broker, then let both sides see what happened."""

    BASIC_ACK = (60, 80)

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = int(self.listener.getsockname()[1])
        self.open = threading.Event()
        self.open.set()
        self.armed = threading.Event()
        self.held = threading.Event()
        self.closed = threading.Event()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(self.target, timeout=5)
            for s in (client, upstream):
                s.settimeout(None)
                # As the AMQP peers do: without it each small frame waits for a delayed ACK.
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sockets += [client, upstream]
            threading.Thread(target=self._from_client, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _from_client(self, src: socket.socket, dst: socket.socket) -> None:
        """Forward frame by frame, so the hold can fall right after a basic.ack."""
        buffer = bytearray()
        header_left = 8  # b"AMQP\x00\x00\x09\x01" comes before the first frame
        try:
            while data := src.recv(65536):
                buffer += data
                while True:
                    if header_left:
                        size = min(header_left, len(buffer))
                        header_left -= size
                    elif len(buffer) >= 7:
                        size = 8 + int.from_bytes(buffer[3:7], "big")
                        if len(buffer) < size:
                            break
                    else:
                        break
                    if not size:
                        break
                    frame, buffer = bytes(buffer[:size]), buffer[size:]
                    self.open.wait()
                    dst.sendall(frame)
                    method = frame[0] == 1 and (
                        int.from_bytes(frame[7:9], "big"),
                        int.from_bytes(frame[9:11], "big"),
                    )
                    if method == self.BASIC_ACK and self.armed.is_set():
                        self.armed.clear()
                        self.open.clear()
                        self.held.set()
        except OSError:
            pass
        finally:
            self._shut(src, dst)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self.open.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._shut(src, dst)

    @staticmethod
    def _shut(*sockets: socket.socket) -> None:
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def hold_after_ack(self) -> None:
        self.armed.set()

    def release(self) -> None:
        self.open.set()

    def close(self) -> None:
        self.closed.set()
        self.open.set()
        self.listener.close()
        for s in self.sockets:
            s.close()


@pytest.fixture
def gate() -> Iterator[GateProxy]:
    proxy = GateProxy(("127.0.0.1", 5672))
    yield proxy
    proxy.close()


def connection_of(process_id: int) -> str:
    """The broker's pid of the connection ``edm dead replay`` (process ``process_id``) opened."""
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    name = f"edm dead replay (pid {process_id})"
    found = [line.split("\t", 1)[0] for line in out.splitlines() if name in line]
    assert len(found) == 1, out
    return found[0]


def test_nothing_is_lost_when_the_broker_closes_the_replay_connection(
    edm_env: EdmEnv, gate: GateProxy
) -> None:
    # Given 1,000 dead letters the daemon made; the daemon stopped
    bodies = [f"poison {n}".encode() for n in range(1000)]
    make_dead_letters(edm_env, bodies)
    assert edm_env.cli("stop").returncode == 0
    queue = dead(edm_env)
    edm_env.doc["amqp"]["url"] = f"amqp://guest:guest@127.0.0.1:{gate.port}/%2F"
    edm_env.write_config()

    # When a replay of all of them runs, and once it has moved some, its connection (and only
    # its own) is closed by the broker; the proxy holds the replay still meanwhile, right
    # after it acknowledged a dead letter
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests' / 'support'}"}
    env.pop("EDM_CONFIG", None)
    replay = subprocess.Popen(
        [sys.executable, "-m", "edm", "--config", str(edm_env.config_path), "dead", "replay", "--all"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        wait_for(lambda: edm_env.queue_depth() >= 50 or replay.poll() is not None, timeout=60)
        # Held right after an ack reached the broker: a replay that acked before its publish
        # was confirmed would have that message nowhere once the connection is closed.
        gate.hold_after_ack()
        wait_for(lambda: gate.held.is_set() or replay.poll() is not None, timeout=30)
        assert replay.poll() is None, "the replay ended before its connection could be closed"
        broker_pid = connection_of(replay.pid)
        subprocess.run(
            ["rabbitmqctl", "-q", "close_connection", broker_pid, "test: closed mid-replay"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        gate.release()
        out, err = replay.communicate(timeout=60)
    finally:
        if replay.poll() is None:
            replay.kill()
            replay.wait()

    # Then it stops with exit 1, says how many it moved, and names the queue and the URL
    assert replay.returncode == 1, (out, err)
    moved = int(re.fullmatch(r"replayed (\d+)\n", out).group(1))  # type: ignore[union-attr]
    assert 50 <= moved < 1000
    assert queue in err and f"amqp://guest:***@127.0.0.1:{gate.port}/%2F" in err, err
    # what was replayed stays replayed: the main queue holds the moved ones (and at most one
    # whose confirm was on its way), .dead the rest (the one in hand went back unacked)
    in_main = edm_env.queue_depth()
    assert moved <= in_main <= moved + 1
    try:
        wait_for(lambda: in_main + edm_env.queue_depth(queue) >= 1000)
    except AssertionError:
        raise AssertionError(
            f"lost: {in_main} in the main queue + {edm_env.queue_depth(queue)} dead"
        ) from None
    left = edm_env.queue_depth(queue)
    assert in_main + left <= 1001

    # When the replay runs again
    again = stdout_lines(edm_env.cli("dead", "replay", "--all"))

    # Then every body is in the main queue, none lost, at most the one in flight twice
    assert again == [f"replayed {left}"]
    assert edm_env.queue_depth(queue) == 0
    counts = collections.Counter(body for body, _ in browse(edm_env.queue))
    assert set(counts) == set(bodies)
    assert sum(counts.values()) - len(bodies) <= 1, [b for b, c in counts.items() if c > 1]
