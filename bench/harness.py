"""The bench's tools: throw-away broker names, /proc sampling, log watching, a real edm daemon.

Everything created here is remembered so that ``Harness.cleanup`` can remove it: queues and
exchanges by name, daemons by the PIDs they wrote (checked against their command line, never
by process name), temp directories by path.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import yaml

# `python bench/run.py` from anywhere uses this checkout's edm.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edm.amqp.topology import retry_queue
from edm.cli.publish import publish_bodies
from edm.config import AmqpConfig

ROOT = Path(__file__).resolve().parent.parent

CLK_TCK = os.sysconf("SC_CLK_TCK")
MARK = b" (+) "
RETRY_DELAYS = (*AmqpConfig().retry_delays, 1.0)  # the delay queues an edm daemon declares here


class BenchError(Exception):
    """A run that did not do what it must (a lost or duplicated message, a consumer that died)."""


# -- processes ----------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[bytes]:
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    return raw[raw.rfind(b")") + 2 :].split()


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime of the processes (all their threads), in seconds; gone processes count 0."""
    total = 0
    for pid in pids:
        try:
            f = _stat_fields(pid)
        except OSError:
            continue
        total += int(f[11]) + int(f[12])  # fields 14 and 15 of proc(5)
    return total / CLK_TCK


def rss_bytes(pid: int) -> int:
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith("VmRSS:"):
            return int(row.split()[1]) * 1024
    return 0


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(_stat_fields(int(entry.name))[1]) == pid:
                    found.append(int(entry.name))
            except OSError:
                continue
    return sorted(found)


def alive(pid: int) -> bool:
    try:
        return _stat_fields(pid)[0] not in (b"Z", b"X")
    except OSError:
        return False


def system_busy_seconds() -> float:
    """CPU time all processes of the machine have used (every core), from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def broker_pid() -> int | None:
    """The RabbitMQ node's beam.smp, when it runs on this machine and /proc shows it."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "beam.smp":
                    return int(entry.name)
            except OSError:
                continue
    return None


# -- the broker ---------------------------------------------------------------------------------


@dataclass
class Broker:
    url: str
    names: set[str] = field(default_factory=set)  # still to delete
    created: list[str] = field(default_factory=list)

    def _channel(self) -> tuple[pika.BlockingConnection, Any]:
        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        return connection, connection.channel()

    def server_properties(self) -> dict[str, Any]:
        connection, _ = self._channel()
        try:
            props = dict(connection._impl.server_properties)
        finally:
            connection.close()
        return {k: v.decode() if isinstance(v, bytes) else v for k, v in props.items() if k != "capabilities"}

    def declare(self, name: str) -> None:
        """A durable direct exchange and a durable queue, both called ``name``, bound by ``name``:
        the same topology edm declares (and the PHP daemon did)."""
        self.names.add(name)
        self.created.append(name)
        connection, channel = self._channel()
        try:
            channel.exchange_declare(name, "direct", durable=True)
            channel.queue_declare(name, durable=True)
            channel.queue_bind(name, name, routing_key=name)
        finally:
            connection.close()

    def depth(self, name: str) -> tuple[int, int]:
        """(messages ready, consumers) of the queue."""
        connection, channel = self._channel()
        try:
            ok = channel.queue_declare(name, passive=True).method
            return int(ok.message_count), int(ok.consumer_count)
        finally:
            if connection.is_open:
                connection.close()

    def prefill(self, name: str, bodies: Iterable[bytes], count: int) -> float:
        """Publish persistent messages with confirms; return the seconds it took."""
        started = time.perf_counter()
        report = publish_bodies([self.url], name, name, bodies)
        if report.error or report.confirmed != count:
            raise BenchError(f"pre-filling {name}: {report.confirmed} of {count} confirmed ({report.error})")
        return time.perf_counter() - started

    def delete(self, name: str) -> None:
        connection, channel = self._channel()
        try:
            for queue in (name, f"{name}.dead", *(retry_queue(name, d) for d in RETRY_DELAYS)):
                channel.queue_delete(queue)
            for exchange in (name, f"{name}.dead"):
                channel.exchange_delete(exchange)
        finally:
            connection.close()
        self.names.discard(name)

    def cleanup(self) -> list[str]:
        problems = []
        for name in sorted(self.names):
            try:
                self.delete(name)
            except Exception as exc:
                problems.append(f"cannot delete {name}: {exc}")
        return problems

    def clean_up(self, workdir: Path | None = None) -> None:
        """Delete what the run declared (saying on stderr what could not be) and its work dir."""
        for problem in self.cleanup():
            print(f"cleanup: {problem}", file=sys.stderr)
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


