"""Reloads that cannot be applied, a spool that moves, a receiver that dies: the real daemon
keeps serving (contract §4 and §16)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from conftest import (
    MYSQL_DB,
    MYSQL_HOST,
    MYSQL_PORT,
    ROOT,
    EdmEnv,
    alive,
    drop_table,
    free_port,
    root_connection,
    unique,
    wait_for,
)
from netutil import Client, TcpProxy

from edm.config import Config
from edm.errors import EdmError


@pytest.fixture
def fee_table() -> Iterator[str]:
    name = unique("fee_r")
    yield name
    drop_table(name)


def _fee_env(make_env: Callable[..., EdmEnv], table: str, port: int, db_port: int = MYSQL_PORT) -> EdmEnv:
    return make_env(
        {
            "database": {"url": f"mysql://root@{MYSQL_HOST}:{db_port}/{MYSQL_DB}", "pool_size": 4},
            "plugins": {"fee": {"enabled": True, "listen": f"tcp://127.0.0.1:{port}", "table": table}},
        }
    )


def _tickets(table: str) -> list[int]:
    """The table's tickets; none while the table is not created yet."""
    con = root_connection()
    try:
        with con.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_NAME = %s", (table,))
            if not cur.fetchone()[0]:
                return []
            cur.execute(f"SELECT ticket FROM `{table}` ORDER BY ticket")
            return [row[0] for row in cur.fetchall()]
    finally:
        con.close()


def _ask(endpoint: str, body: bytes, timeout_ms: int = 15000) -> bytes:
    client = Client(zmq.Context.instance(), endpoint, timeout_ms)
    try:
        return client.ask(body)
    finally:
        client.close()


def _status(env: EdmEnv) -> dict[str, Any]:
    result = env.cli("status", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def _states(env: EdmEnv) -> dict[str, str]:
    return {name: w["state"] for name, w in _status(env)["workers"].items()}


def _running(env: EdmEnv, name: str) -> int | None:
    """The worker's PID once it is RUNNING."""
    worker = env.state().get("workers", {}).get(name, {})
    return worker.get("pid") if worker.get("state") == "RUNNING" else None


def _errors(text: str, key: str) -> list[str]:
    return [line for line in text.splitlines() if " ERROR " in line and key in line]


def test_a_reload_onto_an_endpoint_in_use_keeps_the_receiver_serving(
    make_env: Callable[..., EdmEnv], fee_table: str
) -> None:
    port = free_port()
    blocker = socket.socket()  # another program holds the new endpoint
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    old, new = f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{taken}"
    env = _fee_env(make_env, fee_table, port)
    try:
        pid = env.start()
        worker = wait_for(lambda: _running(env, "plugins"), timeout=15)
        assert _ask(old, b"1,7,1.5") == b"TRUE"

        # When the config moves the receiver to an endpoint in use and edm reloads
        env.doc["plugins"]["fee"]["listen"] = new
        env.write_config()
        assert env.cli("reload").returncode == 0
        expected = f"ERROR plugins.fee.listen: cannot bind {new}: Address already in use; keeping {old}"
        wait_for(lambda: expected in env.log_text(), timeout=15)

        # Then the receiver serves on where it was, in the same worker, and nothing is FATAL
        assert _ask(old, b"2,7,2.5") == b"TRUE"
        assert _tickets(fee_table) == [1, 2]
        assert env.worker_pid("plugins") == worker
        wait_for(lambda: set(_states(env).values()) == {"RUNNING"}, timeout=10)
        assert _status(env)["plugins"]["fee"]["listen"] == old
        wait_for(lambda: "keeping" in (_status(env)["workers"]["plugins"]["last_error"] or ""), timeout=5)
        assert len(_errors(env.log_text(), "plugins.fee.listen")) == 1

        # and should the worker die, it comes back with the settings it ran
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: _running(env, "plugins") not in (None, worker), timeout=15)
        wait_for(lambda: _ask(old, b"3,7,3.5", timeout_ms=2000) == b"TRUE", timeout=15)
        wait_for(lambda: set(_states(env).values()) == {"RUNNING"}, timeout=10)

        # Once the endpoint is free, the next reload moves the receiver there
        blocker.close()
        moved = env.worker_pid("plugins")
        assert env.cli("reload").returncode == 0
        wait_for(lambda: f"The fee receiver listens on {new}" in env.log_text(), timeout=15)
        assert _ask(new, b"4,7,4.5") == b"TRUE"
        assert _tickets(fee_table) == [1, 2, 3, 4]
        assert env.worker_pid("plugins") == moved
        wait_for(lambda: _status(env)["workers"]["plugins"]["last_error"] is None, timeout=5)
        assert env.main_pid() == pid
        assert env.cli("stop").returncode == 0
    finally:
        blocker.close()


