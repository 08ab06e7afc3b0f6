"""Bare reference consumers: what edm is measured against.

    python bench/consumers.py {blocking,select} URL QUEUE PREFETCH COUNT LOGFILE

Each one does exactly the work edm's default handler does for a plain ASCII body: write
``<YYYY-MM-DD HH:MM:SS,mmm> INFO (+) <body>`` to a file, flush it, then ack the message
(manual acks, ``basic.qos(prefetch)``). It exits after COUNT messages. No reconnects, no
retries, no handler thread: the floor a straightforward pika consumer sets.
"""

from __future__ import annotations

import sys
import time
from typing import Any, BinaryIO

import pika


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


def main(argv: list[str]) -> int:
    kind, url, queue, prefetch, count, path = argv
    with open(path, "ab") as out:
        {"blocking": blocking, "select": select}[kind](url, queue, int(prefetch), int(count), out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