class Sentinel:
    """An idle connection held open during a run: if the broker closes it (someone ran
    ``rabbitmqctl close_all_connections`` or ``stop_app``), the run was disturbed from outside."""

    def __init__(self, url: str) -> None:
        params = pika.URLParameters(url)
        params.heartbeat = 0  # it sits idle for minutes
        self.connection = pika.BlockingConnection(params)

    def disturbed(self) -> bool:
        try:
            self.connection.process_data_events(0)
        except pika.exceptions.AMQPError:
            return True
        return not self.connection.is_open

    def close(self) -> None:
        try:
            if self.connection.is_open:
                self.connection.close()
        except pika.exceptions.AMQPError:
            pass


def bodies(count: int, size: int, start: int = 0) -> Iterator[bytes]:
    """``count`` distinct bodies of ``size`` bytes: an 8-digit sequence number, then padding."""
    pad = b"x" * max(0, size - 8)
    for i in range(start, start + count):
        yield b"%08d" % i + pad


# -- log files ----------------------------------------------------------------------------------


def parse_stamp(stamp: bytes) -> float:
    """``YYYY-MM-DD HH:MM:SS,mmm`` (local time) as a Unix time."""
    whole = time.mktime(time.strptime(stamp[:19].decode(), "%Y-%m-%d %H:%M:%S"))
    return whole + int(stamp[20:23]) / 1000


class LogWatch:
    """Follows every file ``<prefix>*`` in a directory and counts the message lines written."""

    def __init__(self, directory: Path, prefix: str) -> None:
        self.directory = directory
        self.prefix = prefix
        self.offsets: dict[str, int] = {}
        self.tails: dict[str, bytes] = {}
        self.count = 0

    def files(self) -> list[Path]:
        if not self.directory.exists():
            return []
        return sorted(p for p in self.directory.iterdir() if p.name.startswith(self.prefix))

    def poll(self) -> int:
        for path in self.files():
            offset = self.offsets.get(path.name, 0)
            try:
                if path.stat().st_size <= offset:
                    continue
                with path.open("rb") as f:
                    f.seek(offset)
                    data = f.read()
            except OSError:
                continue
            self.offsets[path.name] = offset + len(data)
            data = self.tails.get(path.name, b"") + data
            cut = data.rfind(b"\n") + 1
            self.tails[path.name] = data[cut:]
            self.count += data[:cut].count(MARK)
        return self.count

    def lines(self) -> Iterator[tuple[float, bytes, bool]]:
        """Every message line as (log time, body, redelivered)."""
        for path in self.files():
            with path.open("rb") as f:
                for raw in f:
                    head, sep, body = raw.rstrip(b"\n").partition(MARK)
                    if sep:
                        yield parse_stamp(head[:23]), body, b"[redelivered]" in head

    def verify(self, expected: int) -> dict[str, Any]:
        """Each of the ``expected`` sequence numbers logged exactly once, nothing else."""
        seen = bytearray(expected)
        lines = duplicates = strays = redelivered = 0
        first = last = 0.0
        for stamp, body, again in self.lines():
            if lines == 0:
                first = stamp
            last = stamp
            lines += 1
            redelivered += again
            try:
                index = int(body[:8])
            except ValueError:
                strays += 1
                continue
            if not 0 <= index < expected:
                strays += 1
            elif seen[index]:
                duplicates += 1
            else:
                seen[index] = 1
        unique = sum(seen)
        return {
            "lines": lines,
            "unique": unique,
            "missing": expected - unique,
            "duplicates": duplicates,
            "strays": strays,
            "redelivered": redelivered,
            "first": first,
            "last": last,
        }


