"""The fee receiver's cap on peers (at most MAX_PEERS TCP connections at once), and the log
line for a peer whose handshake libzmq refused.

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
import logging
import os
import socket
import threading
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
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            return  # gone already
        try:
            if sock.type != socket.SOCK_STREAM or sock.getsockname()[1] != self._port:
                return  # not the connection accepted: libzmq closed it, the number was reused
            self.shed += 1
            self._shedding.add(fd)
            sock.shutdown(socket.SHUT_RDWR)
        except OSError as exc:
            if exc.errno not in (errno.ENOTCONN, errno.EBADF, errno.ENOTSOCK):
                raise
            return
        finally:
            sock.close()
        if not self._warned:
            self._warned = True
            log.warning(
                "The fee receiver has %d peers, its most; refusing more connections until some "
                "leave (logged once).",
                self._limit,
            )


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
