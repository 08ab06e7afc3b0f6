"""edm's benchmark: edm against bare consumers, on the same broker, in one run.

    python bench/run.py [--messages 20000] [--size 100] [--rss-messages 100000] [--soak N]
                        [--skip X,Y] [--json PATH] [--quick]

Throughput: for each consumer a fresh durable queue is pre-filled with N persistent messages,
then the consumer is started in a fresh process and timed from its first message line to its
last (the line timestamps, 1 ms resolution). edm runs as the real daemon (``edm start`` with
its own config); the references are a bare pika BlockingConnection consumer, a bare pika
SelectConnection one, a plain socket loop (the floor of any Python consumer) and php-amqp when
``php -m`` lists ``amqp``. Every run checks that each
message was written exactly once and that the queue is left empty. References and edm are
interleaved and the median of ``--reps`` runs is reported.

Also: publish→logged latency at a steady rate, RSS of each edm process, ``edm publish`` rate
and the fee path (bench/fee.py). Skippable parts: blocking, select, plain, php, edm, metrics,
prefetch50, latency, rss, publish, fee. See bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pika
import pika.exceptions
from harness import (
    ROOT,
    BenchError,
    Broker,
    EdmDaemon,
    LogWatch,
    Scraper,
    Sentinel,
    bodies,
    broker_pid,
    cpu_seconds,
    rss_bytes,
    system_busy_seconds,
    unique_name,
    wait_lines,
)
from report import evaluate, render

BENCH = Path(__file__).resolve().parent
PARTS = (
    "blocking",
    "select",
    "plain",
    "php",
    "edm",
    "metrics",
    "prefetch50",
    "latency",
    "rss",
    "publish",
    "fee",
)
CONSUMER_NAMES = {
    "blocking": "pika BlockingConnection",
    "select": "pika SelectConnection",
    "plain": "plain socket loop (floor)",
    "php": "php-amqp consume()",
    "edm": "edm (daemon)",
    "metrics": "edm (daemon), metrics.listen on, scraped every second",
}
FEE_CLIENTS = 16
ATTEMPTS = 3
QUIET = 0.25  # cores the rest of the machine may use when a run starts (with --wait-quiet)


@dataclass
class Bench:
    args: argparse.Namespace
    broker: Broker
    tmp: Path
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    beam: int | None = field(default_factory=broker_pid)
    daemons: list[EdmDaemon] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    disturbances: list[str] = field(default_factory=list)

    def workdir(self, name: str) -> Path:
        path = self.tmp / name
        path.mkdir(parents=True)
        return path

    def daemon(self, name: str, prefetch: int, metrics: bool = False) -> EdmDaemon:
        d = EdmDaemon(self.workdir(name), self.broker.url, name, prefetch, metrics)
        self.daemons.append(d)
        return d

    def broker_cpu(self) -> float:
        return cpu_seconds([self.beam]) if self.beam else 0.0


def php_amqp() -> str | None:
    """The php-amqp version when ``php`` has the extension, else None."""
    if shutil.which("php") is None:
        return None
    modules = subprocess.run(["php", "-m"], capture_output=True, text=True, timeout=30).stdout.split()
    if "amqp" not in modules:
        return None
    version = subprocess.run(
        ["php", "-r", 'echo PHP_VERSION, " / amqp ", phpversion("amqp");'],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return version.stdout.strip() or "installed"


# -- throughput -----------------------------------------------------------------------------------


def reference_command(b: Bench, kind: str, queue: str, prefetch: int, count: int, log: Path) -> list[str]:
    if kind == "php":
        u = urlsplit(b.broker.url)
        vhost = unquote(u.path[1:]) if len(u.path) > 1 else "/"
        return [
            "php",
            str(BENCH / "php_consumer.php"),
            u.hostname or "127.0.0.1",
            str(u.port or 5672),
            unquote(u.username or "guest"),
            unquote(u.password or "guest"),
            vhost,
            queue,
            str(prefetch),
            str(count),
            str(log),
        ]
    args = [kind, b.broker.url, queue, str(prefetch), str(count), str(log)]
    return [sys.executable, str(BENCH / "consumers.py"), *args]


@dataclass
class Running:
    """A consumer under test: edm (its main process and workers) or one reference process."""

    kind: str
    pids: list[int]
    watch: LogWatch
    daemon: EdmDaemon | None = None
    proc: subprocess.Popen[bytes] | None = None
    scraper: Scraper | None = None

    def finish(self) -> None:
        """Stop edm gracefully, or let the reference exit after its last message."""
        if self.scraper is not None:
            self.scraper.stop()
            if not self.scraper.scrapes or self.scraper.errors:
                self.abort()
                raise BenchError(f"/metrics: {self.scraper.scrapes} scrapes, {self.scraper.errors} failed")
        try:
            if self.daemon is not None:
                self.daemon.stop()
            elif self.proc is not None:
                code = self.proc.wait(30)
                if code != 0:
                    raise BenchError(f"the {self.kind} consumer exited with {code}")
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        if self.scraper is not None:
            self.scraper.stop()
        if self.daemon is not None:
            self.daemon.kill()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_consumer(b: Bench, kind: str, name: str, prefetch: int, count: int) -> Running:
    if kind in ("edm", "metrics"):
        daemon = b.daemon(name, prefetch, metrics=kind == "metrics")
        running = Running(kind, daemon.start(), daemon.watch(), daemon=daemon)
        if daemon.listen is not None:
            running.scraper = Scraper(daemon.listen)
        return running
    directory = b.workdir(name)
    command = reference_command(b, kind, name, prefetch, count, directory / "ref.log")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with (directory / "stderr").open("wb") as err:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=env)
    b.processes.append(proc)
    return Running(kind, [proc.pid], LogWatch(directory, "ref."), proc=proc)


def wait_consuming(b: Bench, running: Running, name: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while b.broker.depth(name)[1] < 1:
        if time.monotonic() > deadline or (running.proc is not None and running.proc.poll() is not None):
            raise BenchError(f"{running.kind} did not start consuming {name}")
        time.sleep(0.05)


@dataclass
class Sample:
    """CPU seconds used so far by the consumer, the broker, this process and the whole machine."""

    client: float
    broker: float
    own: float
    machine: float
    wall: float

    @classmethod
    def take(cls, b: Bench, pids: list[int]) -> Sample:
        own = resource.getrusage(resource.RUSAGE_SELF)
        return cls(
            client=cpu_seconds(pids),
            broker=b.broker_cpu(),
            own=own.ru_utime + own.ru_stime,
            machine=system_busy_seconds(),
            wall=time.monotonic(),
        )


def consume_run(b: Bench, kind: str, prefetch: int) -> dict[str, Any]:
    """Pre-fill a fresh queue, start one consumer, time it from first to last message."""
    n, size = b.args.messages, b.args.size
    name = unique_name(b.tag, f"{kind}-p{prefetch}")
    b.broker.declare(name)
    b.broker.prefill(name, bodies(n, size), n)
    b.beam = broker_pid()
    running = start_consumer(b, kind, name, prefetch, n)
    try:
        wait_lines(running.watch, 1, pids=running.pids)
        s0, k0 = Sample.take(b, running.pids), running.watch.count
        wait_lines(running.watch, n, pids=running.pids)
        s1 = Sample.take(b, running.pids)
    except BaseException:
        running.abort()
        raise
    running.finish()
    left, consumers = b.broker.depth(name)
    check = running.watch.verify(n)
    ok = check["lines"] == check["unique"] == n and left == 0 and consumers == 0 and not check["strays"]
    if not ok:
        raise BenchError(f"{kind} prefetch {prefetch}: {check} queue left {left}, consumers {consumers}")
    b.broker.delete(name)
    elapsed = check["last"] - check["first"]
    measured = max(1, n - k0)
    client, broker = s1.client - s0.client, s1.broker - s0.broker
    others = (s1.machine - s0.machine) - client - broker - (s1.own - s0.own)
    return {
        "ok": ok,
        "messages": n,
        "seconds": elapsed,
        "msgs_per_s": (n - 1) / elapsed if elapsed > 0 else None,
        "client_us_per_msg": client / measured * 1e6,
        "broker_us_per_msg": broker / measured * 1e6 if b.beam else None,
        # CPU the rest of the machine used meanwhile, in cores: other load skews this run.
        "other_cores": max(0.0, others) / max(1e-3, s1.wall - s0.wall),
        "queue_left": left,
        "pids": running.pids,
        **{k: check[k] for k in ("lines", "unique", "missing", "duplicates", "redelivered")},
    }


def wait_quiet(b: Bench) -> float:
    """Wait (up to --wait-quiet s) until the rest of the machine uses less than QUIET cores;
    return the cores it used in the last look."""
    deadline = time.monotonic() + b.args.wait_quiet
    while True:
        own0, busy0 = resource.getrusage(resource.RUSAGE_SELF), system_busy_seconds()
        time.sleep(0.5)
        own1, busy1 = resource.getrusage(resource.RUSAGE_SELF), system_busy_seconds()
        own = (own1.ru_utime + own1.ru_stime) - (own0.ru_utime + own0.ru_stime)
        load = max(0.0, busy1 - busy0 - own) / 0.5
        if load < QUIET or time.monotonic() > deadline:
            return load


def attempt(b: Bench, label: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run once; when the broker cut our connections meanwhile (another program restarted it or
    closed every connection), the numbers mean nothing: run again, up to ATTEMPTS times."""
    for number in range(1, ATTEMPTS + 1):
        if b.args.wait_quiet > 0:
            wait_quiet(b)
        sentinel = open_sentinel(b.broker.url)
        error: BaseException | None = None
        try:
            result = run()
        except Exception as exc:
            error = exc
        disturbed = sentinel.disturbed()
        sentinel.close()
        if disturbed and number < ATTEMPTS:
            note = f"{label}: attempt {number} disturbed (the broker closed connections); run again"
            print(f"  {note}", file=sys.stderr, flush=True)
            b.disturbances.append(note)
            continue
        if error is not None:
            if isinstance(error, BenchError):
                raise error
            raise BenchError(f"{type(error).__name__}: {error}") from error
        result["attempts"] = number
        return result
    raise AssertionError("unreachable")


