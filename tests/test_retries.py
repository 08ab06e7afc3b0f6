"""Retries wait in the broker's delay queues, never in the consumer (contract §9, §10, §15).

Each test runs the real daemon against the real broker, on a classic and on a quorum queue
where the contract asks for both.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
from conftest import EdmEnv, amqp_channel, wait_for
from test_resilience import broker_restored, rabbitmqctl

from edm.config import ConfigError, parse

__all__ = ["broker_restored"]  # the fixture, used by name

QUORUM = {"x-queue-type": "quorum"}
QUEUE_TYPES = [pytest.param({}, id="classic"), pytest.param(QUORUM, id="quorum")]


def configure(env: EdmEnv, handler: str, queue_arguments: dict[str, Any], **amqp: Any) -> None:
    env.doc["amqp"].update(handler=handler, queue_arguments=queue_arguments, **amqp)
    env.write_config()


def declare(env: EdmEnv) -> None:
    """The exchange, queue and binding as edm declares them (so we can publish before it runs)."""
    a = env.doc["amqp"]
    connection, channel = amqp_channel()
    try:
        channel.exchange_declare(env.exchange, "direct", durable=True)
        channel.queue_declare(env.queue, durable=True, arguments=a.get("queue_arguments") or None)
        channel.queue_bind(env.queue, env.exchange, env.routing_key)
    finally:
        connection.close()


def publish(env: EdmEnv, bodies: list[bytes], message_id: str | None = None) -> None:
    """Confirmed, persistent publishes to the test's exchange (no declaration: any queue type)."""
    connection, channel = amqp_channel()
    try:
        channel.confirm_delivery()
        for body in bodies:
            properties = pika.BasicProperties(delivery_mode=2, message_id=message_id, app_id="test")
            channel.basic_publish(env.exchange, env.routing_key, body, properties)
    finally:
        connection.close()


def dead_letters(env: EdmEnv) -> list[tuple[bytes, dict[str, Any], pika.BasicProperties]]:
    connection, channel = amqp_channel()
    got = []
    try:
        while True:
            method, properties, body = channel.basic_get(env.queue + ".dead", auto_ack=True)
            if method is None:
                return got
            got.append((body, properties.headers or {}, properties))
    finally:
        connection.close()


def lines(env: EdmEnv, text: str) -> list[str]:
    return [line for line in env.log_text().splitlines() if text in line]


@pytest.fixture
def env(edm_env: EdmEnv) -> Iterator[EdmEnv]:
    yield edm_env


# -- the config key -------------------------------------------------------------------------


def test_retry_delays_default_and_errors_name_the_key(tmp_path: Path) -> None:
    def retry_delays(value: Any = None) -> tuple[float, ...]:
        amqp = {} if value is None else {"retry_delays": value}
        return parse({"amqp": amqp, "log": {}, "daemon": {}}, tmp_path / "mq.yaml", {}).amqp.retry_delays

    assert retry_delays() == (10.0, 60.0, 300.0)
    assert retry_delays([1, 2.5]) == (1.0, 2.5)
    for bad, key in [
        ([], "amqp.retry_delays:"),
        (5, "amqp.retry_delays:"),
        ([1, 0], "amqp.retry_delays[1]:"),
        ([-3], "amqp.retry_delays[0]:"),
        ([True], "amqp.retry_delays[0]:"),
        (["10s"], "amqp.retry_delays[0]:"),
        ([float("inf")], "amqp.retry_delays[0]:"),
        ([float("nan")], "amqp.retry_delays[0]:"),
        ([0.0001], "amqp.retry_delays[0]:"),
    ]:
        with pytest.raises(ConfigError) as error:
            retry_delays(bad)
        assert str(error.value).startswith(key), (bad, str(error.value))


# -- a poison message costs the others nothing ----------------------------------------------


@pytest.mark.parametrize("queue_arguments", QUEUE_TYPES)
def test_one_bad_body_in_1000_waits_in_the_broker_while_the_others_flow(
    env: EdmEnv, queue_arguments: dict[str, Any]
) -> None:
    # Given 1,000 messages, the 11th of which the handler cannot take
    configure(env, "edm_retry_handlers:fail_bad", queue_arguments, retry_delays=[1], max_retries=2)
    declare(env)
    bodies = [f"good {i}".encode() for i in range(1000)]
    bodies.insert(10, b"bad one")
    publish(env, bodies)
    # When edm consumes them
    env.start()
    wait_for(lambda: lines(env, "Dead-lettered a message"), timeout=30)
    # Then every good message was logged before the bad one's first retry came back
    text = env.log_text().splitlines()
    good_lines = [i for i, line in enumerate(text) if " (+) good " in line]
    second_attempt = next(i for i, line in enumerate(text) if "Attempt 2 of bad one" in line)
    assert len(good_lines) == 1000
    assert max(good_lines) < second_attempt
    # and the bad one was tried 3 times, then dead-lettered with its attempts and error
    assert len(lines(env, "of bad one (message_id")) == 3
    assert len(lines(env, " WARNING The handler failed (attempt")) == 2
    [(body, headers, _)] = dead_letters(env)
    assert body == b"bad one"
    assert headers["x-edm-attempts"] == 3
    assert headers["x-edm-error"] == "ValueError: cannot handle b'bad one'"
    assert len(lines(env, " ERROR Dead-lettered a message")) == 1
    assert env.queue_depth(f"{env.queue}.retry.1000") == 0
    assert env.cli("stop").returncode == 0


