"""Batches of many clients: a ticket repeated within a batch and across batches is stored once,
with its first values; an outage spools such batches and replays them in order."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
import zmq
from conftest import MYSQL_DB, MYSQL_HOST, MYSQL_PORT, root_connection
from netutil import Client, TcpProxy
from test_fee import SQL, rows, wait_for

from edm.config import Config


def ask_all(context: zmq.Context[Any], endpoint: str, bodies: list[bytes]) -> list[bytes]:
    """Send each body from its own client, all at once; the replies in the same order."""
    clients = [Client(context, endpoint) for _ in bodies]
    go = threading.Barrier(len(bodies))
    replies: list[bytes] = [b""] * len(bodies)

    def one(n: int) -> None:
        go.wait()
        replies[n] = clients[n].ask(bodies[n])

    threads = [threading.Thread(target=one, args=(n,)) for n in range(len(bodies))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        for client in clients:
            client.close()
    return replies


def test_a_ticket_repeated_at_once_by_many_clients_is_stored_once(
    make_config: Callable[..., Config],
    databases: Any,
    plugins: Any,
    table: str,
    root_sql: SQL,
    zctx: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Given 16 clients sending ticket 7 at the same moment, each with its own login, and
    other tickets around it, ticket 7 gets one row; every other sender is told TRUE and
    warned about."""
    config = make_config(table=table)
    plugin = plugins(config, databases(config))
    bodies = [f"7,{login},1.5".encode() for login in range(100, 116)]
    bodies += [f"{ticket},1,1".encode() for ticket in range(20, 36)]
    with caplog.at_level(logging.WARNING, logger="edm.plugins"):
        replies = ask_all(zctx, plugin.endpoint, bodies)

    assert replies == [b"TRUE"] * len(bodies)
    stored = {r[0]: r for r in rows(root_sql, table)}
    assert len(stored) == 17
    _, login, volume, status = stored[7]
    assert 100 <= login < 116 and volume == Decimal("1.5000") and status == "Y"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 15
    assert all(f"keeping the first (login {login}" in w for w in warnings)
    assert plugin.status()["duplicates"] == 15


def test_the_first_values_stay_when_the_repeats_come_later(
    make_config: Callable[..., Config], databases: Any, plugins: Any, table: str, root_sql: SQL, zctx: Any
) -> None:
    config = make_config(table=table)
    plugin = plugins(config, databases(config))
    first = ask_all(zctx, plugin.endpoint, [f"{t},1,0.5".encode() for t in range(1, 9)])
    assert first == [b"TRUE"] * 8
    repeats = ask_all(zctx, plugin.endpoint, [f"{t},2,9".encode() for t in range(1, 9)] * 2)
    assert repeats == [b"TRUE"] * 16
    assert rows(root_sql, table) == [(t, 1, Decimal("0.5000"), "Y") for t in range(1, 9)]


def test_an_outage_spools_repeats_and_replays_them_in_order(
    make_config: Callable[..., Config], databases: Any, plugins: Any, table: str, root_sql: SQL, zctx: Any
) -> None:
    """Given tickets spooled during an outage, repeats among them included,
    the replay stores each once with its first values and the spool goes away."""
    proxy = TcpProxy((MYSQL_HOST, MYSQL_PORT))
    try:
        config = make_config(url=f"mysql://root@127.0.0.1:{proxy.port}/{MYSQL_DB}", table=table)
        plugin = plugins(config, databases(config))
        assert ask_all(zctx, plugin.endpoint, [b"1,1,1"]) == [b"TRUE"]
        proxy.cut()
        spooled = ask_all(zctx, plugin.endpoint, [f"{t},5,0.01".encode() for t in range(2, 34)])
        assert spooled == [b"TRUE"] * 32
        repeats = ask_all(zctx, plugin.endpoint, [f"{t},6,9".encode() for t in range(1, 34)])
        assert repeats == [b"TRUE"] * 33
        assert plugin.status()["state"] == "spooling"
        proxy.restore()
        assert wait_for(lambda: plugin.status()["state"] == "running", 30), plugin.status()
    finally:
        proxy.close()
    expected = [(1, 1, Decimal("1.0000"), "Y")] + [(t, 5, Decimal("0.0100"), "Y") for t in range(2, 34)]
    assert rows(root_sql, table) == expected
    assert not config.plugins.fee.spool.exists()


