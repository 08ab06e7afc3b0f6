"""FlushingIOLoop: pika's queued frames leave at flush(), without another turn of the loop."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from pika.adapters.select_connection import IOLoop
from pika.adapters.utils.selector_ioloop_adapter import SelectorIOServicesAdapter

from edm.amqp.ioloop import FlushingIOLoop

Pair = tuple[socket.socket, socket.socket]


@pytest.fixture
def pair() -> Iterator[Pair]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.settimeout(5)
    yield a, b
    a.close()
    b.close()


def test_flush_runs_the_writer_pika_turned_on_and_nothing_else(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Through pika's own adapter (what its transports call): a writer set with set_writer
    runs at flush(); once pika removes it, flush() calls nothing."""
    ours, theirs = pair
    loop = FlushingIOLoop()
    nbio = SelectorIOServicesAdapter(loop)
    written: list[int] = []
    reads: list[int] = []
    nbio.set_reader(ours.fileno(), lambda: reads.append(1))
    loop.flush()
    assert written == [] and reads == []  # a reader alone is never called by flush()

    def on_writable() -> None:
        written.append(ours.send(b"ack"))
        nbio.remove_writer(ours.fileno())  # what pika's transport does once its buffer is empty

    nbio.set_writer(ours.fileno(), on_writable)
    loop.flush()
    assert written == [3] and theirs.recv(16) == b"ack"
    loop.flush()
    assert written == [3] and reads == []  # the writer is off again: nothing more to send
    nbio.remove_reader(ours.fileno())
    loop.close()


def test_a_writer_that_cannot_send_stays_on_for_the_next_poll(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """If the socket cannot take the data, the writer stays registered and poll() runs it."""
    ours, theirs = pair
    loop = FlushingIOLoop()
    nbio = SelectorIOServicesAdapter(loop)
    calls: list[str] = []
    nbio.set_reader(ours.fileno(), lambda: None)  # connected: pika reads it too

    def on_writable() -> None:
        calls.append("write")
        if len(calls) > 1:  # the second time, as if the socket had room again
            ours.send(b"late")
            nbio.remove_writer(ours.fileno())

    nbio.set_writer(ours.fileno(), on_writable)
    loop.flush()
    assert calls == ["write"]  # ran once, kept its handler
    loop.activate_poller()
    loop.poll()
    assert calls == ["write", "write"] and theirs.recv(16) == b"late"
    nbio.remove_reader(ours.fileno())
    loop.deactivate_poller()
    loop.close()


def test_a_socket_that_is_still_connecting_is_left_to_poll(pair: Pair) -> None:
    """pika watches a connecting socket for writability alone; flush() must not call that
    handler, or pika would take the socket for connected before it is."""
    ours, _ = pair
    loop = FlushingIOLoop()
    nbio = SelectorIOServicesAdapter(loop)
    calls: list[str] = []
    nbio.set_writer(ours.fileno(), lambda: calls.append("connected?"))
    loop.flush()
    assert calls == []
    loop.activate_poller()
    loop.poll()  # the poller still watches it: a real writability event calls it
    assert calls == ["connected?"]
    nbio.remove_writer(ours.fileno())
    loop.deactivate_poller()
    loop.close()


def test_a_write_handler_turned_on_and_off_by_flush_never_reaches_the_poller(pair: Pair) -> None:
    """The ack's round trip costs no epoll_ctl: the poller only ever watches for reading."""
    ours, theirs = pair
    loop = FlushingIOLoop()
    nbio = SelectorIOServicesAdapter(loop)
    watched: list[int] = []
    real_update = IOLoop.update_handler

    def spy(self: IOLoop, fd: int, events: int) -> None:
        watched.append(events)
        real_update(self, fd, events)

    nbio.set_reader(ours.fileno(), lambda: None)

    def on_writable() -> None:
        ours.send(b"ack")
        nbio.remove_writer(ours.fileno())

    IOLoop.update_handler = spy  # type: ignore[method-assign]
    try:
        for _ in range(3):
            nbio.set_writer(ours.fileno(), on_writable)
            loop.flush()
    finally:
        IOLoop.update_handler = real_update  # type: ignore[method-assign]
    assert theirs.recv(16) == b"ackackack"
    assert watched == []
    nbio.remove_reader(ours.fileno())
    loop.close()


def test_a_reader_takes_read_events_first_and_hands_on_what_it_refuses(pair: Pair) -> None:
    """set_reader: the reader sees each read event first; False passes it to pika's handler;
    once pika removes the fd's handler the reader is gone too (a new socket may get the fd)."""
    ours, theirs = pair
    loop = FlushingIOLoop()
    nbio = SelectorIOServicesAdapter(loop)
    handled: list[bytes] = []
    taken: list[bytes] = []
    refuse = [False]

    asked = [0]

    def reader() -> bool:
        asked[0] += 1
        if refuse[0]:
            return False
        taken.append(ours.recv(16))
        return True

    nbio.set_reader(ours.fileno(), lambda: handled.append(ours.recv(16)))
    loop.activate_poller()
    try:
        loop.set_reader(ours.fileno(), reader)
        theirs.sendall(b"one")
        loop.poll()
        assert (taken, handled) == ([b"one"], [])

        refuse[0] = True
        theirs.sendall(b"two")
        loop.poll()
        assert (taken, handled) == ([b"one"], [b"two"])
        assert asked == [2]  # once per event, refused or not

        refuse[0] = False
        nbio.remove_reader(ours.fileno())
        nbio.set_reader(ours.fileno(), lambda: handled.append(ours.recv(16)))
        theirs.sendall(b"three")
        loop.poll()
        assert (taken, handled) == ([b"one"], [b"two", b"three"])
    finally:
        nbio.remove_reader(ours.fileno())
        loop.deactivate_poller()
        loop.close()


def test_events_of_several_sockets_in_one_poll_all_reach_their_handlers(pair: Pair) -> None:
    """The reader's shortcut is for one event alone; with more, each goes where pika sends it."""
    ours, theirs = pair
    other, other_peer = socket.socketpair()
    other.setblocking(False)
    loop = FlushingIOLoop()
    nbio = SelectorIOServicesAdapter(loop)
    got: list[tuple[str, bytes]] = []

    def reader() -> bool:
        got.append(("reader", ours.recv(16)))
        return True

    nbio.set_reader(ours.fileno(), lambda: got.append(("pika", ours.recv(16))))
    nbio.set_reader(other.fileno(), lambda: got.append(("other", other.recv(16))))
    loop.activate_poller()
    try:
        loop.set_reader(ours.fileno(), reader)
        theirs.sendall(b"a")
        other_peer.sendall(b"b")
        loop.poll()
        assert sorted(got) == [("other", b"b"), ("reader", b"a")]
    finally:
        nbio.remove_reader(ours.fileno())
        nbio.remove_reader(other.fileno())
        loop.deactivate_poller()
        loop.close()
        other.close()
        other_peer.close()
