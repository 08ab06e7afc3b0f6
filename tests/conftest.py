"""Fixtures for tests that run against the real MariaDB on 127.0.0.1:3306 (root, database test).

A missing database fails these tests; it never skips them.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest

from edm.config import Config, parse
from edm.db import Database

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


@pytest.fixture
def table() -> Iterator[str]:
    """A fresh table name, dropped after the test."""
    name = unique("fee_t")
    yield name
    con = root_connection()
    try:
        with con.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS `{name}`")
    finally:
        con.close()


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
