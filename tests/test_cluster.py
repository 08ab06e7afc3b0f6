"""A cluster node down never stops an instance; a `.dead` queue that cannot be declared never
stops consumption.

The cluster tests run a 3-node RabbitMQ cluster of their own on loopback with
``scripts/rabbit-cluster`` (own ports, data and Erlang cookie in a temp dir), torn down by the
script's ``down`` whatever happens. The `.dead` tests use the system broker.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
from conftest import EdmEnv, amqp_channel, wait_for
from rabbitnode import SCRIPT, Cluster, free_base, running_cluster

from edm.amqp.topology import helper_queue_arguments

QUORUM = {"x-queue-type": "quorum"}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with running_cluster(tmp_path / "cluster", free_base(), 3) as cluster:
        yield cluster


def publish(url: str, exchange: str, routing_key: str, bodies: list[bytes]) -> None:
    """Publish persistent, confirmed messages through one node (edm declared the topology)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        properties = pika.BasicProperties(delivery_mode=2)
        for body in bodies:
            channel.basic_publish(exchange, routing_key, body, properties, mandatory=True)
    finally:
        connection.close()


def consumer_state(env: EdmEnv) -> dict[str, Any]:
    worker: dict[str, Any] = env.state().get("workers", {}).get("consumer", {})
    return worker


@pytest.mark.slow
def test_killing_the_queue_leader_node_costs_no_message_and_no_instance(
    cluster: Cluster, make_env: Any, tmp_path: Path
) -> None:
    # Given two instances on a quorum queue, each with the node list in its own order:
    # A on node 1, which declares everything (and so leads the queue), B on node 2.
    n1, n2, n3 = cluster.urls
    a: EdmEnv = make_env({"amqp": {"url": [n1, n2, n3], "queue_arguments": QUORUM, "retry_max": 1}})
    b: EdmEnv = make_env({"amqp": {"url": [n2, n3, n1], "queue_arguments": QUORUM, "retry_max": 1}})
    for env in (a, b):  # one topology, shared; torn down with the cluster
        env.exchange = env.queue = env.routing_key = a.tag
        env.doc["amqp"].update(exchange=a.tag, queue=a.tag, routing_key=a.tag)
        env.write_config()
    assert a.cli("start").returncode == 0
    wait_for(lambda: consumer_state(a).get("activity") == "consuming", 30)
    assert b.cli("start").returncode == 0
    wait_for(lambda: consumer_state(b).get("activity") == "consuming", 30)
    leader = cluster.leader(a.queue, via=2)
    assert leader == 1, f"the queue's leader is node {leader}, not node 1 where it was declared"

    # When 5,000 messages stream in through node 3 and node 1 is killed mid-stream
    bodies = [f"m {i}".encode() for i in range(5000)]
    jobs = tmp_path / "jobs.txt"
    jobs.write_bytes(b"\n".join(bodies) + b"\n")
    published: list[subprocess.CompletedProcess[str]] = []
    publisher = threading.Thread(
        target=lambda: published.append(a.cli("publish", "--file", str(jobs), env={"EDM_AMQP_URL": n3}))
    )
    publisher.start()
    try:
        wait_for(lambda: len(a.message_lines()) + len(b.message_lines()) >= 1000, 60)
        killed_at = time.time()
        kill = cluster.run("kill", "1")
        assert kill.returncode == 0, kill.stderr

        # Then both instances consume again within 5 s of the kill: A has reconnected (to
        # node 2), B has kept its connection
        def reconnected() -> bool:
            state = consumer_state(a)
            return state.get("activity") == "consuming" and state.get("since", 0) > killed_at

        wait_for(reconnected, 30)
        back_after = consumer_state(a)["since"] - killed_at
        assert back_after < 5, f"instance A consumed again {back_after:.1f} s after the kill"
        assert consumer_state(a)["broker"] == n2.replace(":guest@", ":***@")
        assert consumer_state(b).get("activity") == "consuming"
    finally:
        publisher.join(120)
    assert not publisher.is_alive()
    assert published[0].returncode == 0, published[0].stderr

    # and every message is logged, the only duplicates marked [redelivered]
    expected = {body.decode() for body in bodies}
    wait_for(lambda: set(a.bodies_logged()) | set(b.bodies_logged()) >= expected, 60)
    lines = a.message_lines() + b.message_lines()
    unmarked = Counter(line.split(" (+) ", 1)[1] for line in lines if "[redelivered]" not in line)
    assert [body for body, n in unmarked.items() if n > 1] == []
    assert set(a.bodies_logged()) | set(b.bodies_logged()) == expected

    # and A took part in the stream after the kill: message lines after its second start
    a_log = a.log_text()
    after = a_log.split("Consuming from queue")[-1]
    assert a_log.count("Consuming from queue") == 2 and " (+) " in after
    assert "NOT_FOUND" not in a_log + b.log_text()
    for env in (a, b):
        assert env.cli("stop").returncode == 0

    # and the killed node comes back into its cluster
    start = cluster.run("start", "1")
    assert start.returncode == 0, start.stderr
    status = cluster.run("ctl", "2", "-q", "cluster_status", "--formatter", "json")
    assert sorted(json.loads(status.stdout)["running_nodes"]) == [
        f"edm{cluster.base}n{i}@localhost" for i in (1, 2, 3)
    ]


