"""The consumer's fast lane against pika's own decoder, and end to end on the real broker."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pika.frame
import pika.spec
import pytest
from conftest import AMQP_URL, amqp_channel, delete_topology, helper_queues, unique
from hypothesis import given, settings
from hypothesis import strategies as st

from edm.amqp.consumer import Consumer
from edm.amqp.fastlane import Lane, decode_properties, feed, take_delivery
from edm.amqp.ioloop import io_loop
from edm.config import AmqpConfig
from edm.handlers import Message, Reject
from edm.handlers.loader import HandlerFactory

CHANNEL, TAG = 1, "ctag1.abc"


def delivery_frames(
    *,
    channel: int = CHANNEL,
    consumer_tag: str = TAG,
    delivery_tag: int = 1,
    redelivered: bool = False,
    exchange: str = "email",
    routing_key: str = "email",
    properties: pika.BasicProperties | None = None,
    body: bytes = b"hello",
    frame_body: int = 131064,
) -> bytes:
    """A delivery as the broker sends it, marshalled by pika (body split at ``frame_body``)."""
    method = pika.spec.Basic.Deliver(consumer_tag, delivery_tag, redelivered, exchange, routing_key)
    parts = [
        pika.frame.Method(channel, method).marshal(),
        pika.frame.Header(channel, len(body), properties or pika.BasicProperties()).marshal(),
    ]
    parts += [
        pika.frame.Body(channel, body[i : i + frame_body]).marshal() for i in range(0, len(body), frame_body)
    ]
    return b"".join(parts)


def pika_deliveries(data: bytes) -> list[tuple[Any, ...]]:
    """What pika's generic path makes of ``data``: (tag, redelivered, key, properties, body)."""
    out: list[tuple[Any, ...]] = []
    pos = 0
    while pos < len(data):
        used, method = pika.frame.decode_frame(data[pos:])
        pos += used
        used, header = pika.frame.decode_frame(data[pos:])
        pos += used
        body = b""
        while len(body) < header.body_size:
            used, chunk = pika.frame.decode_frame(data[pos:])
            pos += used
            body += chunk.fragment
        m = method.method
        out.append((m.delivery_tag, m.redelivered, m.routing_key, dict(vars(header.properties)), body))
    return out


def lane_deliveries(data: bytes, lane_tag: str = TAG) -> tuple[list[tuple[Any, ...]], int]:
    got: list[tuple[Any, ...]] = []

    def on_delivery(tag: int, redelivered: bool, key: str, properties: bytes, body: bytes) -> None:
        got.append((tag, redelivered, key, dict(vars(decode_properties(properties))), body))

    lane = Lane(CHANNEL, lane_tag, on_delivery)
    pos = 0
    while True:
        pos, taken = take_delivery(data, pos, lane)
        if not taken:
            return got, pos


texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=40).filter(
    lambda s: len(s.encode()) < 256
)
header_values = st.one_of(st.integers(-(2**31), 2**31 - 1), st.text(max_size=20), st.booleans())
properties = st.builds(
    pika.BasicProperties,
    content_type=st.none() | st.just("text/plain"),
    delivery_mode=st.none() | st.sampled_from([1, 2]),
    headers=st.none() | st.dictionaries(st.text(min_size=1, max_size=10), header_values, max_size=4),
    message_id=st.none() | texts,
    priority=st.none() | st.integers(0, 9),
    timestamp=st.none() | st.integers(0, 2**40),
)
deliveries = st.fixed_dictionaries(
    {
        "delivery_tag": st.integers(1, 2**64 - 1),
        "redelivered": st.booleans(),
        "exchange": texts,
        "routing_key": texts,
        "properties": properties,
        "body": st.binary(max_size=300),
        "frame_body": st.integers(1, 120),
    }
)


@settings(max_examples=200, deadline=None)
@given(st.lists(deliveries, min_size=1, max_size=5))
def test_the_lane_decodes_deliveries_as_pika_does(given_deliveries: list[dict[str, Any]]) -> None:
    data = b"".join(delivery_frames(**d) for d in given_deliveries)

    got, pos = lane_deliveries(data)

    assert pos == len(data)
    assert got == pika_deliveries(data)