def open_sentinel(url: str, timeout: float = 60) -> Sentinel:
    """A sentinel connection; waits for a broker that is restarting."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return Sentinel(url)
        except pika.exceptions.AMQPError as exc:
            if time.monotonic() > deadline:
                raise BenchError(f"the broker does not answer: {exc!r}") from None
            time.sleep(1)


def consumer_plan(b: Bench, php: str | None) -> list[tuple[str, int]]:
    skip = b.args.skip
    plan = [("blocking", 1), ("edm", 1), ("metrics", 1), ("select", 1), ("plain", 1), ("php", 1)]
    if "prefetch50" not in skip:
        plan += [("blocking", 50), ("edm", 50), ("metrics", 50)]
    return [(k, p) for k, p in plan if k not in skip and (k != "php" or php)]


def throughput(b: Bench, php: str | None) -> dict[str, Any]:
    plan = consumer_plan(b, php)
    runs: dict[str, list[dict[str, Any]]] = {f"{k}-p{p}": [] for k, p in plan}
    for rep in range(b.args.reps):
        for kind, prefetch in plan if rep % 2 == 0 else reversed(plan):
            key = f"{kind}-p{prefetch}"
            try:
                run = attempt(b, key, lambda k=kind, p=prefetch: consume_run(b, k, p))
            except BenchError as exc:
                b.failures.append(f"{key}: {exc}")
                run = {"ok": False, "error": str(exc)}
            runs[key].append(run)
            rate = run.get("msgs_per_s")
            shown = f"{rate:,.0f} msg/s" if rate else run.get("error", "")
            print(f"  [{rep + 1}/{b.args.reps}] {key:<12} {shown}", file=sys.stderr, flush=True)
    result = {}
    for kind, prefetch in plan:
        key = f"{kind}-p{prefetch}"
        good = [r for r in runs[key] if r["ok"]]
        median = {
            m: statistics.median(r[m] for r in good) if good and good[0].get(m) is not None else None
            for m in ("msgs_per_s", "client_us_per_msg", "broker_us_per_msg", "other_cores")
        }
        result[key] = {
            "name": f"{CONSUMER_NAMES[kind]}, prefetch {prefetch}",
            "kind": kind,
            "prefetch": prefetch,
            "ok": len(good) == len(runs[key]),
            "median": median,
            "runs": runs[key],
        }
    return result


# -- latency ------------------------------------------------------------------------------------


def paced_publish(url: str, name: str, total: int, rate: float, size: int) -> float:
    """Publish ``total`` persistent messages at ``rate``/s, each body carrying its send time."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    properties = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)
    t0 = time.perf_counter() + 0.05
    for i in range(total):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        body = b"%08d %.6f " % (i, time.time())
        channel.basic_publish(name, name, body.ljust(size, b"x"), properties)
    achieved = total / (time.perf_counter() - t0)
    connection.close()
    return achieved


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def latency_run(b: Bench, kind: str) -> dict[str, Any]:
    rate = b.args.rate
    total = int(rate * b.args.latency_seconds)
    name = unique_name(b.tag, f"latency-{kind}")
    b.broker.declare(name)
    running = start_consumer(b, kind, name, 1, total)
    try:
        wait_consuming(b, running, name)
        achieved = paced_publish(b.broker.url, name, total, rate, b.args.size)
        wait_lines(running.watch, total, pids=running.pids, stall=30)
    except BaseException:
        running.abort()
        raise
    running.finish()
    watch = running.watch
    check = watch.verify(total)
    left, _ = b.broker.depth(name)
    if not (check["lines"] == check["unique"] == total and left == 0):
        raise BenchError(f"latency {kind}: {check}, queue left {left}")
    b.broker.delete(name)
    # A line's time is cut to the millisecond: its midpoint is the unbiased estimate.
    lat = sorted((stamp + 0.0005 - float(body.split(b" ")[1])) * 1000 for stamp, body, _ in watch.lines())
    return {
        "ok": True,
        "rate_target": rate,
        "rate_achieved": achieved,
        "messages": total,
        "lines": check["lines"],
        "unique": check["unique"],
        "duplicates": check["duplicates"],
        "queue_left": left,
        "p50_ms": percentile(lat, 0.50),
        "p99_ms": percentile(lat, 0.99),
        "max_ms": lat[-1],
    }


