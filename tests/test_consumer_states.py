"""The consumer's state machine without a broker: a fake connection, channel and I/O loop.

The fakes answer every declaration at once (or refuse the ones a test names), record what the
consumer sends, and let the test deliver messages, confirm publishes, close the connection
and fire timers. The integration tests against the real broker stay beside these.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions
import pika.frame
import pika.spec
import pytest

from edm.amqp.connection import Link, State
from edm.amqp.consumer import Consumer
from edm.amqp.outcomes import Kind, judge, pick_delay
from edm.config import AmqpConfig
from edm.errors import LogWriteError
from edm.handlers.api import Message, Reject, Retry
from edm.handlers.loader import HandlerFactory

URLS = ("amqp://guest:secret@127.0.0.1:5672/%2F", "amqp://guest:secret@127.0.0.2:5672/%2F")


class FakeLoop:
    """call_later records; the test fires timers by hand."""

    def __init__(self) -> None:
        self.timers: list[tuple[float, Callable[[], None]]] = []
        self.wakeups = 0
        self.callbacks: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()

    def call_later(self, delay: float, callback: Callable[[], None]) -> object:
        entry = (delay, callback)
        self.timers.append(entry)
        return entry

    def remove_timeout(self, handle: object) -> None:
        self.timers.remove(handle)  # type: ignore[arg-type]

    def add_callback_threadsafe(self, callback: Callable[[], None]) -> None:
        self.wakeups += 1
        self.callbacks.put(callback)

    def run_callbacks(self, count: int) -> None:
        """Run ``count`` callbacks other threads added, waiting up to 5 s for each."""
        for _ in range(count):
            self.callbacks.get(timeout=5)()

    def fire(self, name: str) -> float:
        """Run the first timer whose callback is named ``name``; return its delay."""
        for entry in self.timers:
            if getattr(entry[1], "__name__", "") == name:
                self.timers.remove(entry)
                entry[1]()
                return entry[0]
        raise AssertionError(f"no {name} timer in {self.timers}")

    def delays(self, name: str) -> list[float]:
        return [d for d, cb in self.timers if getattr(cb, "__name__", "") == name]


def _frame(method: Any) -> pika.frame.Method:
    return pika.frame.Method(1, method)


class FakeChannel:
    def __init__(self, connection: FakeConnection, number: int) -> None:
        self.connection = connection
        self.channel_number = number
        self.is_open = True
        self.on_close: list[Callable[[Any, BaseException], None]] = []
        self.on_message: Callable[..., None] | None = None
        self.on_confirm: Callable[[pika.frame.Method], None] | None = None
        self.on_return: Callable[..., None] | None = None
        self.published: list[tuple[str, str, bytes, pika.BasicProperties]] = []
        self.acks: list[int] = []
        self.nacks: list[int] = []
        self.cancelled = False
        self.declared: list[str] = []
        self.prefetch = 0
        self.qos: list[int] = []  # every basic.qos asked, in order
        self.qos_global: list[bool] = []  # and whether it was the channel's (global)

    def add_on_close_callback(self, callback: Callable[[Any, BaseException], None]) -> None:
        self.on_close.append(callback)

    def _answer(self, name: str, callback: Callable[[Any], None] | None, method: Any) -> None:
        if name in self.connection.refuse:
            self.closed_by_broker(406, f"PRECONDITION_FAILED - inequivalent arg for {name}")
            return
        self.declared.append(name)
        if callback is not None:
            callback(_frame(method))

    def exchange_declare(self, name: str, *_a: Any, callback: Any = None, **_k: Any) -> None:
        self._answer(name, callback, pika.spec.Exchange.DeclareOk())

    def queue_declare(self, name: str, *_a: Any, callback: Any = None, **_k: Any) -> None:
        self._answer(name, callback, pika.spec.Queue.DeclareOk(name, 0, 0))

    def queue_bind(self, queue: str, *_a: Any, callback: Any = None, **_k: Any) -> None:
        self._answer(queue + " (bind)", callback, pika.spec.Queue.BindOk())

    def confirm_delivery(self, callback: Callable[[pika.frame.Method], None]) -> None:
        self.on_confirm = callback

    def basic_qos(self, prefetch_count: int, global_qos: bool, callback: Callable[[Any], None]) -> None:
        self.qos_global.append(global_qos)
        self.prefetch = prefetch_count
        self.qos.append(prefetch_count)
        callback(_frame(pika.spec.Basic.QosOk()))

    def basic_consume(self, _queue: str, on_message: Callable[..., None], auto_ack: bool) -> str:
        self.on_message = on_message
        self.cancelled = False
        return "ctag"

    def basic_cancel(self, _tag: str) -> None:
        self.cancelled = True

    def basic_publish(
        self, exchange: str, routing_key: str, body: bytes, properties: Any, mandatory: bool
    ) -> None:
        assert mandatory  # an unroutable copy must come back, never vanish
        self.published.append((exchange, routing_key, body, properties))

    def add_on_return_callback(self, callback: Callable[..., None]) -> None:
        self.on_return = callback

    def basic_ack(self, tag: int) -> None:
        self.acks.append(tag)

    def basic_nack(self, tag: int, requeue: bool) -> None:
        self.nacks.append(tag)

    def close(self) -> None:
        self.is_open = False

    def closed_by_broker(self, code: int, text: str) -> None:
        self.is_open = False
        for callback in self.on_close:
            callback(self, pika.exceptions.ChannelClosedByBroker(code, text))

    # the test's side
    def deliver(self, tag: int, body: bytes, headers: dict[str, Any] | None = None) -> None:
        assert self.on_message is not None
        method = pika.spec.Basic.Deliver("ctag", tag, False, "ex", "rk")
        self.on_message(self, method, pika.BasicProperties(headers=headers, message_id="m-1"), body)

    def give_back(self, routing_key: str, body: bytes) -> None:
        """basic.return: the broker could not route a mandatory publish."""
        assert self.on_return is not None
        method = pika.spec.Basic.Return(312, "NO_ROUTE", "", routing_key)
        self.on_return(self, method, pika.BasicProperties(), body)

    def confirm(self, seq: int, ok: bool = True, multiple: bool = False) -> None:
        assert self.on_confirm is not None
        method = pika.spec.Basic.Ack(seq, multiple) if ok else pika.spec.Basic.Nack(seq, multiple)
        self.on_confirm(_frame(method))


class FakeConnection:
    def __init__(
        self,
        params: Any,
        on_open_callback: Any,
        on_open_error_callback: Any,
        on_close_callback: Any,
        custom_ioloop: Any,
    ) -> None:
        self.params = params
        self.on_open = on_open_callback
        self.on_open_error = on_open_error_callback
        self.on_close = on_close_callback
        self.is_open = False
        self.is_closed = False
        self.channels: list[FakeChannel] = []
        self.refuse: set[str] = set()
        self.hold_channels = False  # channel opens wait for the test
        self.held: list[Callable[[], None]] = []
        self.lane: Any = None
        self.sent_acks: list[int] = []
        self.blocked_callbacks: list[Callable[..., None]] = []
        self.unblocked_callbacks: list[Callable[..., None]] = []

    def add_on_connection_blocked_callback(self, callback: Callable[..., None]) -> None:
        self.blocked_callbacks.append(callback)

    def add_on_connection_unblocked_callback(self, callback: Callable[..., None]) -> None:
        self.unblocked_callbacks.append(callback)

    def channel(self, on_open_callback: Callable[[FakeChannel], None]) -> None:
        channel = FakeChannel(self, len(self.channels) + 1)
        self.channels.append(channel)
        if self.hold_channels:
            self.held.append(lambda: on_open_callback(channel))
        else:
            on_open_callback(channel)

    def open_lane(self, lane: Any) -> None:
        self.lane = lane

    def close_lane(self) -> None:
        self.lane = None

    def send_ack(self, _channel_number: int, tag: int) -> None:
        self.sent_acks.append(tag)

    def close(self) -> None:
        self.lost(pika.exceptions.ConnectionClosedByClient(200, "OK"))

    # the test's side
    def opened(self) -> None:
        self.is_open = True
        self.on_open(self)

    def refused(self) -> None:
        self.is_closed = True
        self.on_open_error(self, pika.exceptions.AMQPConnectionError("refused"))

    def lost(self, reason: BaseException) -> None:
        self.is_open, self.is_closed = False, True
        for channel in self.channels:
            channel.is_open = False
        self.on_close(self, reason)

    @property
    def main(self) -> FakeChannel:
        return self.channels[0]


class Rig:
    """A consumer on fakes, with what it emitted and the connections it made."""

    def __init__(self, handler: Callable[[Message], object], refuse: set[str] | None = None, **amqp: Any):
        self.loop = FakeLoop()
        self.connections: list[FakeConnection] = []
        self.states: list[str] = []
        self.refuse = refuse or set()
        config = AmqpConfig(url=URLS, queue="q", exchange="ex", routing_key="rk", **amqp)
        factory = HandlerFactory("test:handler", handler)
        self.consumer = Consumer(config, factory, self._emit, self.loop, connection_factory=self._connect)  # type: ignore[arg-type]
        self.consumer.start()

    def _emit(self, snapshot: dict[str, Any]) -> None:
        self.states.append(snapshot["state"])

    def _connect(self, params: Any, **callbacks: Any) -> FakeConnection:
        connection = FakeConnection(params, **callbacks)
        connection.refuse = self.refuse
        self.connections.append(connection)
        return connection

    @property
    def connection(self) -> FakeConnection:
        return self.connections[-1]

    def handle(self) -> None:
        self.consumer._running = True
        self.consumer._flow.handle()


def _open(rig: Rig) -> FakeChannel:
    rig.connection.opened()
    return rig.connection.main


# -- outcomes: pure ------------------------------------------------------------------------


def test_the_delay_follows_the_schedule_or_the_first_configured_one_at_least_as_long() -> None:
    delays = (10.0, 60.0, 300.0)
    assert [pick_delay(delays, n, None) for n in (1, 2, 3, 4, 9)] == [10, 60, 300, 300, 300]
    assert pick_delay(delays, 1, 0.5) == 10
    assert pick_delay(delays, 1, 10) == 10
    assert pick_delay(delays, 1, 61) == 300
    assert pick_delay(delays, 1, 3600) == 300  # none is long enough: the longest


def test_judge_maps_each_ending_to_an_outcome() -> None:
    amqp = AmqpConfig(max_retries=2, retry_delays=(1.0, 5.0))

    def message(attempts_before: int) -> Message:
        headers = {"x-edm-attempts": attempts_before} if attempts_before else None
        return Message(b"x", "rk", False, pika.BasicProperties(headers=headers))

    retry = judge(message(0), ValueError("boom"), amqp)
    assert (retry.kind, retry.attempts, retry.delay, retry.error) == (Kind.RETRY, 1, 1.0, "ValueError: boom")
    assert judge(message(1), ValueError("boom"), amqp).delay == 5.0
    dead = judge(message(2), ValueError("boom"), amqp)
    assert (dead.kind, dead.attempts) == (Kind.DEAD, 3)
    rejected = judge(message(0), Reject("no 'to'"), amqp)
    assert (rejected.kind, rejected.error) == (Kind.DEAD, "Reject: no 'to'")
    asked = judge(message(0), Retry("greylisted", delay=2), amqp)
    assert (asked.kind, asked.delay, asked.error) == (Kind.RETRY, 5.0, "Retry: greylisted")
    held = judge(message(0), LogWriteError("/x", OSError(28, "No space left on device"), _no_write), amqp)
    assert held.kind is Kind.HELD and held.failure is not None
    assert judge(message(0), ValueError("x"), AmqpConfig(max_retries=0)).kind is Kind.DEAD


def _no_write(_level: str, _text: str) -> None:
    raise OSError(28, "No space left on device")


# -- connection: URLs in turn, back-off, blocked ----------------------------------------------


def test_link_tries_each_url_then_backs_off_doubling_and_resets_once_settled() -> None:
    loop = FakeLoop()
    made: list[FakeConnection] = []
    states: list[State] = []
    downs: list[BaseException | None] = []
    now = [100.0]

    def factory(params: Any, **callbacks: Any) -> FakeConnection:
        made.append(FakeConnection(params, **callbacks))
        return made[-1]

    link = Link(
        AmqpConfig(url=URLS, retry_max=1.0),
        loop,
        lambda c: None,
        downs.append,
        states.append,
        lambda: None,
        factory,
        clock=lambda: now[0],
    )  # type: ignore[arg-type]
    link.connect()
    assert made[-1].params.host == "127.0.0.1" and states == [State.CONNECTING]
    made[-1].refused()
    assert downs == [None]
    link.next()  # the second URL at once
    assert made[-1].params.host == "127.0.0.2" and not loop.timers
    backoffs = []
    for _ in range(4):
        made[-1].refused()
        link.next()
        assert states[-1] is State.BACKING_OFF
        backoffs.append(loop.fire("connect"))
        made[-1].refused()
        link.next()
    assert backoffs == [0.25, 0.5, 1.0, 1.0]  # capped by amqp.retry_max
    made[-1].opened()
    assert link.open
    link.settled()
    made[-1].lost(pika.exceptions.ConnectionClosedByBroker(320, "shutdown"))
    assert not link.open and isinstance(downs[-1], pika.exceptions.ConnectionClosedByBroker)
    link.next()
    made[-1].refused()
    link.next()
    assert loop.delays("connect") == [0.25]


def test_link_reports_a_block_once_and_its_length(caplog: pytest.LogCaptureFixture) -> None:
    loop = FakeLoop()
    made: list[FakeConnection] = []
    changes: list[str | None] = []
    now = [10.0]

    def factory(params: Any, **callbacks: Any) -> FakeConnection:
        made.append(FakeConnection(params, **callbacks))
        return made[-1]

    link: Link
    link = Link(
        AmqpConfig(url=URLS[:1]),
        loop,
        lambda c: None,
        lambda r: None,
        lambda s: None,
        lambda: changes.append(link.blocked),
        factory,
        clock=lambda: now[0],
    )  # type: ignore[arg-type]
    link.connect()
    made[0].opened()
    blocked = pika.frame.Method(0, pika.spec.Connection.Blocked("low on memory"))
    with caplog.at_level(logging.INFO):
        for callback in made[0].blocked_callbacks * 2:
            callback(made[0], blocked)
        now[0] = 12.5
        for callback in made[0].unblocked_callbacks:
            callback(made[0], pika.frame.Method(0, pika.spec.Connection.Unblocked()))
    assert changes == ["low on memory", None]
    assert "The broker blocks publishing: low on memory." in caplog.text
    assert "(blocked for 2.5 s)" in caplog.text


# -- the consumer on fakes -------------------------------------------------------------------


def test_consumer_goes_connecting_consuming_and_backs_off_after_a_loss() -> None:
    rig = Rig(lambda m: None)
    assert rig.states == ["connecting"]
    channel = _open(rig)
    assert rig.states[-1] == "consuming"
    assert rig.connection.lane is not None
    helper = rig.connection.channels[1]
    assert helper.declared == [
        "ex.dead",
        "q.dead",
        "q.dead (bind)",
        "q.retry.10000",
        "q.retry.60000",
        "q.retry.300000",
    ]
    assert not helper.is_open  # closed once declared
    channel.deliver(1, b"hello")
    rig.handle()
    assert rig.connection.sent_acks == [1] and rig.consumer.handled == 1
    rig.connection.lost(pika.exceptions.ConnectionClosedByBroker(320, "shutdown"))
    assert rig.states[-1] == "connecting"  # the second URL at once
    rig.connection.refused()
    assert rig.states[-1] == "backing off"
    assert rig.consumer.snapshot()["connected"] is False
    rig.loop.fire("connect")
    _open(rig)
    assert rig.states[-1] == "consuming"
    assert rig.consumer.snapshot()["broker"] == "amqp://guest:***@127.0.0.1:5672/%2F"


def test_a_failure_is_republished_to_the_delay_queue_and_acked_on_the_confirm() -> None:
    def fail(message: Message) -> None:
        raise ValueError("smtp down")

    rig = Rig(fail, retry_delays=(1.0, 30.0))
    channel = _open(rig)
    channel.deliver(7, b"job", headers={"x-edm-attempts": 1, "x-death": [{"count": 1}], "keep": "me"})
    rig.handle()
    [(exchange, routing_key, body, properties)] = channel.published
    assert (exchange, routing_key, body) == ("", "q.retry.30000", b"job")
    assert properties.headers == {
        "keep": "me",
        "x-edm-attempts": 2,
        "x-edm-error": "ValueError: smtp down",
        "x-edm-queue": "q",
    }
    assert properties.message_id == "m-1" and properties.delivery_mode == 2
    assert channel.acks == [] and rig.consumer.retried == 0  # not before the confirm
    channel.confirm(1)
    assert channel.acks == [7] and rig.consumer.retried == 1
    assert not rig.loop.delays("_retry")  # nothing waits in the consumer


def _fail_bad(message: Message) -> None:
    if message.body.startswith(b"bad"):
        raise ValueError("smtp down")


@pytest.mark.parametrize(
    "amqp",
    [
        pytest.param({"prefetch": 1}, id="prefetch 1"),
        pytest.param({"queue_arguments": {"x-queue-type": "quorum"}}, id="quorum"),
        pytest.param({"prefetch": 5}, id="prefetch 5"),
    ],
)
def test_the_window_is_per_consumer_and_never_changes_while_confirms_are_owed(amqp: dict[str, Any]) -> None:
    # Given a consumer: one per-consumer basic.qos of its prefetch
    rig = Rig(_fail_bad, retry_delays=(1.0,), **amqp)
    channel = _open(rig)
    expected = amqp.get("prefetch", 1)
    assert channel.qos == [expected] and channel.qos_global == [False]

    # When messages fail and their copies await their confirms, one confirmed at a time
    for tag in (1, 2):
        channel.deliver(tag, b"bad %d" % tag)
    rig.handle()
    assert len(channel.published) == 2 and channel.acks == []
    channel.confirm(1)
    channel.confirm(2)

    # Then each original is acked on its confirm, and no other basic.qos was ever sent (a
    # channel-wide one would cost the broker on every delivery)
    assert channel.acks == [1, 2]
    assert channel.qos == [expected] and channel.qos_global == [False]


def test_a_stop_waits_for_the_confirm_of_a_dead_letter() -> None:
    def reject(message: Message) -> None:
        raise Reject("bad address")

    rig = Rig(reject)
    channel = _open(rig)
    channel.deliver(3, b"job")
    rig.handle()
    [(exchange, routing_key, _body, properties)] = channel.published
    assert (exchange, routing_key) == ("ex.dead", "rk")
    assert properties.headers["x-edm-attempts"] == 1
    rig.consumer.stop()
    assert rig.states[-1] == "draining" and rig.connection.is_open  # the confirm is owed
    channel.confirm(1)
    assert channel.acks == [3] and rig.consumer.dead == 1
    assert rig.consumer.snapshot()["rejected"] == 1
    assert rig.states[-1] == "stopped"


def test_helper_queues_that_cannot_be_declared_send_the_message_round_its_queue() -> None:
    def fail(message: Message) -> None:
        raise ValueError("boom")

    rig = Rig(fail, refuse={"q.dead"})
    channel = _open(rig)
    assert rig.states[-1] == "consuming"  # the main queue does not suffer
    channel.deliver(5, b"job")
    rig.handle()
    assert channel.published == []  # waits, unacked, then goes back: no loop of declarations
    rig.loop.fire("flush")
    [(exchange, routing_key, _body, properties)] = channel.published
    assert (exchange, routing_key) == ("", "q")
    assert "x-edm-attempts" not in properties.headers  # the attempt that could not settle is not counted
    channel.confirm(1)
    assert channel.acks == [5]


def test_a_log_that_cannot_be_written_holds_deliveries_off_until_a_probe_works() -> None:
    full = [True]

    def write(_level: str, _text: str) -> None:
        if full[0]:
            raise OSError(28, "No space left on device")

    def handler(message: Message) -> None:
        if full[0]:
            raise LogWriteError("/logs/edm.log", OSError(28, "No space left on device"), _probe_write)

    def _probe_write(level: str, text: str) -> None:
        try:
            write(level, text)
        except OSError as exc:
            raise LogWriteError("/logs/edm.log", exc, _probe_write) from None

    rig = Rig(handler, retry_max=1.0)
    channel = _open(rig)
    channel.deliver(1, b"a")
    channel.deliver(2, b"b")
    rig.handle()
    assert channel.nacks == [1, 2] and channel.cancelled  # both back to the queue, no more taken
    assert channel.published == [] and rig.consumer.handled == 0
    assert rig.states[-1] == "log write failing: /logs/edm.log: No space left on device"
    assert rig.loop.fire("_probe") == 0.25
    assert rig.loop.delays("_probe") == [0.5]  # still full: the next probe later
    full[0] = False
    rig.loop.fire("_probe")
    assert not channel.cancelled and rig.states[-1] == "consuming"


def test_a_copy_the_broker_cannot_route_leaves_its_original_in_the_queue(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def fail(message: Message) -> None:
        raise ValueError("boom")

    rig = Rig(fail, retry_delays=(1.0,))
    channel = _open(rig)
    channel.deliver(4, b"job")
    rig.handle()
    # When the delay queue was deleted behind edm's back: the copy comes back, then its confirm
    with caplog.at_level(logging.ERROR):
        channel.give_back("q.retry.1000", b"job")
    channel.confirm(1)
    # Then the original is not acked but requeued, and the helper queues are declared again
    assert channel.acks == [] and channel.nacks == [4] and rig.consumer.retried == 0
    assert "could not route a message to q.retry.1000 (NO_ROUTE)" in caplog.text
    channel.deliver(5, b"job")
    rig.handle()
    assert len(rig.connection.channels) == 3  # a new helper channel declared them again
    channel.confirm(2)
    assert channel.acks == [5]


def test_handler_threads_run_messages_side_by_side_and_ack_on_the_io_thread() -> None:
    # Given four handler threads whose handler waits for the test
    gate = threading.Event()
    started = threading.Semaphore(0)
    threads_seen: set[str] = set()

    def handler(message: Message) -> None:
        threads_seen.add(threading.current_thread().name)
        started.release()
        assert gate.wait(5)
        if message.body == b"bad":
            raise ValueError("boom")

    rig = Rig(handler, threads=4, prefetch=1, retry_delays=(1.0,))
    channel = _open(rig)
    pool = rig.consumer._pool
    assert pool is not None
    pool.start()
    try:
        # When four messages arrive
        for tag, body in enumerate([b"a", b"b", b"bad", b"c"], start=1):
            channel.deliver(tag, body)
        rig.consumer._running = True
        rig.consumer._flow.dispatch()
        # Then all four run at once, each in its own thread, nothing acked meanwhile
        for _ in range(4):
            assert started.acquire(timeout=5)
        assert pool.busy == 4 and len(threads_seen) == 4
        assert rig.consumer.snapshot()["busy"] == 4 and rig.consumer.snapshot()["threads"] == 4
        assert rig.connection.sent_acks == []
        gate.set()
        rig.loop.run_callbacks(4)
        # the good ones acked from the I/O thread, the bad one republished to its delay queue
        assert sorted(rig.connection.sent_acks) == [1, 2, 4] and rig.consumer.handled == 3
        [(_, routing_key, body, _)] = channel.published
        assert (routing_key, body) == ("q.retry.1000", b"bad")
        assert pool.in_hand == 0
        # When stopped, it waits for the retry's confirm, then stops (the threads too)
        rig.consumer.stop()
        assert rig.states[-1] == "draining"
        channel.confirm(1)
        assert rig.states[-1] == "stopped"
        assert not any(t.is_alive() for t in pool._threads)
    finally:
        gate.set()
        pool.stop()


def test_the_prefetch_is_at_least_the_number_of_threads() -> None:
    assert _open(Rig(lambda m: None, threads=8, prefetch=2)).prefetch == 8
    assert _open(Rig(lambda m: None, threads=2, prefetch=5)).prefetch == 5


def test_the_first_consume_waits_for_the_helper_queues_but_not_for_long() -> None:
    for helpers_answer in (True, False):
        rig = Rig(lambda m: None)
        rig.connection.hold_channels = True
        rig.connection.opened()
        rig.connection.held.pop(0)()  # the main channel opens: it asks for the helper channel,
        # declares the main queue and sets the qos, then waits for the helper queues
        [helpers_open] = rig.connection.held
        assert rig.states[-1] == "connecting" and rig.connection.lane is None
        if helpers_answer:
            helpers_open()  # declared: consuming starts at once
        else:
            assert rig.loop.fire("_start_consuming") == 2.0  # they hang: consume anyway
        assert rig.states[-1] == "consuming" and rig.connection.lane is not None
