"""The handler API of contract §9: Message, Reject, Retry, built-in names, classes, close()."""

from __future__ import annotations

import subprocess
import sys

import pika
import pytest
from conftest import ROOT, EdmEnv, wait_for

from edm.errors import ConfigError
from edm.handlers import Message, Reject, Retry, loader


class Counter:
    built = 0

    def __init__(self, options: dict[str, object]) -> None:
        Counter.built += 1
        self.options = options
        self.closed = False

    def __call__(self, message: Message) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class Broken:
    def __init__(self, options: dict[str, object]) -> None:
        raise RuntimeError(f"no mail server at {options['server']}")


def test_message_decodes_properties_once_and_reads_attempts_and_id() -> None:
    properties = pika.BasicProperties(message_id="job-7", headers={"x-edm-attempts": 2, "k": "v"})
    encoded = bytearray()
    calls = []

    def decode(raw: object) -> pika.BasicProperties:
        calls.append(raw)
        return properties

    message = Message(b"body", "rk", True, b"raw", decode)
    assert calls == []
    assert message.attempts == 3
    assert message.message_id == "job-7"
    assert message.headers["k"] == "v"
    assert calls == [b"raw"]
    plain = Message(b"b", "rk", False, pika.BasicProperties())
    assert plain.attempts == 1 and plain.message_id is None and plain.headers == {}
    assert not encoded


def test_outcomes_carry_reason_and_delay() -> None:
    assert Reject("bad address").reason == "bad address"
    retry = Retry("greylisted", delay=300)
    assert (retry.reason, retry.delay) == ("greylisted", 300)
    assert Retry().delay is None


def test_a_class_is_built_per_thread_with_its_options_and_closed() -> None:
    factory = loader.HandlerFactory("tests:Counter", Counter, {"server": "mx"})
    before = Counter.built
    first, second = factory.build(), factory.build()
    assert Counter.built == before + 2 and first.call is not second.call
    assert first.call.options == {"server": "mx"}  # type: ignore[attr-defined]
    first.call.options["server"] = "changed"  # type: ignore[attr-defined]
    assert second.call.options == {"server": "mx"}  # type: ignore[attr-defined]
    first.release()
    assert first.call.closed  # type: ignore[attr-defined]


def test_a_function_is_shared_and_takes_no_options() -> None:
    factory = loader.load("log")
    assert factory.build().call is factory.build().call
    with pytest.raises(ConfigError, match=r"^amqp\.handler_options: log is a function"):
        loader.load("log", {"x": 1})


def test_load_errors_name_amqp_handler() -> None:
    with pytest.raises(ConfigError, match=r"^amqp\.handler: 'mail' is not a built-in handler"):
        loader.load("mail")
    with pytest.raises(ConfigError, match=r"^amqp\.handler: cannot import 'no_such_module_q'"):
        loader.load("no_such_module_q:run")
    factory = loader.load("tests.test_handler_api:Broken", {"server": "mx.example"})
    with pytest.raises(ConfigError, match=r"^amqp\.handler: \S+:Broken could not be built: RuntimeError"):
        factory.build()


def test_the_api_module_imports_no_pika() -> None:
    code = "import sys, edm.handlers; assert 'pika' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_a_class_handler_runs_with_options_and_is_closed_on_reload(edm_env: EdmEnv) -> None:
    edm_env.doc["amqp"].update(handler="edm_class_handlers:Tagged", handler_options={"tag": "first"})
    edm_env.write_config()
    pid = edm_env.start()
    edm_env.publish([b"one", b"reject-me"])
    wait_for(lambda: "first: one" in edm_env.bodies_logged())
    wait_for(lambda: edm_env.queue_depth(f"{edm_env.queue}.dead") == 1)
    dead = edm_env.drain_queue(f"{edm_env.queue}.dead")
    assert dead[0][1]["x-edm-attempts"] == 1
    assert dead[0][1]["x-edm-error"] == "Reject: first refuses reject-me"

    edm_env.doc["amqp"]["handler_options"] = {"tag": "second"}
    edm_env.write_config()
    assert edm_env.cli("reload").returncode == 0
    wait_for(lambda: "with tag first closed." in edm_env.log_text())
    edm_env.publish([b"two"])
    wait_for(lambda: "second: two" in edm_env.bodies_logged())
    assert edm_env.main_pid() == pid
    assert edm_env.cli("stop").returncode == 0
    assert "with tag second closed." in edm_env.log_text()


def test_a_constructor_that_raises_fails_the_start_and_keeps_the_handler_on_reload(edm_env: EdmEnv) -> None:
    edm_env.doc["amqp"].update(handler="edm_class_handlers:Broken", handler_options={"server": "mx.q"})
    edm_env.write_config()
    result = edm_env.cli("start")
    assert result.returncode == 1
    assert "amqp.handler: edm_class_handlers:Broken could not be built" in result.stderr + result.stdout
    assert "no mail server at mx.q" in result.stderr + result.stdout

    edm_env.doc["amqp"].update(handler="edm_class_handlers:Tagged", handler_options={"tag": "kept"})
    edm_env.write_config()
    edm_env.start()
    edm_env.doc["amqp"].update(handler="edm_class_handlers:Broken", handler_options={})
    edm_env.write_config()
    assert edm_env.cli("reload").returncode == 0
    wait_for(lambda: "could not be built" in edm_env.log_text())
    edm_env.publish([b"still"])
    wait_for(lambda: "kept: still" in edm_env.bodies_logged())
