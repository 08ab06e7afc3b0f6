"""A poison message must cost the others nothing: good-message throughput with and without.

    PYTHONPATH=. python bench/poison.py [--messages 20000] [--poison 100] [--reps 3] [--prefetch 1]

Each repetition runs the real daemon twice, on fresh queues, one after the other: N good
messages alone, then the same N good messages with P failing ones spread evenly among them
(``amqp.retry_delays: [1]``, ``max_retries: 3``: each failing message is tried 4 times, 1 s
apart in the broker, then dead-lettered). The good-message throughput is timed from the
first good line to the last (the lines' own timestamps); the ratio with/without is printed,
the goal is at least 0.95. Both runs use the same handler (``poison_handler`` below), so the
work per good message is the same; the two runs of a repetition alternate their order, so
that a drift of the machine's load does not always favour one. Everything made is removed at
the end.

What a failure costs the others: its handler call, the republish, and the frames around it:
the confirm and, at prefetch 1, for the settler's ``basic.qos`` widening (the original waits
unacked for its confirm), a qos and its qos-ok each way. The fast lane resumes after each of
those frames, and at prefetch 1 the widened window lets the next message come while the
confirm is awaited, so the confirm round trip no longer stops the queue. See bench/README.md
for the numbers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import BenchError, Broker, EdmDaemon, bodies, unique_name, wait_lines
from edm.handlers import Message, log_message

POISON = b"poison"
HANDLER = "bench.poison:poison_handler"


def poison_handler(message: Message) -> None:
    """Raise for bodies that start with ``poison``; log the others (the default handler's work)."""
    if message.body.startswith(POISON):
        raise ValueError("poisoned")
    log_message(message)


def mixed(good: int, poison: int, size: int) -> list[bytes]:
    """``good`` numbered bodies with ``poison`` failing ones spread evenly among them."""
    out = list(bodies(good, size))
    step = max(1, good // (poison + 1))
    for k in range(poison, 0, -1):
        out.insert(k * step, POISON + b" %05d" % k)
    return out


def run(
    broker: Broker, base: Path, tag: str, good: int, poison: int, size: int, prefetch: int
) -> dict[str, Any]:
    name = unique_name(tag, f"poison{poison}")
    broker.declare(name)
    items = mixed(good, poison, size)
    broker.prefill(name, iter(items), len(items))
    daemon = EdmDaemon(base / name, broker.url, name, prefetch=prefetch)
    doc = yaml.safe_load(daemon.config_path.read_text())
    doc["amqp"].update(handler=HANDLER, retry_delays=[1], max_retries=3)
    daemon.config_path.write_text(yaml.safe_dump(doc))
    try:
        pids = daemon.start()
        watch = daemon.watch()
        wait_lines(watch, good, pids=pids)
        deadline = time.monotonic() + 60  # the last retries come back 3 s after the first try
        while broker.depth(f"{name}.dead")[0] < poison:
            if time.monotonic() > deadline:
                raise BenchError(f"{name}: the failing messages did not all reach {name}.dead")
            time.sleep(0.1)
        daemon.stop()
    except BaseException:
        daemon.kill()
        raise
    check = watch.verify(good)
    if check["unique"] != good or check["duplicates"] or check["strays"]:
        raise BenchError(f"{name}: {check}")
    dead = broker.depth(f"{name}.dead")[0]
    if dead != poison:
        raise BenchError(f"{name}: {dead} dead letters, expected {poison}")
    broker.delete(name)
    elapsed = check["last"] - check["first"]
    return {
        "good": good,
        "poison": poison,
        "seconds": elapsed,
        "msgs_per_s": (good - 1) / elapsed,
        "dead": dead,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=20000, help="good messages per run")
    p.add_argument("--poison", type=int, default=100, help="failing messages among them")
    p.add_argument("--size", type=int, default=100)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--prefetch", type=int, default=1)
    p.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    args = p.parse_args(argv)
    broker = Broker(args.url)
    tag = unique_name("poison", "run")[len("edm-bench-") :]
    base = Path(tempfile.mkdtemp(prefix="edm-bench-poison-"))
    alone: list[float] = []
    spiked: list[float] = []
    try:
        for rep in range(args.reps):
            pair = [(0, alone), (args.poison, spiked)]
            for poison, results in pair if rep % 2 == 0 else reversed(pair):
                r = run(broker, base, f"{tag}{rep}", args.messages, poison, args.size, args.prefetch)
                results.append(r["msgs_per_s"])
            print(
                f"rep {rep + 1}: alone {alone[-1]:.0f}/s, with {args.poison} failing "
                f"{spiked[-1]:.0f}/s: {spiked[-1] / alone[-1]:.3f}",
                file=sys.stderr,
            )
    finally:
        problems = broker.cleanup()
        for problem in problems:
            print(f"cleanup: {problem}", file=sys.stderr)
    ratio = statistics.median(spiked) / statistics.median(alone)
    per_rep = statistics.median(s / a for s, a in zip(spiked, alone, strict=True))
    print(f"prefetch {args.prefetch}, {args.messages} good messages, {args.poison} failing (4 attempts each)")
    print(f"good messages alone:            {statistics.median(alone):8.0f} msg/s (median of {args.reps})")
    print(f"with {args.poison} failing among them: {statistics.median(spiked):8.0f} msg/s")
    print(f"ratio of the medians: {ratio:.3f}, median of the per-repetition ratios: {per_rep:.3f}")
    print(f"goal >= 0.95: {'OK' if ratio >= 0.95 else 'MISS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