def test_a_reload_with_a_handler_that_cannot_load_keeps_the_running_one(edm_env: EdmEnv) -> None:
    edm_env.doc["amqp"]["handler"] = "edm_test_handlers:marked"
    edm_env.write_config()
    pid = edm_env.start()
    consumer = wait_for(lambda: _running(edm_env, "consumer"), timeout=15)
    unloadable = [
        ("edm_test_nowhere:handle", "cannot import 'edm_test_nowhere'"),  # no such module
        ("edm_test_handlers:nowhere", "'edm_test_handlers' has no callable 'nowhere'"),  # no such function
        ("edm_test_unimportable:handle", "cannot import 'edm_test_unimportable'"),  # its import raises
        ("edm_test_exiting:handle", "importing 'edm_test_exiting' called sys.exit(3)"),
    ]
    for n, (spec, reason) in enumerate(unloadable):
        # When the config names a handler that cannot be loaded (and a new log name) and
        # edm gets SIGHUP (systemctl reload; `edm reload` would refuse to send it)
        name = f"after-{n}"
        edm_env.doc["amqp"]["handler"] = spec
        edm_env.doc["log"]["name"] = name
        edm_env.write_config()
        os.kill(pid, signal.SIGHUP)
        wait_for(_logged(edm_env, name, f"ERROR amqp.handler: {reason}"), timeout=15)

        # Then the rest of the config applies, and the running handler goes on consuming
        edm_env.publish([f"message {n}".encode()])
        wait_for(_logged(edm_env, name, f"(+) marked: message {n}"), timeout=15)
        (line,) = _errors(edm_env.log_text(name), "amqp.handler")
        assert line.endswith("; keeping edm_test_handlers:marked"), line
        states = _states(edm_env)
        assert states["consumer"] == "RUNNING", states
        assert edm_env.worker_pid() == consumer
        assert edm_env.main_pid() == pid
    assert "FATAL" not in edm_env.log_text("after-3")
    assert edm_env.cli("stop").returncode == 0


def test_a_handler_loaded_by_a_reload_stays_through_the_next_reload(edm_env: EdmEnv) -> None:
    pid = edm_env.start()
    edm_env.doc["amqp"]["handler"] = "edm_test_handlers:marked"
    edm_env.write_config()
    assert edm_env.cli("reload").returncode == 0
    edm_env.publish([b"one"])
    wait_for(_logged(edm_env, "edm", "(+) marked: one"), timeout=15)
    # When a second reload changes something else only
    edm_env.doc["log"]["name"] = "second"
    edm_env.write_config()
    assert edm_env.cli("reload").returncode == 0
    wait_for(_logged(edm_env, "second", "Reloaded the config"), timeout=15)
    # Then the handler of the first reload goes on (not the one edm started with)
    edm_env.publish([b"two"])
    wait_for(lambda: "two" in " ".join(edm_env.bodies_logged("second")), timeout=15)
    assert edm_env.bodies_logged("second") == ["marked: two"]
    assert edm_env.main_pid() == pid
    assert edm_env.cli("stop").returncode == 0


def _logged(env: EdmEnv, name: str, text: str) -> Callable[[], bool]:
    return lambda: text in env.log_text(name)


def test_a_reload_with_a_new_spool_moves_the_pending_fees(
    make_env: Callable[..., EdmEnv], fee_table: str
) -> None:
    proxy = TcpProxy((MYSQL_HOST, MYSQL_PORT))
    port = free_port()
    env = _fee_env(make_env, fee_table, port, db_port=proxy.port)
    endpoint = f"tcp://127.0.0.1:{port}"
    old_spool = env.base / "run" / "fee.spool"
    new_spool = env.base / "spool-b" / "fee.spool"
    try:
        env.start()
        worker = wait_for(lambda: env.worker_pid("plugins"))
        assert _ask(endpoint, b"1,1,1") == b"TRUE"
        # Given fees spooled while the database is cut
        proxy.cut()
        for ticket in range(2, 52):
            assert _ask(endpoint, f"{ticket},5,0.01".encode()) == b"TRUE"
        assert old_spool.read_bytes().count(b"\n") == 50

        # When a reload points the spool elsewhere
        env.doc["plugins"]["fee"]["spool"] = str(new_spool)
        env.write_config()
        assert env.cli("reload").returncode == 0
        wait_for(_logged(env, "edm", f"Moved 50 pending fee(s) from the spool {old_spool} to {new_spool}"))
        assert not old_spool.exists()
        assert _ask(endpoint, b"52,5,0.01") == b"TRUE"  # still down: behind the moved ones

        # Then, once the database is back, every spooled fee is in the table, once
        proxy.restore()
        wait_for(lambda: _tickets(fee_table) == list(range(1, 53)), timeout=30)
        wait_for(lambda: not new_spool.exists(), timeout=10)
        assert not old_spool.exists()
        wait_for(lambda: set(_states(env).values()) == {"RUNNING"}, timeout=10)
        assert env.worker_pid("plugins") == worker
        assert env.cli("stop").returncode == 0
    finally:
        proxy.close()


