"""Flood the fee receiver of a real daemon and watch its memory.

    python bench/fee_flood.py [--requests 100000] [--clients 64] [--sockets 4] [--burst 150]
                              [--max-rss-mib 120] [--db-url mysql://root@127.0.0.1:3306/test] [--json]

Starts ``python -m edm --config <tmp> start`` with the fee plugin on a free loopback port,
then runs ``--clients`` client processes. Each has ``--sockets`` REQ sockets and one DEALER
that pipelines ``--burst`` requests at a time (more than the per-connection cap of one batch,
so some may be told ``FALSE busy``); about ``--malformed`` of the requests are junk of
several kinds. It reports
the plugin worker's VmRSS before, at its peak (sampled, and VmHWM) and after, requests/s, and
accounts for every reply. It fails (exit 1) when a request got no reply, when the rows stored
differ from the TRUE replies, when the daemon stops serving, or when the peak RSS passes
``--max-rss-mib``. It stops by itself (``--timeout``), drops its table, deletes its broker
names and stops the daemon by its PID.

Observed on a 2-CPU VM (MariaDB on the same host, defaults: 100k requests, 64 clients, 4 REQ
sockets + 1 DEALER each, 20 % junk), with the one-thread receiver: about 7,900 requests/s;
the worker's RSS 33 MiB before, 57 MiB at the peak (VmHWM), 52 MiB after; every request
answered (80 % TRUE, 20 % FALSE malformed, no FALSE busy: libzmq takes the connections in
turn, so a DEALER's burst is spread over several batches) and one row per TRUE. The default bound of 120 MiB
leaves about twice the observed peak; tests/test_fee_flood.py holds a small run to it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pika
import pymysql
import yaml
import zmq

from edm.db import parse_url

ROOT = Path(__file__).resolve().parent.parent
AMQP_URL = os.environ.get("EDM_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
REPLY_TIMEOUT = 30.0  # seconds without any reply before a client gives up on what it has in flight

JUNK = [
    b"1,2",
    b"a,b,c",
    b"-1,2,3",
    b"1,2,1e5",
    b"\xff\xfe,2,3",
    b"",
    b"1,2," + b"9" * 2000,
]


@dataclass
class Counts:
    sent: int = 0
    true: int = 0
    busy: int = 0
    malformed: int = 0  # FALSE for any other reason
    unanswered: int = 0
    unexpected: list[str] = field(default_factory=list)

    def add(self, other: Counts) -> None:
        self.sent += other.sent
        self.true += other.true
        self.busy += other.busy
        self.malformed += other.malformed
        self.unanswered += other.unanswered
        self.unexpected += other.unexpected[:5]


# -- the clients (each in a process of its own) ------------------------------------------------


def _request(rng: random.Random, ticket: int, malformed: float) -> tuple[list[bytes], bool]:
    """The frames of one request and whether it is a valid fee."""
    if rng.random() >= malformed:
        return [f"{ticket},{ticket % 9973},{rng.randrange(10**6)}.{rng.randrange(10**4):04d}".encode()], True
    if rng.random() < 0.15:
        return [f"{ticket},1,1".encode(), b"junk"], False  # multipart
    return [rng.choice(JUNK)], False


def _classify(reply: bytes, valid: bool, counts: Counts) -> None:
    if reply == b"TRUE" and valid:
        counts.true += 1
    elif reply == b"FALSE busy" and valid:
        counts.busy += 1
    elif reply.startswith(b"FALSE ") and not valid:
        counts.malformed += 1
    elif len(counts.unexpected) < 5:
        counts.unexpected.append(f"{reply!r:.80} (valid={valid})")


def client_main(
    index: int, endpoint: str, total: int, sockets: int, burst: int, malformed: float, go: Any, results: Any
) -> None:
    """Send ``total`` requests over ``sockets`` REQ sockets and one pipelining DEALER."""
    rng = random.Random(index)
    counts = Counts()
    context: zmq.Context[Any] = zmq.Context()
    reqs = []
    for _ in range(sockets):
        s = context.socket(zmq.REQ)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
        reqs.append(s)
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    poller = zmq.Poller()
    for s in [*reqs, dealer]:
        poller.register(s, zmq.POLLIN)
    next_ticket = (index + 1) * 10_000_000
    left = total
    waiting: dict[zmq.Socket[Any], bool] = {}  # REQ socket -> whether its request is valid
    dealer_waiting: list[bool] = []  # the DEALER's requests in flight, in order

    def take() -> tuple[list[bytes], bool]:
        nonlocal left, next_ticket
        left -= 1
        next_ticket += 1
        counts.sent += 1
        return _request(rng, next_ticket, malformed)

    go.wait()
    last_reply = time.monotonic()
    try:
        while left or waiting or dealer_waiting:
            for s in reqs:
                if s not in waiting and left:
                    frames, waiting[s] = take()
                    s.send_multipart(frames)
            if not dealer_waiting and left:
                for _ in range(min(burst, left)):
                    frames, valid = take()
                    dealer.send_multipart([b"", *frames])
                    dealer_waiting.append(valid)
            events = dict(poller.poll(1000))
            if not events:
                if time.monotonic() - last_reply > REPLY_TIMEOUT:
                    counts.unanswered += len(waiting) + len(dealer_waiting) + left
                    break
                continue
            last_reply = time.monotonic()
            for s in events:
                if s is dealer:
                    while True:
                        try:
                            reply = dealer.recv_multipart(zmq.NOBLOCK)[-1]
                        except zmq.Again:
                            break
                        # replies to one connection keep no order (busy ones come at once)
                        _classify(reply, _pop_matching(dealer_waiting, reply), counts)
                else:
                    _classify(s.recv(), waiting.pop(s), counts)
    finally:
        context.destroy(linger=0)
        results.put(asdict(counts))


def _pop_matching(waiting: list[bool], reply: bytes) -> bool:
    """Take a request of the kind this reply answers (valid for TRUE/busy, junk otherwise)."""
    valid = reply in (b"TRUE", b"FALSE busy")
    try:
        waiting.remove(valid)
    except ValueError:
        waiting.pop()
        return not valid
    return valid


# -- the daemon --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """``edm start`` with the fee plugin in a temp dir; stopped by PID, whatever happens."""

    def __init__(self, base: Path, db_url: str, table: str, pool_size: int) -> None:
        self.base = base
        self.tag = "edm-flood-" + secrets.token_hex(6)
        self.port = free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.config = base / "mq.yaml"
        doc = {
            "amqp": {"url": AMQP_URL, "exchange": self.tag, "queue": self.tag, "routing_key": self.tag},
            "log": {"dir": "logs", "name": "edm"},
            "daemon": {"pidfile": "run/edm.pid", "stop_timeout": 20},
            "database": {"url": db_url, "pool_size": pool_size},
            "plugins": {
                "fee": {"enabled": True, "listen": self.endpoint, "table": table, "spool": "run/fee.spool"}
            },
        }
        self.config.write_text(yaml.safe_dump(doc))
        self.config.chmod(0o600)
        self.pidfile = base / "run" / "edm.pid"
        self.pids: set[int] = set()

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("EDM_CONFIG", None)
        return subprocess.run(
            [sys.executable, "-m", "edm", "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=str(self.base),
        )

    def start(self) -> None:
        result = self.cli("start")
        if result.returncode != 0:
            raise RuntimeError(f"edm start failed: {result.stderr.strip()}")
        self.pids.add(int(self.pidfile.read_text()))

    def plugin_pid(self, timeout: float = 20) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                state = json.loads(self.pidfile.with_name("edm.status.json").read_text())
                pid = state["workers"]["plugins"]["pid"]
            except (OSError, ValueError, KeyError, TypeError):
                pid = None
            if isinstance(pid, int):
                self.pids.add(pid)
                return pid
            time.sleep(0.1)
        raise RuntimeError("the plugin worker did not show up in the status file")

    def log_text(self) -> str:
        logs = self.base / "logs"
        return "".join(p.read_text(errors="replace") for p in sorted(logs.glob("edm.*.log")))

    def stop(self) -> None:
        self.cli("stop")
        for pid in self.pids:
            if _ours(pid, self.config):
                os.kill(pid, signal.SIGKILL)
        _delete_broker_names(self.tag)


def _ours(pid: int, config: Path) -> bool:
    try:
        return str(config).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _delete_broker_names(tag: str) -> None:
    try:
        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    except pika.exceptions.AMQPError:
        return
    try:
        channel = connection.channel()
        for name in (tag, f"{tag}.dead"):
            channel.queue_delete(name)
            channel.exchange_delete(name)
    finally:
        connection.close()


def memory(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a process, in MiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    return {
        key: int(m.group(1)) / 1024
        for key in ("VmRSS", "VmHWM")
        if (m := re.search(rf"{key}:\s+(\d+) kB", text))
    }


class Sampler(threading.Thread):
    """The highest VmRSS seen every 20 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self._done = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.02):
            try:
                self.peak = max(self.peak, memory(self.pid)["VmRSS"])
            except OSError:
                return

    def stop(self) -> float:
        self._done.set()
        self.join()
        return self.peak