def latency(b: Bench) -> dict[str, Any]:
    """edm's latency, and a bare BlockingConnection consumer's for scale."""
    results = {}
    for kind in ("edm", "blocking"):
        if kind not in b.args.skip:
            results[kind] = attempt(b, f"latency {kind}", lambda k=kind: latency_run(b, k))
    return results


# -- memory -------------------------------------------------------------------------------------


def rss_of(daemon: EdmDaemon, pids: list[int]) -> dict[str, int]:
    """VmRSS of each edm process, named main / consumer / plugins from edm's status file."""
    state = json.loads(daemon.pidfile.with_name("edm.status.json").read_text())
    names = {w["pid"]: n for n, w in state.get("workers", {}).items()}
    return {"main" if i == 0 else names.get(pid, str(pid)): rss_bytes(pid) for i, pid in enumerate(pids)}


def rss_run(b: Bench, total: int, label: str) -> dict[str, Any]:
    """Start edm idle, feed it ``total`` messages (a bounded backlog), sample RSS as it goes."""
    name = unique_name(b.tag, label)
    b.broker.declare(name)
    running = start_consumer(b, "edm", name, 1, total)
    daemon, pids, watch = running.daemon, running.pids, running.watch
    assert daemon is not None
    chunk = min(20000, total)
    samples = []
    try:
        wait_consuming(b, running, name)
        time.sleep(1.0)
        idle = rss_of(daemon, pids)
        for start in range(0, total, chunk):
            wait_lines(watch, max(0, start - chunk), pids=pids)
            count = min(chunk, total - start)
            b.broker.prefill(name, bodies(count, b.args.size, start), count)
            samples.append({"messages": watch.poll(), "rss": rss_of(daemon, pids)})
        wait_lines(watch, total, pids=pids)
        time.sleep(0.5)
        after = rss_of(daemon, pids)
    except BaseException:
        running.abort()
        raise
    running.finish()
    check = watch.verify(total)
    left, _ = b.broker.depth(name)
    if not (check["lines"] == check["unique"] == total and left == 0):
        raise BenchError(f"{label}: {check}, queue left {left}")
    b.broker.delete(name)
    samples.append({"messages": total, "rss": after})
    return {
        "ok": True,
        "messages": total,
        "lines": check["lines"],
        "unique": check["unique"],
        "duplicates": check["duplicates"],
        "queue_left": left,
        "idle": idle,
        "after": after,
        "samples": samples,
    }


