"""Bare reference consumers: what edm is measured against.

    python bench/consumers.py {blocking,select,plain} URL QUEUE PREFETCH COUNT LOGFILE

Each one does exactly the work edm's default handler does for a plain ASCII body: write
``<YYYY-MM-DD HH:MM:SS,mmm> INFO (+) <body>`` to a file, flush it, then ack the message
(manual acks, ``basic.qos(prefetch)``). It exits after COUNT messages. No reconnects, no
retries, no handler thread: the floor a straightforward pika consumer sets.

``plain`` is not a consumer anyone should run: a blocking socket, the handshake encoded by
pika, then a loop that reads frames with ``struct`` and writes pre-marshalled acks. No
heartbeats, no other frames understood, no error handling. It measures the floor of any
Python consumer on this machine: what the protocol's three syscalls and the interpreter cost.
"""

from __future__ import annotations

import socket
import struct
import sys
import time
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit

import pika
import pika.frame
import pika.spec


def line(body: bytes) -> bytes:
    now = time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
    return b"%s,%03d INFO (+) %s\n" % (stamp.encode(), int(now * 1000) % 1000, body)


def blocking(url: str, queue: str, prefetch: int, count: int, out: BinaryIO) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=prefetch)
    handled = 0

    def on_message(ch: Any, method: Any, _properties: Any, body: bytes) -> None:
        nonlocal handled
        out.write(line(body))
        out.flush()
        ch.basic_ack(method.delivery_tag)
        handled += 1
        if handled >= count:
            ch.stop_consuming()

    channel.basic_consume(queue, on_message)
    channel.start_consuming()
    connection.close()


def select(url: str, queue: str, prefetch: int, count: int, out: BinaryIO) -> None:
    handled = 0

    def on_message(ch: Any, method: Any, _properties: Any, body: bytes) -> None:
        nonlocal handled
        out.write(line(body))
        out.flush()
        ch.basic_ack(method.delivery_tag)
        handled += 1
        if handled == count:
            connection.close()

    def on_channel(ch: Any) -> None:
        ch.basic_qos(prefetch_count=prefetch, callback=lambda _f: ch.basic_consume(queue, on_message))

    def on_error(_c: Any, error: Any) -> None:
        print(f"cannot connect: {error}", file=sys.stderr)
        connection.ioloop.stop()

    connection = pika.SelectConnection(
        pika.URLParameters(url),
        on_open_callback=lambda c: c.channel(on_open_callback=on_channel),
        on_open_error_callback=on_error,
        on_close_callback=lambda _c, _r: connection.ioloop.stop(),
    )
    connection.ioloop.start()


def plain(url: str, queue: str, prefetch: int, count: int, out: BinaryIO) -> None:
    u = urlsplit(url)
    sock = socket.create_connection((u.hostname or "127.0.0.1", u.port or 5672))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = b""

    def method(channel: int, value: Any) -> Any:
        """Send one method frame and return the next method frame's method."""
        nonlocal buf
        sock.sendall(pika.frame.Method(channel, value).marshal() if value else b"AMQP\x00\x00\x09\x01")
        while True:
            used, frame = pika.frame.decode_frame(buf)
            if frame is not None:
                buf = buf[used:]
                return frame.method
            buf += sock.recv(65536)

    user, password = unquote(u.username or "guest"), unquote(u.password or "guest")
    vhost = unquote(u.path[1:]) if len(u.path) > 1 else "/"
    method(0, None)  # connection.start
    tune = method(0, pika.spec.Connection.StartOk({}, "PLAIN", f"\0{user}\0{password}", "en_US"))
    sock.sendall(
        pika.frame.Method(0, pika.spec.Connection.TuneOk(tune.channel_max, tune.frame_max, 0)).marshal()
    )
    method(0, pika.spec.Connection.Open(vhost))
    method(1, pika.spec.Channel.Open())
    method(1, pika.spec.Basic.Qos(prefetch_count=prefetch))
    method(1, pika.spec.Basic.Consume(queue=queue))

    frame_head, u64, ack = struct.Struct(">BHI"), struct.Struct(">Q"), struct.Struct(">BHIIQBB")
    handled, tag, left, parts = 0, 0, 0, []
    data = bytearray(buf)
    while handled < count:
        pos = 0
        while len(data) - pos >= 8:
            kind, channel, size = frame_head.unpack_from(data, pos)
            end = pos + 8 + size
            if end > len(data):
                break
            if kind == 1 and data[pos + 7 : pos + 11] == b"\x00\x3c\x00\x3c":  # basic.deliver
                tag = u64.unpack_from(data, pos + 12 + data[pos + 11])[0]
            elif kind == 2:
                left, parts = u64.unpack_from(data, pos + 11)[0], []
            elif kind == 3:
                parts.append(bytes(data[pos + 7 : end - 1]))
                left -= size
                if left == 0:
                    out.write(line(b"".join(parts)))
                    out.flush()
                    sock.sendall(ack.pack(1, channel, 13, 0x003C0050, tag, 0, 0xCE))
                    handled += 1
            pos = end
        del data[:pos]
        if handled < count:
            data += sock.recv(65536)
    sock.close()


def main(argv: list[str]) -> int:
    kind, url, queue, prefetch, count, path = argv
    with open(path, "ab") as out:
        {"blocking": blocking, "select": select, "plain": plain}[kind](
            url, queue, int(prefetch), int(count), out
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
