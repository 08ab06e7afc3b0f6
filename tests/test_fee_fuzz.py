"""Hostile traffic against the live fee receiver: a seeded random mix of good requests, junk,
multipart and oversized messages, raw DEALER and raw TCP peers, and clients that leave before
their reply. Afterwards the receiver still serves and the table holds exactly the good fees.

The seed is printed on failure; ``EDM_FUZZ_SEED=<n>`` replays a run.
"""

from __future__ import annotations

import logging
import os
import random
import threading
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
import zmq
import zmq.utils.monitor
from netutil import Client, RawZmtp

from edm.config import Config
from edm.plugins.fee.parse import MAX_ID, Fee, MalformedRequest, parse_request
from edm.plugins.fee.receiver import MAX_FRAME, FeePlugin

SQL = Callable[..., list[tuple[Any, ...]]]
SEED = int(os.environ.get("EDM_FUZZ_SEED", "20240611"))
WORKERS = 4
ACTIONS = 500  # per worker: 2,000 requests in all
TIMEOUT_MS = 15000

# (action, weight)
MIX = [
    ("valid", 30),
    ("repeat", 4),
    ("random", 18),
    ("multipart", 10),
    ("empty", 5),
    ("huge", 5),
    ("dealer", 10),
    ("raw", 6),
    ("abandon", 12),
]


def expected_reply(body: bytes) -> tuple[bytes, Fee | None]:
    """What the receiver must answer to a single-frame request, and the fee it stores."""
    try:
        fee = parse_request(body)
    except MalformedRequest as exc:
        return f"FALSE {exc.reason}".encode(), None
    return b"TRUE", fee


def random_fee_text(rng: random.Random, ticket: int) -> tuple[bytes, Fee]:
    login = rng.randrange(MAX_ID)
    integer = str(rng.randrange(10 ** rng.randint(1, 16))).zfill(rng.choice([1, 1, 1, 3]))
    decimals = rng.randint(0, 4)
    volume = integer + ("." + "".join(rng.choices("0123456789", k=decimals)) if decimals else "")
    pad = " " * rng.choice([0, 0, 0, 1, 2])
    text = f"{pad}{ticket}{pad},{login},{pad}{volume}{pad}".encode()
    return text, Fee(ticket, login, Decimal(volume))


def random_bytes(rng: random.Random, low: int, high: int) -> bytes:
    size = rng.randint(low, high)
    if rng.random() < 0.3:  # text-like junk: digits, commas, dots and spaces get further in the parser
        return "".join(rng.choices("0123456789,. -x\n", k=size)).encode()
    return rng.randbytes(size)


