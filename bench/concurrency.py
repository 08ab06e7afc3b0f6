"""Many handlers at once: ``amqp.threads`` and ``amqp.workers`` side by side, in one run.

    PYTHONPATH=. python bench/concurrency.py [--parts wait,cpu,inline,rss] [--before /work/wt/before]

Every number comes from the real daemon on fresh queues, timed from the first message line to
the last (the lines' own timestamps), each run checked: every message logged exactly once.

* ``wait``: a handler that sleeps 20 ms (a mail server's reply) at ``threads`` 1, 8, 32,
  against the limit ``threads / 20 ms``; prefetch is twice the threads so none waits for the
  broker. Goal: at least 90 % of the limit up to 32 threads.
* ``cpu``: a handler that burns ~2 ms of CPU (a fixed number of SHA-256 rounds, calibrated
  here) at ``workers`` 1 and 2, one thread each. Goal: at least 1.7× from 1 to 2 workers; the
  broker's CPU (beam.smp) over the same run is printed, since it shares the 2 cores.
* ``inline``: ``threads: 1, workers: 1`` with the log handler, ``--count`` (50,000) × 100 B prefilled, at
  prefetch 1 and 50, from this tree and from a checkout of the code before handler threads
  (``--before``, its own ``.venv``), alternating, median of ``--reps``. Goal: within 5 %.
* ``rss``: the consumer process's RSS at threads 2 and 32 (per extra thread), and all
  processes' RSS at workers 1 and 3 (per extra process), after each handled 2,000 messages.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import (
    BenchError,
    Broker,
    EdmDaemon,
    Scraper,
    Sentinel,
    bodies,
    broker_pid,
    children,
    cpu_seconds,
    rss_bytes,
    unique_name,
    wait_lines,
)
from edm.handlers import Message, log_message

WAIT = 0.020  # seconds the waiting handler sleeps
CPU_TARGET = 0.002  # seconds of CPU the CPU-bound handler should burn


def waiting(message: Message) -> None:
    """Wait 20 ms, as for a mail server's reply, then log the message."""
    time.sleep(WAIT)
    log_message(message)


def burn(rounds: int) -> bytes:
    digest = b"edm"
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    return digest