def soak_growth(soak: dict[str, Any]) -> dict[str, int]:
    """RSS growth of each process from the first sample past 10 % of the soak to its end."""
    total = soak["messages"]
    base = next(s for s in soak["samples"] if s["messages"] >= total // 10)["rss"]
    return {proc: soak["after"][proc] - base.get(proc, 0) for proc in soak["after"]}


# -- edm publish --------------------------------------------------------------------------------


def publish_run(b: Bench) -> dict[str, Any]:
    n = b.args.publish_messages
    name = unique_name(b.tag, "publish")
    b.broker.declare(name)
    daemon = b.daemon(name, 1)  # only its config: publish reads amqp.exchange and routing_key
    source = daemon.base / "bodies.txt"
    with source.open("wb") as f:
        for body in bodies(n, b.args.size):
            f.write(body + b"\n")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = daemon.cli("publish", "--file", str(source), timeout=600)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    left, _ = b.broker.depth(name)
    if result.returncode != 0 or left != n:
        raise BenchError(
            f"edm publish exited {result.returncode} ({result.stderr.strip()}); {left} of {n} queued"
        )
    b.broker.delete(name)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "ok": True,
        "messages": n,
        "queued": left,
        "seconds": elapsed,
        "msgs_per_s": n / elapsed,
        "client_us_per_msg": cpu / n * 1e6,
    }


