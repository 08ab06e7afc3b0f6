"""FlushingIOLoop: pika's queued frames leave at flush(), without another turn of the loop."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from pika.adapters.utils.selector_ioloop_adapter import SelectorIOServicesAdapter

from edm.ioloop import FlushingIOLoop

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
    loop.deactivate_poller()
    loop.close()
