"""Every private attribute of pika edm touches, behind public names, and the check that they exist.

The consumer's fast lane (``edm.amqp.fastlane``) and the flushing I/O loop
(``edm.amqp.ioloop``) need a few of pika's internals: the connection's entry for received
data, its frame buffer, its transport's socket and read limits, the poller's own wait and
dispatch. They are reached here only, through ``ConnectionHooks`` and ``IOLoopHooks``, so
that a pika release that renames one breaks this module's check, not a message in flight.

At import ``MISSING`` lists what this pika lacks of ``PRIVATES`` (see ``edm.internals``:
read targets must exist; what edm assigns or overrides must also still be read by pika).
``fast_path()`` is then False and says once, in a WARNING naming what is missing, that the
consumer runs on pika's plain ``SelectConnection`` and ``IOLoop``. ``pyproject.toml`` pins
the pika versions this was checked against.
"""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import Sequence
from typing import Any

import pika
from pika.adapters.base_connection import BaseConnection
from pika.adapters.select_connection import EPollPoller, IOLoop, PollPoller, SelectConnection
from pika.adapters.utils import io_services_utils
from pika.connection import Connection
from pika.heartbeat import HeartbeatChecker

from edm.internals import Private, missing

log = logging.getLogger(__name__)

_POLL_POLLERS = frozenset({PollPoller, EPollPoller})  # the pollers with a ``_poll`` object

# Looked up, not imported: a release without them must not fail edm's import.
_TransportBase: Any = getattr(io_services_utils, "_AsyncTransportBase", None)
_PlainTransport: Any = getattr(io_services_utils, "_AsyncPlaintextTransport", None)


def _privates() -> list[Private]:
    privates = [
        # pika's transport hands received data to this method: the lane overrides it
        Private(Connection, "_on_data_available", read_by=(BaseConnection,)),
        # the lane takes frames from the head of the buffer and leaves the rest in it
        Private(Connection, "_frame_buffer", read_by=(Connection,)),
        Private(Connection, "_output_marshaled_frames"),
        # the lane counts what it takes, as pika does: the heartbeat checker reads it
        Private(Connection, "bytes_received", read_by=(HeartbeatChecker,)),
        Private(BaseConnection, "_transport"),
        # the flushing loop's shortcut for a poll that returns one event
        Private(IOLoop, "_poller"),
        Private(PollPoller, "_poll"),
        Private(PollPoller, "_get_max_wait"),
        Private(PollPoller, "_dispatch_fd_events"),
    ]
    if _TransportBase is not None:
        privates += [
            Private(_TransportBase, "_sock"),
            Private(_TransportBase, "_initiate_abort"),
            Private(_TransportBase, "get_write_buffer_size"),
            # set by the lane on its transport: one large recv per readable event
            Private(_TransportBase, "_MAX_RECV_BYTES", read_by=(_TransportBase,)),
            Private(_TransportBase, "_MAX_CONSUME_BYTES", read_by=(_TransportBase,)),
        ]
    return privates


def _check() -> tuple[str, ...]:
    classes = {"_AsyncTransportBase": _TransportBase, "_AsyncPlaintextTransport": _PlainTransport}
    problems = [
        f"pika.adapters.utils.io_services_utils.{name} (gone)" for name, c in classes.items() if c is None
    ]
    return (*problems, *missing(_privates()))


MISSING: tuple[str, ...] = _check()


@functools.cache
def fast_path() -> bool:
    """Whether this pika has every internal the fast path uses; the first call that finds it
    has not logs the one WARNING that says what is missing."""
    if MISSING:
        log.warning(
            "pika %s lacks what edm's fast lane relies on (%s); the consumer uses pika's plain "
            "SelectConnection and IOLoop instead (slower, otherwise the same; amqp.fast_lane: false "
            "chooses that without this warning).",
            pika.__version__,
            "; ".join(MISSING),
        )
    return not MISSING


class ConnectionHooks(SelectConnection):  # type: ignore[misc]  # pika has no type hints for mypy
    """pika's SelectConnection with the internals the fast lane needs behind public names.

    Received data goes to ``on_data()``; a subclass that takes some of it itself hands the
    rest to pika with ``pika_received()``."""

    def _on_data_available(self, data_in: bytes) -> None:
        self.on_data(data_in)

    def on_data(self, data: bytes) -> None:
        """Data from the broker, in order; by default all of it goes to pika's decoder."""
        SelectConnection._on_data_available(self, data)

    def pika_received(self, data: bytes) -> None:
        """Hand data to pika's decoder, behind what its frame buffer holds already."""
        SelectConnection._on_data_available(self, data)

    @property
    def frame_buffer(self) -> bytes:
        """Received bytes pika has not decoded yet."""
        buffered: bytes = self._frame_buffer
        return buffered

    @frame_buffer.setter
    def frame_buffer(self, data: bytes) -> None:
        self._frame_buffer = data

    def plain_socket(self) -> socket.socket | None:
        """The socket of a plain TCP connection (not TLS), while there is one."""
        transport = self._transport
        if type(transport) is not _PlainTransport:
            return None
        sock: socket.socket | None = transport._sock
        return sock

    def read_in_chunks_of(self, size: int) -> None:
        """Let pika's transport read ``size`` bytes per recv, one recv per readable event."""
        transport = self._transport
        if transport is not None:
            transport._MAX_RECV_BYTES = size
            transport._MAX_CONSUME_BYTES = 1

    def idle_socket(self) -> socket.socket | None:
        """The socket of a plain TCP connection with no output queued in pika's transport: a
        frame sent on it now keeps the order of frames."""
        transport = self._transport
        if type(transport) is not _PlainTransport or transport.get_write_buffer_size():
            return None
        sock: socket.socket | None = transport._sock
        return sock

    def abort_connection(self, error: BaseException) -> None:
        """End the connection as pika's transport does on an error of its own."""
        self._transport._initiate_abort(error)

    def send_frames(self, frames: Sequence[bytes]) -> None:
        """Queue marshalled frames on pika's output path (it counts them)."""
        self._output_marshaled_frames(frames)


class IOLoopHooks(IOLoop):  # type: ignore[misc]  # pika has no type hints for mypy
    """pika's IOLoop with its poller's wait and dispatch behind public names."""

    def poll_events(self) -> list[tuple[int, int]] | None:
        """One wait of pika's poll/epoll poller: the (fd, events) it reports; None where the
        poller is of another kind or not active (``IOLoop.poll()`` does the job then)."""
        poller = self._poller
        # the exact types: isinstance with pika's abstract poller base costs an ABC check a wait
        if type(poller) not in _POLL_POLLERS or poller._poll is None:
            return None
        events: list[tuple[int, int]] = poller._poll.poll(poller._get_max_wait())
        return events

    def dispatch_events(self, fd_events: dict[int, int]) -> None:
        """Run the handlers of the events, as pika's poller does after its wait."""
        self._poller._dispatch_fd_events(fd_events)
