"""Fee receiver benchmark: edm's FeePlugin against a server written the way the PHP daemon was.

    python bench/fee.py [--requests 20000] [--clients 16] [--db-url mysql://root@127.0.0.1:3306/test] [--json]

Both servers get the same load: ``--clients`` concurrent REQ clients sending ``--requests``
fees in total, over loopback.

* edm: replies TRUE only once the fee is committed (group commit), so its requests/s are
  durable requests/s.
* reference (the PHP way): a REP socket that replies TRUE at once and hands the insert to a
  thread pool sharing a few connections. Its requests/s say nothing about durability; its
  rows/s (rows actually stored, per second until the pool has drained) is the real rate.

Each run uses fresh tables and drops them; it stops by itself.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import queue
import secrets
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pymysql
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edm.config import parse
from edm.db import Database, parse_url
from edm.plugins.fee.receiver import FeePlugin

REFERENCE_THREADS = 8


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def connect(url: str) -> pymysql.connections.Connection:
    db = parse_url(url)  # the pool's own parser: percent-decoding, defaults
    return pymysql.connect(
        host=db.host, port=db.port, user=db.user, password=db.password, database=db.database, autocommit=False
    )


def _clients(endpoint: str, clients: int, total: int, results: Any) -> None:
    """Runs in a process of its own, so the clients do not share the server's GIL."""
    context: zmq.Context[Any] = zmq.Context()
    per_client = total // clients
    trues = [0] * clients
    go = threading.Barrier(clients + 1)

    def client(index: int) -> None:
        sock = context.socket(zmq.REQ)
        sock.setsockopt(zmq.RCVTIMEO, 30000)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        go.wait()
        try:
            for i in range(per_client):
                ticket = index * per_client + i + 1
                sock.send(f"{ticket},{1000 + index},{i % 1000}.25".encode())
                if sock.recv() == b"TRUE":
                    trues[index] += 1
        except zmq.Again:
            print(f"client {index}: no reply within 30 s", file=sys.stderr)
        finally:
            sock.close(0)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    go.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    context.term()
    results.put((elapsed, sum(trues)))


def drive(endpoint: str, clients: int, total: int) -> tuple[float, int]:
    """Send ``total`` fees from ``clients`` REQ sockets; return (seconds, TRUE replies)."""
    mp = multiprocessing.get_context("spawn")
    results = mp.Queue()
    process = mp.Process(target=_clients, args=(endpoint, clients, total, results))
    process.start()
    try:
        elapsed, trues = results.get(timeout=600)
    finally:
        process.join(30)
        if process.is_alive():
            process.kill()
    return float(elapsed), int(trues)


def count_rows(url: str, table: str) -> int:
    con = connect(url)
    try:
        with con.cursor() as cur:
            cur.execute(f"SELECT COUNT(*) FROM `{table}` WHERE status = 'Y'")
            return int(cur.fetchone()[0])
    finally:
        con.close()


def drop(url: str, table: str) -> None:
    con = connect(url)
    try:
        with con.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS `{table}`")
    finally:
        con.close()


def bench_edm(url: str, clients: int, total: int, pool_size: int, tag: str = "") -> dict[str, float]:
    table = f"bench_fee_{tag}{secrets.token_hex(4)}"
    with tempfile.TemporaryDirectory() as tmp:
        raw = {
            "database": {"url": url, "pool_size": pool_size},
            "plugins": {
                "fee": {"enabled": True, "listen": free_endpoint(), "table": table, "spool": "fee.spool"}
            },
        }
        config = parse(raw, Path(tmp) / "mq.yaml", environ={})
        db = Database.open(config.database)
        plugin = FeePlugin(config, db)
        plugin.start()
        try:
            assert plugin.endpoint is not None
            elapsed, trues = drive(plugin.endpoint, clients, total)
        finally:
            plugin.stop(30)
            db.close()
    try:
        rows = count_rows(url, table)
    finally:
        drop(url, table)
    return {"requests": trues, "seconds": elapsed, "requests_per_s": trues / elapsed, "rows": rows}


