"""The smtp handler against a Celery task around smtplib: messages per second, CPU and memory.

    PYTHONPATH=. python bench/smtp.py [--jobs 2000] [--concurrency 1 8 32] [--delay 0.02]

Needs the ``bench`` extra (Celery): ``scripts/setup --bench``. A local SMTP server
(``bench/smtp_sink.py``: aiosmtpd in its own process) answers each message after ``--delay``
(20 ms), many sessions at once, so the most any sender can reach with C messages in flight
is ``C / delay`` messages per second: the *limit*. For each concurrency C, on the same broker
and in the same run:

- edm, ``amqp.handler: smtp``, with ``workers × threads = C`` handlers (a few splits);
- Celery, ``--pool threads`` and ``--pool prefork``, ``--concurrency C``, ``acks_late``,
  prefetch multiplier 1, the task of ``bench/celery_smtp.py`` (``EmailMessage`` + ``smtplib``
  over a per-thread session);
- ``bare`` (``--systems bare``): the ceiling of this machine and this server, C threads of
  one process each sending prebuilt messages over its own ``smtplib`` session, no broker, no
  building, no journal: what is left of the limit there is the server's own time and the
  round trips, which no sender can avoid.

Each run pre-fills a fresh queue with ``--jobs`` jobs (the same job for both: text + html,
an unsubscribe URL, its own id), starts the consumer, and measures between the server's
``--warmup``-th message and its last (the server's timestamps; the consumer's start and
its first sessions stay out): messages per second, % of the limit, CPU per message of the
consumer's processes (edm: the main process and its workers; Celery: the worker and its
pool), their summed RSS at the end. Every run is checked: the server got each job exactly
once, and the queue is empty once the consumer has stopped. Everything made is removed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import BenchError, Broker, EdmDaemon, children, cpu_seconds, rss_bytes, unique_name

BENCH = Path(__file__).resolve().parent
SENDER = "news@bench.example"


@dataclass
class Result:
    system: str  # "edm 2×16", "celery threads", "celery prefork"
    concurrency: int
    jobs: int
    msgs_per_s: float
    of_limit: float  # msgs_per_s / (C / delay)
    cpu_us_per_msg: float
    rss_mb: float


def job(n: int, tag: str) -> dict[str, Any]:
    return {
        "id": f"{tag}-{n}",
        "to": f"reader{n}@example.com",
        "from": SENDER,
        "subject": f"Our news, issue {n}",
        "text": f"Hello reader {n},\n\nThis week's news is below.\n\n" + "A line of news.\n" * 20,
        "html": f"<p>Hello reader {n},</p><p>This week's news is below.</p>" + "<p>A line of news.</p>" * 20,
        "unsubscribe": f"https://bench.example/unsubscribe?u={n}",
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sink:
    """The SMTP server process and what it received."""

    def __init__(self, base: Path, delay: float, processes: int = 1) -> None:
        self.port = free_port()
        self.out = base / f"received-{self.port}.txt"
        self.out.touch()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(BENCH / "smtp_sink.py"),
                "--port",
                str(self.port),
                "--delay",
                str(delay),
                "--processes",
                str(processes),
                "--out",
                str(self.out),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            self.stop()
            raise BenchError("the SMTP sink did not start")
        self._offset = 0
        self.times: list[float] = []
        self.ids: list[str] = []

    def poll(self) -> int:
        with self.out.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._offset += end
        for line in data[:end].splitlines():
            stamp, msgid = line.split(b" ", 1)
            self.times.append(float(stamp))
            self.ids.append(msgid.decode())
        return len(self.ids)

    def reset(self) -> None:
        self.poll()
        self.times, self.ids = [], []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def measure(sink: Sink, pids: Any, jobs: int, warmup: int, timeout: float) -> tuple[float, float, float]:
    """Wait for every job at the sink: (msgs/s, CPU seconds, RSS bytes) between the warm-up and the end.

    ``pids()`` gives the consumer's processes now (a prefork pool's children included).
    """
    deadline = time.monotonic() + timeout
    cpu_at_warmup: float | None = None
    rss = 0
    while True:
        count = sink.poll()
        now_pids = pids()
        if cpu_at_warmup is None and count >= warmup:
            cpu_at_warmup = cpu_seconds(now_pids)
        if count >= jobs:
            cpu = cpu_seconds(now_pids) - (cpu_at_warmup or 0.0)
            rss = max(rss, sum(rss_bytes(p) for p in now_pids if Path(f"/proc/{p}").exists()))
            break
        if time.monotonic() > deadline:
            raise BenchError(f"only {count} of {jobs} messages reached the SMTP server in {timeout:.0f} s")
        rss = max(rss, sum(_rss(p) for p in now_pids))
        time.sleep(0.01)
    times = sorted(sink.times)
    rate = (jobs - warmup) / (times[jobs - 1] - times[warmup - 1])
    return rate, cpu, float(rss)


def _rss(pid: int) -> int:
    try:
        return rss_bytes(pid)
    except OSError:
        return 0


def check_once(sink: Sink, jobs: int, what: str) -> None:
    time.sleep(0.2)  # a late duplicate would show here
    sink.poll()
    if len(sink.ids) != jobs or len(set(sink.ids)) != jobs:
        distinct = len(set(sink.ids))
        raise BenchError(f"{what}: the server got {len(sink.ids)} messages, {distinct} distinct, of {jobs}")


def check_empty(broker: Broker, queue: str, what: str) -> None:
    ready, consumers = broker.depth(queue)
    if ready or consumers:
        raise BenchError(f"{what}: {ready} messages left in {queue} ({consumers} consumers)")


def run_edm(
    broker: Broker,
    sink: Sink,
    base: Path,
    workers: int,
    threads: int,
    jobs: int,
    warmup: int,
    delay: float,
    prefetch: int = 1,
) -> Result:
    name = unique_name("smtp", f"edm{workers}x{threads}")
    broker.declare(name)
    tag = name[-6:]
    broker.prefill(name, (json.dumps(job(n, tag)).encode() for n in range(jobs)), jobs)
    daemon = EdmDaemon(base / name, broker.url, name, prefetch=prefetch * threads)
    doc = yaml.safe_load(daemon.config_path.read_text())
    doc["amqp"].update({"handler": "smtp", "workers": workers, "threads": threads, "max_retries": 0})
    doc["smtp"] = {
        "url": f"smtp://127.0.0.1:{sink.port}",
        "journal": "../run/smtp.journal",
        "helo": "edm.bench",
    }
    daemon.config_path.write_text(yaml.safe_dump(doc))
    sink.reset()
    what = f"edm {workers}×{threads}" + (f" prefetch {prefetch * threads}" if prefetch > 1 else "")
    try:
        daemon.start()
        rate, cpu, rss = measure(sink, daemon.pids, jobs, warmup, timeout=60 + jobs * delay * 2)
        check_once(sink, jobs, what)
        daemon.stop()
    except BaseException:
        daemon.kill()
        raise
    check_empty(broker, name, what)
    broker.delete(name)
    c = workers * threads
    return Result(what, c, jobs, rate, rate / (c / delay), cpu / (jobs - warmup) * 1e6, rss / 2**20)


def run_celery(
    broker: Broker, sink: Sink, pool: str, concurrency: int, jobs: int, warmup: int, delay: float
) -> Result:
    name = unique_name("smtp", f"celery-{pool}{concurrency}")
    env = {
        **os.environ,
        "BENCH_BROKER": broker.url,
        "BENCH_QUEUE": name,
        "BENCH_SMTP": f"127.0.0.1:{sink.port}",
        "PYTHONPATH": str(BENCH),
    }
    broker.names.add(name)
    tag = name[-6:]
    # Published as a user would: the task's apply_async, persistent, into the queue the worker reads.
    subprocess.run(
        [sys.executable, "-c", PUBLISH, str(jobs), tag, json.dumps(job(0, "x"))],
        env=env,
        check=True,
        cwd=BENCH,
    )
    if broker.depth(name)[0] != jobs:
        raise BenchError(f"celery: {broker.depth(name)[0]} of {jobs} tasks in {name}")
    sink.reset()
    what = f"celery {pool}"
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "celery_smtp",
            "worker",
            "--pool",
            pool,
            "--concurrency",
            str(concurrency),
            "-Q",
            name,
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--loglevel",
            "WARNING",
            "-n",
            f"{name}@%h",
        ],
        env=env,
        cwd=BENCH,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        rate, cpu, rss = measure(
            sink, lambda: [worker.pid, *children(worker.pid)], jobs, warmup, timeout=60 + jobs * delay * 2
        )
        check_once(sink, jobs, what)
        worker.send_signal(signal.SIGTERM)  # warm shutdown
        worker.wait(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    check_empty(broker, name, what)
    broker.delete(name)
    return Result(
        what, concurrency, jobs, rate, rate / (concurrency / delay), cpu / (jobs - warmup) * 1e6, rss / 2**20
    )


def run_bare(sink: Sink, concurrency: int, jobs: int, warmup: int, delay: float) -> Result:
    sink.reset()
    what = "bare smtplib"
    tag = unique_name("smtp", "bare")[-6:]
    sender = subprocess.Popen(
        [
            sys.executable,
            "-c",
            BARE,
            str(sink.port),
            str(concurrency),
            str(jobs),
            tag,
            json.dumps(job(0, "x")),
        ]
    )
    try:
        rate, cpu, rss = measure(sink, lambda: [sender.pid], jobs, warmup, timeout=60 + jobs * delay * 2)
        check_once(sink, jobs, what)
        if sender.wait(timeout=60) != 0:
            raise BenchError(f"{what}: the sender exited with {sender.returncode}")
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
    return Result(
        what, concurrency, jobs, rate, rate / (concurrency / delay), cpu / (jobs - warmup) * 1e6, rss / 2**20
    )


BARE = """
import json, smtplib, sys, threading
from email.message import EmailMessage
from email.policy import SMTP
port, concurrency, jobs = (int(a) for a in sys.argv[1:4])
tag, template = sys.argv[4], json.loads(sys.argv[5])
messages = []
for n in range(jobs):
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = template["from"], f"reader{n}@example.com", f"Our news, issue {n}"
    m["Message-ID"] = f"<{tag}-{n}@bench.example>"
    m.set_content(template["text"])
    m.add_alternative(template["html"], subtype="html")
    messages.append((f"reader{n}@example.com", m.as_bytes(policy=SMTP)))