def test_a_receiver_thread_that_dies_takes_its_worker_down_to_be_restarted(
    make_env: Callable[..., EdmEnv], fee_table: str
) -> None:
    port = free_port()
    env = _fee_env(make_env, fee_table, port)
    endpoint = f"tcp://127.0.0.1:{port}"
    # Given a daemon whose fee receiver breaks on ticket 666 (see edm_faulty_receiver)
    support = ROOT / "tests" / "support"
    result = subprocess.run(
        [sys.executable, "-m", "edm_faulty_receiver", "--config", str(env.config_path), "start"],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{support}"},
        cwd=str(env.base),
    )
    env.started_pids.update(env.all_pids())
    assert result.returncode == 0, result.stderr
    pid = env.main_pid()
    env.wait_consuming()
    worker = wait_for(lambda: _running(env, "plugins"), timeout=15)
    assert _ask(endpoint, b"1,1,1") == b"TRUE"

    # When a request makes the receiver's thread die
    doomed = Client(zmq.Context.instance(), endpoint, timeout_ms=1000)
    try:
        doomed.socket.send(b"666,1,1")

        # Then its worker exits non-zero, the supervisor restarts it, and the endpoint serves again
        wait_for(lambda: not alive(worker), timeout=15)
        restarted = wait_for(lambda: env.worker_pid("plugins") not in (None, worker), timeout=15)
        assert restarted
    finally:
        doomed.close()
    env.started_pids.update(env.all_pids())
    wait_for(lambda: _ask(endpoint, b"2,1,1", timeout_ms=2000) == b"TRUE", timeout=15)
    assert _tickets(fee_table) == [1, 2]
    log = env.log_text()
    assert "The fee receiver failed" in log
    assert "The fee plugin no longer serves (the fee receiver failed: RuntimeError: ticket 666" in log
    assert "The plugins worker exited with code 1; restarting it" in log
    assert "FATAL" not in log
    wait_for(lambda: _running(env, "plugins"), timeout=15)
    assert env.main_pid() == pid
    assert env.cli("stop").returncode == 0


def test_the_spool_takes_over_nothing_from_itself(tmp_path: Path) -> None:
    """A reload naming the same spool file by another path moves nothing and loses nothing."""
    from edm.plugins.fee.parse import parse_request
    from edm.plugins.fee.spool import Spool

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    old = Spool(tmp_path / "real" / "fee.spool")
    old.append([parse_request(b"1,2,3"), parse_request(b"4,5,6")])
    new = Spool(tmp_path / "link" / "fee.spool")
    assert new.take_over(old) == 0
    assert new.records == 2
    assert (tmp_path / "real" / "fee.spool").read_bytes().count(b"\n") == 2


# -- the fee plugin on its own ---------------------------------------------------------------


def test_a_plugin_reload_that_cannot_bind_keeps_every_fee_setting(
    make_config: Callable[..., Config], databases: Any, plugins: Any, table: str, zctx: Any
) -> None:
    config = make_config(table=table)
    plugin = plugins(config, databases(config))
    old = config.plugins.fee.listen
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    new = f"tcp://127.0.0.1:{blocker.getsockname()[1]}"
    client = Client(zctx, plugin.endpoint)
    try:
        assert client.ask(b"1,1,1") == b"TRUE"
        moved = make_config(table=table + "_b", listen=new)
        with pytest.raises(EdmError) as refused:
            plugin.reload(moved)
        message = f"plugins.fee.listen: cannot bind {new}: Address already in use; keeping {old}"
        assert str(refused.value) == message
        # the same connection, the same endpoint, the same table
        assert client.ask(b"2,1,1") == b"TRUE"
        assert plugin.endpoint == old
        assert plugin.status()["state"] == "running"
    finally:
        client.close()
        blocker.close()
    assert _tickets(table) == [1, 2]