def bench_reference(url: str, clients: int, total: int, tag: str = "") -> dict[str, float]:
    """REP socket, TRUE at once, INSERT (N) then UPDATE (Y) per fee in a thread pool."""
    table = f"bench_ref_{tag}{secrets.token_hex(4)}"
    setup = connect(url)
    with setup.cursor() as cur:
        columns = "ticket BIGINT PRIMARY KEY, login BIGINT, volume DECIMAL(20,4), status CHAR(1)"
        cur.execute(f"CREATE TABLE `{table}` ({columns})")
    setup.close()
    connections: queue.Queue[pymysql.connections.Connection] = queue.Queue()
    for _ in range(REFERENCE_THREADS):
        connections.put(connect(url))
    pool = ThreadPoolExecutor(REFERENCE_THREADS)
    endpoint = free_endpoint()
    context: zmq.Context[Any] = zmq.Context()
    rep = context.socket(zmq.REP)
    rep.setsockopt(zmq.LINGER, 0)
    rep.bind(endpoint)
    stop = threading.Event()

    def insert(ticket: int, login: int, volume: str) -> None:
        con = connections.get()
        try:
            with con.cursor() as cur:
                cur.execute(f"INSERT IGNORE INTO `{table}` VALUES (%s, %s, %s, 'N')", (ticket, login, volume))
                cur.execute(f"UPDATE `{table}` SET status = 'Y' WHERE ticket = %s", (ticket,))
            con.commit()
        finally:
            connections.put(con)

    def serve() -> None:
        poller = zmq.Poller()
        poller.register(rep, zmq.POLLIN)
        while not stop.is_set():
            if not poller.poll(100):
                continue
            body = rep.recv()
            rep.send(b"TRUE")
            ticket, login, volume = body.decode().split(",")
            pool.submit(insert, int(ticket), int(login), volume)

    server = threading.Thread(target=serve)
    server.start()
    try:
        elapsed, trues = drive(endpoint, clients, total)
        answered = time.perf_counter()
        pool.shutdown(wait=True)
        drained = elapsed + (time.perf_counter() - answered)  # from the first request to the last row
    finally:
        stop.set()
        server.join()
        rep.close(0)
        context.term()
        while not connections.empty():
            connections.get().close()
    try:
        rows = count_rows(url, table)
    finally:
        drop(url, table)
    return {
        "requests": trues,
        "seconds": elapsed,
        "requests_per_s": trues / elapsed,
        "rows": rows,
        "drain_seconds": drained,
        "rows_per_s": rows / drained,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--pool-size", type=int, default=8)
    parser.add_argument("--db-url", default="mysql://root@127.0.0.1:3306/test")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--tag", default="", help="table name prefix, so a caller can drop what a killed run left"
    )
    args = parser.parse_args(argv)
    if urlsplit(args.db_url).hostname not in ("127.0.0.1", "localhost", "::1"):
        parser.error("--db-url: only loopback databases")
    total = args.requests // args.clients * args.clients
    if not args.tag.isalnum() and args.tag:
        parser.error("--tag: letters and digits only")
    edm = bench_edm(args.db_url, args.clients, total, args.pool_size, args.tag)
    ref = bench_reference(args.db_url, args.clients, total, args.tag)
    result = {
        "clients": args.clients,
        "requests": total,
        "edm": edm,
        "reference": ref,
        "edm_vs_reference_requests": edm["requests_per_s"] / ref["requests_per_s"],
        "edm_vs_reference_rows": edm["requests_per_s"] / ref["rows_per_s"],
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.clients} REQ clients, {total} fees each run")
        print(
            f"edm        : {edm['requests_per_s']:9.0f} durable requests/s "
            f"({edm['requests']} TRUE, {edm['rows']} rows, {edm['seconds']:.2f} s)"
        )
        print(
            f"reference  : {ref['requests_per_s']:9.0f} requests/s (TRUE before the insert), "
            f"{ref['rows_per_s']:.0f} rows/s ({ref['rows']} rows, drained in {ref['drain_seconds']:.2f} s)"
        )
        print(f"edm / reference requests/s : {result['edm_vs_reference_requests']:.2f}")
        print(f"edm / reference rows/s     : {result['edm_vs_reference_rows']:.2f}")
    ok = edm["requests"] == edm["rows"] == total
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
