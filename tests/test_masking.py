"""A broker password that reads like a word: the daemon's lines stay readable, the password hidden.

Each test makes its own RabbitMQ user (a unique name, so that only the password is a secret)
and deletes it in teardown, whatever happens.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import EdmEnv, free_port, unique, wait_for

from edm import __version__

LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S")


def rabbitmqctl(*args: str) -> None:
    result = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def broker_user() -> Iterator[Callable[[str], str]]:
    """Make a broker user with the given password and all rights on vhost /; delete it after."""
    made: list[str] = []

    def make(password: str) -> str:
        name = unique("edm_mask")
        made.append(name)
        rabbitmqctl("add_user", name, password)
        rabbitmqctl("set_permissions", "-p", "/", name, ".*", ".*", ".*")
        return name

    yield make
    for name in made:
        rabbitmqctl("delete_user", name)


@pytest.mark.parametrize("password", ["edm", "email", "guest"])
def test_a_password_like_a_word_is_hidden_in_urls_and_nowhere_else(
    password: str, broker_user: Callable[[str], str], make_env: Callable[..., EdmEnv], tmp_path: Path
) -> None:
    # Given a user whose password is a word found in the program's name, the config directory,
    # the queue and the messages, and a URL list whose first broker does not answer
    user = broker_user(password)
    dead_port = free_port()
    urls = [
        f"amqp://{user}:{password}@127.0.0.1:{dead_port}/%2F",
        f"amqp://{user}:{password}@127.0.0.1:5672/%2F",
    ]
    env = make_env({"amqp": {"url": urls}}, base=tmp_path / "edm_email_guest_failover")
    tag = secrets.token_hex(4)
    env.queue, env.exchange = f"qq_edm_email_guest_{tag}", f"edm_email_guest_{tag}"
    env.routing_key = f"edm.email.guest.{tag}"
    env.doc["amqp"].update(queue=env.queue, exchange=env.exchange, routing_key=env.routing_key)
    env.write_config()
    bodies = [
        b"an email for edm from guest",
        f"amqp://x:{password}@h/ password={password}".encode(),
        password.encode(),
    ]

    # When the daemon starts, consumes, reloads, reports its status and stops
    pid = env.start()
    env.publish(bodies)
    wait_for(lambda: len(env.message_lines()) == len(bodies), 30)
    assert env.cli("reload").returncode == 0
    wait_for(lambda: "Reloaded the config from" in env.log_text())
    status = env.cli("status")
    status_json = env.cli("status", "--json")
    assert env.cli("stop").returncode == 0

    # Then the bodies are logged exactly as they came
    assert env.bodies_logged() == [b.decode() for b in bodies]
    # and every other line reads whole: the program, the config path, the queue, the URLs
    masked = {url: url.replace(f":{password}@", ":***@") for url in urls}
    config = env.config_path.resolve()
    lines = [line for line in env.log_text().splitlines() if " (+) " not in line]
    text = "\n".join(lines)
    assert all(LINE.match(line) for line in lines), text
    assert f"INFO edm {__version__} starting (pid {pid}, config {config})." in text
    assert f"WARNING Cannot connect to {masked[urls[0]]}: " in text
    assert f"INFO Connected to {masked[urls[1]]}." in text
    assert (
        f"Consuming from queue {env.queue} (exchange {env.exchange}, routing key {env.routing_key}," in text
    )
    assert f"INFO Reloaded the config from {config}." in text
    assert f"INFO edm stopped (pid {pid})." in text
    # and the password shows as a password nowhere: the only *** are the URLs' passwords
    for output in (text, status.stdout, status_json.stdout):
        assert f":{password}@" not in output
        assert output.count("***") == output.count(f"{user}:***@"), output
    assert status.returncode == 0 and status_json.returncode == 0, status.stderr + status_json.stderr
    assert f"broker {masked[urls[1]]}, queue {env.queue} " in status.stdout
    consumer = json.loads(status_json.stdout)["workers"]["consumer"]
    assert consumer["broker"] == masked[urls[1]]