lock, todo = threading.Lock(), iter(messages)
def send():
    with smtplib.SMTP("127.0.0.1", port, local_hostname="bare.bench") as session:
        while True:
            with lock:
                item = next(todo, None)
            if item is None:
                return
            session.sendmail(template["from"], [item[0]], item[1])
threads = [threading.Thread(target=send) for _ in range(concurrency)]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


PUBLISH = """
import json, sys
from celery_smtp import app, send_mail
jobs, tag, template = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
with app.producer_or_acquire() as producer:
    for n in range(jobs):
        job = dict(template, id=f"{tag}-{n}", to=f"reader{n}@example.com",
                   subject=f"Our news, issue {n}",
                   unsubscribe=f"https://bench.example/unsubscribe?u={n}")
        send_mail.apply_async(args=[job], producer=producer)
"""


def splits(concurrency: int, wanted: list[str] | None) -> list[tuple[int, int]]:
    if wanted:
        found = []
        for split in wanted:
            w, t = (int(x) for x in split.split("x"))
            if w * t == concurrency:
                found.append((w, t))
        return found
    return [(w, concurrency // w) for w in (1, 2, 4) if concurrency % w == 0 and w <= concurrency]


def table(results: list[Result]) -> str:
    rows = ["| C | system | msg/s | % of limit | CPU µs/msg | RSS MB |", "|---|---|---|---|---|---|"]
    for r in results:
        rows.append(
            f"| {r.concurrency} | {r.system} | {r.msgs_per_s:.0f} | {r.of_limit * 100:.0f} % | "
            f"{r.cpu_us_per_msg:.0f} | {r.rss_mb:.0f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--delay", type=float, default=0.02, help="seconds the server takes per message")
    p.add_argument("--warmup", type=int, default=0, help="messages before the window (default: jobs / 10)")
    p.add_argument("--splits", nargs="*", help="edm's workers×threads, e.g. 1x32 2x16 (default: 1, 2, 4)")
    p.add_argument(
        "--prefetch", type=int, default=1, help="edm's amqp.prefetch per handler thread (Celery's is 1)"
    )
    p.add_argument("--systems", nargs="+", default=["edm", "threads", "prefork"], help="and bare")
    p.add_argument("--sink-processes", type=int, default=1, help="SMTP server processes sharing its port")
    p.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args(argv)
    warmup = args.warmup or max(1, args.jobs // 10)
    broker = Broker(args.url)
    base = Path(tempfile.mkdtemp(prefix="edm-bench-smtp-"))
    results: list[Result] = []
    sink = Sink(base, args.delay, args.sink_processes)
    try:
        for c in args.concurrency:
            if "edm" in args.systems:
                for workers, threads in splits(c, args.splits):
                    result = run_edm(
                        broker, sink, base, workers, threads, args.jobs, warmup, args.delay, args.prefetch
                    )
                    results.append(result)
                    print(table(results[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
            if "bare" in args.systems:
                results.append(run_bare(sink, c, args.jobs, warmup, args.delay))
                print(table(results[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
            for pool in ("threads", "prefork"):
                if pool in args.systems:
                    results.append(run_celery(broker, sink, pool, c, args.jobs, warmup, args.delay))
                    print(table(results[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    finally:
        sink.stop()
        for problem in broker.cleanup():
            print(f"cleanup: {problem}", file=sys.stderr)
    print(f"{args.jobs} jobs, the server answers each after {args.delay * 1000:.0f} ms; limit = C / delay")
    print("Correctness: each job reached the server exactly once; every queue ended empty")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