def ask(endpoint: str, body: bytes, timeout_ms: int = 10000) -> bytes | None:
    context: zmq.Context[Any] = zmq.Context()
    try:
        s = context.socket(zmq.REQ)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVTIMEO, timeout_ms)
        s.connect(endpoint)
        s.send(body)
        try:
            return s.recv()
        except zmq.Again:
            return None
    finally:
        context.destroy(linger=0)


def connect(url: str) -> pymysql.connections.Connection:
    db = parse_url(url)  # the pool's own parser: percent-decoding, defaults
    return pymysql.connect(
        host=db.host, port=db.port, user=db.user, password=db.password, database=db.database, autocommit=True
    )


def sql(url: str, statement: str) -> list[tuple[Any, ...]]:
    con = connect(url)
    try:
        with con.cursor() as cur:
            cur.execute(statement)
            return list(cur.fetchall())
    finally:
        con.close()


# -- the run -----------------------------------------------------------------------------------


def flood(
    requests: int = 100_000,
    clients: int = 64,
    sockets: int = 4,
    burst: int = 150,
    malformed: float = 0.2,
    db_url: str = "mysql://root@127.0.0.1:3306/test",
    pool_size: int = 8,
    timeout: float = 600,
) -> dict[str, Any]:
    """Run one flood against a fresh daemon; return the measurements (see ``verdict``)."""
    table = f"flood_fee_{secrets.token_hex(4)}"
    mp = multiprocessing.get_context("spawn")  # no inherited threads, sockets or zmq context
    with tempfile.TemporaryDirectory(prefix="edm-flood-") as tmp:
        daemon = Daemon(Path(tmp), db_url, table, pool_size)
        try:
            daemon.start()
            pid = daemon.plugin_pid()
            probe_first = ask(daemon.endpoint, b"1,1,1", timeout_ms=20000)
            time.sleep(0.5)
            before = memory(pid)
            go = mp.Barrier(clients + 1)  # every client connected: the clock starts
            results = mp.Queue()
            share = [requests // clients + (1 if n < requests % clients else 0) for n in range(clients)]
            procs = [
                mp.Process(
                    target=client_main,
                    args=(n, daemon.endpoint, share[n], sockets, burst, malformed, go, results),
                )
                for n in range(clients)
            ]
            for p in procs:
                p.start()
            sampler = Sampler(pid)
            sampler.start()
            go.wait(timeout=120)
            started = time.perf_counter()
            counts = Counts()
            deadline = time.monotonic() + timeout
            for _ in procs:
                counts.add(Counts(**results.get(timeout=max(1.0, deadline - time.monotonic()))))
            elapsed = time.perf_counter() - started
            for p in procs:
                p.join(10)
                if p.is_alive():
                    p.kill()
            sampled_peak = sampler.stop()
            peak = memory(pid)
            time.sleep(2)  # let the receiver finish and the allocator settle
            after = memory(pid)
            probe_last = ask(daemon.endpoint, b"2,2,2")
            still_serving = probe_first == probe_last == b"TRUE" and daemon.cli("status").returncode == 0
            ((rows, rows_y),) = sql(db_url, f"SELECT COUNT(*), COALESCE(SUM(status = 'Y'), 0) FROM `{table}`")
            tracebacks = daemon.log_text().count("Traceback")
        finally:
            daemon.stop()
            sql(db_url, f"DROP TABLE IF EXISTS `{table}`")
    return {
        "requests": requests,
        "clients": clients,
        "sockets_per_client": sockets + 1,
        "dealer_burst": burst,
        "seconds": round(elapsed, 2),
        "requests_per_s": round(counts.sent / elapsed),
        "replies": {
            "sent": counts.sent,
            "TRUE": counts.true,
            "FALSE busy": counts.busy,
            "FALSE malformed": counts.malformed,
            "unanswered": counts.unanswered,
            "unexpected": counts.unexpected,
        },
        "rows": int(rows) - 2,  # without the two probes
        "rows_not_Y": int(rows) - int(rows_y),
        "rss_mib": {
            "before": round(before["VmRSS"], 1),
            "peak": round(max(sampled_peak, peak["VmRSS"]), 1),
            "hwm": round(peak["VmHWM"], 1),
            "after": round(after["VmRSS"], 1),
        },
        "still_serving": still_serving,
        "tracebacks_in_log": tracebacks,
    }


def verdict(result: dict[str, Any], max_rss_mib: float) -> list[str]:
    """What is wrong with a flood's result (nothing: an empty list)."""
    replies = result["replies"]
    problems = []
    if replies["unanswered"] or replies["unexpected"]:
        problems.append(f"{replies['unanswered']} unanswered, unexpected: {replies['unexpected']}")
    answered = replies["TRUE"] + replies["FALSE busy"] + replies["FALSE malformed"]
    if answered != replies["sent"] or replies["sent"] != result["requests"]:
        problems.append(f"{replies['sent']} sent, {answered} answered, {result['requests']} planned")
    if result["rows"] != replies["TRUE"] or result["rows_not_Y"]:
        problems.append(f"{result['rows']} rows ({result['rows_not_Y']} not Y) for {replies['TRUE']} TRUE")
    if result["rss_mib"]["hwm"] > max_rss_mib or result["rss_mib"]["peak"] > max_rss_mib:
        problems.append(f"peak RSS {result['rss_mib']} MiB over the bound of {max_rss_mib} MiB")
    if not result["still_serving"]:
        problems.append("the daemon stopped serving")
    if result["tracebacks_in_log"]:
        problems.append(f"{result['tracebacks_in_log']} traceback(s) in the log")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=64, help="client processes")
    parser.add_argument("--sockets", type=int, default=4, help="REQ sockets per client (plus one DEALER)")
    parser.add_argument("--burst", type=int, default=150, help="requests each DEALER pipelines at once")
    parser.add_argument("--malformed", type=float, default=0.2, help="share of junk requests")
    parser.add_argument(
        "--max-rss-mib", type=float, default=120, help="fail when the worker's peak RSS passes this"
    )
    parser.add_argument("--pool-size", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=600, help="seconds the flood may take")
    parser.add_argument("--db-url", default="mysql://root@127.0.0.1:3306/test")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if urlsplit(args.db_url).hostname not in ("127.0.0.1", "localhost", "::1"):
        parser.error("--db-url: only loopback databases")
    result = flood(
        args.requests,
        args.clients,
        args.sockets,
        args.burst,
        args.malformed,
        args.db_url,
        args.pool_size,
        args.timeout,
    )
    problems = verdict(result, args.max_rss_mib)
    result["max_rss_mib"], result["problems"] = args.max_rss_mib, problems
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        r, m = result["replies"], result["rss_mib"]
        print(
            f"{result['requests']} requests from {result['clients']} client processes, "
            f"{result['sockets_per_client']} sockets each"
        )
        print(f"{'requests/s':<24}{result['requests_per_s']:>10}   ({result['seconds']} s)")
        for key in ("TRUE", "FALSE busy", "FALSE malformed", "unanswered"):
            print(f"{key:<24}{r[key]:>10}")
        print(f"{'rows stored (all Y)':<24}{result['rows']:>10}")
        print(f"{'RSS before MiB':<24}{m['before']:>10}")
        print(f"{'RSS peak MiB':<24}{m['peak']:>10}   (VmHWM {m['hwm']}, bound {args.max_rss_mib})")
        print(f"{'RSS after MiB':<24}{m['after']:>10}")
        print(f"{'still serving':<24}{result['still_serving']!s:>10}")
        for problem in problems:
            print(f"FAIL: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
