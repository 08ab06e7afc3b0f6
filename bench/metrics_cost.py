"""What turning metrics on costs edm, counted in CPU instructions instead of messages a second.

Throughput with metrics on and off cannot be told apart on a small VM: the broker's CPU per
message drifts by more than the 3 % asked (bench/README.md, "Metrics on and off"). An
instruction count does not depend on the broker's rate or on other load: this runs the daemon
(`edm run`, main process and consumer worker) under valgrind's callgrind, switches counting on
once it consumes, feeds it N messages (with a scraper reading /metrics every second when
metrics are on), and prints the instructions per message of each process, metrics off and
on, and their ratio (each as the difference between N and 2N messages, so start and stop
cancel out).

    python bench/metrics_cost.py [--messages 2000] [--prefetch 1] [--reps 1] [--scrapes 50]

The main process's cost of metrics is measured apart: an idle daemon scraped 0 and K times.
The rates projected onto default to the msg/s of "Metrics on and off" in bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from harness import ROOT, BenchError, Broker, EdmDaemon, Scraper, bodies, children, unique_name, wait_lines

AMQP_URL = os.environ.get("EDM_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
TOTALS = re.compile(rb"^totals: (\d+)", re.M)


def callgrind(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=120)


def instructions(path: Path) -> int:
    found = TOTALS.findall(path.read_bytes())
    if not found:
        raise BenchError(f"{path}: no totals line")
    return int(found[-1])


def one_run(
    broker: Broker,
    base: Path,
    messages: int,
    prefetch: int,
    metrics: bool,
    scrapes: int = 0,
    root: Path = ROOT,
    idle: float = 0.0,
) -> dict[str, float]:
    """The whole life of the daemon under callgrind; instructions of main and worker, each.

    ``root``: the checkout whose edm runs, with its own ``.venv`` when it is not this one;
    ``idle``: seconds to keep it running once the messages are handled.
    """
    name = unique_name("cg", "on" if metrics else "off")
    broker.declare(name)
    daemon = EdmDaemon(base / name, broker.url, name, prefetch, metrics)
    out = base / name / "cg"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDM_")}
    env["PYTHONPATH"] = str(root)
    env["PYTHONHASHSEED"] = "0"  # the same dict layouts in every run
    python = sys.executable if root == ROOT else str(root / ".venv" / "bin" / "python")
    command = [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/cg.%p",
        python, "-m", "edm", "--config", str(daemon.config_path), "run",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=daemon.base, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    scraper = None
    try:
        daemon.wait_consuming(broker, timeout=600)
        main = process.pid
        workers = children(main)
        if len(workers) != 1:
            raise BenchError(f"expected one consumer worker under {main}, found {workers}")
        worker = workers[0]
        started = time.monotonic()
        if metrics:
            assert daemon.listen is not None
            scraper = Scraper(daemon.listen)
        for _ in range(scrapes):  # back to back: what one scrape costs the main process
            assert daemon.listen is not None
            with urllib.request.urlopen(f"http://{daemon.listen}/metrics", timeout=60) as response:
                response.read()
        if messages:
            broker.prefill(name, bodies(messages, 100), messages)
            wait_lines(daemon.watch(), messages, pids=[main, worker], stall=300)
        time.sleep(idle)  # consuming, nothing to do: what the daemon costs a second
        seconds = time.monotonic() - started
        scrapes = 0
        if scraper is not None:
            scraper.stop()
            scrapes = scraper.scrapes
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        broker.delete(name)
    if os.environ.get("EDM_BENCH_KEEP"):
        shutil.copytree(out, Path(os.environ["EDM_BENCH_KEEP"]) / name)
    return {
        "worker": instructions(out / f"cg.{worker}"),
        "main": instructions(out / f"cg.{main}"),
        "seconds": seconds,
        "scrapes": scrapes,
    }


def marginal(small: dict[str, float], large: dict[str, float], count: int) -> dict[str, float]:
    return {key: (large[key] - small[key]) / count for key in ("worker", "main")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--scrapes", type=int, default=50)
    parser.add_argument("--rates", type=int, nargs="*", default=[4154, 21667], help="msg/s to project onto")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("metrics_cost: needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    broker = Broker(AMQP_URL)
    n, k = args.messages, args.scrapes
    per_message: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    per_scrape: list[float] = []
    with tempfile.TemporaryDirectory(prefix="edm-bench-cg-") as tmp:
        base = Path(tmp)
        for _ in range(args.reps):
            for metrics in (False, True):
                # the same daemon with N and 2N messages: the difference is what N messages cost
                small = one_run(broker, base, n, args.prefetch, metrics)
                large = one_run(broker, base, 2 * n, args.prefetch, metrics)
                per_message[metrics].append(marginal(small, large, n))
            idle = one_run(broker, base, 0, args.prefetch, True)
            scraped = one_run(broker, base, 0, args.prefetch, True, scrapes=k)
            per_scrape.append(marginal(idle, scraped, k)["main"])
    off = {key: statistics.median(r[key] for r in per_message[False]) for key in ("worker", "main")}
    on = {key: statistics.median(r[key] for r in per_message[True]) for key in ("worker", "main")}
    scrape = statistics.median(per_scrape)
    print(f"callgrind, instructions (Ir); {n} vs {2 * n} messages of 100 B, prefetch {args.prefetch}")
    print("| | consumer worker per message | main process per message |")
    print("|---|---|---|")
    print(f"| metrics off | {off['worker']:,.0f} | {off['main']:,.0f} |")
    print(f"| metrics on, scraped every second | {on['worker']:,.0f} | {on['main']:,.0f} |")
    print(f"consumer worker on/off: {on['worker'] / off['worker']:.4f}×")
    print(f"one scrape of /metrics: {scrape:,.0f} instructions in the main process")
    for rate in args.rates:
        share = scrape / (rate * off["worker"])
        print(
            f"at {rate:,} msg/s and one scrape a second: {100 * share:.2f} % of the consumer's instructions"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
