"""The fee receiver's resource limits, with small numbers: what one client can make it hold."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.utils.monitor
from netutil import Client, RawZmtp

from edm.config import Config
from edm.db import Database
from edm.plugins.fee import MAX_FRAME, MAX_PER_PEER, FeePlugin

SQL = Callable[..., list[tuple[Any, ...]]]


@pytest.fixture
def start() -> Iterator[Callable[..., FeePlugin]]:
    """Start a FeePlugin (or a subclass) that is stopped after the test, whatever happens."""
    started: list[FeePlugin] = []

    def start_(config: Config, db: Database, cls: type[FeePlugin] = FeePlugin) -> FeePlugin:
        plugin = cls(config, db)
        plugin.start()
        started.append(plugin)
        return plugin

    yield start_
    for plugin in started:
        plugin.stop(10)


def port_of(plugin: FeePlugin) -> int:
    assert plugin.endpoint is not None
    return int(plugin.endpoint.rsplit(":", 1)[1])


def rss_mib() -> float:
    status = Path("/proc/self/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match
    return int(match.group(1)) / 1024


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_a_pipelining_dealer_gets_a_bounded_number_accepted(
    make_config: Callable[..., Config], databases: Any, start: Any, table: str, root_sql: SQL, zctx: Any
) -> None:
    """Given a writer held in process(), a DEALER pipelining 1,000 requests gets MAX_PER_PEER of
    them accepted and FALSE busy for the rest, while a REQ client is still accepted."""
    release = threading.Event()

    class HeldFee(FeePlugin):
        def process(self, cursor: Any, fees: Any) -> None:
            release.wait(20)

    config = make_config(table=table)
    plugin = start(config, databases(config), HeldFee)
    dealer = zctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVTIMEO, 15000)
    dealer.connect(plugin.endpoint)
    client = Client(zctx, plugin.endpoint)
    try:
        for ticket in range(1, 1001):
            dealer.send_multipart([b"", f"{ticket},1,1".encode()])
        assert wait_for(lambda: plugin.status()["busy"] == 1000 - MAX_PER_PEER, 10), plugin.status()
        assert plugin.status()["requests"] == 1000
        assert plugin.status()["queue"] <= MAX_PER_PEER
        client.socket.send(b"5000,2,2")  # another connection is not refused for the DEALER's flood
        assert wait_for(lambda: plugin.status()["requests"] == 1001, 5)
        assert plugin.status()["busy"] == 1000 - MAX_PER_PEER
        release.set()
        replies = [dealer.recv_multipart() for _ in range(1000)]
        assert client.socket.recv() == b"TRUE"
    finally:
        release.set()
        dealer.close(0)
        client.close()
    assert (
        sorted(r[-1] for r in replies) == [b"FALSE busy"] * (1000 - MAX_PER_PEER) + [b"TRUE"] * MAX_PER_PEER
    )
    tickets = [ticket for (ticket,) in root_sql(f"SELECT ticket FROM `{table}` ORDER BY ticket")]
    assert tickets == [*range(1, MAX_PER_PEER + 1), 5000]
    # the cap is on requests in flight, not a quota: once answered, the DEALER is served again
    dealer = zctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVTIMEO, 15000)
    dealer.connect(plugin.endpoint)
    try:
        dealer.send_multipart([b"", b"6000,3,3"])
        assert dealer.recv_multipart() == [b"", b"TRUE"]
    finally:
        dealer.close(0)


def test_a_frame_announced_as_one_gib_drops_the_peer_and_is_not_buffered(
    make_config: Callable[..., Config], databases: Any, start: Any, table: str, zctx: Any
) -> None:
    config = make_config(table=table)
    plugin = start(config, databases(config))
    before = rss_mib()
    peer = RawZmtp(port_of(plugin))
    try:
        peer.header(1 << 30)
        try:
            for _ in range(64):  # 4 MiB of it, if libzmq were reading
                peer.send(b"x" * 65536)
        except OSError:
            pass  # already dropped
        assert peer.dropped(5)
    finally:
        peer.close()
    assert rss_mib() - before < 32
    client = Client(zctx, plugin.endpoint)
    try:
        assert client.ask(b"1,2,3") == b"TRUE"
    finally:
        client.close()


def test_a_req_client_over_the_frame_limit_is_disconnected_without_a_reply(
    make_config: Callable[..., Config], databases: Any, start: Any, table: str, root_sql: SQL, zctx: Any
) -> None:
    """Up to MAX_FRAME bytes a request gets FALSE; past it libzmq drops the connection: the REQ
    client sees no reply (only its own timeout) and a disconnect, and may reconnect."""
    config = make_config(table=table)
    plugin = start(config, databases(config))
    client = Client(zctx, plugin.endpoint, timeout_ms=1000)
    monitor = client.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        assert client.ask(b"1" * MAX_FRAME).startswith(b"FALSE request longer than 1024 bytes")
        client.socket.send(b"1" * (MAX_FRAME + 1))
        with pytest.raises(zmq.Again):
            client.socket.recv()
        assert monitor.poll(5000)
        event = zmq.utils.monitor.recv_monitor_message(monitor)
        assert event["event"] == zmq.EVENT_DISCONNECTED
    finally:
        client.socket.disable_monitor()
        monitor.close(0)
        client.close()
    client = Client(zctx, plugin.endpoint)
    try:
        assert client.ask(b"2,2,2") == b"TRUE"
    finally:
        client.close()
    assert root_sql(f"SELECT ticket FROM `{table}`") == [(2,)]
    assert plugin.status()["state"] == "running"


def test_a_made_up_routing_envelope_is_refused(
    make_config: Callable[..., Config], databases: Any, start: Any, table: str, root_sql: SQL, zctx: Any
) -> None:
    config = make_config(table=table)
    plugin = start(config, databases(config))
    dealer = zctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVTIMEO, 15000)
    dealer.connect(plugin.endpoint)
    try:
        dealer.send_multipart([b"hop"] * 10 + [b"", b"1,2,3"])
        assert dealer.recv_multipart() == [b"FALSE invalid routing envelope"]
        dealer.send_multipart([b"h" * 300, b"", b"2,2,3"])
        assert dealer.recv_multipart() == [b"FALSE invalid routing envelope"]
        dealer.send_multipart([b"proxy", b"", b"3,2,3"])  # one hop, as through a proxy
        assert dealer.recv_multipart() == [b"proxy", b"", b"TRUE"]
        dealer.send_multipart([b"4,2,3"])  # no delimiter at all
        assert dealer.recv_multipart() == [b"TRUE"]
    finally:
        dealer.close(0)
    assert root_sql(f"SELECT ticket FROM `{table}` ORDER BY ticket") == [(3,), (4,)]


def test_a_huge_malformed_request_is_logged_cut(
    make_config: Callable[..., Config],
    databases: Any,
    start: Any,
    table: str,
    zctx: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = make_config(table=table)
    plugin = start(config, databases(config))
    client = Client(zctx, plugin.endpoint)
    try:
        with caplog.at_level(logging.ERROR, logger="edm.plugins.fee"):
            assert client.ask([b"\n" * 10000] * 5) == b"FALSE multipart request"
    finally:
        client.close()
    (message,) = [r.getMessage() for r in caplog.records if "Malformed" in r.getMessage()]
    assert len(message) < 3000
    assert message.endswith("…[cut: 50004 bytes in 5 frame(s)]")


def test_status_says_failed_when_a_thread_died(
    make_config: Callable[..., Config], databases: Any, start: Any, table: str, caplog: Any
) -> None:
    class Broken(FeePlugin):
        def _next_batch(self, requests: Any) -> Any:
            raise RuntimeError("boom")

    config = make_config(table=table)
    with caplog.at_level(logging.ERROR, logger="edm.plugins.fee"):
        plugin = start(config, databases(config), Broken)
        assert wait_for(lambda: plugin.status()["state"] == "failed", 5)
    assert any("writer failed" in r.getMessage() for r in caplog.records)