class Gate:
    """A MariaDB user lock held by the test: an insert of login 999 into a gated table waits
    for it, so a batch holding such a fee stays in flight until ``open()``; no timing."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._connection = root_connection()
        with self._connection.cursor() as cur:
            cur.execute("SELECT GET_LOCK(%s, 0)", (name,))
            assert cur.fetchone()[0] == 1

    def open(self) -> None:
        if self._connection.open:
            self._connection.close()  # a closed session's user locks are released

    def __enter__(self) -> Gate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.open()


def gated_table(root_sql: SQL, table: str) -> Gate:
    """The fee table, made beforehand (the receiver uses it as it is), where inserting a fee
    of login 999 waits for the returned gate to open."""
    root_sql(
        f"CREATE TABLE `{table}` (ticket BIGINT NOT NULL PRIMARY KEY, login BIGINT NOT NULL,"
        " volume DECIMAL(20,4) NOT NULL, status CHAR(1) NOT NULL DEFAULT 'N')"
    )
    root_sql(
        f"CREATE TRIGGER `{table}_gate` BEFORE INSERT ON `{table}` FOR EACH ROW"
        f" SET NEW.volume = NEW.volume"
        f" + IF(NEW.login = 999, (GET_LOCK('{table}', 60) + RELEASE_LOCK('{table}')) * 0, 0)"
    )
    return Gate(table)


class Asker:
    """Send ``body`` from a client of its own in a thread; ``done`` is set with the reply."""

    def __init__(self, context: zmq.Context[Any], endpoint: str, body: bytes) -> None:
        self.reply: bytes | None = None
        self.seconds = 0.0  # from the send to the reply
        self.done = threading.Event()
        self._client = Client(context, endpoint)
        self._thread = threading.Thread(target=self._run, args=(body,))
        self._thread.start()

    def _run(self, body: bytes) -> None:
        try:
            started = time.monotonic()
            self.reply = self._client.ask(body)
            self.seconds = time.monotonic() - started
        finally:
            self._client.close()
            self.done.set()

    def join(self) -> bytes | None:
        self._thread.join(30)
        return self.reply


@pytest.mark.parametrize("pool_size", [8, 1])
def test_a_slow_batch_does_not_hold_up_the_next_one(
    make_config: Callable[..., Config],
    databases: Any,
    plugins: Any,
    table: str,
    root_sql: SQL,
    zctx: Any,
    pool_size: int,
) -> None:
    """Given a batch held in flight, a request that comes meanwhile is stored and answered on
    a second pooled connection without waiting for it; with a pool of one connection it waits
    for the held batch and is answered after it."""
    with gated_table(root_sql, table) as gate:
        config = make_config(table=table, pool_size=pool_size)
        plugin = plugins(config, databases(config))
        slow = Asker(zctx, plugin.endpoint, b"1,999,1")
        assert wait_for(lambda: plugin.status()["queue"] == 1, 10), plugin.status()
        quick = Asker(zctx, plugin.endpoint, b"2,1,1")
        if pool_size > 1:
            assert quick.done.wait(30), "the quick request waited for the held batch"
            assert not slow.done.is_set()
        else:
            # Correct code can never answer here (the one connection is held); a bound only
            # limits how long a wrong one is given to show itself.
            assert not quick.done.wait(0.5)
        gate.open()
        assert slow.join() == quick.join() == b"TRUE"
    assert [r[:2] for r in rows(root_sql, table)] == [(1, 999), (2, 1)]


def test_a_ticket_in_a_batch_in_flight_waits_for_it(
    make_config: Callable[..., Config], databases: Any, plugins: Any, table: str, root_sql: SQL, zctx: Any
) -> None:
    """Given ticket 5 in a batch still being stored, a later fee of ticket 5 is not stored
    beside it on the other connection: it waits, and the first values stay."""
    with gated_table(root_sql, table) as gate:
        config = make_config(table=table)
        plugin = plugins(config, databases(config))
        first = Asker(zctx, plugin.endpoint, b"5,999,1")
        assert wait_for(lambda: plugin.status()["queue"] == 1, 10), plugin.status()
        repeat = Asker(zctx, plugin.endpoint, b"5,2,2")
        assert wait_for(lambda: plugin.status()["requests"] == 2, 10), plugin.status()
        other = Asker(zctx, plugin.endpoint, b"6,2,2")
        assert not first.done.is_set() and not repeat.done.is_set()
        gate.open()
        assert first.join() == repeat.join() == other.join() == b"TRUE"
    assert rows(root_sql, table) == [(5, 999, Decimal("1.0000"), "Y"), (6, 2, Decimal("2.0000"), "Y")]
    assert plugin.status()["duplicates"] == 1


def test_batches_in_flight_when_the_database_is_cut_are_spooled_and_replayed(
    make_config: Callable[..., Config], databases: Any, plugins: Any, table: str, root_sql: SQL, zctx: Any
) -> None:
    """Given two batches in flight on two connections, a cut of both connections gets each
    batch spooled and answered TRUE; once the database is back each fee is in the table once
    (the server may have committed a batch whose answer the cut lost: the replay finds it)."""
    proxy = TcpProxy((MYSQL_HOST, MYSQL_PORT))
    try:
        with gated_table(root_sql, table) as gate:
            config = make_config(url=f"mysql://root@127.0.0.1:{proxy.port}/{MYSQL_DB}", table=table)
            plugin = plugins(config, databases(config))
            first = Asker(zctx, plugin.endpoint, b"11,999,1")
            assert wait_for(lambda: plugin.status()["queue"] == 1, 10), plugin.status()
            second = Asker(zctx, plugin.endpoint, b"12,999,2")
            assert wait_for(lambda: plugin.status()["queue"] == 2, 10), plugin.status()  # both in flight
            proxy.cut()
            assert first.join() == second.join() == b"TRUE"
            assert plugin.status()["spooled"] == 2
            gate.open()  # the server's sessions may now commit late: harmless
        proxy.restore()
        assert wait_for(lambda: plugin.status()["state"] == "running", 30), plugin.status()
    finally:
        proxy.close()
    assert wait_for(lambda: len(rows(root_sql, table)) == 2, 10)
    assert rows(root_sql, table) == [(11, 999, Decimal("1.0000"), "Y"), (12, 999, Decimal("2.0000"), "Y")]
    assert not config.plugins.fee.spool.exists()
