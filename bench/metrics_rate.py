"""Metrics on and off, in messages a second and in edm's CPU a message, side by side.

    PYTHONPATH=. python bench/metrics_rate.py [--reps 7] [--count 50000] [--prefetch 1,50] [--pin 1]

Each repetition runs the real daemon twice on fresh prefilled queues (``--count`` × 100 B,
the log handler, one worker, one thread): without ``metrics.listen`` and with it, /metrics
scraped every second meanwhile, the order alternating from one repetition to the next. The
rate is timed from the first message line to the last (the lines' own timestamps); edm's CPU
(main process and worker) and the broker's are counted from a fifth of the messages on, so
the start is not a message's cost. Goal (contract §14): with metrics on, the msg/s at
prefetch 1 and 50 within 3 % of metrics off; the median of the repetitions is compared.

One run's rate moves by ±15 % from one run to the next on a 2-core VM, and the broker has a
fast and a slow mode at prefetch 50 (about 45,000 and 27,000 msg/s here, on either side);
``--pin`` keeps this script and its daemons on one CPU, which makes the slow mode the usual
one. edm's CPU a message does not depend on the broker's mode: it is the figure that shows
what metrics cost edm. bench/metrics_cost.py counts the same in instructions.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.concurrency import print_medians, run
from bench.harness import Broker, unique_name


def compare(broker: Broker, base: Path, tag: str, reps: int, count: int, prefetch: int) -> None:
    found: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    for rep in range(reps):
        order = ("off", "on") if rep % 2 == 0 else ("on", "off")
        for which in order:
            found[which].append(
                run(broker, base, f"{tag}m{prefetch}{which}", count, prefetch, metrics=which == "on")
            )
    medians = print_medians(prefetch, found)
    rate = medians["on"][0] / medians["off"][0]
    cpu = medians["on"][1] / medians["off"][1]
    verdict = "OK" if rate >= 0.97 else "MISS"
    print(f"  {'':>8} on/off: msg/s {rate:.3f}, edm µs/msg {cpu:.3f}  goal msg/s within 3 %: {verdict}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--count", type=int, default=50000, help="messages a run")
    p.add_argument("--prefetch", default="1,50")
    p.add_argument("--pin", type=int, default=None, help="run this script and its daemons on this CPU only")
    p.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    args = p.parse_args(argv)
    if args.pin is not None:
        os.sched_setaffinity(0, {args.pin})  # inherited by every daemon started from here
    broker = Broker(args.url)
    tag = unique_name("metr", "run")[len("edm-bench-") :]
    base = Path(tempfile.mkdtemp(prefix="edm-bench-metrics-"))
    print(f"{os.cpu_count()} CPUs; broker {broker.server_properties().get('version', '?')}")
    print(f"metrics off and on: log handler, {args.count:,} x 100 B a run, {args.reps} repetitions")
    print(f"  {'prefetch':>8} {'':>6} {'msg/s':>8} {'edm µs/msg':>10} {'broker µs/msg':>13}")
    try:
        for prefetch in (int(x) for x in args.prefetch.split(",")):
            compare(broker, base, tag, args.reps, args.count, prefetch)
    finally:
        broker.clean_up(base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