class Burner:
    """Burn ``rounds`` SHA-256 rounds of CPU (``handler_options: {rounds: N}``), then log."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.rounds = int(options["rounds"])

    def __call__(self, message: Message) -> None:
        burn(self.rounds)
        log_message(message)


def calibrate(target: float = CPU_TARGET) -> tuple[int, float]:
    """Rounds that take about ``target`` seconds of CPU here, and the seconds they take."""
    rounds = 1000
    started = time.process_time()
    burn(rounds)
    per_round = (time.process_time() - started) / rounds
    rounds = max(1, round(target / per_round))
    samples = []
    for _ in range(5):
        started = time.process_time()
        burn(rounds)
        samples.append(time.process_time() - started)
    return rounds, statistics.median(samples)


class TreeDaemon(EdmDaemon):
    """An edm from another checkout (its own Python), or from this one when ``root`` is None."""

    def __init__(
        self, base: Path, url: str, name: str, prefetch: int, root: Path | None = None, metrics: bool = False
    ) -> None:
        super().__init__(base, url, name, prefetch, metrics)
        self.root = root

    def cli(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        if self.root is None:
            return super().cli(*args, timeout=timeout)
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDM_")}
        env["PYTHONPATH"] = str(self.root)
        return subprocess.run(
            [
                str(self.root / ".venv" / "bin" / "python"),
                "-m",
                "edm",
                "--config",
                str(self.config_path),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=self.base,
        )

    def amqp(self, **settings: Any) -> None:
        doc = yaml.safe_load(self.config_path.read_text())
        doc["amqp"].update(settings)
        self.config_path.write_text(yaml.safe_dump(doc))


def run(broker: Broker, base: Path, tag: str, count: int, prefetch: int, **kw: Any) -> dict[str, Any]:
    """``once``, again (at most 3 times) when the broker was restarted or closed our
    connections from outside during the run (other work on the machine may do that)."""
    for attempt in range(3):
        sentinel = Sentinel(broker.url)
        try:
            result = once(broker, base, f"{tag}a{attempt}", count, prefetch, **kw)
            if not sentinel.disturbed():
                return result
        except BenchError:
            if not sentinel.disturbed():
                raise
        finally:
            sentinel.close()
        print(f"  (the broker was disturbed from outside during {tag}; run again)", file=sys.stderr)
        broker.cleanup()
    raise BenchError(f"{tag}: the broker was disturbed from outside 3 times")


def once(
    broker: Broker,
    base: Path,
    tag: str,
    count: int,
    prefetch: int,
    root: Path | None = None,
    measure: bool = False,
    metrics: bool = False,
    **amqp: Any,
) -> dict[str, Any]:
    """Prefill ``count`` messages, start edm with ``amqp`` settings, wait for all, stop it.

    With ``metrics``, ``metrics.listen`` is set and /metrics is scraped every second meanwhile.
    """
    name = unique_name(tag, "q")
    broker.declare(name)
    broker.prefill(name, bodies(count, 100), count)
    daemon = TreeDaemon(base / name, broker.url, name, prefetch, root, metrics)
    daemon.amqp(**amqp)
    beam = broker_pid()
    out: dict[str, Any] = {}
    scraper: Scraper | None = None
    try:
        pids = daemon.start()
        if daemon.listen is not None:
            scraper = Scraper(daemon.listen)
        watch = daemon.watch()
        # CPU is counted from a fifth of the messages on: the start (imports, connection,
        # declarations) is not a message's cost and would weigh on short runs
        wait_lines(watch, count // 5, pids=pids)
        beam_before = cpu_seconds([beam]) if beam else 0.0
        edm_before = cpu_seconds(pids)
        seen = watch.count
        wall = time.monotonic()
        wait_lines(watch, count, pids=pids)
        wall = time.monotonic() - wall
        beam_cpu = cpu_seconds([beam]) - beam_before if beam else None
        edm_cpu = cpu_seconds(daemon.pids()) - edm_before
        counted = max(watch.count - seen, 1)
        out["broker_cores"] = beam_cpu / wall if beam_cpu is not None else None
        out["edm_cores"] = edm_cpu / wall
        out["edm_us"] = edm_cpu / counted * 1e6  # edm's CPU a message, all its processes
        out["broker_us"] = beam_cpu / counted * 1e6 if beam_cpu is not None else None
        if measure:
            main = daemon.main_pid()
            workers = children(main) if main else []
            out["rss_workers"] = [rss_bytes(p) for p in workers]
            out["rss_total"] = sum(rss_bytes(p) for p in daemon.pids())
        if scraper is not None:
            scraper.stop()
            if not scraper.scrapes or scraper.errors:
                raise BenchError(f"/metrics: {scraper.scrapes} scrapes, {scraper.errors} failed")
        daemon.stop()
    except BaseException:
        if scraper is not None:
            scraper.stop()
        daemon.kill()
        raise
    check = watch.verify(count)
    if check["unique"] != count or check["duplicates"] or check["strays"]:
        raise BenchError(f"{name}: {check}")
    broker.delete(name)
    elapsed = check["last"] - check["first"]
    out["msgs_per_s"] = (count - 1) / elapsed if elapsed > 0 else float("inf")
    return out


def part_wait(broker: Broker, base: Path, tag: str, reps: int) -> None:
    print("wait: a handler that sleeps 20 ms; throughput against threads / 20 ms")
    print(f"  {'threads':>7} {'prefetch':>8} {'msg/s':>8} {'limit':>7} {'of limit':>8}")
    for threads in (1, 8, 32):
        limit = threads / WAIT
        count = max(300, int(limit * 5))  # about 5 s each
        rates = [
            run(
                broker,
                base,
                f"{tag}w{threads}",
                count,
                2 * threads,
                handler="bench.concurrency:waiting",
                threads=threads,
            )["msgs_per_s"]
            for _ in range(reps)
        ]
        rate = statistics.median(rates)
        verdict = "OK" if rate >= 0.9 * limit else "MISS"
        print(f"  {threads:>7} {2 * threads:>8} {rate:>8.0f} {limit:>7.0f} {rate / limit:>7.1%} {verdict}")


def part_cpu(broker: Broker, base: Path, tag: str, reps: int) -> None:
    rounds, seconds = calibrate()
    print(
        f"cpu: {rounds} SHA-256 rounds a message ({seconds * 1000:.2f} ms of CPU here), "
        "threads 1, prefetch 50"
    )
    print(f"  {'workers':>7} {'msg/s':>8} {'edm cores':>9} {'broker cores':>12}")
    results: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    for rep in range(reps):
        for workers in (1, 2) if rep % 2 == 0 else (2, 1):
            results[workers].append(
                run(
                    broker,
                    base,
                    f"{tag}c{workers}",
                    6000,
                    50,
                    handler="bench.concurrency:Burner",
                    handler_options={"rounds": rounds},
                    workers=workers,
                )
            )
    medians = {}
    for workers, found in results.items():
        medians[workers] = statistics.median(r["msgs_per_s"] for r in found)
        edm = statistics.median(r["edm_cores"] for r in found)
        beam = [r["broker_cores"] for r in found if r["broker_cores"] is not None]
        shown = f"{statistics.median(beam):.2f}" if beam else "?"
        print(f"  {workers:>7} {medians[workers]:>8.0f} {edm:>9.2f} {shown:>12}")
    ratio = medians[2] / medians[1]
    print(f"  2 workers / 1: {ratio:.2f}x  goal >= 1.7x: {'OK' if ratio >= 1.7 else 'MISS'}")


def part_inline(
    broker: Broker,
    base: Path,
    tag: str,
    reps: int,
    before: Path,
    prefetches: tuple[int, ...] = (1, 50),
    count: int = 50000,
) -> None:
    print(f"inline: threads 1, workers 1, log handler, {count:,} x 100 B; this tree vs {before}")
    print(f"  {'prefetch':>8} {'':>6} {'msg/s':>8} {'edm µs/msg':>10} {'broker µs/msg':>13}")
    for prefetch in prefetches:
        found: dict[str, list[dict[str, Any]]] = {"before": [], "now": []}
        for rep in range(reps):
            order = (("before", before), ("now", None))
            for which, root in order if rep % 2 == 0 else tuple(reversed(order)):
                found[which].append(run(broker, base, f"{tag}i{prefetch}{which}", count, prefetch, root=root))
        medians = print_medians(prefetch, found)
        rate = medians["now"][0] / medians["before"][0]
        cpu = medians["now"][1] / medians["before"][1]
        verdict = "OK" if rate >= 0.95 and cpu <= 1.05 else "MISS"
        print(f"  {'':>8} now/before: msg/s {rate:.3f}, edm µs/msg {cpu:.3f}  goal within 5 %: {verdict}")


def print_medians(prefetch: int, found: dict[str, list[dict[str, Any]]]) -> dict[str, tuple[float, float]]:
    """Print each side's median msg/s, edm's and the broker's µs a message, and its runs'
    rates; return each side's (msg/s, edm µs/msg) medians."""
    medians = {}
    for which, runs in found.items():
        rate = statistics.median(r["msgs_per_s"] for r in runs)
        edm = statistics.median(r["edm_us"] for r in runs)
        beam = [r["broker_us"] for r in runs if r["broker_us"] is not None]
        shown = f"{statistics.median(beam):.1f}" if beam else "?"
        medians[which] = (rate, edm)
        print(f"  {prefetch:>8} {which:>6} {rate:>8.0f} {edm:>10.1f} {shown:>13}")
        print(f"  {'':>8} {'':>6} runs {[round(r['msgs_per_s']) for r in runs]}")
    return medians