@pytest.mark.parametrize("queue_arguments", QUEUE_TYPES)
def test_retry_twice_then_succeed(env: EdmEnv, queue_arguments: dict[str, Any]) -> None:
    # Given a handler that asks for a retry in 0.5 s twice, with delays of 1 and 5 s
    configure(env, "edm_retry_handlers:retry_twice", queue_arguments, retry_delays=[1, 5])
    env.start()
    # When one message comes
    publish(env, [b"job 1"], message_id="id-17")
    wait_for(lambda: "job 1" in env.bodies_logged(), timeout=20)
    # Then it is logged once, at its third attempt, its message_id kept through the retries
    assert env.bodies_logged() == ["job 1"]
    assert [line.split(" INFO ", 1)[1] for line in lines(env, "of job 1")] == [
        f"Attempt {n} of job 1 (message_id id-17)." for n in (1, 2, 3)
    ]
    # each retry waited the first configured delay >= the 0.5 s asked, one WARNING each
    warnings = lines(env, " WARNING The handler failed")
    assert len(warnings) == 2
    assert all(f"Retry: not yet; retrying in 1 s ({env.queue}.retry.1000)" in w for w in warnings)
    assert "attempt 1 of 4" in warnings[0] and "attempt 2 of 4" in warnings[1]
    wait_for(lambda: env.queue_depth() == 0)
    assert env.queue_depth(env.queue + ".dead") == 0
    assert env.queue_depth(f"{env.queue}.retry.1000") == 0
    wait_for(lambda: env.state()["workers"]["consumer"].get("retried") == 2)  # the status counts them
    assert env.cli("stop").returncode == 0


@pytest.mark.parametrize("queue_arguments", QUEUE_TYPES)
def test_reject_goes_straight_to_dead(env: EdmEnv, queue_arguments: dict[str, Any]) -> None:
    configure(env, "edm_retry_handlers:reject_bad", queue_arguments, retry_delays=[1])
    env.start()
    publish(env, [b"bad job", b"good job"], message_id="id-9")
    wait_for(lambda: env.queue_depth(env.queue + ".dead") == 1, timeout=20)
    wait_for(lambda: env.bodies_logged() == ["good job"])
    # one attempt, no retry, one ERROR line
    assert len(lines(env, "of bad job")) == 1
    assert not lines(env, "The handler failed")
    [error] = lines(env, " ERROR Dead-lettered a message")
    assert "after 1 attempts: Reject: field 'to' is missing" in error
    [(body, headers, properties)] = dead_letters(env)
    assert body == b"bad job"
    assert headers["x-edm-attempts"] == 1
    assert headers["x-edm-error"] == "Reject: field 'to' is missing"
    assert properties.message_id == "id-9" and properties.app_id == "test"
    assert env.cli("stop").returncode == 0


# -- a retry survives a restart of edm and of the broker ------------------------------------


def test_a_retry_waiting_in_the_broker_survives_a_restart_of_edm(env: EdmEnv) -> None:
    configure(env, "edm_retry_handlers:fail_once", {}, retry_delays=[5])
    env.start()
    publish(env, [b"job while stopped"])
    wait_for(lambda: lines(env, " WARNING The handler failed (attempt 1"), timeout=15)
    # When edm stops while the message waits in its delay queue
    assert env.cli("stop").returncode == 0
    assert env.queue_depth(f"{env.queue}.retry.5000") == 1
    # Then, started again, it gets the message back when the delay is up, and handles it
    env.start()
    wait_for(lambda: "job while stopped" in env.bodies_logged(), timeout=20)
    assert lines(env, "Attempt 2 of job while stopped")
    assert env.queue_depth(f"{env.queue}.retry.5000") == 0
    assert env.cli("stop").returncode == 0


@pytest.mark.usefixtures("broker_restored")
def test_a_retry_waiting_in_the_broker_survives_a_broker_restart(env: EdmEnv) -> None:
    configure(env, "edm_retry_handlers:fail_once", {}, retry_delays=[6])
    env.start()
    publish(env, [b"job across a broker restart"])
    wait_for(lambda: lines(env, " WARNING The handler failed (attempt 1"), timeout=15)
    # When the broker restarts while the message waits
    assert rabbitmqctl("stop_app").returncode == 0
    wait_for(lambda: "Lost the connection" in env.log_text(), timeout=30)
    assert rabbitmqctl("start_app").returncode == 0
    rabbitmqctl("await_startup")
    env.wait_consuming(timeout=40)
    # Then the message comes back when its time is up, and is handled once
    wait_for(lambda: "job across a broker restart" in env.bodies_logged(), timeout=40)
    assert env.bodies_logged() == ["job across a broker restart"]
    assert lines(env, "Attempt 2 of job across a broker restart")
    assert env.cli("stop").returncode == 0
