"""The fee receiver end to end: real ZeroMQ REQ clients, the real MariaDB (and sqlite)."""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import zmq
from conftest import MYSQL_DB, MYSQL_HOST, MYSQL_PORT, free_port
from netutil import Client, TcpProxy, tcp_received, zmq_port
from test_db import ConnectionSampler

from edm.config import Config
from edm.errors import EdmError
from edm.plugins import build
from edm.plugins.fee.receiver import FeePlugin

SQL = Callable[..., list[tuple[Any, ...]]]


def run_clients(
    context: zmq.Context[Any],
    endpoint: str,
    clients: int,
    per_client: int,
    first_ticket: int = 1,
    timeout_ms: int = 15000,
) -> list[bytes]:
    """Each client sends its own tickets in turn; returns every reply (or the error text)."""
    replies: list[bytes] = []
    lock = threading.Lock()

    def one(index: int) -> None:
        client = Client(context, endpoint, timeout_ms)
        got = []
        try:
            for i in range(per_client):
                ticket = first_ticket + index * per_client + i
                try:
                    got.append(client.ask(f"{ticket},{1000 + index},{i}.25".encode()))
                except zmq.ZMQError as exc:
                    got.append(f"ERROR {exc}".encode())
                    break
        finally:
            client.close()
            with lock:
                replies.extend(got)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    return replies


def rows(sql: SQL, table: str) -> list[tuple[Any, ...]]:
    return sql(f"SELECT ticket, login, volume, status FROM `{table}` ORDER BY ticket")


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_sixteen_concurrent_clients_are_all_stored(
    make_config: Callable[..., Config], databases: Any, plugins: Any, table: str, root_sql: SQL, zctx: Any
) -> None:
    config = make_config(table=table)
    plugin = plugins(config, databases(config))

    replies = run_clients(zctx, plugin.endpoint, clients=16, per_client=200)

    assert replies.count(b"TRUE") == 3200, set(replies)
    stored = rows(root_sql, table)
    assert len(stored) == 3200
    assert {status for *_, status in stored} == {"Y"}
    assert stored[0][:3] == (1, 1000, Decimal("0.25"))
    status = plugin.status()
    assert status["state"] == "running"
    assert (status["requests"], status["stored"], status["malformed"]) == (3200, 3200, 0)


MALFORMED = [
    (b"1,2", "field"),
    (b"1,2,3,4", "field"),
    (b"abc,2,3", "ticket"),
    (b"1,2,x1", "volume"),
    (b"-1,2,3", "ticket"),
    (b"1,-2,3", "login"),
    (b"1,2,-3", "volume"),
    (b"9223372036854775808,2,3", "2^63"),
    (b"1,9223372036854775808,3", "2^63"),
    (b"1,2," + b"1" * 1100, "1024"),
    (b"\xff\xfe,2,3", "UTF-8"),
    (b"", "empty"),
    ([b"1,2", b",3"], "multipart"),
    ([b"1,2,3", b""], "multipart"),
]