@settings(max_examples=100, deadline=None)
@given(deliveries, st.data())
def test_an_incomplete_delivery_is_left_whole_for_later(
    delivery: dict[str, Any], data: st.DataObject
) -> None:
    whole = delivery_frames(**delivery)
    cut = data.draw(st.integers(0, len(whole) - 1))

    got, pos = lane_deliveries(whole[:cut])

    assert (got, pos) == ([], 0)


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(delivery_frames(channel=2), id="another channel"),
        pytest.param(delivery_frames(consumer_tag="ctag1.other"), id="another consumer"),
        pytest.param(pika.frame.Heartbeat().marshal(), id="a heartbeat"),
        pytest.param(pika.frame.Method(CHANNEL, pika.spec.Basic.CancelOk(TAG)).marshal(), id="cancel-ok"),
        pytest.param(
            pika.frame.Method(CHANNEL, pika.spec.Channel.Close(406, "x", 0, 0)).marshal(), id="close"
        ),
        pytest.param(delivery_frames()[:-1] + b"\x00", id="a bad frame end"),
    ],
)
def test_the_lane_stops_at_anything_else_and_never_takes_what_follows(other: bytes) -> None:
    first, after = delivery_frames(delivery_tag=1), delivery_frames(delivery_tag=3)

    got, pos = lane_deliveries(first + other + after)

    assert [d[0] for d in got] == [1]
    assert pos == len(first)


def fed(data: bytes, close_after: int = -1) -> tuple[list[int], list[bytes], int]:
    """``feed`` with a recording pika: (the lane's delivery tags, pika's frames, the position
    reached); the lane closes once pika took ``close_after`` frames."""
    tags: list[int] = []
    to_pika: list[bytes] = []
    lane = Lane(CHANNEL, TAG, lambda tag, *_: tags.append(tag))
    pos, frames, taken = feed(data, lane, to_pika.append, lambda _lane: len(to_pika) != close_after)
    assert taken + sum(map(len, to_pika)) == pos  # every byte used once, by one or the other
    assert frames == 3 * len(tags)
    return tags, to_pika, pos


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(delivery_frames(channel=2), id="another channel"),
        pytest.param(delivery_frames(consumer_tag="ctag1.other"), id="another consumer"),
        pytest.param(pika.frame.Heartbeat().marshal(), id="a heartbeat"),
        pytest.param(pika.frame.Method(CHANNEL, pika.spec.Basic.Ack(5)).marshal(), id="a confirm"),
        pytest.param(pika.frame.Method(CHANNEL, pika.spec.Basic.QosOk()).marshal(), id="qos-ok"),
        pytest.param(delivery_frames()[:-1] + b"\x00", id="a bad frame end"),
    ],
)
def test_pika_takes_each_other_frame_alone_and_the_lane_resumes_after_it(other: bytes) -> None:
    first, after = delivery_frames(delivery_tag=1), delivery_frames(delivery_tag=3)

    tags, to_pika, pos = fed(first + other + after)

    assert tags == [1, 3]
    assert b"".join(to_pika) == other  # whole frames, in order, nothing of the lane's
    assert all(pika.frame.decode_frame(f)[0] == len(f) for f in to_pika if not f.endswith(b"\x00"))
    assert pos == len(first + other + after)


def test_a_delivery_cut_short_by_a_read_waits_for_the_rest() -> None:
    first, second = delivery_frames(delivery_tag=1), delivery_frames(delivery_tag=2, body=b"x" * 300)
    confirm = pika.frame.Method(CHANNEL, pika.spec.Basic.Ack(1)).marshal()
    for cut in range(1, len(second)):
        data = first + confirm + second[:cut]
        tags, to_pika, pos = fed(data)
        assert (tags, to_pika, pos) == ([1], [confirm], len(first + confirm))
        tags, to_pika, pos = fed(data[pos:] + second[cut:])
        assert (tags, to_pika, pos) == ([2], [], len(second))


def test_a_lane_closed_by_a_frame_pika_took_leaves_the_rest_to_pika() -> None:
    cancel = pika.frame.Method(CHANNEL, pika.spec.Basic.CancelOk(TAG)).marshal()
    first, after = delivery_frames(delivery_tag=1), delivery_frames(delivery_tag=3)

    tags, to_pika, pos = fed(first + cancel + after, close_after=1)

    assert (tags, to_pika, pos) == ([1], [cancel], len(first + cancel))


def test_the_lane_ack_is_the_frame_pika_would_send() -> None:
    from edm.amqp.fastlane import _ACK, _ACK_ID, _FRAME_END, _METHOD

    for channel, tag in ((1, 1), (7, 2**64 - 1), (65535, 123456789)):
        ours = _ACK.pack(_METHOD, channel, 13, _ACK_ID, tag, 0, _FRAME_END)
        assert ours == pika.frame.Method(channel, pika.spec.Basic.Ack(tag)).marshal()


def test_a_message_decodes_its_properties_once_and_only_when_asked() -> None:
    props = pika.BasicProperties(headers={"a": 1}, message_id="m-1")
    encoded = pika.frame.Header(1, 0, props).marshal()[7 + 12 : -1]
    message = Message(b"x", "rk", False, encoded, decode_properties)

    assert message.properties.message_id == "m-1"
    assert message.properties is message.properties
    assert message.headers == {"a": 1}


# -- end to end ---------------------------------------------------------------------------------


@pytest.fixture
def names() -> Iterator[str]:
    name = unique("fastlane")
    yield name
    delete_topology({name} | helper_queues(name), {name})