def wait_lines(
    watch: LogWatch,
    target: int,
    *,
    pids: Iterable[int] = (),
    stall: float = 60.0,
    interval: float = 0.005,
) -> None:
    """Poll until ``target`` message lines are written; fail when nothing moves for ``stall`` s
    or a process we rely on has died."""
    pids = list(pids)
    last_count, last_change = watch.poll(), time.monotonic()
    while watch.count < target:
        time.sleep(interval)
        if watch.poll() != last_count:
            last_count, last_change = watch.count, time.monotonic()
            continue
        if time.monotonic() - last_change > stall:
            raise BenchError(f"stalled at {watch.count} of {target} messages for {stall:.0f} s")
        dead = [pid for pid in pids if not alive(pid)]
        if dead:
            watch.poll()
            if watch.count < target:
                raise BenchError(f"process {dead} died at {watch.count} of {target} messages")


# -- edm, the real daemon -----------------------------------------------------------------------


class EdmDaemon:
    """One edm started with ``python -m edm --config <file> start``, its config in ``base``."""

    def __init__(self, base: Path, url: str, name: str, prefetch: int, metrics: bool = False) -> None:
        self.base = base
        self.name = name
        self.config_path = base / "config" / "mq.yaml"
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "amqp": {"url": url, "exchange": name, "queue": name, "routing_key": name, "prefetch": prefetch},
            "log": {"dir": "../logs", "name": "edm"},
            "daemon": {"pidfile": "../run/edm.pid", "stop_timeout": 30},
        }
        self.listen: str | None = None
        if metrics:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.listen = f"127.0.0.1:{s.getsockname()[1]}"
            doc["metrics"] = {"listen": self.listen}
        self.config_path.write_text(yaml.safe_dump(doc), encoding="utf-8")
        self.config_path.chmod(0o600)
        self.log_dir = base / "logs"
        self.pidfile = base / "run" / "edm.pid"
        self.seen_pids: set[int] = set()

    def cli(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDM_")}
        env["PYTHONPATH"] = str(ROOT)
        return subprocess.run(
            [sys.executable, "-m", "edm", "--config", str(self.config_path), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=self.base,
        )

    def watch(self) -> LogWatch:
        return LogWatch(self.log_dir, "edm.")

    def main_pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def pids(self) -> list[int]:
        """The main process and its workers."""
        main = self.main_pid()
        found = [] if main is None else [main, *children(main)]
        self.seen_pids.update(found)
        return found

    def start(self) -> list[int]:
        result = self.cli("start")
        if result.returncode != 0:
            raise BenchError(f"edm start failed ({result.returncode}): {result.stderr.strip()}")
        pids = self.pids()
        if len(pids) < 2:
            raise BenchError(f"edm started without its consumer worker (pids {pids})")
        return pids

    def wait_consuming(self, broker: Broker, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while broker.depth(self.name)[1] < 1:
            if time.monotonic() > deadline:
                raise BenchError(f"edm did not start consuming {self.name} within {timeout:.0f} s")
            time.sleep(0.05)

    def stop(self) -> None:
        result = self.cli("stop")
        if result.returncode != 0:
            raise BenchError(f"edm stop failed ({result.returncode}): {result.stderr.strip()}")
        leftover = [pid for pid in self.seen_pids if self._ours(pid)]
        if leftover:
            raise BenchError(f"edm stop left processes behind: {leftover}")

    def _ours(self, pid: int) -> bool:
        """Alive and running with our config (guards against a reused PID)."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return alive(pid) and str(self.config_path).encode() in cmdline

    def kill(self) -> list[int]:
        """Last resort in cleanup: SIGKILL whatever of ours still runs."""
        self.pids()
        killed = []
        for pid in sorted(self.seen_pids):
            if self._ours(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
        return killed


class Scraper:
    """GET /metrics once a second from a thread, as a Prometheus would (counts the scrapes)."""

    def __init__(self, listen: str, interval: float = 1.0) -> None:
        self.url = f"http://{listen}/metrics"
        self.interval = interval
        self.scrapes = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-scraper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    response.read()
                self.scrapes += 1
            except OSError:
                self.errors += 1
            if self._stop.wait(self.interval):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def unique_name(tag: str, what: str) -> str:
    return f"edm-bench-{tag}-{what}-{uuid.uuid4().hex[:6]}"
