"""Fixtures that run the real edm process against the real RabbitMQ.

A broker that does not answer fails the run: these tests never skip for a missing service.
Every test gets its own exchange and queue names and its own directory; every daemon a test
starts is stopped in teardown by the PIDs it wrote, never by name.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pymysql
import pytest
import yaml

from edm.amqp.topology import retry_queue
from edm.config import Config, parse
from edm.db import Database

ROOT = Path(__file__).resolve().parent.parent
AMQP_URL = os.environ.get("EDM_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll until ``predicate`` returns something truthy; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {predicate}")
        time.sleep(interval)


def broker_answers() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session", autouse=True)
def _broker_is_up() -> None:
    if not broker_answers():
        pytest.fail("RabbitMQ does not answer on 127.0.0.1:5672; start it (rabbitmq-server -detached)")


def amqp_channel() -> tuple[pika.BlockingConnection, Any]:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    return connection, connection.channel()


def helper_queues(queue: str, delays: tuple[float, ...] = (1.0, 10.0, 60.0, 300.0)) -> set[str]:
    """``<queue>.dead`` and the delay queues of ``delays`` (the default ones and a test's 1 s)."""
    return {f"{queue}.dead"} | {retry_queue(queue, delay) for delay in delays}


def delete_topology(queues: set[str], exchanges: set[str]) -> None:
    """Delete the queues, and the exchanges with their ``.dead`` companions, a test made."""
    connection, channel = amqp_channel()
    try:
        for queue in queues:
            channel.queue_delete(queue)
        for exchange in exchanges | {f"{e}.dead" for e in exchanges}:
            channel.exchange_delete(exchange)
    finally:
        connection.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] not in (b"Z", b"X")