# -- the fee path -------------------------------------------------------------------------------


def fee_runs(b: Bench) -> dict[str, Any]:
    runs = []
    for rep in range(b.args.reps):
        command = [sys.executable, str(BENCH / "fee.py"), "--json", "--requests", str(b.args.fee_requests)]
        command += ["--clients", str(FEE_CLIENTS), "--db-url", b.args.db_url, "--tag", f"{b.tag}{rep}"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
        try:
            run = json.loads(done.stdout)
        except ValueError:
            raise BenchError(
                f"bench/fee.py failed ({done.returncode}): {done.stderr.strip()[-2000:]}"
            ) from None
        total, edm, ref = run["requests"], run["edm"], run["reference"]
        run["ok"] = edm["requests"] == edm["rows"] == total and ref["rows"] == total
        if not run["ok"]:
            raise BenchError(
                f"fee: {total} sent, edm {edm['requests']} TRUE / {edm['rows']} rows, "
                f"reference {ref['rows']} rows"
            )
        runs.append(run)
        print(
            f"  [{rep + 1}/{b.args.reps}] fee          {edm['requests_per_s']:,.0f} durable replies/s",
            file=sys.stderr,
            flush=True,
        )
    med = statistics.median
    return {
        "ok": True,
        "clients": FEE_CLIENTS,
        "requests": runs[0]["requests"],
        "edm_replies_per_s": med(r["edm"]["requests_per_s"] for r in runs),
        "reference_replies_per_s": med(r["reference"]["requests_per_s"] for r in runs),
        "reference_rows_per_s": med(r["reference"]["rows_per_s"] for r in runs),
        "runs": runs,
    }


def drop_fee_tables(b: Bench) -> list[str]:
    """Tables bench/fee.py made for this run's tag and could not drop itself (a killed run)."""
    from fee import connect

    con = connect(b.args.db_url)
    try:
        with con.cursor() as cur:
            cur.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = DATABASE() "
                "AND (table_name LIKE %s OR table_name LIKE %s)",
                (f"bench\\_fee\\_{b.tag}%", f"bench\\_ref\\_{b.tag}%"),
            )
            names = [row[0] for row in cur.fetchall()]
            for table in names:
                cur.execute(f"DROP TABLE IF EXISTS `{table}`")
        con.commit()
        return names
    finally:
        con.close()


# -- the run ------------------------------------------------------------------------------------


