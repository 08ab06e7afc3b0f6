"""The fee receiver's cap on peers (at most MAX_PEERS TCP connections at once), the drop of
a peer that misbehaves (a message over the frame cap, an unfinished message past its bound:
see ``guard_messages``), and the log line for a peer whose handshake libzmq refused.

libzmq has no such option for a ROUTER, but its socket monitor reports each connection it
accepts and each it loses, with the file descriptor. A thread reads those events; an
accepted connection beyond the cap is shut down (``shutdown(2)`` on a duplicate of the
descriptor: libzmq sees the peer hang up and closes and forgets it as after any hang-up).
The connection is checked to be a TCP socket of the bound port first, so that a descriptor
number libzmq has closed and the process reused meanwhile is never touched. The shed peer
has sent at most its greeting: nothing of it was buffered. The monitor drops events when
its queue is full, so at the cap the connections counted are checked first (does the
descriptor still hold the same peer?), and those gone without a report give their place back.

libzmq reports a failed handshake (with CURVE on: a client without CURVE) without the peer,
but then the loss of the connection with its descriptor; the peer's address, taken when the
connection was accepted, is logged once at WARNING (a CURVE key that is not allowed is
logged by fee_auth, by its key). A ZeroMQ client without CURVE and the server each see the
other's mechanism in the greeting: when the server reads it first, libzmq reports a protocol
error (and the client connects again); when the client does, it hangs up for good and libzmq
reports only a handshake failed "without detail" (the errno of the hang-up). With CURVE on
both are a refused client, or the client would go unlogged; without CURVE a hang-up during
the greeting is a peer that left (a port probe), nothing refused. The address is read when
this thread hears of the connection: a peer gone by then (on a fast link, often) is logged
as "?", once.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct
import termios
import threading
from collections.abc import Callable
from typing import Any

import zmq
import zmq.utils.monitor

log = logging.getLogger(__name__)

_EVENTS = (
    int(zmq.EVENT_ACCEPTED)
    | int(zmq.EVENT_DISCONNECTED)
    | int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
    | int(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
    | int(zmq.EVENT_MONITOR_STOPPED)
)
MAX_WARNED = 10_000  # addresses remembered as logged
CHECK_INTERVAL = 0.05  # seconds between two looks at the bytes read from each connection
CHECK_COST = 10e-6  # seconds a look at one connection takes (measured: 9 µs)
# struct tcp_info (linux/tcp.h): 8 one-byte fields, 24 u32 (rto ... total_retrans), then the
# u64 pacing_rate, max_pacing_rate, bytes_acked and bytes_received.
_BYTES_RECEIVED = 8 + 24 * 4 + 3 * 8
_TCP_INFO_SIZE = 256


class PeerCap:
    """Watches ``router`` (bound to a tcp:// endpoint on ``port``) and sheds connections beyond ``limit``."""

    def __init__(self, router: Any, port: int, limit: int, curve: bool = False) -> None:
        self._port = port
        self._limit = limit
        self._curve = curve
        self._live: dict[int, tuple[str, int] | None] = {}  # descriptor -> the peer's (address, port)
        self._failed: tuple[int, int] | None = None  # the event and value of a handshake that just failed
        self._warned_addresses: set[str] = set()
        self._shedding: set[int] = set()  # descriptors shut by _shed whose end is not reported yet
        self.shed = 0
        self.failed_handshakes = 0
        self._warned = False
        self.dropped = 0  # connections dropped by drop()
        self._warned_drops: set[str] = set()
        self.done: dict[int, int] = {}  # descriptor -> whole messages the receiver took of it
        self.max_unfinished = 0  # set by guard_messages()
        self._guarding = True
        self._monitor = router.get_monitor_socket(_EVENTS)
        self._thread = threading.Thread(target=self._watch, name="fee-peer-cap", daemon=True)
        self._thread.start()

    @property
    def peers(self) -> int:
        return len(self._live)

    def _watch(self) -> None:
        try:
            while True:
                event = zmq.utils.monitor.recv_monitor_message(self._monitor)
                kind, fd = int(event["event"]), int(event["value"])
                if kind == zmq.EVENT_MONITOR_STOPPED:
                    return
                if kind in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                    # not a descriptor here: the ZMTP error code, or the errno of a hang-up
                    if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL or self._curve:
                        self._failed = (kind, fd)
                elif kind == zmq.EVENT_DISCONNECTED:
                    peer = self._live.pop(fd, None)
                    failed, self._failed = self._failed, None
                    if fd in self._shedding:  # shut by us in its handshake: no refusal of libzmq
                        self._shedding.discard(fd)
                    elif failed is not None:
                        self.failed_handshakes += 1
                        self._refused(peer[0] if peer else "?", *failed)
                else:
                    self._shedding.discard(fd)  # (its end went unreported: the number is reused)
                    if len(self._live) >= self._limit:
                        self._prune()
                    if len(self._live) < self._limit:
                        self._live[fd] = _peer(fd, self._port)
                    else:
                        self._shed(fd)
        except zmq.ZMQError as exc:
            if exc.errno not in (zmq.ETERM, zmq.ENOTSOCK):
                log.error("The fee receiver's peer cap stopped: %s", exc)
        finally:
            self._monitor.close(0)

    def _prune(self) -> None:
        """Forget connections that are gone without a report (the monitor drops events when
        its queue is full): a descriptor that no longer holds the same peer."""
        for fd, peer in list(self._live.items()):
            if peer is None or _peer(fd, self._port) != peer:
                del self._live[fd]

    def _refused(self, address: str, kind: int, value: int) -> None:
        if address in self._warned_addresses or len(self._warned_addresses) >= MAX_WARNED:
            return
        self._warned_addresses.add(address)
        what = "a client without CURVE, or not ZeroMQ at all" if self._curve else "not a ZeroMQ client"
        if kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            detail = f"it hung up at the greeting: {os.strerror(value)}"
        else:
            detail = f"ZMTP error 0x{value:08x}"
        log.warning(
            "Refused a fee client at %s at the handshake (%s; %s); further refusals of this "
            "address are not logged.",
            address,
            what,
            detail,
        )

    def _shed(self, fd: int) -> None:
        if _shutdown(fd, self._port, lambda: self._count_shed(fd)) is None:
            return  # gone already, or the number was reused for something else
        if not self._warned:
            self._warned = True
            log.warning(
                "The fee receiver has %d peers, its most; refusing more connections until some "
                "leave (logged once).",
                self._limit,
            )

    def _count_shed(self, fd: int) -> None:
        self.shed += 1
        self._shedding.add(fd)

    # -- dropping a connection that misbehaves -------------------------------------------

    def drop(self, fd: int, reason: str) -> bool:
        """Shut down the connection ``fd`` holds (a TCP connection of our port), log it once
        per address at WARNING; whether it was shut. libzmq then discards what it had not yet
        handed over of that peer, except the messages already whole in its queue."""
        peer = _shutdown(fd, self._port, self._count_drop, reset=True)
        if peer is None:
            return False
        address = peer[0]
        if address not in self._warned_drops and len(self._warned_drops) < MAX_WARNED:
            self._warned_drops.add(address)
            log.warning(
                "Dropped the fee client at %s:%d: %s; further drops of this address are not logged.",
                address,
                peer[1],
                reason,
            )
        return True

    def _count_drop(self) -> None:
        self.dropped += 1

    def guard_messages(self, limit: int, interval: float = CHECK_INTERVAL) -> None:
        """Start the watch on unfinished messages: every ``interval`` seconds, a connection from
        which libzmq has read more than ``limit`` bytes since the receiver last took a
        whole message of it (``done``, bumped by the receiver per descriptor) is dropped.
        Only with the message's descriptor known to the receiver (ZMQ_SRCFD)."""
        self.max_unfinished = limit
        self._guard = threading.Thread(
            target=self._guard_loop, args=(interval,), name="fee-message-guard", daemon=True
        )
        self._guard.start()

    def stop_guard(self) -> None:
        self._guarding = False

    def _guard_loop(self, interval: float) -> None:
        seen: dict[int, tuple[tuple[str, int] | None, int, int]] = {}  # fd -> (peer, done, mark)
        live: dict[int, tuple[str, int] | None] = {}
        while self._guarding:
            # A look costs ~9 µs a connection: with many, look less often (2 % of a core at
            # most; 0.5 s between looks at MAX_PEERS). What libzmq reads between two looks is
            # shared among the connections: one I/O thread reads them all.
            self._thread.join(max(interval, len(live) * CHECK_COST * 50))
            if not self._thread.is_alive():
                return  # the socket is closed
            live = self._live.copy()
            for fd in [fd for fd in seen if fd not in live]:
                del seen[fd]
            for fd, peer in live.items():
                taken = _taken(fd)
                if taken is None:
                    continue
                done = self.done.get(fd, 0)
                last = seen.get(fd)
                if last is None or last[0] != peer:
                    seen[fd] = (peer, done, 0)  # a new connection: counted from its first byte
                elif last[1] != done:
                    seen[fd] = (peer, done, taken)  # a whole message taken since: start again here
                elif taken - last[2] > self.max_unfinished:
                    del seen[fd]
                    self.drop(
                        fd,
                        f"{taken - last[2]:,} bytes without finishing a message "
                        f"(at most {self.max_unfinished:,})",
                    )


def _shutdown(fd: int, port: int, count: Callable[[], None], reset: bool = False) -> tuple[str, int] | None:
    """``shutdown(2)`` the TCP connection accepted on ``port`` that ``fd`` holds (on a duplicate
    of the descriptor: libzmq sees the peer hang up and closes and forgets it as after any
    hang-up); the peer's (address, port), or None when ``fd`` holds no such connection any
    more (libzmq closed it, and the number may have been reused). With ``reset``, libzmq's
    close then resets the connection (SO_LINGER 0): the kernel drops what the peer still has
    in flight at once, and the peer learns it at its next send. ``count`` is called just
    before the shutdown (so the count is right as soon as the peer sees it)."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None  # gone already
    try:
        if sock.type != socket.SOCK_STREAM or sock.getsockname()[1] != port:
            return None
        try:
            address = sock.getpeername()
        except OSError:
            address = ("?", 0)  # reset by the peer already: shut it all the same
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        count()
        sock.shutdown(socket.SHUT_RDWR)
        return str(address[0]), int(address[1])
    except OSError as exc:
        if exc.errno not in (errno.ENOTCONN, errno.EBADF, errno.ENOTSOCK):
            raise
        return None
    finally:
        sock.close()


def _taken(fd: int) -> int | None:
    """How many bytes libzmq has read from the connection ``fd`` holds: what the kernel has
    received on it (``tcpi_bytes_received`` of TCP_INFO, Linux 4.1 and later) less what still
    waits in its receive queue (FIONREAD). None when unknown."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
        if len(info) < _BYTES_RECEIVED + 8:
            return None  # a kernel older than 4.1
        (received,) = struct.unpack_from("=Q", info, _BYTES_RECEIVED)
        (queued,) = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))
        return int(received) - int(queued)
    except OSError:
        return None
    finally:
        sock.close()


def _peer(fd: int, port: int) -> tuple[str, int] | None:
    """The remote (address, port) of the connection accepted on ``port`` that ``fd`` holds;
    None when it holds none (closed, or reused for something else)."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    try:
        if sock.type != socket.SOCK_STREAM or sock.getsockname()[1] != port:
            return None
        address = sock.getpeername()
        return str(address[0]), int(address[1])
    except OSError:
        return None
    finally:
        sock.close()