# -- a `.dead` queue that cannot be declared, on the system broker -------------------------------


def classic_dead_beside_a_quorum_queue(env: EdmEnv) -> None:
    """An earlier version's classic `<queue>.dead`; the main queue is now quorum."""
    connection, channel = amqp_channel()
    try:
        channel.queue_declare(env.queue + ".dead", durable=True)
    finally:
        connection.close()
    env.doc["amqp"].update(queue_arguments=QUORUM, handler="edm_test_handlers:fail_poison", max_retries=1)
    env.write_config()


def migration_errors(env: EdmEnv) -> list[str]:
    return [line for line in env.log_text().splitlines() if " ERROR The queue " in line]


def test_a_classic_dead_queue_beside_a_quorum_queue_is_one_error_and_consuming_goes_on(
    edm_env: EdmEnv,
) -> None:
    classic_dead_beside_a_quorum_queue(edm_env)
    edm_env.start()

    # a poison message cannot be dead-lettered: the good ones behind it are consumed anyway
    bodies = [b"good 1", b"poison 1", *(f"good {i}".encode() for i in range(2, 50))]
    publish(edm_env.doc["amqp"]["url"], edm_env.exchange, edm_env.routing_key, bodies)
    wait_for(lambda: len(edm_env.bodies_logged()) == 49, 30)
    assert sorted(edm_env.bodies_logged()) == sorted(b.decode() for b in bodies if b != b"poison 1")

    # one ERROR line says what is wrong and what to run
    dead = edm_env.queue + ".dead"
    [line] = migration_errors(edm_env)
    assert f"The queue {dead} exists with other arguments" in line
    assert "inequivalent arg 'x-queue-type'" in line
    assert f"`rabbitmqctl delete_queue --vhost / --if-empty {dead}`" in line
    # the poison message is not lost: it goes round the queue, not to the classic .dead
    wait_for(lambda: "the message went back to the end of the queue" in edm_env.log_text(), 15)
    assert edm_env.queue_depth(dead) == 0
    assert consumer_state(edm_env)["activity"] == "consuming"
    assert edm_env.cli("stop").returncode == 0
    assert edm_env.queue_depth() == 1  # the poison message, back in its queue
    assert len(migration_errors(edm_env)) == 1


def test_a_dead_letter_is_delivered_once_the_dead_queue_can_be_declared(edm_env: EdmEnv) -> None:
    classic_dead_beside_a_quorum_queue(edm_env)
    edm_env.start()
    publish(edm_env.doc["amqp"]["url"], edm_env.exchange, edm_env.routing_key, [b"poison 1", b"good 1"])
    wait_for(lambda: edm_env.bodies_logged() == ["good 1"], 30)
    wait_for(lambda: "the message went back to the end of the queue" in edm_env.log_text(), 15)

    # When the operator runs the command the ERROR line gives (the classic .dead is empty)
    [line] = migration_errors(edm_env)
    command = shlex.split(line.split("`")[1])
    assert command[:2] == ["rabbitmqctl", "delete_queue"]
    deleted = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert deleted.returncode == 0, deleted.stderr

    # Then the poison message, at its next pass, lands in a quorum .dead with its headers
    dead = edm_env.queue + ".dead"
    wait_for(lambda: " ERROR Dead-lettered a message to " in edm_env.log_text(), 30)
    assert edm_env.queue_depth(dead) == 1
    [(body, headers)] = edm_env.drain_queue(dead)
    assert body == b"poison 1"
    assert headers["x-edm-attempts"] == 2
    assert headers["x-edm-error"].startswith("ValueError: cannot handle b'poison")
    connection, channel = amqp_channel()
    try:  # declaring it as quorum again passes only if it is quorum
        channel.queue_declare(dead, durable=True, arguments=QUORUM)
    finally:
        connection.close()
    assert f"Declared {dead}: dead letters go there again." in edm_env.log_text()
    assert edm_env.bodies_logged() == ["good 1"]
    assert edm_env.cli("stop").returncode == 0
    assert edm_env.queue_depth() == 0


def test_helper_queues_take_the_main_queue_type() -> None:
    assert helper_queue_arguments({}) == {}
    assert helper_queue_arguments({"x-queue-type": "classic", "x-max-length": 10}) == {}
    assert helper_queue_arguments(QUORUM) == QUORUM
    assert helper_queue_arguments({"x-queue-type": "stream"}) == QUORUM
    assert helper_queue_arguments({}, dead_letter_to="email") == {
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "email",
    }
    assert helper_queue_arguments(QUORUM, dead_letter_to="email") == {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "email",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def test_the_cluster_script_passes_shellcheck() -> None:
    result = subprocess.run(["shellcheck", "--severity=style", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_cluster_script_needs_a_cluster_before_anything_but_up(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(SCRIPT), "--dir", str(tmp_path), "kill", "1"], capture_output=True, text=True
    )
    expected = f"rabbit-cluster: no cluster in {tmp_path} (run up first)\n"
    assert (result.returncode, result.stderr) == (1, expected)
