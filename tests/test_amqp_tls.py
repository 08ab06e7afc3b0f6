"""AMQP over TLS against a real broker: a private RabbitMQ node with a TLS listener, started
by ``scripts/rabbit-cluster`` on its own ports (never the system's broker), with a CA and
certificates made here. ``amqps://`` verifies the broker's certificate and host name; a
client certificate logs in with ``EXTERNAL``; ``verify: false`` connects, with a WARNING.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika.credentials
import pytest
import trustme
from conftest import EdmEnv, wait_for
from rabbitnode import Cluster, free_base, running_cluster

from edm.amqp.params import parameters
from edm.config import parse
from edm.errors import BrokerError, ConfigError

TLS_OFFSET = 50  # the TLS listener's port, from the node's base port (free_base checks it)
CLIENT_USER = "edm-client"  # the client certificate's common name: a user of the node

NODE_CONF = """\
listeners.ssl.1 = 127.0.0.1:{port}
ssl_options.cacertfile = {dir}/ca.pem
ssl_options.certfile = {dir}/server.pem
ssl_options.keyfile = {dir}/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = false
auth_mechanisms.1 = PLAIN
auth_mechanisms.2 = EXTERNAL
ssl_cert_login_from = common_name
"""


@dataclass
class TlsNode:
    cluster: Cluster
    port: int
    certs: Path  # ca.pem, client.pem, client.key, other-ca.pem

    def url(self, host: str = "localhost", userinfo: str = "guest:guest@") -> str:
        return f"amqps://{userinfo}{host}:{self.port}/%2F"

    def masked(self, host: str = "localhost") -> str:
        return f"amqps://guest:***@{host}:{self.port}/%2F"

    def connections(self) -> list[dict[str, Any]]:
        result = self.cluster.run(
            "ctl", "1", "-q", "list_connections", "user", "auth_mechanism", "ssl", "--formatter", "json"
        )
        assert result.returncode == 0, result.stderr
        rows: list[dict[str, Any]] = json.loads(result.stdout or "[]")
        return rows


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsNode]:
    """One node for the module: the server certificate names ``localhost`` only."""
    top = tmp_path_factory.mktemp("tls")
    certs = top / "certs"
    certs.mkdir()
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(certs / "ca.pem"))
    server = ca.issue_cert("localhost")
    server.cert_chain_pems[0].write_to_path(str(certs / "server.pem"))
    server.private_key_pem.write_to_path(str(certs / "server.key"))
    client = ca.issue_cert(f"{CLIENT_USER}.test", common_name=CLIENT_USER)  # Erlang wants a SAN
    client.cert_chain_pems[0].write_to_path(str(certs / "client.pem"))
    client.private_key_pem.write_to_path(str(certs / "client.key"))
    trustme.CA().cert_pem.write_to_path(str(certs / "other-ca.pem"))
    base = free_base(1, extra=[TLS_OFFSET])
    conf = top / "tls.conf"
    conf.write_text(NODE_CONF.format(port=base + TLS_OFFSET, dir=certs))
    options = ("--conf", str(conf), "--plugins", "rabbitmq_auth_mechanism_ssl")
    with running_cluster(top / "node", base, 1, *options) as cluster:
        for args in (
            ("add_user", CLIENT_USER, secrets.token_hex(16)),
            ("set_permissions", "-p", "/", CLIENT_USER, ".*", ".*", ".*"),
        ):
            result = cluster.run("ctl", "1", "-q", *args)
            assert result.returncode == 0, result.stderr
        yield TlsNode(cluster, base + TLS_OFFSET, certs)


@pytest.fixture
def tls_env(make_env: Callable[..., EdmEnv], tls_node: TlsNode) -> Callable[..., EdmEnv]:
    """An EdmEnv on the TLS node: ``url`` and the ``amqp.tls`` mapping given."""

    def make(url: str, tls: dict[str, Any]) -> EdmEnv:
        env: EdmEnv = make_env({"amqp": {"url": url, "tls": tls, "retry_max": 1}})
        return env

    return make


def consumer_activity(env: EdmEnv) -> str:
    worker: dict[str, Any] = env.state().get("workers", {}).get("consumer", {})
    return str(worker.get("activity", ""))


def consume_and_publish(env: EdmEnv, bodies: list[str]) -> None:
    """Given a started daemon, `edm publish` over the same link; the daemon logs every body."""
    wait_for(lambda: consumer_activity(env) == "consuming", 60)
    published = env.cli("publish", *bodies)
    assert published.returncode == 0, published.stderr
    wait_for(lambda: env.bodies_logged() == bodies, 30)


def test_the_daemon_consumes_over_amqps_with_the_private_ca(
    tls_env: Callable[..., EdmEnv], tls_node: TlsNode
) -> None:
    # Given amqps:// to the name the broker's certificate holds, and the CA that signed it
    env = tls_env(tls_node.url(), {"ca_file": str(tls_node.certs / "ca.pem")})
    # When the daemon runs and `edm publish` sends over TLS too
    assert env.cli("start").returncode == 0
    consume_and_publish(env, ["first over tls", "second over tls"])
    # Then the log names the masked URL, and the broker sees TLS connections of guest
    assert f"Connected to {tls_node.masked()}." in env.log_text()
    assert "guest:guest" not in env.log_text()
    ours = [c for c in tls_node.connections() if c["user"] == "guest"]
    assert ours and all(c["ssl"] for c in ours), ours


def test_a_certificate_for_another_host_name_is_refused(
    tls_env: Callable[..., EdmEnv], tls_node: TlsNode
) -> None:
    # Given the right CA, but an address the broker's certificate does not name
    env = tls_env(tls_node.url("127.0.0.1"), {"ca_file": str(tls_node.certs / "ca.pem")})
    # When the daemon and `edm publish` try to connect
    assert env.cli("start").returncode == 0
    published = env.cli("publish", "refused")
    # Then both refuse, naming the masked URL and the reason
    reason = "certificate verify failed: IP address mismatch, certificate is not valid for '127.0.0.1'"
    line = f"Cannot connect to {tls_node.masked('127.0.0.1')}: {reason}."
    wait_for(lambda: line in env.log_text(), 30)
    assert published.returncode == 1
    assert f"{tls_node.masked('127.0.0.1')}: {reason}" in published.stderr
    assert "Connected to" not in env.log_text()
    assert not env.bodies_logged()


@pytest.mark.parametrize("ca_file", [None, "other-ca.pem"], ids=["system-cas", "another-ca"])
def test_a_broker_signed_by_an_unknown_ca_is_refused(
    tls_env: Callable[..., EdmEnv], tls_node: TlsNode, ca_file: str | None
) -> None:
    # Given the system's CAs (the default) or a CA that did not sign the broker's certificate
    tls = {} if ca_file is None else {"ca_file": str(tls_node.certs / ca_file)}
    env = tls_env(tls_node.url(), tls)
    # When the daemon and `edm publish` try to connect
    assert env.cli("start").returncode == 0
    published = env.cli("publish", "refused")
    # Then both refuse: the broker's certificate is not verified
    prefix = f"Cannot connect to {tls_node.masked()}: certificate verify failed: "
    wait_for(lambda: prefix in env.log_text(), 30)
    line = next(x for x in env.log_text().splitlines() if prefix in x)
    assert "amqp.tls.ca_file" in line, line  # the hint at what to check
    assert published.returncode == 1
    assert f"{tls_node.masked()}: certificate verify failed: " in published.stderr
    assert "Connected to" not in env.log_text()


def test_verify_false_connects_to_anything_with_a_warning(
    tls_env: Callable[..., EdmEnv], tls_node: TlsNode
) -> None:
    # Given neither the CA nor the right host name, but verify: false
    env = tls_env(tls_node.url("127.0.0.1"), {"verify": False})
    # When the daemon runs and `edm publish` sends
    assert env.cli("start").returncode == 0
    wait_for(lambda: consumer_activity(env) == "consuming", 60)
    published = env.cli("publish", "unverified")
    # Then both work, and both warn that the broker is not checked
    assert published.returncode == 0, published.stderr
    assert "WARNING: amqp.tls.verify is false" in published.stderr
    wait_for(lambda: env.bodies_logged() == ["unverified"], 30)
    warnings = [x for x in env.log_text().splitlines() if "amqp.tls.verify is false" in x]
    assert len(warnings) == 1 and " WARNING " in warnings[0], warnings


def test_a_client_certificate_logs_in_with_external(
    tls_env: Callable[..., EdmEnv], tls_node: TlsNode
) -> None:
    # Given a URL without user or password, and a client certificate whose CN is a user
    certs = tls_node.certs
    env = tls_env(tls_node.url(userinfo=""), {})
    # (the certificate given relative to the config file's directory, as operators write it)
    relative = os.path.relpath(certs / "client.pem", env.config_path.parent)
    tls = {"ca_file": str(certs / "ca.pem"), "cert_file": relative, "key_file": str(certs / "client.key")}
    env.doc["amqp"]["tls"] = tls
    env.write_config()
    # When the daemon consumes and `edm publish` sends
    assert env.cli("start").returncode == 0
    consume_and_publish(env, ["as the certificate's user"])
    # Then the daemon's connection is that user's, logged in with EXTERNAL (a PLAIN login
    # would have been guest's: pika's default credentials when a URL names no user)
    external = [c for c in tls_node.connections() if c["user"] == CLIENT_USER]
    assert external and all(c["auth_mechanism"] == "EXTERNAL" and c["ssl"] for c in external), external


# -- the configuration: checked when read, each error naming its key ---------------------------


@pytest.fixture(scope="module")
def pems(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pems")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    leaf = ca.issue_cert(common_name="edm")
    leaf.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    leaf.private_key_pem.write_to_path(str(d / "key.pem"))
    leaf.private_key_and_cert_chain_pem.write_to_path(str(d / "both.pem"))
    ca.issue_cert(common_name="other").private_key_pem.write_to_path(str(d / "other.key"))
    return d


def tls_config(base: Path, tls: Any, url: str = "amqps://h/") -> Any:
    return parse({"amqp": {"url": url, "tls": tls}}, base / "mq.yaml", environ={}).amqp.tls


def test_tls_paths_resolve_against_the_config_directory(pems: Path) -> None:
    tls = tls_config(pems, {"ca_file": "ca.pem", "cert_file": "both.pem"})
    assert (tls.ca_file, tls.cert_file, tls.key_file, tls.verify) == (
        pems / "ca.pem",
        pems / "both.pem",
        None,
        True,
    )
    assert tls_config(pems, None).verify is True


@pytest.mark.parametrize(
    ("tls", "error"),
    [
        ({"ca_file": "missing.pem"}, "amqp.tls.ca_file: {d}/missing.pem does not exist"),
        ({"ca_file": "key.pem"}, "amqp.tls.ca_file: {d}/key.pem holds no PEM certificate"),
        ({"cert_file": "cert.pem"}, "amqp.tls.cert_file: {d}/cert.pem holds no private key"),
        ({"key_file": "key.pem"}, "amqp.tls.key_file: set amqp.tls.cert_file too"),
        ({"cert_file": "cert.pem", "key_file": "other.key"}, "amqp.tls.key_file: the key does not match"),
        ({"verify": "no"}, "amqp.tls.verify: must be true or false"),
        ({"ca": "ca.pem"}, "amqp.tls.ca: unknown key"),
        ("yes", "amqp.tls: must be a mapping"),
    ],
)
def test_a_bad_tls_setting_names_its_key(pems: Path, tls: Any, error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        tls_config(pems, tls)
    assert str(caught.value).startswith(error.format(d=pems)), caught.value


def test_a_urls_own_ssl_options_are_refused(pems: Path) -> None:
    url = "amqps://u:secret@h/%2F?ssl_options={'cert_reqs':0}"
    with pytest.raises(ConfigError) as caught:
        tls_config(pems, {}, url)
    assert "use amqp.tls" in str(caught.value) and "secret" not in str(caught.value)


# -- the parameters every connection is made with ---------------------------------------------


def test_amqps_parameters_verify_the_certificate_and_host_name_by_default() -> None:
    params = parameters("amqps://u:p@broker.example.org:5671/%2F")
    options = params.ssl_options
    assert options is not None and options.server_hostname == "broker.example.org"
    assert options.context.verify_mode == ssl.CERT_REQUIRED and options.context.check_hostname
    assert options.context.cert_store_stats()["x509_ca"] > 0  # the system's CAs
    assert isinstance(params.credentials, pika.credentials.PlainCredentials)
    assert parameters("amqp://u:p@h/%2F").ssl_options is None


def test_amqps_parameters_take_amqp_tls(pems: Path) -> None:
    # a private CA only: nothing else is trusted
    tls = tls_config(pems, {"ca_file": "ca.pem", "cert_file": "cert.pem", "key_file": "key.pem"})
    params = parameters("amqps://broker:5671/%2F", tls=tls)
    assert params.ssl_options is not None
    assert params.ssl_options.context.cert_store_stats()["x509_ca"] == 1
    # a client certificate without a password in the URL: EXTERNAL; with one: PLAIN
    assert isinstance(params.credentials, pika.credentials.ExternalCredentials)
    assert isinstance(
        parameters("amqps://u:p@broker/", tls=tls).credentials, pika.credentials.PlainCredentials
    )
    unverified = parameters("amqps://broker/", tls=tls_config(pems, {"verify": False}))
    assert unverified.ssl_options is not None
    assert unverified.ssl_options.context.verify_mode == ssl.CERT_NONE
    assert not unverified.ssl_options.context.check_hostname


def test_a_certificate_gone_since_the_config_check_is_a_broker_error(tmp_path: Path, pems: Path) -> None:
    for name in ("cert.pem", "key.pem"):
        shutil.copy(pems / name, tmp_path / name)
    tls = tls_config(tmp_path, {"cert_file": "cert.pem", "key_file": "key.pem"})
    (tmp_path / "key.pem").unlink()
    with pytest.raises(BrokerError) as caught:
        parameters("amqps://broker/", tls=tls)
    expected = f"amqp.tls.cert_file: cannot load {tmp_path}/cert.pem and {tmp_path}/key.pem: "
    assert str(caught.value) == expected + "No such file or directory", caught.value


def test_edm_dead_talks_tls_like_the_daemon(tls_env: Callable[..., EdmEnv], tls_node: TlsNode) -> None:
    # Given the private CA, `edm dead` reaches the broker over amqps
    env = tls_env(tls_node.url(), {"ca_file": str(tls_node.certs / "ca.pem")})
    listed = env.cli("dead", "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.strip().endswith(".dead (the queue does not exist)"), listed.stdout
    # and with a CA that did not sign the broker's certificate it refuses, saying why
    env = tls_env(tls_node.url(), {"ca_file": str(tls_node.certs / "other-ca.pem")})
    refused = env.cli("dead", "list")
    assert refused.returncode == 1
    assert f"{tls_node.masked()}: certificate verify failed: " in refused.stderr
    # and with verify: false it warns once, as `edm publish` does
    env = tls_env(tls_node.url("127.0.0.1"), {"verify": False})
    unverified = env.cli("dead", "list")
    assert unverified.returncode == 0, unverified.stderr
    assert unverified.stderr.count("edm dead: WARNING: ") == 1, unverified.stderr
