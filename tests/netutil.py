"""Test helpers: a TCP proxy the test can cut and restore, and a ZeroMQ REQ client."""

from __future__ import annotations

import re
import socket
import subprocess
import threading
from collections.abc import Sequence

import zmq


class TcpProxy:
    """Forward 127.0.0.1:<port> to a target; ``cut()`` drops every connection and refuses new
    ones (accepted, then closed at once) until ``restore()``."""

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
                    t.start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self._cut.set()
        self._drop_all()

    def restore(self) -> None:
        self._cut.clear()

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