def test_malformed_requests_get_false_and_the_next_good_one_works(
    make_config: Callable[..., Config],
    databases: Any,
    plugins: Any,
    table: str,
    root_sql: SQL,
    zctx: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = make_config(table=table)
    plugin = plugins(config, databases(config))
    client = Client(zctx, plugin.endpoint)
    try:
        for ticket, (body, word) in enumerate(MALFORMED, start=1):
            with caplog.at_level(logging.ERROR, logger="edm.plugins.fee.receiver"):
                caplog.clear()
                reply = client.ask(body)
            assert reply.startswith(b"FALSE "), (body, reply)
            assert word in reply.decode(), (body, reply)
            assert any(r.levelno == logging.ERROR and "Malformed" in r.getMessage() for r in caplog.records)
            assert client.ask(f"{ticket},7,1.5".encode()) == b"TRUE"
    finally:
        client.close()
    assert len(rows(root_sql, table)) == len(MALFORMED)
    assert plugin.status()["malformed"] == len(MALFORMED)


def test_malformed_request_is_logged_escaped(
    make_config: Callable[..., Config], databases: Any, plugins: Any, table: str, zctx: Any, caplog: Any
) -> None:
    config = make_config(table=table)
    plugin = plugins(config, databases(config))
    client = Client(zctx, plugin.endpoint)
    try:
        with caplog.at_level(logging.ERROR, logger="edm.plugins.fee.receiver"):
            assert client.ask(b"1,2\n,\xff").startswith(b"FALSE")
    finally:
        client.close()
    message = next(r.getMessage() for r in caplog.records if "Malformed" in r.getMessage())
    assert message.endswith("1,2\\n,\\xff")


def test_a_repeated_ticket_is_stored_once_and_keeps_the_first_values(
    make_config: Callable[..., Config],
    databases: Any,
    plugins: Any,
    table: str,
    root_sql: SQL,
    zctx: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = make_config(table=table)
    plugin = plugins(config, databases(config))
    client = Client(zctx, plugin.endpoint)
    try:
        assert client.ask(b"42,7,1.5") == b"TRUE"
        with caplog.at_level(logging.WARNING, logger="edm.plugins.fee.receiver"):
            assert client.ask(b" 42 , 7 , 1.50 ") == b"TRUE"  # the same values
            assert not [r for r in caplog.records if r.levelno == logging.WARNING]
            assert client.ask(b"42,8,2") == b"TRUE"  # different values
    finally:
        client.close()
    assert rows(root_sql, table) == [(42, 7, Decimal("1.5000"), "Y")]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "42" in warnings[0]
    assert plugin.status()["duplicates"] == 2


def test_an_existing_table_is_used_as_it_is(
    make_config: Callable[..., Config], databases: Any, plugins: Any, table: str, root_sql: SQL, zctx: Any
) -> None:
    root_sql(
        f"CREATE TABLE `{table}` (id INT AUTO_INCREMENT PRIMARY KEY, ticket BIGINT UNIQUE, login BIGINT,"
        " volume DECIMAL(20,4), status CHAR(1), note VARCHAR(10) DEFAULT 'php')"
    )
    config = make_config(table=table)
    plugin = plugins(config, databases(config))
    client = Client(zctx, plugin.endpoint)
    try:
        assert client.ask(b"5,6,7") == b"TRUE"
    finally:
        client.close()
    assert root_sql(f"SELECT ticket, status, note FROM `{table}`") == [(5, "Y", "php")]


def test_start_fails_with_a_clear_error_when_the_endpoint_is_taken(
    make_config: Callable[..., Config], databases: Any, table: str, zctx: Any
) -> None:
    port = free_port()
    squatter = zctx.socket(zmq.REP)
    squatter.bind(f"tcp://127.0.0.1:{port}")
    try:
        config = make_config(table=table, listen=f"tcp://127.0.0.1:{port}")
        plugin = FeePlugin(config, databases(config))
        with pytest.raises(EdmError, match=r"plugins.fee.listen: cannot bind tcp://127.0.0.1:\d+: .*in use"):
            plugin.start()
        assert plugin.status()["state"] == "stopped"
    finally:
        squatter.close(0)


def test_build_makes_the_fee_plugin(make_config: Callable[..., Config], databases: Any, table: str) -> None:
    config = make_config(table=table)
    (plugin,) = build(config, databases(config))
    assert plugin.name == "fee" and isinstance(plugin, FeePlugin)


def test_requests_wait_while_a_batch_is_stored_and_none_is_refused(
    make_config: Callable[..., Config], databases: Any, table: str, root_sql: SQL, zctx: Any
) -> None:
    """Given a batch held in the processing step, requests sent meanwhile wait in the socket's
    buffers (none is read, none is refused) and go together into the next batch."""
    release = threading.Event()
    batches: list[list[int]] = []

    class SlowFee(FeePlugin):
        def process(self, cursor: Any, fees: Any) -> None:
            batches.append([fee.ticket for fee in fees])
            if len(batches) == 1:
                release.wait(10)

    config = make_config(table=table)
    plugin = SlowFee(config, databases(config))
    plugin.start()
    clients = [Client(zctx, plugin.endpoint) for _ in range(4)]
    try:
        clients[0].socket.send(b"1,1,1")
        assert wait_for(lambda: plugin.status()["queue"] == 1, 5)
        for n, client in enumerate(clients[1:], start=2):
            client.socket.send(f"{n},1,1".encode())

        def all_read_by_libzmq() -> bool:
            # Four connections, each brought its greeting and one request of the same size, and
            # libzmq has read them all off the sockets: the three requests wait in its queues.
            seen = tcp_received(zmq_port(plugin.endpoint))
            return (
                len(seen) == 4
                and len({received for received, _ in seen}) == 1
                and not any(queued for _, queued in seen)
            )

        assert wait_for(all_read_by_libzmq, 10), tcp_received(zmq_port(plugin.endpoint))
        assert plugin.status()["requests"] == 1  # the others wait unread: the receiver is held
        release.set()
        replies = [c.socket.recv() for c in clients]
    finally:
        release.set()
        for client in clients:
            client.close()
        plugin.stop(10)
    assert replies == [b"TRUE"] * 4
    assert len(batches) == 2 and batches[0] == [1] and sorted(batches[1]) == [2, 3, 4], batches
    assert len(rows(root_sql, table)) == 4
    assert plugin.status()["busy"] == 0


def test_stop_answers_every_accepted_request(
    make_config: Callable[..., Config], databases: Any, table: str, root_sql: SQL, zctx: Any
) -> None:
    config = make_config(table=table)
    plugin = FeePlugin(config, databases(config))
    plugin.start()
    results: list[bytes] = []

    def load() -> None:
        results.extend(run_clients(zctx, plugin.endpoint, clients=8, per_client=100, timeout_ms=2000))

    loader = threading.Thread(target=load)
    loader.start()
    assert wait_for(lambda: plugin.status()["stored"] >= 50, 30), plugin.status()  # under load
    plugin.stop(10)
    loader.join(60)
    assert plugin.status()["state"] == "stopped"
    answered = results.count(b"TRUE")
    # Every TRUE is a stored row; requests not taken before the stop simply time out.
    assert len(rows(root_sql, table)) >= answered > 0


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    p = TcpProxy((MYSQL_HOST, MYSQL_PORT))
    yield p
    p.close()


def proxied_config(make_config: Callable[..., Config], proxy: TcpProxy, table: str, **kw: Any) -> Config:
    return make_config(url=f"mysql://root@127.0.0.1:{proxy.port}/{MYSQL_DB}", table=table, **kw)


def test_a_database_outage_loses_nothing(
    make_config: Callable[..., Config],
    databases: Any,
    plugins: Any,
    table: str,
    root_sql: SQL,
    zctx: Any,
    proxy: TcpProxy,
) -> None:
    config = proxied_config(make_config, proxy, table)
    plugin = plugins(config, databases(config))
    client = Client(zctx, plugin.endpoint)
    try:
        assert client.ask(b"1,1,1") == b"TRUE"
        proxy.cut()
        for ticket in range(2, 102):
            assert client.ask(f"{ticket},5,0.01".encode()) == b"TRUE"
        spool = config.plugins.fee.spool
        assert stat.S_IMODE(os.stat(spool).st_mode) == 0o600
        assert not stat.S_IMODE(os.stat(spool.parent).st_mode) & 0o027
        assert plugin.status()["state"] == "spooling"
        assert plugin.status()["spooled"] == 100
        assert len(rows(root_sql, table)) == 1
        proxy.restore()
        assert wait_for(lambda: len(rows(root_sql, table)) == 101, 30)
        assert {r[3] for r in rows(root_sql, table)} == {"Y"}
        assert wait_for(lambda: plugin.status()["state"] == "running", 5)
        assert not spool.exists()
        assert client.ask(b"500,5,5") == b"TRUE"
    finally:
        client.close()
    assert len(rows(root_sql, table)) == 102


def test_spooled_fees_survive_a_restart(
    make_config: Callable[..., Config],
    databases: Any,
    plugins: Any,
    table: str,
    root_sql: SQL,
    zctx: Any,
    proxy: TcpProxy,
) -> None:
    """Given fees spooled during an outage, a new receiver (a restarted daemon) replays them in order."""
    config = proxied_config(make_config, proxy, table)
    first = plugins(config, databases(config))
    endpoint = first.endpoint
    client = Client(zctx, endpoint)
    try:
        assert client.ask(b"1,1,1") == b"TRUE"
        proxy.cut()
        for ticket in range(2, 101):
            assert client.ask(f"{ticket},5,0.01".encode()) == b"TRUE"
        assert client.ask(b"2,6,9") == b"TRUE"  # a repeat while spooled: the first values must win
        first.stop(10)
        assert config.plugins.fee.spool.exists()

        second = plugins(config, databases(config))  # a new pool too, as after a daemon restart
        assert second.status()["spool_pending"] == 100
        assert client.ask(b"101,5,0.01") == b"TRUE"  # still down: spooled behind the others
        proxy.restore()
        assert wait_for(lambda: len(rows(root_sql, table)) == 101, 30)
    finally:
        client.close()
    stored = rows(root_sql, table)
    assert {r[3] for r in stored} == {"Y"}
    assert stored[1] == (2, 5, Decimal("0.0100"), "Y")
    assert wait_for(lambda: not config.plugins.fee.spool.exists(), 5)


def test_pool_size_bounds_server_connections_under_load(
    make_config: Callable[..., Config],
    databases: Any,
    plugins: Any,
    table: str,
    root_sql: SQL,
    zctx: Any,
    db_user: tuple[str, str],
) -> None:
    user, password = db_user
    config = make_config(
        url=f"mysql://{user}:{password}@{MYSQL_HOST}:{MYSQL_PORT}/{MYSQL_DB}", table=table, pool_size=4
    )
    db = databases(config)
    plugin = plugins(config, db)
    hammer_errors: list[BaseException] = []

    def hammer() -> None:  # another user of the shared pool, as a second plugin would be
        try:
            for _ in range(20):
                with db.connection() as con, con.cursor() as cur:
                    cur.execute("SELECT SLEEP(0.005)")
        except BaseException as exc:
            hammer_errors.append(exc)

    with ConnectionSampler(user) as sampler:
        hammers = [threading.Thread(target=hammer) for _ in range(8)]
        for t in hammers:
            t.start()
        replies = run_clients(zctx, plugin.endpoint, clients=32, per_client=50)
        for t in hammers:
            t.join(60)
    assert not hammer_errors
    assert replies.count(b"TRUE") == 1600
    assert len(rows(root_sql, table)) == 1600
    assert 1 <= sampler.maximum <= 4, sampler.maximum


def test_the_same_flow_on_sqlite(
    make_config: Callable[..., Config], databases: Any, plugins: Any, tmp_path: Path, zctx: Any
) -> None:
    config = make_config(url=f"sqlite:///{tmp_path}/data/fees.db", table="fee", pool_size=2)
    db = databases(config)
    plugin = plugins(config, db)
    replies = run_clients(zctx, plugin.endpoint, clients=8, per_client=50)
    assert replies.count(b"TRUE") == 400
    client = Client(zctx, plugin.endpoint)
    try:
        assert client.ask(b"1,2,x").startswith(b"FALSE")
        assert client.ask(b"1,999,9") == b"TRUE"  # repeat
        assert client.ask(b"9999,1,9999999999999999.9999") == b"TRUE"
    finally:
        client.close()
    with db.connection() as con:
        assert con.execute("SELECT COUNT(*), MIN(status), MAX(status) FROM fee").fetchone() == (401, "Y", "Y")
        assert con.execute("SELECT login FROM fee WHERE ticket = 1").fetchone() == (1000,)
        (volume,) = con.execute("SELECT volume FROM fee WHERE ticket = 9999").fetchone()
        assert Decimal(str(volume)) == Decimal("9999999999999999.9999")


def test_reload_moves_the_receiver_to_a_new_endpoint(
    make_config: Callable[..., Config], databases: Any, plugins: Any, table: str, root_sql: SQL, zctx: Any
) -> None:
    config = make_config(table=table)
    plugin = plugins(config, databases(config))
    plugin.reload(config)  # unchanged: keeps serving where it is
    old_endpoint = plugin.endpoint
    moved = make_config(table=table)
    plugin.reload(moved)
    assert plugin.endpoint != old_endpoint
    assert plugin.status()["state"] == "running"
    client = Client(zctx, plugin.endpoint)
    try:
        assert client.ask(b"1,2,3") == b"TRUE"
    finally:
        client.close()
    assert len(rows(root_sql, table)) == 1
