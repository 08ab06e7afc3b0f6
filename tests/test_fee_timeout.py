"""database.timeout: a database that stops answering — a link that passes no packets, neither
closed nor reset — costs a fee request that long and no more, and loses nothing.

The link is a TcpProxy between edm and the real MariaDB, stalled mid-stream. A bound on the
time a request takes is the product's promise here (database.timeout plus one fsync), so the
tests assert one, with slack for a loaded machine.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest
from conftest import (
    MYSQL_DB,
    MYSQL_HOST,
    MYSQL_PORT,
    EdmEnv,
    drop_table,
    free_port,
    unique,
    wait_for,
)
from netutil import Client, TcpProxy
from test_fee import SQL, rows
from test_fee_batches import Asker

from edm.config import MAX_DATABASE_TIMEOUT, Config, DatabaseConfig, parse
from edm.db import Database
from edm.errors import ConfigError, DatabaseUnavailable

SLACK = 3.0  # seconds beyond database.timeout (and an fsync) a loaded 2-core machine may add


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    """A proxy in front of MariaDB, resumed and closed after the test whatever happens."""
    link = TcpProxy((MYSQL_HOST, MYSQL_PORT))
    try:
        yield link
    finally:
        link.resume()
        link.close()


def proxied(proxy: TcpProxy) -> str:
    return f"mysql://root@127.0.0.1:{proxy.port}/{MYSQL_DB}"


def with_timeout(config: Config, seconds: float) -> Config:
    return dataclasses.replace(config, database=dataclasses.replace(config.database, timeout=seconds))


def server_port(root_sql: SQL, table: str) -> int | None:
    """The client port of the server connection running a statement on ``table`` (from the
    server's process list; the proxy's upstream socket has that port), or None."""
    found = root_sql(
        "SELECT HOST FROM information_schema.PROCESSLIST WHERE INFO LIKE %s AND ID <> CONNECTION_ID()",
        f"%{table}%",
    )
    return int(found[0][0].rsplit(":", 1)[1]) if found else None


def spooled_tickets(config: Config) -> list[int]:
    lines = config.plugins.fee.spool.read_text().splitlines()
    return sorted(int(line.split(",")[0]) for line in lines)


def test_a_batch_in_flight_when_the_database_stalls_is_spooled_within_the_timeout(
    make_config: Callable[..., Config],
    databases: Any,
    plugins: Any,
    table: str,
    root_sql: SQL,
    zctx: Any,
    proxy: TcpProxy,
) -> None:
    """Given a batch the server is still working on when the link stops passing packets, its
    client and a client that comes after get TRUE within database.timeout (+ slack), both
    fees wait in the spool, and the connection that carried the batch is closed, not kept for
    its answer. The server commits that batch late; once the link is back, the replay finds
    it there and the table holds every ticket once, with its first values."""
    timeout = 1.0
    config = with_timeout(make_config(url=proxied(proxy), table=table), timeout)
    plugin = plugins(config, databases(config))
    client = Client(zctx, plugin.endpoint)
    try:
        assert client.ask(b"1,1,1") == b"TRUE"  # the receiver's connections run through the proxy
        # A transaction of our own holds ticket 11: the batch that brings it waits at the server.
        root_sql("START TRANSACTION")
        root_sql(f"INSERT INTO `{table}` (ticket, login, volume) VALUES (11, 0, 0)")
        slow = Asker(zctx, plugin.endpoint, b"11,999,1")
        port = wait_for(lambda: server_port(root_sql, table), 10)  # the server is storing it

        proxy.stall()
        started = time.monotonic()
        assert client.ask(b"12,1,2") == b"TRUE"
        after_the_stall = time.monotonic() - started
        assert slow.join() == b"TRUE"
        assert slow.seconds < timeout + SLACK, slow.seconds
        assert after_the_stall < timeout + SLACK

        assert spooled_tickets(config) == [11, 12]
        assert plugin.status()["state"] == "spooling"
        assert wait_for(lambda: proxy.client_closed(port), 5), "the stalled connection was kept"
        # The server goes on with the batch it had and commits it: a late commit.
        root_sql("ROLLBACK")
        assert wait_for(lambda: [r[0] for r in rows(root_sql, table)] == [1, 11], 10)

        proxy.resume()
        assert wait_for(lambda: plugin.status()["state"] == "running", 30), plugin.status()
        assert client.ask(b"13,1,3") == b"TRUE"
    finally:
        client.close()
    assert rows(root_sql, table) == [
        (1, 1, Decimal("1.0000"), "Y"),
        (11, 999, Decimal("1.0000"), "Y"),
        (12, 1, Decimal("2.0000"), "Y"),
        (13, 1, Decimal("3.0000"), "Y"),
    ]
    status = plugin.status()
    assert (status["spooled"], status["replayed"]) == (2, 2)
    assert status["duplicates"] >= 1  # 11, committed late (12 too, if its held packet got through)
    assert not config.plugins.fee.spool.exists()


def test_requests_keep_their_bound_while_the_database_stays_stalled(
    make_config: Callable[..., Config],
    databases: Any,
    plugins: Any,
    table: str,
    root_sql: SQL,
    zctx: Any,
    proxy: TcpProxy,
) -> None:
    """Given a stall that outlasts several of the replay's retries (after 0.5, 1 and 2 s),
    requests sent back to back all that time each get TRUE within database.timeout (+ slack):
    an attempt to replay the spool on the silent link costs no more than the timeout."""
    timeout = 1.0
    config = with_timeout(make_config(url=proxied(proxy), table=table), timeout)
    plugin = plugins(config, databases(config))
    client = Client(zctx, plugin.endpoint)
    try:
        assert client.ask(b"1,1,1") == b"TRUE"
        proxy.stall()
        longest, ticket = 0.0, 1
        until = time.monotonic() + 6 * timeout
        while time.monotonic() < until:
            ticket += 1
            started = time.monotonic()
            assert client.ask(f"{ticket},1,1".encode()) == b"TRUE"
            longest = max(longest, time.monotonic() - started)
        assert longest < timeout + SLACK
        assert plugin.status()["spool_pending"] == ticket - 1
        proxy.resume()
        assert wait_for(lambda: plugin.status()["state"] == "running", 60), plugin.status()
    finally:
        client.close()
    assert [r[0] for r in rows(root_sql, table)] == list(range(1, ticket + 1))


def test_the_daemon_answers_within_its_database_timeout_while_the_database_stalls(
    make_env: Callable[..., EdmEnv], table: str, root_sql: SQL, zctx: Any, proxy: TcpProxy
) -> None:
    """Given `edm start` with database.timeout: 1 in its config and the database's link
    stalled, a fee request gets TRUE within the timeout (+ slack), status shows the fee
    receiver spooling, and once the link is back the fee is in the table."""
    port = free_port()
    env = make_env(
        {
            "database": {"url": proxied(proxy), "pool_size": 4, "timeout": 1},
            "plugins": {"fee": {"enabled": True, "listen": f"tcp://127.0.0.1:{port}", "table": table}},
        }
    )

    def fee_status() -> dict[str, Any]:
        fee: dict[str, Any] = json.loads(env.cli("status", "--json").stdout)["plugins"].get("fee") or {}
        return fee

    env.start()
    client = Client(zctx, f"tcp://127.0.0.1:{port}")
    try:
        assert client.ask(b"1,1,1") == b"TRUE"
        proxy.stall()
        started = time.monotonic()
        assert client.ask(b"2,1,2") == b"TRUE"
        assert time.monotonic() - started < 1 + SLACK
        assert wait_for(lambda: fee_status().get("state") == "spooling", 10)
        assert "no answer within 1 s (database.timeout)" in env.log_text()
        proxy.resume()
        assert wait_for(lambda: fee_status().get("state") == "running", 30)
    finally:
        client.close()
        env.cli("stop")
    assert [row[0] for row in rows(root_sql, table)] == [1, 2]


@pytest.fixture
def plain_table() -> Iterator[str]:
    name = unique("dbt")
    yield name
    drop_table(name)


def test_a_transaction_on_a_stalled_link_is_given_up_and_its_connection_replaced(
    proxy: TcpProxy, plain_table: str, root_sql: SQL
) -> None:
    """Given a session and a pooled connection through a link that then stalls: the session's
    transaction in flight raises DatabaseUnavailable within the timeout, naming the key; the
    pool's idle connection, whose liveness ping and reconnect both meet the stall, costs the
    timeout once, not once per wait; after the stall a fresh connection serves the session."""
    timeout = 2.0
    root_sql(f"CREATE TABLE `{plain_table}` (id INT PRIMARY KEY)")
    insert = f"INSERT INTO `{plain_table}` VALUES (%s)"
    db = Database.open(DatabaseConfig(url=proxied(proxy), pool_size=2, timeout=timeout))
    try:
        with db.session() as session:
            session.atomic([(insert, [1])])
            db.atomic([(insert, [5])])  # a second connection, idle in the pool
            proxy.stall()

            started = time.monotonic()
            pending = session.send_atomic([(insert, [2])])
            with pytest.raises(DatabaseUnavailable, match=r"no answer within 2 s \(database\.timeout\)"):
                pending.finish()
            assert time.monotonic() - started < timeout + SLACK

            started = time.monotonic()
            with pytest.raises(DatabaseUnavailable):
                db.atomic([(insert, [3])])
            took = time.monotonic() - started
            # One timeout: the ping's wait and the reconnect's share it (they took 3 before).
            assert timeout * 0.9 < took < timeout * 1.75, took

            proxy.resume()
            session.atomic([(insert, [4])])
    finally:
        db.close()
    ids = {row[0] for row in root_sql(f"SELECT id FROM `{plain_table}`")}
    assert {1, 4, 5} <= ids <= {1, 2, 4, 5}  # 2 only if the held packet reached the server late


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        *[(5, True), (0.25, True), (MAX_DATABASE_TIMEOUT, True)],
        *[(0, False), (-1, False), ("5", False), (True, False), (None, False)],
        *[(float("inf"), False), (MAX_DATABASE_TIMEOUT + 1, False)],
    ],
)
def test_database_timeout_is_a_number_of_seconds_above_zero(value: Any, ok: bool, tmp_path: Any) -> None:
    doc = {"database": {"timeout": value}}
    if ok:
        assert parse(doc, tmp_path / "mq.yaml", {}).database.timeout == value
    else:
        with pytest.raises(ConfigError, match=r"^database\.timeout: must be a number of seconds > 0"):
            parse(doc, tmp_path / "mq.yaml", {})


def test_database_timeout_defaults_to_five_seconds(tmp_path: Any) -> None:
    assert parse({}, tmp_path / "mq.yaml", {}).database.timeout == 5.0