class Worker:
    """One thread of the fuzz: its own sockets, tickets and expectations."""

    def __init__(self, index: int, context: zmq.Context[Any], endpoint: str) -> None:
        self.rng = random.Random(SEED * 100 + index)
        self.index = index
        self.context = context
        self.endpoint = endpoint
        self.port = int(endpoint.rsplit(":", 1)[1])
        self.next_ticket = index * 10_000_000 + 1
        self.stored: dict[int, Fee] = {}  # tickets answered TRUE -> the values the table keeps
        self.maybe: dict[int, Fee] = {}  # valid fees whose client left before the reply
        self.failures: list[str] = []
        self.client = Client(context, endpoint, TIMEOUT_MS)
        self.dealer_socket = self._dealer()

    def _dealer(self) -> zmq.Socket[Any]:
        dealer = self.context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.RCVTIMEO, TIMEOUT_MS)
        dealer.connect(self.endpoint)
        return dealer

    def ticket(self) -> int:
        self.next_ticket += 1
        return self.next_ticket

    def check(self, what: str, sent: Any, got: Any, want: Any) -> None:
        if got != want:
            self.failures.append(f"{what}: sent {sent!r:.200} got {got!r:.200} want {want!r:.200}")

    def run(self) -> None:
        actions, weights = zip(*MIX, strict=True)
        try:
            for n in range(ACTIONS):
                if self.index == 0 and n == ACTIONS // 2:
                    self.oversized()
                getattr(self, "do_" + rng_choice(self.rng, actions, weights))()
        except Exception as exc:  # a failure of the test's own client, reported with the seed
            self.failures.append(f"{type(exc).__name__}: {exc}")
        finally:
            self.client.close()
            self.dealer_socket.close(0)

    def ask(self, body: bytes) -> None:
        want, fee = expected_reply(body)
        got = self.client.ask(body)
        self.check("request", body, got, want)
        if fee is not None and got == b"TRUE":
            self.stored.setdefault(fee.ticket, fee)

    # -- the actions -------------------------------------------------------------------------

    def do_valid(self) -> None:
        self.ask(random_fee_text(self.rng, self.ticket())[0])

    def do_repeat(self) -> None:
        """An earlier ticket again, with the same or other values: TRUE, the first values stay."""
        if not self.stored:
            return self.do_valid()
        ticket = self.rng.choice(sorted(self.stored))
        self.ask(
            random_fee_text(self.rng, ticket)[0]
            if self.rng.random() < 0.5
            else self.stored[ticket].line().encode()
        )

    def do_random(self) -> None:
        self.ask(random_bytes(self.rng, 0, 2048))

    def do_huge(self) -> None:
        self.ask(random_bytes(self.rng, 1025, MAX_FRAME))

    def do_empty(self) -> None:
        if self.rng.random() < 0.5:
            self.ask(b"")
        else:
            frames = [b""] * self.rng.randint(2, 5)
            self.check("empty frames", frames, self.client.ask(frames), b"FALSE multipart request")

    def do_multipart(self) -> None:
        frames = []
        for _ in range(self.rng.randint(2, 5)):
            kind = self.rng.random()
            if kind < 0.3:
                frames.append(random_fee_text(self.rng, self.ticket())[0])  # good text, bad envelope
            elif kind < 0.4:
                frames.append(b"")
            else:
                frames.append(random_bytes(self.rng, 0, 2048))
        self.check("multipart", frames, self.client.ask(frames), b"FALSE multipart request")

    def do_dealer(self) -> None:
        """A DEALER that sends no empty delimiter: its frames are the request; the reply has none."""
        if self.rng.random() < 0.4:
            frames = [random_fee_text(self.rng, self.ticket())[0]]
        else:
            frames = [random_bytes(self.rng, 1, 2048) for _ in range(self.rng.choice([1, 1, 2, 3]))]
        self.dealer_socket.send_multipart(frames)
        got = self.dealer_socket.recv_multipart()
        if len(frames) == 1:
            want, fee = expected_reply(frames[0])
            if fee is not None and got == [b"TRUE"]:
                self.stored.setdefault(fee.ticket, fee)
        else:
            want = b"FALSE multipart request"
        self.check("dealer", frames, got, [want])

    def do_raw(self) -> None:
        """A raw TCP peer: garbage with or without a ZMTP handshake, then gone."""
        peer = RawZmtp(self.port, handshake=self.rng.random() < 0.5)
        try:
            peer.send(random_bytes(self.rng, 0, 4096))
        except OSError:
            pass  # the receiver may drop a peer that speaks nonsense, even before we are done
        finally:
            peer.close()

    def do_abandon(self) -> None:
        """A REQ client that sends and closes without reading the reply."""
        socket = self.context.socket(zmq.REQ)
        socket.connect(self.endpoint)
        if self.rng.random() < 0.6:
            body, fee = random_fee_text(self.rng, self.ticket())
            self.maybe[fee.ticket] = fee
        else:
            body = random_bytes(self.rng, 0, 2048)
        socket.send(body)
        socket.close(linger=self.rng.choice([0, 0, 20]))

    def oversized(self) -> None:
        """~2 MiB: libzmq drops the connection; the REQ client gets no reply, sees a disconnect."""
        client = Client(self.context, self.endpoint, timeout_ms=1000)
        monitor = client.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            client.socket.send(b"1,2," + b"3" * (2 << 20))
            try:
                self.failures.append(f"oversized request answered: {client.socket.recv()!r:.100}")
            except zmq.Again:
                pass
            if not monitor.poll(5000):
                self.failures.append("oversized request: the connection was not dropped")
            elif zmq.utils.monitor.recv_monitor_message(monitor)["event"] != zmq.EVENT_DISCONNECTED:
                self.failures.append("oversized request: no disconnect event")
        finally:
            client.socket.disable_monitor()
            monitor.close(0)
            client.close()


def rng_choice(rng: random.Random, items: tuple[str, ...], weights: tuple[int, ...]) -> str:
    return rng.choices(items, weights)[0]


def test_hostile_traffic_leaves_the_receiver_serving_and_the_table_exact(
    make_config: Callable[..., Config],
    databases: Any,
    table: str,
    root_sql: SQL,
    zctx: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = make_config(table=table)
    plugin = FeePlugin(config, databases(config))
    plugin.start()
    assert plugin.endpoint is not None
    try:
        with caplog.at_level(logging.DEBUG, logger="edm"):
            workers = [Worker(n, zctx, plugin.endpoint) for n in range(WORKERS)]
            threads = [threading.Thread(target=w.run, name=f"fuzz-{w.index}") for w in workers]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert not any(t.is_alive() for t in threads), f"seed {SEED}: a fuzz client hangs"
            failures = [f for w in workers for f in w.failures]
            assert not failures, f"seed {SEED}: {len(failures)} wrong replies, first: {failures[:5]}"

            client = Client(zctx, plugin.endpoint)
            try:
                assert client.ask(b"999999999,1,1.5") == b"TRUE"
            finally:
                client.close()
            status = plugin.status()
    finally:
        plugin.stop(10)

    assert status["state"] == "running", status
    assert status["requests"] >= WORKERS * ACTIONS * 0.5
    stored = {w_ticket: fee for w in workers for w_ticket, fee in w.stored.items()}
    stored[999999999] = Fee(999999999, 1, Decimal("1.5"))
    maybe = {ticket: fee for w in workers for ticket, fee in w.maybe.items()}
    rows = {
        int(ticket): (Fee(int(ticket), int(login), Decimal(volume)), status)
        for ticket, login, volume, status in root_sql(f"SELECT ticket, login, volume, status FROM `{table}`")
    }
    assert {status for _, status in rows.values()} == {"Y"}
    missing = stored.keys() - rows.keys()
    assert not missing, f"seed {SEED}: TRUE but not stored: {sorted(missing)[:10]}"
    extra = rows.keys() - stored.keys() - maybe.keys()
    assert not extra, f"seed {SEED}: stored without a TRUE: {sorted(extra)[:10]}"
    wrong = [(fee, rows[t][0]) for t, fee in {**maybe, **stored}.items() if t in rows and rows[t][0] != fee]
    assert not wrong, f"seed {SEED}: stored values differ: {wrong[:5]}"

    assert not [r for r in caplog.records if r.exc_info], "a thread logged a traceback"
    assert not [r for r in caplog.records if "failed" in r.getMessage()]
