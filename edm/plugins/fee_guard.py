"""The fee receiver's cap on peers: at most MAX_PEERS TCP connections at once.

libzmq has no such option for a ROUTER, but its socket monitor reports each connection it
accepts and each it loses, with the file descriptor. A thread reads those events; an
accepted connection beyond the cap is shut down (``shutdown(2)`` on a duplicate of the
descriptor: libzmq sees the peer hang up and closes and forgets it as after any hang-up).
The connection is checked to be a TCP socket of the bound port first, so that a descriptor
number libzmq has closed and the process reused meanwhile is never touched. The shed peer
has sent at most its greeting: nothing of it was buffered.
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

_EVENTS = int(zmq.EVENT_ACCEPTED) | int(zmq.EVENT_DISCONNECTED) | int(zmq.EVENT_MONITOR_STOPPED)


class PeerCap:
    """Watches ``router`` (bound to a tcp:// endpoint on ``port``) and sheds connections beyond ``limit``."""

    def __init__(self, router: Any, port: int, limit: int) -> None:
        self._port = port
        self._limit = limit
        self._live: set[int] = set()
        self.shed = 0
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
                if kind == zmq.EVENT_DISCONNECTED:
                    self._live.discard(fd)
                elif len(self._live) < self._limit:
                    self._live.add(fd)
                else:
                    self._shed(fd)
        except zmq.ZMQError as exc:
            if exc.errno not in (zmq.ETERM, zmq.ENOTSOCK):
                log.error("The fee receiver's peer cap stopped: %s", exc)
        finally:
            self._monitor.close(0)

    def _shed(self, fd: int) -> None:
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            return  # gone already
        try:
            if sock.type != socket.SOCK_STREAM or sock.getsockname()[1] != self._port:
                return  # not the connection accepted: libzmq closed it, the number was reused
            self.shed += 1
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
