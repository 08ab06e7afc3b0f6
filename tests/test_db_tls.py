"""The database link over TLS, against private MariaDB servers started for these tests
(scripts/mariadb-node: their own data dirs and ports; the system's server is not touched)."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pymysql
import pytest
import zmq
from conftest import ROOT, EdmEnv, free_port
from netutil import Client
from tlsutil import make_ca, make_cert

from edm.config import Config, parse
from edm.db import Database, TlsRefused, require_tls
from edm.errors import DatabaseError, DatabaseUnavailable, EdmError
from edm.plugins.fee.receiver import FeePlugin

NODE = ROOT / "scripts" / "mariadb-node"


@dataclass
class Node:
    directory: Path
    port: int
    password: str

    @property
    def url(self) -> str:
        return f"mysql://edm:{self.password}@127.0.0.1:{self.port}/test"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("certs")
    make_ca(directory)
    make_cert(directory, "server", hosts=("127.0.0.1", "localhost"))
    make_ca(directory, "other")  # a CA that signed nothing of the server's
    return directory


def _node(directory: Path, *options: str) -> Iterator[Node]:
    port = free_port()
    try:
        subprocess.run([str(NODE), "up", str(directory), str(port), *options], check=True, timeout=120)
        yield Node(directory, port, (directory / "password").read_text())
    finally:
        subprocess.run([str(NODE), "down", str(directory)], check=False, timeout=60)


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[Node]:
    """A server that speaks TLS and refuses connections without it."""
    yield from _node(tmp_path_factory.mktemp("tls-node"), "--tls", str(certs), "--require-tls")


@pytest.fixture(scope="module")
def plain_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """A server without TLS."""
    yield from _node(tmp_path_factory.mktemp("plain-node"))


def _config(tmp_path: Path, url: str, tls: dict[str, Any] | None, table: str = "fee") -> Config:
    raw = {
        "database": {"url": url, "pool_size": 4, "tls": tls},
        "plugins": {
            "fee": {
                "enabled": True,
                "listen": f"tcp://127.0.0.1:{free_port()}",
                "table": table,
                "spool": "fee.spool",
            }
        },
    }
    return parse(raw, tmp_path / "mq.yaml", environ={})


@pytest.fixture
def opened() -> Iterator[Callable[[Config], Database]]:
    pools: list[Database] = []

    def open_(config: Config) -> Database:
        pools.append(Database.open(config.database))
        return pools[-1]

    yield open_
    for pool in pools:
        pool.close()


def _cipher(db: Database) -> str:
    with db.connection() as con:
        cur = con.cursor()
        cur.execute("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        return str(cur.fetchone()[1])


def test_the_fee_plugin_stores_over_tls_with_the_right_ca(
    tls_node: Node, certs: Path, tmp_path: Path, opened: Any
) -> None:
    """Given a server that refuses plaintext, the receiver stores a fee (TRUE) and its pooled
    sessions are encrypted, as the server itself reports."""
    config = _config(tmp_path, tls_node.url, {"ca_file": str(certs / "ca.pem")})
    db = opened(config)
    plugin = FeePlugin(config, db)
    plugin.start()
    context: Any = zmq.Context()
    client = Client(context, plugin.endpoint or "")
    try:
        assert client.ask(b"7001,3,2.5") == b"TRUE"
    finally:
        client.close()
        context.destroy(0)
        plugin.stop(10)
    assert _cipher(db)  # the server says: this session is encrypted
    with db.connection() as con:
        cur = con.cursor()
        cur.execute("SELECT ticket, login, status FROM fee")
        assert cur.fetchall() == ((7001, 3, "Y"),)


def test_the_daemon_stores_fees_over_tls(
    tls_node: Node, certs: Path, make_env: Callable[..., EdmEnv], zctx: Any, tmp_path: Path, opened: Any
) -> None:
    port = free_port()
    env = make_env(
        {
            "database": {"url": tls_node.url, "tls": {"ca_file": str(certs / "ca.pem")}},
            "plugins": {"fee": {"enabled": True, "listen": f"tcp://127.0.0.1:{port}", "table": "fee_daemon"}},
        }
    )
    env.start()
    client = Client(zctx, f"tcp://127.0.0.1:{port}")
    try:
        assert client.ask(b"7101,4,1") == b"TRUE"
    finally:
        client.close()
    assert tls_node.password not in env.log_text()
    db = opened(_config(tmp_path, tls_node.url, {"ca_file": str(certs / "ca.pem")}))
    with db.connection() as con:
        cur = con.cursor()
        cur.execute("SELECT ticket, status FROM fee_daemon")
        assert cur.fetchall() == ((7101, "Y"),)


def test_a_wrong_ca_fails_the_daemons_start_naming_the_key_and_the_reason(
    tls_node: Node, certs: Path, make_env: Callable[..., EdmEnv]
) -> None:
    env = make_env(
        {
            "database": {"url": tls_node.url, "tls": {"ca_file": str(certs / "other.pem")}},
            "plugins": {"fee": {"enabled": True, "listen": f"tcp://127.0.0.1:{free_port()}"}},
        }
    )
    result = env.cli("start")
    assert result.returncode == 1, result.stdout
    assert "database.tls" in result.stderr
    assert "certificate verify failed" in result.stderr
    assert f"mysql://edm:***@127.0.0.1:{tls_node.port}/test" in result.stderr
    assert tls_node.password not in result.stderr + env.log_text()


def test_ca_file_set_and_a_server_without_tls_is_refused(
    plain_node: Node, certs: Path, tmp_path: Path, opened: Any
) -> None:
    config = _config(tmp_path, plain_node.url, {"ca_file": str(certs / "ca.pem")})
    db = opened(config)
    with pytest.raises(DatabaseError) as refused:
        with db.connection():
            pass
    assert not isinstance(refused.value, DatabaseUnavailable)  # no retry can make it secure
    assert "TLS" in str(refused.value)
    with pytest.raises(EdmError, match=r"^database\.tls: database mysql://edm:\*\*\*@"):
        FeePlugin(config, db).start()


def test_a_plaintext_session_fails_the_servers_own_check(plain_node: Node) -> None:
    """edm asks the server whether the session is encrypted (PyMySQL before 1.2 would go on in
    plaintext by itself): a plaintext session fails that check."""
    con = pymysql.connect(
        host="127.0.0.1", port=plain_node.port, user="edm", password=plain_node.password, ssl_disabled=True
    )
    try:
        with pytest.raises(TlsRefused, match="did not encrypt"):
            require_tls(con)
    finally:
        con.close()


def test_verify_false_connects_without_checking_and_warns(
    tls_node: Node, tmp_path: Path, opened: Any, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(tmp_path, tls_node.url, {"verify": False})
    with caplog.at_level(logging.WARNING, logger="edm.db"):
        db = opened(config)
    assert any("database.tls.verify is false" in r.getMessage() for r in caplog.records)
    assert _cipher(db)


def test_tls_settings_are_checked_with_the_config(tmp_path: Path, certs: Path) -> None:
    url = "mysql://edm:pw@127.0.0.1:3306/test"
    with pytest.raises(EdmError, match=r"^database\.tls\.ca_file: .*missing\.pem: no such file"):
        _config(tmp_path, url, {"ca_file": "missing.pem"})
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(EdmError, match=r"^database\.tls\.ca_file: .*not a PEM CA certificate"):
        _config(tmp_path, url, {"ca_file": "junk.pem"})
    with pytest.raises(EdmError, match=r"^database\.tls\.key_file: needs database\.tls\.cert_file"):
        _config(tmp_path, url, {"key_file": str(certs / "server.key")})
    with pytest.raises(EdmError, match=r"^database\.tls: TLS is for mysql:// URLs"):
        _config(tmp_path, "sqlite:///tmp/x.db", {"ca_file": str(certs / "ca.pem")})
    with pytest.raises(EdmError, match=r"^database\.tls\.verfy: unknown key"):
        _config(tmp_path, url, {"verfy": False})
    (tmp_path / "rel").mkdir()
    (tmp_path / "rel" / "ca.pem").write_bytes((certs / "ca.pem").read_bytes())
    config = _config(tmp_path, url, {"ca_file": "rel/ca.pem", "cert_file": str(certs / "server.pem"),
                                     "key_file": str(certs / "server.key")})  # fmt: skip
    assert config.database.tls.ca_file == tmp_path / "rel" / "ca.pem"  # against the config's dir
