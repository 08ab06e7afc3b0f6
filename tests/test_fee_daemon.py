"""The fee receiver inside the real daemon: started, supervised, reported by status."""

from __future__ import annotations

import json
import os
import signal
import socket

import zmq
from conftest import EdmEnv, drop_table, free_port, root_connection, unique, wait_for
from netutil import Client


def _fee_env(make_env, table: str, port: int) -> EdmEnv:
    return make_env(
        {
            "database": {"url": "mysql://root@127.0.0.1:3306/test", "pool_size": 4},
            "plugins": {"fee": {"enabled": True, "listen": f"tcp://127.0.0.1:{port}", "table": table}},
        }
    )


def _rows(table: str) -> list[tuple[int, int, str, str]]:
    con = root_connection()
    try:
        with con.cursor() as cur:
            cur.execute(f"SELECT ticket, login, CAST(volume AS CHAR), status FROM `{table}` ORDER BY ticket")
            return list(cur.fetchall())
    finally:
        con.close()


def test_fee_plugin_in_the_daemon(make_env) -> None:
    table, port = unique("fee_d"), free_port()
    env = _fee_env(make_env, table, port)
    try:
        pid = env.start()
        wait_for(lambda: env.worker_pid("plugins") is not None)
        client = Client(zmq.Context.instance(), f"tcp://127.0.0.1:{port}")
        try:
            assert client.ask(b"1001,7,1.5") == b"TRUE"
            assert client.ask(b" 1002 , 7 , 100 ") == b"TRUE"
            assert client.ask(b"1001,7,1.5") == b"TRUE"  # a repeat stores nothing new
            bad = client.ask(b"12,abc,1")
            assert bad.startswith(b"FALSE ")
            assert client.ask(b"1003,8,0.0001") == b"TRUE"
        finally:
            client.close()
        assert _rows(table) == [
            (1001, 7, "1.5000", "Y"),
            (1002, 7, "100.0000", "Y"),
            (1003, 8, "0.0001", "Y"),
        ]
        assert "12,abc,1" in env.log_text()

        status = env.cli("status")
        assert status.returncode == 0
        assert f"plugins: RUNNING, pid {env.worker_pid('plugins')}" in status.stdout or (
            f"plugins: STARTING, pid {env.worker_pid('plugins')}" in status.stdout
        )

        # the fee receiver's own state and counters, for people and for machines
        def fee_status() -> dict | None:
            doc = json.loads(env.cli("status", "--json").stdout)
            fee = doc["plugins"].get("fee")
            return fee if fee and fee["stored"] == 4 else None  # the repeat counts as stored

        fee = wait_for(fee_status, timeout=5)
        assert fee["state"] == "running"
        assert fee["listen"] == f"tcp://127.0.0.1:{port}"
        assert (fee["requests"], fee["duplicates"], fee["malformed"]) == (5, 1, 1)
        lines = env.cli("status").stdout.splitlines()
        assert f"    fee: running, listen tcp://127.0.0.1:{port}" in "\n".join(lines)
        assert any("stored 4" in line and "malformed 1" in line for line in lines if "fee:" in line)

        # the plugin worker is supervised like the consumer
        worker = env.worker_pid("plugins")
        assert worker is not None
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: env.worker_pid("plugins") not in (None, worker), timeout=5)
        client = Client(zmq.Context.instance(), f"tcp://127.0.0.1:{port}")
        try:
            wait_for(lambda: client.ask(b"1004,9,2") == b"TRUE", timeout=10)
        finally:
            client.close()
        assert (1004, 9, "2.0000", "Y") in _rows(table)
        assert env.main_pid() == pid
        assert env.cli("stop").returncode == 0
    finally:
        drop_table(table)


def test_start_fails_when_the_fee_endpoint_is_taken(make_env) -> None:
    table = unique("fee_d")
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    env = _fee_env(make_env, table, port)
    try:
        result = env.cli("start")
        assert result.returncode == 1
        assert f"tcp://127.0.0.1:{port}" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert env.cli("status").returncode == 3
        assert not env.all_pids()
    finally:
        blocker.close()
        drop_table(table)


def test_a_password_in_both_urls_never_appears(make_env) -> None:
    table, port = unique("fee_d"), free_port()
    env = _fee_env(make_env, table, port)
    env.doc["amqp"]["url"] = "amqp://guest:wrong-amqp-pw-123@127.0.0.1:5672/%2F"
    env.doc["database"]["url"] = "mysql://root:wrong-db-pw-456@127.0.0.1:3306/test"
    env.write_config()
    try:
        outputs = [env.cli("check-config"), env.cli("start")]
        wait_for(lambda: "ACCESS_REFUSED" in env.log_text() or "Cannot connect" in env.log_text(), timeout=15)
        outputs += [env.cli("status"), env.cli("status", "--json"), env.cli("stop")]
        text = env.log_text() + "".join(r.stdout + r.stderr for r in outputs)
        for secret in ("wrong-amqp-pw-123", "wrong-db-pw-456"):
            assert secret not in text
        assert "amqp://guest:***@127.0.0.1:5672/%2F" in env.log_text()
    finally:
        drop_table(table)