class EdmEnv:
    """One test's edm: a config file in a temp dir, unique broker names, helpers."""

    def __init__(self, base: Path, overrides: dict[str, Any] | None = None) -> None:
        self.base = base
        self.tag = "edm-test-" + uuid.uuid4().hex[:12]
        self.exchange = self.tag
        self.queue = self.tag
        self.routing_key = self.tag
        self.config_path = base / "config" / "mq.yaml"
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.doc: dict[str, Any] = {
            "amqp": {
                "url": AMQP_URL,
                "exchange": self.exchange,
                "queue": self.queue,
                "routing_key": self.routing_key,
                "heartbeat": 10,
                "retry_max": 2,
            },
            "log": {"dir": "../logs", "name": "edm"},
            "daemon": {"pidfile": "../run/edm.pid", "stop_timeout": 10},
        }
        for section, values in (overrides or {}).items():
            self.doc.setdefault(section, {}).update(values)
        self.write_config()
        self.started_pids: set[int] = set()
        self.extra_queues: set[str] = set()
        self.extra_exchanges: set[str] = set()

    # -- config and paths ---------------------------------------------------------------------

    def write_config(self, doc: dict[str, Any] | None = None) -> None:
        if doc is not None:
            self.doc = doc
        self.config_path.write_text(yaml.safe_dump(self.doc), encoding="utf-8")
        self.config_path.chmod(0o600)

    @property
    def log_dir(self) -> Path:
        return (self.config_path.parent / self.doc["log"]["dir"]).resolve()

    @property
    def pidfile(self) -> Path:
        return (self.config_path.parent / self.doc["daemon"]["pidfile"]).resolve()

    def log_files(self, name: str | None = None) -> list[Path]:
        prefix = (name or self.doc["log"]["name"]) + "."
        if not self.log_dir.exists():
            return []
        return sorted(p for p in self.log_dir.iterdir() if p.name.startswith(prefix))

    def log_text(self, name: str | None = None) -> str:
        return "".join(p.read_text(encoding="utf-8") for p in self.log_files(name))

    def message_lines(self, name: str | None = None) -> list[str]:
        return [line for line in self.log_text(name).split("\n") if " (+) " in line]

    def bodies_logged(self, name: str | None = None) -> list[str]:
        return [line.split(" (+) ", 1)[1] for line in self.message_lines(name)]

    # -- the command line ---------------------------------------------------------------------

    def cli(
        self, *args: str, timeout: float = 90, env: dict[str, str] | None = None, input: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests' / 'support'}"}
        full_env.pop("EDM_CONFIG", None)
        full_env.update(env or {})
        result = subprocess.run(
            [sys.executable, "-m", "edm", "--config", str(self.config_path), *args],
            capture_output=True,
            timeout=timeout,
            env=full_env,
            cwd=str(self.base),
            input=input.decode() if input is not None else None,
            text=True,
        )
        self._remember_pids()
        return result

    def start(self) -> int:
        result = self.cli("start")
        assert result.returncode == 0, result.stderr
        pid = self.main_pid()
        assert pid is not None
        self.wait_consuming()
        return pid

    def main_pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def state(self) -> dict[str, Any]:
        path = self.pidfile.with_name(self.pidfile.stem + ".status.json")
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def worker_pid(self, name: str = "consumer") -> int | None:
        worker = self.state().get("workers", {}).get(name, {})
        pid = worker.get("pid")
        return pid if isinstance(pid, int) else None

    def wait_consuming(self, timeout: float = 15) -> None:
        def consuming() -> bool:
            worker = self.state().get("workers", {}).get("consumer", {})
            return worker.get("activity") == "consuming" and self._consumers() >= 1

        wait_for(consuming, timeout)

    def _consumers(self) -> int:
        connection, channel = amqp_channel()
        try:
            return channel.queue_declare(self.queue, passive=True).method.consumer_count
        except pika.exceptions.ChannelClosedByBroker:
            return 0
        finally:
            if connection.is_open:
                connection.close()

    def _remember_pids(self) -> None:
        pid = self.main_pid()
        if pid:
            self.started_pids.add(pid)
        for worker in self.state().get("workers", {}).values():
            if isinstance(worker.get("pid"), int):
                self.started_pids.add(worker["pid"])

    def all_pids(self) -> list[int]:
        """The main process and every live child of it (from /proc, not by name)."""
        main = self.main_pid()
        if main is None:
            return []
        pids = [main]
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_bytes()
                except OSError:
                    continue
                ppid = int(stat[stat.rfind(b")") + 2 :].split()[1])
                if ppid == main:
                    pids.append(int(entry.name))
        self.started_pids.update(pids)
        return pids

    # -- the broker ---------------------------------------------------------------------------

    def publish(self, bodies: list[bytes], routing_key: str | None = None) -> None:
        connection, channel = amqp_channel()
        channel.exchange_declare(self.exchange, "direct", durable=True)
        channel.queue_declare(self.queue, durable=True)
        channel.queue_bind(self.queue, self.exchange, self.routing_key)
        channel.confirm_delivery()
        properties = pika.BasicProperties(delivery_mode=2)
        for body in bodies:
            channel.basic_publish(self.exchange, routing_key or self.routing_key, body, properties)
        connection.close()

    def queue_depth(self, queue: str | None = None) -> int:
        connection, channel = amqp_channel()
        try:
            return channel.queue_declare(queue or self.queue, passive=True).method.message_count
        finally:
            if connection.is_open:
                connection.close()

    def drain_queue(self, queue: str | None = None) -> list[tuple[bytes, dict[str, Any]]]:
        connection, channel = amqp_channel()
        got = []
        try:
            while True:
                method, properties, body = channel.basic_get(queue or self.queue, auto_ack=True)
                if method is None:
                    return got
                got.append((body, properties.headers or {}))
        finally:
            connection.close()

    def ours(self, pid: int) -> bool:
        """Guard against PID reuse: our processes carry our config path on their command line."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return str(self.config_path).encode() in cmdline

    def teardown(self) -> None:
        for pid in self.all_pids() + sorted(self.started_pids):
            if alive(pid) and self.ours(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        queues = {self.tag, self.queue, *self.extra_queues}
        delays = self.doc["amqp"].get("retry_delays", [10, 60, 300])
        helpers = {f"{q}.dead" for q in queues} | {retry_queue(q, d) for q in queues for d in delays}
        delete_topology(queues | helpers, {self.exchange, *self.extra_exchanges})


@pytest.fixture
def edm_env(tmp_path: Path) -> Iterator[EdmEnv]:
    env = EdmEnv(tmp_path)
    yield env
    env.teardown()


@pytest.fixture
def make_env(tmp_path: Path) -> Iterator[Callable[..., EdmEnv]]:
    made: list[EdmEnv] = []

    def make(overrides: dict[str, Any] | None = None, base: Path | None = None) -> EdmEnv:
        directory = base or tmp_path / f"env{len(made)}"
        directory.mkdir(parents=True, exist_ok=True)
        env = EdmEnv(directory, overrides)
        made.append(env)
        return env

    yield make
    for env in made:
        env.teardown()


# -- MariaDB: a missing database fails these tests; it never skips them. ----------------------

MYSQL_HOST, MYSQL_PORT, MYSQL_DB = "127.0.0.1", 3306, "test"
ROOT_URL = f"mysql://root@{MYSQL_HOST}:{MYSQL_PORT}/{MYSQL_DB}"


def root_connection() -> pymysql.connections.Connection:
    return pymysql.connect(
        host=MYSQL_HOST, port=MYSQL_PORT, user="root", password="", database=MYSQL_DB, autocommit=True
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unique(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(6)}"


@pytest.fixture
def root_sql() -> Iterator[Callable[..., list[tuple[Any, ...]]]]:
    """Run a statement as root on the test database (a connection of its own, autocommit)."""
    con = root_connection()

    def sql(statement: str, *args: Any) -> list[tuple[Any, ...]]:
        with con.cursor() as cur:
            cur.execute(statement, args or None)
            return list(cur.fetchall())

    yield sql
    con.close()


def drop_table(name: str) -> None:
    con = root_connection()
    try:
        with con.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS `{name}`")
    finally:
        con.close()


@pytest.fixture
def table() -> Iterator[str]:
    """A fresh table name, dropped after the test."""
    name = unique("fee_t")
    yield name
    drop_table(name)


@pytest.fixture
def db_user() -> Iterator[tuple[str, str]]:
    """A dedicated MariaDB user (name, password) so its connections can be counted exactly."""
    name, password = unique("edm_u"), "pw-" + secrets.token_hex(8)
    hosts = ("127.0.0.1", "localhost", "%")
    con = root_connection()
    try:
        with con.cursor() as cur:
            for host in hosts:
                quoted_host = host.replace("%", "%%")  # the statement goes through %-formatting
                cur.execute(f"CREATE USER '{name}'@'{quoted_host}' IDENTIFIED BY %s", (password,))
                cur.execute(f"GRANT ALL ON `{MYSQL_DB}`.* TO '{name}'@'{host}'")
        yield name, password
    finally:
        with con.cursor() as cur:
            cur.execute("SELECT ID FROM information_schema.PROCESSLIST WHERE USER = %s", (name,))
            for (pid,) in cur.fetchall():
                try:
                    cur.execute(f"KILL {int(pid)}")
                except pymysql.err.Error:
                    pass
            for host in hosts:
                cur.execute(f"DROP USER IF EXISTS '{name}'@'{host}'")
        con.close()


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    def build(
        url: str = ROOT_URL,
        table: str = "fee",
        listen: str | None = None,
        pool_size: int = 8,
        spool: str = "run/fee.spool",
    ) -> Config:
        raw = {
            "database": {"url": url, "pool_size": pool_size},
            "plugins": {
                "fee": {
                    "enabled": True,
                    "listen": listen or f"tcp://127.0.0.1:{free_port()}",
                    "table": table,
                    "spool": spool,
                }
            },
        }
        return parse(raw, tmp_path / "mq.yaml", environ={})

    return build


@pytest.fixture
def databases() -> Iterator[Callable[[Config], Database]]:
    """Open Database pools that are closed after the test."""
    opened: list[Database] = []

    def open_(config: Config) -> Database:
        db = Database.open(config.database)
        opened.append(db)
        return db

    yield open_
    for db in opened:
        db.close()


# -- ZeroMQ and the fee plugin -----------------------------------------------------------------


@pytest.fixture
def zctx() -> Iterator[Any]:
    """A ZeroMQ context destroyed (linger 0) after the test."""
    import zmq

    context: Any = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def plugins() -> Iterator[Callable[..., Any]]:
    """Start FeePlugins (or a subclass: ``cls``) that are stopped after the test, whatever happens."""
    from edm.plugins.fee.receiver import FeePlugin

    started: list[FeePlugin] = []

    def start(config: Config, db: Database, cls: type[FeePlugin] = FeePlugin) -> FeePlugin:
        plugin = cls(config, db)
        plugin.start()
        started.append(plugin)
        return plugin

    yield start
    for plugin in started:
        plugin.stop(10)