def part_rss(broker: Broker, base: Path, tag: str) -> None:
    mib = 1024 * 1024
    print("rss: after 2,000 messages of the 20 ms handler (MiB)")
    two = run(
        broker, base, f"{tag}r2", 2000, 64, measure=True, handler="bench.concurrency:waiting", threads=2
    )
    many = run(
        broker, base, f"{tag}r32", 2000, 64, measure=True, handler="bench.concurrency:waiting", threads=32
    )
    a, b = two["rss_workers"][0], many["rss_workers"][0]
    print(
        f"  consumer process: threads 2 {a / mib:.1f}, threads 32 {b / mib:.1f}: "
        f"{(b - a) / 30 / 1024:.0f} KiB a thread"
    )
    one = run(broker, base, f"{tag}p1", 2000, 50, measure=True, workers=1)
    three = run(broker, base, f"{tag}p3", 2000, 50, measure=True, workers=3)
    a, b = one["rss_total"], three["rss_total"]
    print(
        f"  all processes: workers 1 {a / mib:.1f}, workers 3 {b / mib:.1f}: "
        f"{(b - a) / 2 / mib:.1f} MiB a process"
    )


PARTS = ("wait", "cpu", "inline", "rss")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated: {','.join(PARTS)}")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--before", type=Path, default=Path("/work/wt/before"), help="checkout of the code before")
    p.add_argument("--prefetch", default="1,50", help="inline: the prefetches to compare")
    p.add_argument("--count", type=int, default=50000, help="inline: messages a run")
    p.add_argument(
        "--pin",
        type=int,
        default=None,
        help="run this script and the daemons it starts on this CPU only",
    )
    p.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    args = p.parse_args(argv)
    parts = [part for part in args.parts.split(",") if part]
    unknown = set(parts) - set(PARTS)
    if unknown:
        p.error(f"unknown parts: {', '.join(sorted(unknown))}")
    if args.pin is not None:
        os.sched_setaffinity(0, {args.pin})  # inherited by every daemon started from here
    broker = Broker(args.url)
    tag = unique_name("conc", "run")[len("edm-bench-") :]
    base = Path(tempfile.mkdtemp(prefix="edm-bench-conc-"))
    print(f"{os.cpu_count()} CPUs; broker {broker.server_properties().get('version', '?')}")
    try:
        if "wait" in parts:
            part_wait(broker, base, tag, args.reps)
        if "cpu" in parts:
            part_cpu(broker, base, tag, args.reps)
        if "inline" in parts:
            part_inline(
                broker,
                base,
                tag,
                args.reps,
                args.before.resolve(),
                tuple(int(x) for x in args.prefetch.split(",")),
                args.count,
            )
        if "rss" in parts:
            part_rss(broker, base, tag)
    finally:
        broker.clean_up(base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
