"""``edm publish`` against the real RabbitMQ: every message confirmed, or reported."""

from __future__ import annotations

import io
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest

from edm.cli.publish import (
    _Publisher,
    bodies_from_args,
    bodies_from_file,
    bodies_from_lines,
    publish_bodies,
    read_bodies,
    run_publish,
)
from edm.config import Config, parse
from edm.errors import EdmError

BROKER_URL = os.environ.get("EDM_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


@pytest.fixture
def admin() -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    try:
        connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    except pika.exceptions.AMQPError as exc:
        pytest.fail(f"RabbitMQ is required at {BROKER_URL} (set EDM_TEST_AMQP_URL): {exc!r}")
    yield connection.channel()
    connection.close()


@pytest.fixture
def route(admin: pika.adapters.blocking_connection.BlockingChannel) -> Iterator[tuple[str, str, str]]:
    """A fresh durable exchange and queue bound with a routing key; deleted afterwards."""
    name = f"edm-test-{uuid.uuid4().hex}"
    admin.exchange_declare(name, "direct", durable=True)
    admin.queue_declare(name, durable=True)
    admin.queue_bind(name, name, routing_key="key")
    yield name, name, "key"
    admin.queue_delete(name)
    admin.exchange_delete(name)


def make_config(tmp_path: Path, exchange: str, routing_key: str, url: object = BROKER_URL) -> Config:
    raw = {"amqp": {"url": url, "exchange": exchange, "routing_key": routing_key}}
    return parse(raw, tmp_path / "mq.yaml", environ={})


def drain(channel: pika.adapters.blocking_connection.BlockingChannel, queue: str) -> list[bytes]:
    """Every message in the queue, in order, consumed and acked."""
    expected = channel.queue_declare(queue, passive=True).method.message_count
    bodies: list[bytes] = []
    for method, properties, body in channel.consume(queue, inactivity_timeout=2):
        if method is None:
            break
        assert properties.delivery_mode == 2
        bodies.append(body)
        channel.basic_ack(method.delivery_tag)
        if len(bodies) == expected:
            break
    channel.cancel()
    return bodies


def test_publish_from_arguments_confirms_every_message(tmp_path, admin, route, capsys):
    exchange, queue, key = route
    config = make_config(tmp_path, exchange, key)

    code = run_publish(config, bodies_from_args(["hello", "wörld", ""]))

    assert code == 0
    assert capsys.readouterr().err == ""
    assert drain(admin, queue) == [b"hello", "wörld".encode(), b""]


def test_publish_from_stdin_lines_keeps_binary_bodies_intact(tmp_path, admin, route):
    exchange, queue, key = route
    config = make_config(tmp_path, exchange, key)
    bodies = [b"plain", b"\x00\xff\xfe binary \x80", b"crlf stays\r", "ünïcode".encode(), b""]
    stdin = io.BytesIO(b"".join(body + b"\n" for body in bodies))

    code = run_publish(config, read_bodies(stdin=stdin))

    assert code == 0
    assert drain(admin, queue) == bodies


def test_publish_from_a_file(tmp_path, admin, route):
    exchange, queue, key = route
    config = make_config(tmp_path, exchange, key)
    source = tmp_path / "bodies.txt"
    source.write_bytes(b"one\ntwo\n\xc3\x28 invalid utf-8\nlast line without newline")

    code = run_publish(config, read_bodies(file=str(source)))

    assert code == 0
    assert drain(admin, queue) == [b"one", b"two", b"\xc3\x28 invalid utf-8", b"last line without newline"]


def test_many_messages_through_a_small_window_each_arrive_once(tmp_path, admin, route):
    exchange, queue, key = route
    count = 20_000
    bodies = (b"%06d" % i for i in range(count))

    report = publish_bodies([BROKER_URL], exchange, key, bodies, window=100)

    assert report.error is None
    assert (report.published, report.confirmed, report.not_confirmed) == (count, count, 0)
    received = drain(admin, queue)
    assert len(received) == count
    assert set(received) == {b"%06d" % i for i in range(count)}


def test_routing_key_and_exchange_can_be_overridden(tmp_path, admin, route):
    exchange, queue, key = route
    config = make_config(tmp_path, "not-used", "not-used")

    code = run_publish(config, [b"x"], exchange=exchange, routing_key=key)

    assert code == 0
    assert drain(admin, queue) == [b"x"]


def test_unroutable_messages_are_reported_and_fail(tmp_path, admin, route, capsys):
    exchange, queue, _key = route
    config = make_config(tmp_path, exchange, "no-queue-is-bound-to-this")

    code = run_publish(config, [b"a", b"b", b"c"])

    assert code == 1
    err = capsys.readouterr().err
    assert "edm publish: 3 of 3 messages not confirmed (3 unroutable)" in err
    assert drain(admin, queue) == []


def test_a_missing_exchange_is_named(tmp_path, capsys, admin):
    missing = f"edm-test-missing-{uuid.uuid4().hex}"
    config = make_config(tmp_path, missing, "key")

    code = run_publish(config, [b"a"])

    assert code == 1
    assert f"exchange '{missing}' does not exist" in capsys.readouterr().err


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_broker_fails_with_the_password_masked(tmp_path, capsys):
    port = closed_port()
    url = f"amqp://guest:s3cret@127.0.0.1:{port}/%2F"
    config = make_config(tmp_path, "email", "email", url=url)

    code = run_publish(config, [b"a"])

    assert code == 1
    err = capsys.readouterr().err
    assert f"amqp://guest:***@127.0.0.1:{port}/%2F" in err
    assert "cannot connect to the broker" in err
    assert "s3cret" not in err
    assert "Traceback" not in err


def test_the_next_url_is_tried_when_the_first_is_down(tmp_path, admin, route):
    exchange, queue, key = route
    dead = f"amqp://guest:guest@127.0.0.1:{closed_port()}/%2F"
    config = make_config(tmp_path, exchange, key, url=[dead, BROKER_URL])

    assert run_publish(config, [b"failover"]) == 0
    assert drain(admin, queue) == [b"failover"]


def test_progress_is_written_when_a_run_takes_a_while(tmp_path, admin, route):
    exchange, queue, key = route
    config = make_config(tmp_path, exchange, key)
    progress = io.StringIO()

    def slow() -> Iterator[bytes]:
        yield from (b"m" for _ in range(1500))
        time.sleep(1.5)
        yield from (b"m" for _ in range(1500))

    assert run_publish(config, slow(), progress=progress) == 0

    text = progress.getvalue()
    assert text.startswith("\r1500 published, 1500 confirmed, ")
    assert text.endswith("\r3000 published, 3000 confirmed, " + text.rsplit(", ", 1)[1])
    assert text.endswith(" msg/s\n")
    assert len(drain(admin, queue)) == 3000


def test_a_short_run_shows_no_progress(tmp_path, admin, route):
    exchange, _queue, key = route
    progress = io.StringIO()
    assert run_publish(make_config(tmp_path, exchange, key), [b"a"], progress=progress) == 0
    assert progress.getvalue() == ""


def test_an_input_error_is_reported_after_confirming_what_was_read(tmp_path, admin, route, capsys):
    exchange, queue, key = route
    config = make_config(tmp_path, exchange, key)

    def broken() -> Iterator[bytes]:
        yield b"first"
        raise OSError(5, "Input/output error")

    code = run_publish(config, broken())

    assert code == 1
    assert "cannot read the messages: Input/output error" in capsys.readouterr().err
    assert drain(admin, queue) == [b"first"]


# -- reading bodies ------------------------------------------------------------------------
def test_stdin_lines_are_streamed_not_slurped():
    read_fd, write_fd = os.pipe()
    with os.fdopen(read_fd, "rb") as reader, os.fdopen(write_fd, "wb", buffering=0) as writer:
        writer.write(b"first\n")
        lines = bodies_from_lines(reader)
        got: list[bytes] = []
        thread = threading.Thread(target=lambda: got.append(next(lines)))
        thread.start()
        thread.join(timeout=5)
        # The writer is still open: a reader that slurped would still be waiting for EOF.
        assert got == [b"first"]


def test_arguments_are_utf8():
    assert list(bodies_from_args(["é", "a b"])) == ["é".encode(), b"a b"]


def test_a_missing_file_fails_before_connecting(tmp_path):
    with pytest.raises(EdmError, match=r"cannot read .*nope.txt: No such file"):
        bodies_from_file(tmp_path / "nope.txt")


def test_dash_means_stdin():
    assert list(read_bodies(file="-", stdin=io.BytesIO(b"a\nb\n"))) == [b"a", b"b"]


def test_the_reader_stays_within_a_bounded_distance_of_the_broker(route):
    """Huge input must not be slurped: reading runs at most ~2 windows ahead of confirms."""
    from edm.cli.publish import _Publisher

    exchange, _queue, key = route
    window = 200
    ahead: list[int] = []
    publisher: _Publisher

    def bodies() -> Iterator[bytes]:
        for i in range(10_000):
            ahead.append(i - publisher.report.acked)
            yield b"%d" % i

    publisher = _Publisher([BROKER_URL], exchange, key, bodies(), window, None)
    report = publisher.run()

    assert report.confirmed == 10_000
    # window bodies waiting in the hand-over queue + window unconfirmed + one in hand
    assert max(ahead) <= 2 * window + 1


class _Frame:
    def __init__(self, tag: int, multiple: bool) -> None:
        self.method = pika.spec.Basic.Ack(delivery_tag=tag, multiple=multiple)


class _Channel:
    def __init__(self) -> None:
        self.published: list[bytes] = []

    def basic_publish(
        self, _exchange: str, _key: str, body: bytes, _properties: object, mandatory: bool
    ) -> None:
        self.published.append(body)


class _Loop:
    def __init__(self) -> None:
        self.callbacks: list[object] = []

    def add_callback_threadsafe(self, callback: object) -> None:
        self.callbacks.append(callback)


def test_a_confirm_that_empties_a_full_window_lets_the_next_body_wake_the_loop() -> None:
    """Given a pump that stopped at a full window (its wake flag still set) and the window's
    confirms arriving while the reader has nothing queued, when the reader queues the next body,
    then the loop is woken to publish it (before, both sides waited for each other for ever)."""
    publisher = _Publisher([BROKER_URL], "x", "key", iter(()), window=2, progress=None)
    publisher.ioloop.close()
    loop, channel = _Loop(), _Channel()
    publisher.ioloop = loop  # type: ignore[assignment]
    publisher.channel = channel
    publisher.wake_pending = False
    for body in (b"1", b"2"):
        publisher.queue.append(body)
    publisher._wake()
    assert len(loop.callbacks) == 1
    publisher._pump()  # publishes 1 and 2 and stops: the window is full, the queue empty
    assert channel.published == [b"1", b"2"]
    publisher._on_confirm(_Frame(2, multiple=True))  # the window empties with nothing queued

    publisher.queue.append(b"3")
    publisher._wake()

    assert len(loop.callbacks) == 2
    loop.callbacks[-1]()  # type: ignore[operator]
    assert channel.published == [b"1", b"2", b"3"]
