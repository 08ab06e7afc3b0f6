"""Test helpers: a TCP proxy the test can cut and restore, or stall and resume, and a ZeroMQ
REQ client."""

from __future__ import annotations

import re
import select
import socket
import subprocess
import threading
from collections.abc import Sequence

import zmq


class TcpProxy:
    """Forward 127.0.0.1:<port> to a target; ``cut()`` drops every connection and refuses new
    ones (accepted, then closed at once) until ``restore()``. ``stall()`` stops forwarding in
    both directions, on every connection and on new ones, without closing or resetting
    anything (a partition that drops packets, a stalled server) until ``resume()``."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port = int(self._listener.getsockname()[1])
        self._cut = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._threads: list[threading.Thread] = []
        self._turn = threading.Condition()  # guards the three below
        self._stalled = False
        self._pumps = 0  # pumps running
        self._parked = 0  # pumps waiting for resume()
        self._acceptor = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._cut.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, upstream))
                for src, dst in ((client, upstream), (upstream, client)):
                    t = threading.Thread(target=self._pump, args=(src, dst), daemon=True)
                    self._threads.append(t)
                    with self._turn:
                        self._pumps += 1
                    t.start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                with self._turn:
                    if self._stalled:
                        self._parked += 1
                        self._turn.notify_all()
                        while self._stalled and not self._closed.is_set():
                            self._turn.wait(0.05)
                        self._parked -= 1
                # Only look for data between checks of the stall: nothing passes once parked.
                if not select.select([src], [], [], 0.05)[0]:
                    continue
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except (OSError, ValueError):  # ValueError: select() on a socket closed by cut()
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            with self._turn:
                self._pumps -= 1
                self._turn.notify_all()

    def cut(self) -> None:
        self._cut.set()
        self._drop_all()

    def restore(self) -> None:
        self._cut.clear()

    def stall(self) -> None:
        """Stop forwarding; returns once no byte moves any more (a chunk being forwarded when
        it is called still arrives)."""
        with self._turn:
            self._stalled = True
            if not self._turn.wait_for(lambda: self._parked >= self._pumps, timeout=10):
                raise RuntimeError("the proxy could not stall every connection")

    def resume(self) -> None:
        """Forward again what waited and what comes."""
        with self._turn:
            self._stalled = False
            self._turn.notify_all()

    def client_closed(self, upstream_port: int) -> bool:
        """Whether the client of the connection whose upstream side has local port
        ``upstream_port`` has closed it (seen without reading what it may have sent)."""
        with self._lock:
            clients = [
                c for c, up in self._pairs if up.fileno() >= 0 and up.getsockname()[1] == upstream_port
            ]
        if not clients:
            raise LookupError(f"no connection with upstream port {upstream_port}")
        try:
            return clients[0].recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False  # open, nothing to read
        except OSError:
            return True  # reset

    def _drop_all(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self._closed.set()
        self._acceptor.join(5)
        self._listener.close()
        self._drop_all()
        with self._lock:
            threads, self._threads = self._threads, []
        for t in threads:
            t.join(5)


class Client:
    """A REQ socket with timeouts, so a bug fails the test instead of hanging it."""

    def __init__(
        self, context: zmq.Context[zmq.Socket[bytes]], endpoint: str, timeout_ms: int = 15000
    ) -> None:
        self.socket = context.socket(zmq.REQ)
        self.socket.setsockopt(zmq.RCVTIMEO, timeout_ms)
        self.socket.setsockopt(zmq.SNDTIMEO, timeout_ms)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)

    def ask(self, body: bytes | Sequence[bytes]) -> bytes:
        if isinstance(body, bytes):
            self.socket.send(body)
        else:
            self.socket.send_multipart(list(body))
        return self.socket.recv()

    def close(self) -> None:
        self.socket.close(0)


class RawZmtp:
    """A plain TCP peer speaking just enough ZMTP 3.0 (NULL mechanism) to send frames by hand,
    including ones no libzmq socket would send."""

    def __init__(self, port: int, handshake: bool = True, socket_type: bytes = b"DEALER") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        if handshake:
            self.sock.sendall(
                b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" * 32
            )
            body = b"\x05READY" + b"\x0bSocket-Type" + len(socket_type).to_bytes(4, "big") + socket_type
            self.sock.sendall(b"\x04" + bytes([len(body)]) + body)

    def wait_ready(self) -> None:
        """Read the server's greeting and READY: libzmq takes what comes before it sent its
        READY for a handshake command, and refuses a data frame there."""
        data = b""
        while len(data) < 66 or len(data) < 66 + data[65]:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("the server closed the connection in the handshake")
            data += chunk

    def header(self, size: int, more: bool = False) -> None:
        """A frame header announcing ``size`` bytes (the body is up to the caller)."""
        self.sock.sendall(bytes([0x02 | more]) + size.to_bytes(8, "big"))

    def frame(self, body: bytes, more: bool = False) -> None:
        self.header(len(body), more)
        self.sock.sendall(body)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def dropped(self, timeout: float) -> bool:
        """Whether the server closes the connection within ``timeout`` seconds."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except TimeoutError:
            return False
        except OSError:
            pass  # reset by the server
        return True

    def close(self) -> None:
        self.sock.close()


def tcp_received(port: int) -> list[tuple[int, int]]:
    """(bytes received, bytes still in the receive queue) of every established TCP connection
    accepted on 127.0.0.1:``port``, read from the kernel with ``ss``: how far a peer's data got
    into the process that listens, without asking that process."""
    out = subprocess.run(
        ["ss", "-tniH", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    found: list[tuple[int, int]] = []
    queue = 0
    for line in out.splitlines():
        if not line.startswith(("\t", " ")):
            queue = int(line.split()[0])  # Recv-Q of the socket whose details follow
            continue
        match = re.search(r"bytes_received:(\d+)", line)
        found.append((int(match.group(1)) if match else 0, queue))
    return found


def zmq_port(endpoint: str | None) -> int:
    """The port of a bound ``tcp://host:port`` endpoint."""
    assert endpoint is not None and endpoint.startswith("tcp://"), endpoint
    return int(endpoint.rsplit(":", 1)[1])