def test_a_reload_onto_another_address_of_the_same_port_says_a_restart_applies_it(
    make_config: Callable[..., Config], databases: Any, plugins: Any, table: str
) -> None:
    config = make_config(table=table)
    plugin = plugins(config, databases(config))
    old = config.plugins.fee.listen
    everywhere = "tcp://*:" + old.rpartition(":")[2]
    with pytest.raises(EdmError) as refused:
        plugin.reload(make_config(table=table, listen=everywhere))
    assert str(refused.value) == (
        f"plugins.fee.listen: cannot bind {everywhere}: Address already in use "
        f"(this receiver holds that port itself: a restart applies the change); keeping {old}"
    )
    assert plugin.endpoint == old


def test_a_reload_on_the_same_endpoint_keeps_the_clients_connected(
    make_config: Callable[..., Config], databases: Any, plugins: Any, table: str, zctx: Any
) -> None:
    config = make_config(table=table)
    plugin = plugins(config, databases(config))
    client = Client(zctx, plugin.endpoint)
    monitor = client.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    second = table + "_b"
    try:
        assert client.ask(b"1,1,1") == b"TRUE"
        plugin.reload(make_config(table=second, listen=config.plugins.fee.listen))
        assert client.ask(b"2,1,1") == b"TRUE"
        assert not monitor.poll(0), "the client was disconnected: the socket did not stay bound"
    finally:
        monitor.close(0)
        client.close()
        drop_table(second)
    assert _tickets(table) == [1]


def test_a_spool_that_cannot_take_over_keeps_the_old_one(
    make_config: Callable[..., Config], databases: Any, plugins: Any, table: str, zctx: Any, tmp_path: Path
) -> None:
    proxy = TcpProxy((MYSQL_HOST, MYSQL_PORT))
    url = f"mysql://root@127.0.0.1:{proxy.port}/{MYSQL_DB}"
    config = make_config(url=url, table=table)
    plugin = plugins(config, databases(config))
    client = Client(zctx, plugin.endpoint)
    (tmp_path / "a-file").write_text("not a directory\n")
    try:
        proxy.cut()
        for ticket in range(1, 11):
            assert client.ask(f"{ticket},1,1".encode()) == b"TRUE"
        spool = config.plugins.fee.spool
        listen = config.plugins.fee.listen
        elsewhere = make_config(url=url, table=table, listen=listen, spool="a-file/fee.spool")
        with pytest.raises(EdmError) as refused:
            plugin.reload(elsewhere)
        refusal = str(refused.value)
        assert refusal.startswith(f"plugins.fee.spool: cannot move the pending fees of {spool} to ")
        assert refusal.endswith(f"; keeping {spool}")
        assert plugin.status()["spool_pending"] == 10
        assert client.ask(b"11,1,1") == b"TRUE"
        proxy.restore()
        wait_for(lambda: _tickets(table) == list(range(1, 12)), timeout=30)
    finally:
        client.close()
        proxy.close()
    wait_for(lambda: not config.plugins.fee.spool.exists(), timeout=10)


def test_a_reload_that_changes_the_database_says_it_applies_at_the_next_restart(
    make_env: Callable[..., EdmEnv], fee_table: str
) -> None:
    """The pool is opened once: a changed `database` section is not applied by a reload, and
    the daemon says so instead of pretending; the fee receiver serves on with its pool."""
    port = free_port()
    env = _fee_env(make_env, fee_table, port)
    endpoint = f"tcp://127.0.0.1:{port}"
    pid = env.start()
    worker = wait_for(lambda: _running(env, "plugins"), timeout=15)
    assert _ask(endpoint, b"1,7,1.5") == b"TRUE"

    env.doc["database"]["pool_size"] = 2
    env.doc["log"]["level"] = "DEBUG"
    env.write_config()
    assert env.cli("reload").returncode == 0
    wait_for(lambda: "WARNING database: the changed settings apply at the next restart" in env.log_text())

    assert _ask(endpoint, b"2,7,2.5") == b"TRUE"
    assert _tickets(fee_table) == [1, 2]
    assert env.worker_pid("plugins") == worker and env.main_pid() == pid
    assert set(_states(env).values()) == {"RUNNING"}
    assert env.cli("stop").returncode == 0