def consume(
    name: str,
    count: int,
    publish: Callable[[], None],
    handler: Any = None,
    fast_lane: bool = True,
    **amqp_options: Any,
) -> list[Message]:
    """Run edm's consumer in this thread; ``publish`` runs in another once it consumes."""
    seen: list[Message] = []
    consumer: Consumer
    publisher: list[threading.Thread] = []

    def record(message: Message) -> None:
        if handler is not None:
            handler(message)
        seen.append(message)
        if len(seen) >= count:
            consumer.stop()

    def on_state(snapshot: dict[str, Any]) -> None:
        if snapshot["state"] == "consuming" and not publisher:
            publisher.append(threading.Thread(target=publish))
            publisher[0].start()

    options: dict[str, Any] = {"prefetch": 1, **amqp_options}
    amqp = AmqpConfig(
        url=(AMQP_URL,), exchange=name, queue=name, routing_key=name, fast_lane=fast_lane, **options
    )
    consumer = Consumer(amqp, HandlerFactory("test:record", record), on_state, io_loop(fast_lane))
    timer = threading.Timer(30, consumer.stop)  # a hung consumer fails the test, never the run
    timer.start()
    try:
        consumer.start()
        consumer.run()
    finally:
        timer.cancel()
        for thread in publisher:
            thread.join()
    return seen


@pytest.mark.parametrize("fast_lane", [True, False], ids=["fast lane", "plain pika"])
def test_deliveries_reach_the_handler_whole_with_their_properties(names: str, fast_lane: bool) -> None:
    # Given messages published while edm consumes: empty, with properties, over one frame
    big = bytes(range(256)) * 1200  # over one frame (128 KiB): several body frames
    sent = [
        (b"", pika.BasicProperties(delivery_mode=2)),
        (b"plain", pika.BasicProperties(delivery_mode=2, message_id="id-1", headers={"k": "v", "n": 7})),
        (big, pika.BasicProperties(delivery_mode=2, correlation_id="c-9")),
        (b"last", pika.BasicProperties(delivery_mode=2, headers={"x": b"\xff"})),
    ]

    def publish() -> None:
        connection, channel = amqp_channel()
        try:
            for body, props in sent:
                channel.basic_publish(names, names, body, props)
        finally:
            connection.close()

    # When edm consumes them
    encoded: list[bool] = []
    seen = consume(
        names, len(sent), publish, lambda m: encoded.append(isinstance(m._properties, bytes)), fast_lane
    )

    # Then each arrives once, whole, with its properties and headers
    assert [m.body for m in seen] == [b for b, _ in sent]
    assert [m.routing_key for m in seen] == [names] * len(sent)
    assert [m.redelivered for m in seen] == [False] * len(sent)
    assert seen[0].headers == {}
    assert seen[1].headers == {"k": "v", "n": 7}
    assert seen[1].properties.message_id == "id-1"
    assert seen[2].properties.correlation_id == "c-9"
    assert seen[3].headers == {"x": b"\xff"}
    if fast_lane:
        # the small ones came through the lane: their properties were still encoded in the handler
        assert encoded[:2] == [True, True] and encoded[3]
    else:
        # amqp.fast_lane false: every one came through pika's own decoder
        assert encoded == [False] * len(sent)
    connection, channel = amqp_channel()
    try:
        assert channel.queue_declare(names, passive=True).method.message_count == 0
    finally:
        connection.close()


def test_deliveries_after_a_publisher_confirm_stay_on_the_lane(names: str) -> None:
    # Given 2,000 messages waiting, one in 20 of them rejected by the handler: each rejection
    # is republished to .dead and its confirm arrives among the deliveries (prefetch 50)
    total, poison = 2000, 100
    connection, channel = amqp_channel()
    try:
        channel.exchange_declare(names, "direct", durable=True)
        channel.queue_declare(names, durable=True)
        channel.queue_bind(names, names, names)
        channel.confirm_delivery()
        for i in range(total):
            body = b"poison %d" % i if i % (total // poison) == 7 else b"good %d" % i
            channel.basic_publish(names, names, body, pika.BasicProperties(delivery_mode=2))
    finally:
        connection.close()

    def reject(message: Message) -> None:
        if message.body.startswith(b"poison"):
            raise Reject("poisoned")

    # When edm consumes them with the fast lane
    seen = consume(names, total - poison, lambda: None, reject, prefetch=50, retry_delays=(1.0,))

    # Then every good message came through the lane (its properties still encoded in the
    # handler), none through pika's slower path, and every poison one is in .dead
    lane = sum(isinstance(m._properties, bytes) for m in seen)
    assert (len(seen), lane) == (total - poison, total - poison)
    connection, channel = amqp_channel()
    try:
        assert channel.queue_declare(f"{names}.dead", passive=True).method.message_count == poison
        assert channel.queue_declare(names, passive=True).method.message_count == 0
    finally:
        connection.close()
