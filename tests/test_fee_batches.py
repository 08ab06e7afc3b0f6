"""Batches of many clients: a ticket repeated within a batch and across batches is stored once,
with its first values; an outage spools such batches and replays them in order."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
import zmq
from conftest import MYSQL_DB, MYSQL_HOST, MYSQL_PORT
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
