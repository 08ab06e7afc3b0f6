"""Measure ``edm publish`` against a real broker: N persistent, confirmed messages.

    python bench/publish_rate.py [--count 100000] [--size 100] [--url amqp://...] [--stdin]

Declares a throw-away durable exchange and queue, publishes through ``run_publish`` (with
``--stdin``: through a pipe and the stdin line reader, as ``edm publish`` reads), checks
that the queue holds every message, deletes both and prints the rate.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pika

from edm.cli.publish import bodies_from_lines, run_publish
from edm.config import parse


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument(
        "--url", default=os.environ.get("EDM_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
    )
    ap.add_argument("--stdin", action="store_true", help="feed the bodies through a pipe")
    args = ap.parse_args()

    name = f"edm-bench-{uuid.uuid4().hex}"
    admin = pika.BlockingConnection(pika.URLParameters(args.url))
    channel = admin.channel()
    channel.exchange_declare(name, "direct", durable=True)
    channel.queue_declare(name, durable=True)
    channel.queue_bind(name, name, routing_key="bench")
    config = parse(
        {"amqp": {"url": args.url, "exchange": name, "routing_key": "bench"}},
        Path(tempfile.gettempdir()) / "mq.yaml",
        environ={},
    )
    pad = b"x" * max(0, args.size - 8)
    try:
        start = time.monotonic()
        if args.stdin:
            read_fd, write_fd = os.pipe()

            def feed() -> None:
                with os.fdopen(write_fd, "wb") as w:
                    for i in range(args.count):
                        w.write(b"%08d" % i + pad + b"\n")

            threading.Thread(target=feed, daemon=True).start()
            with os.fdopen(read_fd, "rb") as r:
                code = run_publish(config, bodies_from_lines(r), progress=sys.stderr)
        else:
            bodies = (b"%08d" % i + pad for i in range(args.count))
            code = run_publish(config, bodies, progress=sys.stderr)
        elapsed = time.monotonic() - start
        queued = channel.queue_declare(name, passive=True).method.message_count
    finally:
        channel.queue_delete(name)
        channel.exchange_delete(name)
        admin.close()
    print(
        f"{args.count} x {args.size} B persistent, confirmed: {elapsed:.2f} s, "
        f"{args.count / elapsed:,.0f} msg/s; exit {code}; {queued} in the queue"
    )
    return 0 if code == 0 and queued == args.count else 1


if __name__ == "__main__":
    sys.exit(main())