def machine(b: Bench, php: str | None) -> dict[str, Any]:
    props = b.broker.server_properties()
    cpu = next(
        (
            r.split(":", 1)[1].strip()
            for r in Path("/proc/cpuinfo").read_text().splitlines()
            if r.startswith("model name")
        ),
        platform.processor(),
    )

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "rabbitmq": props.get("version"),
        "erlang": props.get("platform"),
        "python": platform.python_version(),
        "pika": pika.__version__,
        "php_amqp": php,
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=20000, help="messages per throughput run")
    p.add_argument("--size", type=int, default=100, help="body size in bytes (>= 30)")
    p.add_argument("--reps", type=int, default=3, help="repetitions; the median is reported")
    p.add_argument("--rss-messages", type=int, default=100000)
    p.add_argument("--soak", type=int, default=0, metavar="N", help="also soak edm with N messages")
    p.add_argument("--publish-messages", type=int, default=100000)
    p.add_argument("--rate", type=float, default=1000.0, help="latency: messages per second")
    p.add_argument("--latency-seconds", type=float, default=10.0)
    p.add_argument("--fee-requests", type=int, default=20000)
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=30.0,
        metavar="S",
        help="before each run wait up to S s for the rest of the machine to go quiet (0: never)",
    )
    p.add_argument("--skip", default="", help=f"comma-separated parts to skip: {','.join(PARTS)}")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repetition (CI)")
    p.add_argument(
        "--url", default=os.environ.get("EDM_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
    )
    p.add_argument("--db-url", default="mysql://root@127.0.0.1:3306/test")
    args = p.parse_args(argv)
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = args.skip - set(PARTS)
    if unknown:
        p.error(f"--skip: unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    if args.quick:
        args.messages, args.reps, args.rss_messages, args.publish_messages = 2000, 1, 2000, 2000
        args.latency_seconds, args.fee_requests, args.wait_quiet = 2.0, 320, 0.0
    if args.size < 30:
        p.error("--size: at least 30 bytes (the latency bodies carry a sequence number and a time)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="edm-bench-"))
    b = Bench(args, Broker(args.url), tmp)
    php = php_amqp()
    results: dict[str, Any] = {
        "tag": b.tag,
        "tmp": str(tmp),
        "machine": machine(b, php),
        "options": {
            k: sorted(v) if isinstance(v, set) else v
            for k, v in vars(args).items()
            if k not in ("url", "db_url")
        },
    }
    print(f"edm bench {b.tag}: {args.messages} × {args.size} B, {args.reps} rep(s)", file=sys.stderr)
    steps: list[tuple[str, Any]] = [("throughput", lambda: throughput(b, php))]
    if "latency" not in args.skip:
        steps.append(("latency", lambda: latency(b)))
    if "rss" not in args.skip:
        steps.append(("rss", lambda: attempt(b, "rss", lambda: rss_run(b, args.rss_messages, "rss"))))
    if args.soak:
        steps.append(("soak", lambda: attempt(b, "soak", lambda: rss_run(b, args.soak, "soak"))))
    if "publish" not in args.skip:
        steps.append(("publish", lambda: attempt(b, "publish", lambda: publish_run(b))))
    if "fee" not in args.skip:
        steps.append(("fee", lambda: fee_runs(b)))
    try:
        for name, step in steps:
            print(f"{name} …", file=sys.stderr, flush=True)
            try:
                results[name] = step()
            except Exception as exc:
                b.failures.append(f"{name}: {exc}")
                results[name] = {"ok": False, "error": str(exc)}
    finally:
        results["cleanup"] = cleanup(b)
        results["queues"] = queues_made(b)
    if "soak" in results and results["soak"].get("ok"):
        results["soak"]["growth"] = soak_growth(results["soak"])
    results["php"] = php
    results["targets"] = evaluate(results)
    results["failures"] = b.failures
    results["disturbances"] = b.disturbances
    results["correct"] = not b.failures
    print(render(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    for failure in b.failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 0 if not b.failures else 1


def cleanup(b: Bench) -> dict[str, Any]:
    """Stop what we started (by PID), delete queues, exchanges, fee tables and the temp dir."""
    killed: list[int] = []
    for proc in b.processes:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            killed.append(proc.pid)
    for daemon in b.daemons:
        killed += daemon.kill()
    try:
        open_sentinel(b.broker.url).close()  # a broker restarted by someone else: wait for it
    except BenchError:
        pass
    problems = b.broker.cleanup()
    tables: list[str] = []
    if "fee" not in b.args.skip:
        try:
            tables = drop_fee_tables(b)
        except Exception as exc:
            problems.append(f"cannot drop fee tables: {exc}")
    shutil.rmtree(b.tmp, ignore_errors=True)
    for problem in problems:
        b.failures.append(f"cleanup: {problem}")
    pids = sorted({pid for d in b.daemons for pid in d.seen_pids})
    return {"killed": killed, "tables_dropped": tables, "problems": problems, "edm_pids": pids}


def queues_made(b: Bench) -> list[str]:
    return [q for name in b.broker.created for q in (name, f"{name}.dead")]


if __name__ == "__main__":
    sys.exit(main())
