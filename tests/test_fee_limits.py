"""The fee receiver's resource limits, with small numbers: what one client can make it hold."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.utils.monitor
from netutil import Client, RawZmtp, tcp_received, zmq_port

import edm.plugins.fee.receiver as fee_module
from edm.config import Config
from edm.plugins.fee.receiver import MAX_FRAME, RCVHWM, FeePlugin

SQL = Callable[..., list[tuple[Any, ...]]]


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


def test_a_pipelining_dealer_gets_a_bounded_number_into_each_batch(
    make_config: Callable[..., Config],
    databases: Any,
    plugins: Any,
    table: str,
    root_sql: SQL,
    zctx: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Given a DEALER pipelining 1,000 requests while a REQ client waits, no batch holds more
    than MAX_PER_PEER of the DEALER's requests, the rest of a batch's share is told FALSE busy,
    the REQ client is served, and every TRUE is a row.

    The cap is lowered below what libzmq buffers per connection (RCVHWM), so that the first
    batch after the hold meets it whatever the threads' timing: with the real cap (above
    RCVHWM) it is met only when libzmq refills the buffer while the receiver reads."""
    cap = RCVHWM // 4
    monkeypatch.setattr(fee_module, "MAX_PER_PEER", cap)
    release = threading.Event()
    batches: list[list[int]] = []

    class HeldFee(FeePlugin):
        def process(self, cursor: Any, fees: Any) -> None:
            batches.append([fee.ticket for fee in fees])
            if len(batches) == 1:
                release.wait(20)  # hold the first batch while the DEALER's flood arrives

    config = make_config(table=table)
    plugin = plugins(config, databases(config), HeldFee)
    dealer = zctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVTIMEO, 15000)
    dealer.connect(plugin.endpoint)
    client = Client(zctx, plugin.endpoint)
    try:
        client.socket.send(b"5000,2,2")
        assert wait_for(lambda: plugin.status()["queue"] == 1, 5)
        flood = [f"{ticket},1,1".encode() for ticket in range(1, 1001)]
        for body in flood:
            dealer.send_multipart([b"", body])
        # Wait until the flood is in the receiver's kernel buffer (all but the last handshake's
        # worth of bytes) and libzmq has read well over ``cap`` requests of it into its queue.
        flood_bytes = sum(4 + len(body) for body in flood)  # two frames: 2 + 2 header bytes
        over_cap = 2 * (cap + 1) * (4 + len(flood[-1]))

        def buffered() -> bool:
            received, queued = max(tcp_received(zmq_port(plugin.endpoint)))
            return received >= flood_bytes and queued <= flood_bytes - over_cap

        assert wait_for(buffered, 15), tcp_received(zmq_port(plugin.endpoint))
        assert plugin.status()["requests"] == 1  # the receiver still holds only the first batch
        release.set()
        replies = [dealer.recv_multipart()[-1] for _ in range(1000)]
        assert client.socket.recv() == b"TRUE"
    finally:
        release.set()
        dealer.close(0)
        client.close()
    assert batches[0] == [5000]
    assert all(len(batch) <= cap for batch in batches[1:]), [len(b) for b in batches]
    status = plugin.status()
    assert replies.count(b"TRUE") + replies.count(b"FALSE busy") == 1000
    assert status["busy"] == replies.count(b"FALSE busy") > 0
    tickets = [ticket for (ticket,) in root_sql(f"SELECT ticket FROM `{table}` ORDER BY ticket")]
    assert len(tickets) == replies.count(b"TRUE") + 1 and tickets[-1] == 5000
    # the cap is per batch, not a quota: once answered, the DEALER is served again
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
    make_config: Callable[..., Config], databases: Any, plugins: Any, table: str, zctx: Any
) -> None:
    config = make_config(table=table)
    plugin = plugins(config, databases(config))
    before = rss_mib()
    peer = RawZmtp(zmq_port(plugin.endpoint))
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
    make_config: Callable[..., Config], databases: Any, plugins: Any, table: str, root_sql: SQL, zctx: Any
) -> None:
    """Up to MAX_FRAME bytes a request gets FALSE; past it libzmq drops the connection: the REQ
    client sees no reply (only its own timeout) and a disconnect, and may reconnect."""
    config = make_config(table=table)
    plugin = plugins(config, databases(config))
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
    make_config: Callable[..., Config], databases: Any, plugins: Any, table: str, root_sql: SQL, zctx: Any
) -> None:
    config = make_config(table=table)
    plugin = plugins(config, databases(config))
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
    plugins: Any,
    table: str,
    zctx: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = make_config(table=table)
    plugin = plugins(config, databases(config))
    client = Client(zctx, plugin.endpoint)
    try:
        with caplog.at_level(logging.ERROR, logger="edm.plugins.fee.receiver"):
            assert client.ask([b"\n" * 10000] * 5) == b"FALSE multipart request"
    finally:
        client.close()
    (message,) = [r.getMessage() for r in caplog.records if "Malformed" in r.getMessage()]
    assert len(message) < 3000
    assert message.endswith("…[cut: 50004 bytes in 5 frame(s)]")


def test_a_receiver_thread_that_died_is_the_plugins_failure(
    make_config: Callable[..., Config], databases: Any, plugins: Any, table: str, caplog: Any, zctx: Any
) -> None:
    """The plugin says why it no longer serves; its worker then exits to be restarted (the
    daemon's side: test_reload_faults.py, test_a_receiver_thread_that_dies_takes_...)."""

    class Broken(FeePlugin):
        def _receive(self) -> Any:
            raise RuntimeError("boom")

    config = make_config(table=table)
    with caplog.at_level(logging.ERROR, logger="edm.plugins.fee.receiver"):
        plugin = plugins(config, databases(config), Broken)
        assert plugin.status()["state"] == "running"
        assert plugin.failure() is None
        client = Client(zctx, plugin.endpoint)
        try:
            client.socket.send(b"1,1,1")
            assert wait_for(lambda: plugin.status()["state"] == "failed", 5)
        finally:
            client.close()
    assert plugin.failure() == "the fee receiver failed: RuntimeError: boom"
    assert any("receiver failed" in r.getMessage() for r in caplog.records)
