"""The fee socket's hard limits: frames per message and peers, and the memory bound a flood
of many-frame messages from a raw ZMTP peer cannot push the receiver past."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zmq
from conftest import EdmEnv, free_port, unique, wait_for
from netutil import Client, RawZmtp, zmq_port

import edm.plugins.fee.receiver as fee_module
from edm.config import Config
from edm.plugins.fee.receiver import MAX_FRAMES, RCVHWM

SQL = Callable[..., list[tuple[Any, ...]]]

# The flood: FLOOD_MESSAGES multipart messages of FLOOD_FRAMES frames each from a raw socket,
# which connects again whenever it is dropped (as a flooder would) until all are sent. The
# receiver drops a connection at the first message over MAX_FRAMES; what the peer had in
# flight is discarded by the kernel and libzmq, unread. Read to the end frame by frame
# (about 1 µs a frame in Python), the 10^8 frames would take some 150 s: FLOOD_SECONDS fails
# a receiver that does so.
FLOOD_MESSAGES = 100_000
FLOOD_FRAMES = 1_000
FLOOD_SECONDS = 45
# libzmq keeps each frame of up to 33 bytes inside its 64-byte msg_t in the connection's
# pipe: (RCVHWM + 1) messages x 1,000 frames x 64 B = 4.2 MB for a connection. A dropped
# connection's messages that were already whole stay in its pipe until the receiver has read
# them (about 65 ms for 65,000 frames), and libzmq reads the pipes in turn, so a flooder that
# connects again at once has a few such pipes held at a time (the time it takes to connect
# and fill the next is about the same): measured 30 to 36 MiB over the worker's peak before
# the flood, with about 100 connections in 10 s. Add the 8 KiB decoder buffers, at most
# SNDHWM (1,000) unread replies of ~100 B and the allocator's slack; a receiver that
# buffered the flood (300 MB on the wire, twenty times that in msg_t) would pass the bound
# many times over, and one that read it to the end frame by frame misses FLOOD_SECONDS.
MAX_GROWTH_MIB = 64
# An unfinished message: the watch drops the connection once libzmq has read MAX_UNFINISHED
# (1.06 MiB) of it, seen at the next check (CHECK_INTERVAL, 50 ms, during which libzmq reads
# some 15 MB/s of one-byte frames here: 0.75 MB, twice at worst). Each 3-byte frame is a
# 64-byte msg_t: 2.6 MB x 21 = 56 MiB at most. The peer sends up to 30 MB, which the receiver
# without the watch holds as 640 MB.
MAX_UNFINISHED_GROWTH_MIB = 64
UNFINISHED_BYTES = 30_000_000


def test_a_message_over_the_frame_cap_drops_its_connection_and_the_next_client_is_served(
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
    cap = plugin._peer_cap
    assert cap is not None
    dealer = zctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVTIMEO, 15000)
    dealer.connect(plugin.endpoint)
    try:
        dealer.send_multipart([b"", *([b"y"] * (MAX_FRAMES - 2))])  # under the cap: answered
        assert dealer.recv_multipart() == [b"", b"FALSE multipart request"]
        dealer.send_multipart([b"", b"1,1,1", *([b"x"] * 998)])
        wait_for(lambda: cap.dropped == 1)  # not read to its end on a live connection
    finally:
        dealer.close(0)
    client = Client(zctx, plugin.endpoint or "")
    try:
        assert client.ask(b"2,2,2") == b"TRUE"
    finally:
        client.close()
    assert plugin.status()["malformed"] == 2
    assert root_sql(f"SELECT ticket FROM `{table}`") == [(2,)]
    drops = [r for r in caplog.records if r.message.startswith("Dropped the fee client at 127.0.0.1")]
    assert len(drops) == 1 and drops[0].levelname == "WARNING"
    assert f"a message of more than {MAX_FRAMES} frames" in drops[0].message


def test_connections_beyond_the_peer_cap_are_shut_as_they_come(
    make_config: Callable[..., Config],
    databases: Any,
    plugins: Any,
    table: str,
    zctx: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fee_module, "MAX_PEERS", 4)
    config = make_config(table=table)
    plugin = plugins(config, databases(config))
    cap = plugin._peer_cap
    assert cap is not None
    peers = [RawZmtp(zmq_port(plugin.endpoint)) for _ in range(4)]
    extra: list[RawZmtp] = []
    try:
        wait_for(lambda: cap.peers == 4)
        extra.append(RawZmtp(zmq_port(plugin.endpoint), handshake=False))
        assert extra[-1].dropped(10)  # the fifth is shut
        assert cap.shed == 1 and cap.peers == 4
        peers.pop().close()
        wait_for(lambda: cap.peers == 3)
        client = Client(zctx, plugin.endpoint or "")  # room again: a REQ client is served
        try:
            assert client.ask(b"3,3,3") == b"TRUE"
        finally:
            client.close()
        assert cap.shed == 1
    finally:
        for peer in peers + extra:
            peer.close()


def _peak_rss_mib(pid: int) -> float:
    match = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    assert match
    return int(match.group(1)) / 1024


def test_a_flood_of_many_frame_messages_stays_under_the_memory_bound_and_a_client_is_served(
    make_env: Callable[..., EdmEnv], zctx: Any
) -> None:
    table, port = unique("fee_h"), free_port()
    env = make_env(
        {
            "database": {"url": "mysql://root@127.0.0.1:3306/test", "pool_size": 4},
            "plugins": {"fee": {"enabled": True, "listen": f"tcp://127.0.0.1:{port}", "table": table}},
        }
    )
    env.start()
    worker = wait_for(lambda: env.worker_pid("plugins"))
    client = Client(zctx, f"tcp://127.0.0.1:{port}", timeout_ms=30000)
    try:
        assert client.ask(b"1,1,1") == b"TRUE"
        before = _peak_rss_mib(worker)
        # a DEALER's message: the empty delimiter, then 999 one-byte frames
        message = b"\x01\x00" + b"\x01\x01x" * (FLOOD_FRAMES - 2) + b"\x00\x01x"
        chunk = message * 100
        connections: list[int] = []
        failure: list[BaseException] = []

        def flood() -> None:
            try:
                sent = 0
                while sent < FLOOD_MESSAGES:
                    peer = RawZmtp(port)
                    connections.append(1)
                    try:
                        peer.wait_ready()
                        while sent < FLOOD_MESSAGES:
                            peer.send(chunk)
                            sent += 100
                    except (ConnectionError, TimeoutError):
                        pass  # dropped: connect again and send the rest
                    finally:
                        peer.close()
            except BaseException as exc:
                failure.append(exc)

        flooder = threading.Thread(target=flood, daemon=True)
        started = time.monotonic()
        flooder.start()
        served_during = 0
        ticket = 2
        while flooder.is_alive() and time.monotonic() - started < FLOOD_SECONDS:
            assert client.ask(f"{ticket},1,1".encode()) == b"TRUE"
            ticket += 1
            served_during += flooder.is_alive()
        flooder.join(max(0.0, FLOOD_SECONDS - (time.monotonic() - started)))
        assert not flooder.is_alive(), f"the flood was not taken within {FLOOD_SECONDS} s"
        assert not failure, failure
        assert client.ask(f"{ticket},1,1".encode()) == b"TRUE"
    finally:
        client.close()
    growth = _peak_rss_mib(worker) - before
    assert growth < MAX_GROWTH_MIB, f"the worker grew {growth:.1f} MiB ({len(connections)} connections)"
    assert served_during >= 1
    assert len(connections) > 1  # dropped, not read to the end
    log = env.log_text().splitlines()
    warnings = [line for line in log if "WARNING" in line and "Dropped the fee client at 127.0.0.1" in line]
    assert len(warnings) == 1, warnings  # once per address
    assert RCVHWM == 64  # the bound above is computed for it


def test_an_unfinished_message_drops_its_connection_and_memory_stays_bounded(
    make_config: Callable[..., Config],
    databases: Any,
    plugins: Any,
    table: str,
    zctx: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """libzmq holds a message until its last frame, out of RCVHWM's count: a peer that never
    sends one would grow it without end."""
    config = make_config(table=table)
    plugin = plugins(config, databases(config))
    cap = plugin._peer_cap
    assert cap is not None
    client = Client(zctx, plugin.endpoint or "")
    try:
        assert client.ask(b"1,1,1") == b"TRUE"
        Path("/proc/self/clear_refs").write_text("5")  # the peak from here on
        before = _peak_rss_mib(os.getpid())
        chunk = b"\x01\x01x" * 100_000  # one-byte frames, each with MORE: never a last one
        peer = RawZmtp(zmq_port(plugin.endpoint))
        peer.wait_ready()
        outcome: list[BaseException | int] = []

        def send() -> None:
            sent = 0
            try:
                peer.send(b"\x01\x00")
                while sent < UNFINISHED_BYTES:
                    peer.send(chunk)
                    sent += len(chunk)
                outcome.append(sent)
            except BaseException as exc:
                outcome.append(exc)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        ticket = 2
        while sender.is_alive():
            assert client.ask(f"{ticket},1,1".encode()) == b"TRUE"
            ticket += 1
        sender.join()
        peer.close()
        growth = _peak_rss_mib(os.getpid()) - before
        assert isinstance(outcome[0], ConnectionError), outcome  # dropped before the end
        assert cap.dropped == 1
        assert growth < MAX_UNFINISHED_GROWTH_MIB, f"the receiver grew {growth:.1f} MiB"
        assert client.ask(f"{ticket},1,1".encode()) == b"TRUE"
    finally:
        client.close()
    drops = [r for r in caplog.records if r.message.startswith("Dropped the fee client at 127.0.0.1")]
    assert len(drops) == 1 and drops[0].levelname == "WARNING"
    assert "without finishing a message" in drops[0].message


def _fee(env: EdmEnv) -> dict[str, Any]:
    worker = env.state().get("workers", {}).get("plugins", {})
    return dict((worker.get("plugins") or {}).get("fee") or {})


def test_a_connection_lost_without_a_report_does_not_hold_a_place(
    make_config: Callable[..., Config],
    databases: Any,
    plugins: Any,
    table: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The monitor drops events when its queue is full; a place held by a connection whose
    DISCONNECTED never came is given back when the cap is reached, not kept forever."""
    monkeypatch.setattr(fee_module, "MAX_PEERS", 2)
    config = make_config(table=table)
    plugin = plugins(config, databases(config))
    cap = plugin._peer_cap
    assert cap is not None
    first = RawZmtp(zmq_port(plugin.endpoint))
    try:
        wait_for(lambda: cap.peers == 1)
        cap._live[10**6] = ("192.0.2.1", 40000)  # a connection whose loss was never reported
        second = RawZmtp(zmq_port(plugin.endpoint))
        wait_for(lambda: cap.peers == 2 and 10**6 not in cap._live)
        assert cap.shed == 0
        second.close()
    finally:
        first.close()
