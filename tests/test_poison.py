"""A failing message's original stays unacked until its copy is confirmed, and the window
is the prefetch: above 1 the others flow meanwhile; at 1 nothing more is in flight.

These tests run edm's consumer in-process against the real broker and look at what it did
while a confirm was owed. At prefetch 1 the next message waits for the confirm round trip:
the window is not widened (a channel-wide prefetch costs the broker on every delivery, more
than the round trip saves; see edm/amqp/outcomes.py and bench/README.md).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pika
import pytest
from conftest import AMQP_URL, amqp_channel, delete_topology, unique

from edm.amqp.consumer import Consumer
from edm.amqp.ioloop import io_loop
from edm.config import AmqpConfig
from edm.handlers import Message
from edm.handlers.loader import HandlerFactory


@pytest.fixture
def name() -> Iterator[str]:
    name = unique("poison")
    yield name
    delete_topology({name, f"{name}.dead", f"{name}.retry.1000"}, {name})


def _prefill(name: str, bodies: list[bytes]) -> None:
    connection, channel = amqp_channel()
    try:
        channel.exchange_declare(name, "direct", durable=True)
        channel.queue_declare(name, durable=True)
        channel.queue_bind(name, name, name)
        channel.confirm_delivery()
        for body in bodies:
            channel.basic_publish(name, name, body, pika.BasicProperties(delivery_mode=2))
    finally:
        connection.close()


def _depth(queue: str) -> int:
    connection, channel = amqp_channel()
    try:
        count: int = channel.queue_declare(queue, passive=True).method.message_count
        return count
    finally:
        connection.close()


@pytest.mark.parametrize("prefetch", [1, 20], ids=["prefetch 1", "prefetch 20"])
@pytest.mark.parametrize("fast_lane", [True, False], ids=["fast lane", "plain pika"])
def test_a_dead_letter_awaiting_its_confirm_holds_its_place_in_the_window(
    name: str, fast_lane: bool, prefetch: int
) -> None:
    # Given 1,000 messages waiting, one in 10 of them failing (max_retries 0: dead at once)
    bodies = [b"bad %d" % i if i % 10 == 3 else b"good %d" % i for i in range(1000)]
    _prefill(name, bodies)
    good = [b for b in bodies if b.startswith(b"good")]
    handled: list[bytes] = []
    while_owed = 0  # good messages handled while a copy's confirm was owed
    consumer: Consumer

    def handler(message: Message) -> None:
        nonlocal while_owed
        if message.body.startswith(b"bad"):
            raise ValueError("poisoned")
        settler = consumer._flow.settler
        while_owed += settler is not None and settler.busy
        handled.append(message.body)
        if len(handled) == len(good):
            consumer.stop()  # waits for the last confirms before it closes

    amqp = AmqpConfig(
        url=(AMQP_URL,),
        exchange=name,
        queue=name,
        routing_key=name,
        prefetch=prefetch,
        max_retries=0,
        retry_delays=(1.0,),
        fast_lane=fast_lane,
    )
    consumer = Consumer(amqp, HandlerFactory("test:poison", handler), _ignore, io_loop(fast_lane))
    timer = threading.Timer(60, consumer.stop)  # a hung consumer fails the test, never the run
    timer.start()

    # When edm consumes them
    try:
        consumer.start()
        consumer.run()
    finally:
        timer.cancel()

    # Then every good message was handled once, every bad one is in .dead (acked only after
    # its confirm: nothing left in the queue); at prefetch 1 no good message came while a
    # confirm was owed (the unacked original is the whole window), above it good ones did
    assert sorted(handled) == sorted(good)
    assert (_depth(f"{name}.dead"), _depth(name)) == (100, 0)
    assert consumer.dead == 100
    if prefetch == 1:
        assert while_owed == 0
    else:
        assert while_owed > 0


def _ignore(_snapshot: dict[str, Any]) -> None:
    """Status reports are not looked at here."""
