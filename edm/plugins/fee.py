"""The fee receiver: ZeroMQ REQ clients send ``ticket,login,volume``; we answer TRUE once
the fee is durable (committed to the table, or fsynced to the spool while the database is
unreachable) and ``FALSE <reason>`` for anything else.

Two threads, each owning its sockets:

* the I/O thread owns the ROUTER socket bound to ``plugins.fee.listen``. It parses each
  request, answers malformed ones at once, and hands valid ones to a bounded queue (when the
  queue is full the client gets ``FALSE busy``). It also forwards the writer's replies, which
  arrive on an inproc PULL socket, back to the clients through the ROUTER.
* the writer thread drains the queue in batches (group commit: one transaction for all the
  requests that arrived while the previous one committed), then replies to the whole batch.
  While the database is down it appends batches to the spool instead, and it replays the
  spool into the table, in order, once the database answers again.

A single writer keeps the spool and the table in one order: once anything is spooled, every
later request is spooled behind it until the replay has caught up.

Limits, so that a flood or a hostile peer cannot exhaust memory or the pool:

* at most MAX_QUEUE (10,000) accepted requests wait for the writer, all clients together,
  and at most MAX_PER_PEER (100) per connection (a REQ client has one at a time; this
  caps DEALER peers that pipeline); beyond either the client is told ``FALSE busy`` at
  once. The writer uses one pooled connection at a time.
* libzmq refuses a frame larger than MAX_FRAME (16 KiB, sixteen times the largest valid
  request) by dropping the connection before buffering it: a REQ client that sent one gets
  no reply (its recv ends only with its own RCVTIMEO; ``ZMQ_REQ_RELAXED`` lets it send
  again) and reconnects. Frames up to MAX_FRAME get ``FALSE <reason>`` like any bad request.
* libzmq buffers at most RCVHWM (64) messages per connection before it stops reading it,
  so one connection holds at most about RCVHWM x MAX_FRAME (1 MiB) in the receiver.
* replies to a client that left or does not read are dropped (the ROUTER is not
  mandatory), so a client can never block the I/O thread.

libzmq does not bound the number of frames in one multipart message; a peer speaking raw
ZMTP can grow it without end. Only the network (listen on a trusted interface) guards
against that.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import zmq

from edm.config import Config, FeeConfig
from edm.db import Database
from edm.errors import DatabaseError, EdmError
from edm.logs import escape_body
from edm.plugins import fee_store
from edm.plugins.fee_parse import MAX_REQUEST, Fee, MalformedRequest, parse_request
from edm.plugins.fee_spool import Spool

log = logging.getLogger(__name__)

TRUE = b"TRUE"
BUSY = b"FALSE busy"
MAX_QUEUE = 10_000  # accepted requests waiting for the writer; beyond that: FALSE busy
MAX_PER_PEER = 100  # requests one connection may have in flight; beyond that: FALSE busy
MAX_BATCH = 500  # requests per transaction
MAX_FRAME = 16 << 10  # a bigger frame makes libzmq drop the peer instead of buffering it
RCVHWM = 64  # messages libzmq buffers per connection before it stops reading from it
MAX_HOPS = 4  # routing frames (proxies) a request may carry besides the connection's own
MAX_ROUTING_ID = 255  # bytes; ZMTP allows no longer routing id
RETRY_MIN, RETRY_MAX = 0.5, 5.0  # seconds between attempts to reach a database that is down
REPLAY_SLICE = 0.2  # seconds of replay before the writer looks at new requests again
LINGER_MS = 500


@dataclass
class _Request:
    envelope: list[bytes]
    fee: Fee


class FeePlugin:
    name = "fee"

    def __init__(self, config: Config, database: Database) -> None:
        self._config = config
        self._db = database
        self.endpoint: str | None = None  # what the ROUTER is bound to (the resolved port)
        self._state = "stopped"
        self._lock = threading.Lock()  # start/stop/reload
        self._counts = dict.fromkeys(
            ("requests", "stored", "spooled", "replayed", "duplicates", "malformed", "busy"), 0
        )
        self._spool = Spool(config.plugins.fee.spool)
        self._threads: list[threading.Thread] = []

    @property
    def _fee(self) -> FeeConfig:
        return self._config.plugins.fee

    # -- the Plugin protocol -------------------------------------------------------------

    def start(self) -> None:
        """Bind the listen endpoint and start serving; EdmError when the endpoint cannot be bound."""
        with self._lock:
            if self._state != "stopped":
                return
            self._start()

    def stop(self, timeout: float) -> None:
        """Stop taking requests, answer every accepted one, close the sockets."""
        with self._lock:
            self._stop(timeout)

    def reload(self, config: Config) -> None:
        """Apply a new config; a changed endpoint, table or spool means a restart of the receiver."""
        with self._lock:
            old = self._config
            if _settings(config.plugins.fee) == _settings(old.plugins.fee):
                self._config = config
                return
            log.info("The fee receiver's settings changed; restarting it on %s.", config.plugins.fee.listen)
            running = self._state != "stopped"
            if running:
                self._stop(timeout=config.daemon.stop_timeout)
            self._config = config
            self._spool = Spool(config.plugins.fee.spool)
            if not running:
                return
            try:
                self._start()
            except EdmError:
                log.error("Keeping the previous fee settings (%s).", old.plugins.fee.listen)
                self._config = old
                self._spool = Spool(old.plugins.fee.spool)
                self._start()
                raise

    def status(self) -> dict[str, Any]:
        state = self._state
        if state in ("running", "spooling") and not all(t.is_alive() for t in self._threads):
            state = "failed"  # a thread died: the receiver no longer serves
        return {
            "state": state,
            "listen": self.endpoint or self._fee.listen,
            "queue": self._queue.qsize() if self._state != "stopped" else 0,
            "spool_pending": self._spool.records,
            **self._counts,
        }

    def process(self, cursor: Any, fees: Sequence[Fee]) -> None:
        """The processing step between insert (status N) and status Y, inside the batch's
        transaction; raising rolls the batch back. Nothing to do by default."""

    # -- lifecycle -----------------------------------------------------------------------

    def _start(self) -> None:
        self._context = zmq.Context()
        self._router = self._context.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, LINGER_MS)
        self._router.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME)
        self._router.setsockopt(zmq.RCVHWM, RCVHWM)
        try:
            self._router.bind(self._fee.listen)
        except zmq.ZMQError as exc:
            self._router.close(0)
            self._context.term()
            raise EdmError(f"plugins.fee.listen: cannot bind {self._fee.listen}: {exc.strerror}") from None
        self.endpoint = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._replies_endpoint = f"inproc://fee-replies-{id(self)}"
        self._replies = self._context.socket(zmq.PULL)
        self._replies.setsockopt(zmq.RCVHWM, 0)
        self._replies.bind(self._replies_endpoint)
        self._queue: queue.Queue[_Request] = queue.Queue(MAX_QUEUE)
        self._in_flight: dict[bytes, int] = {}  # connection -> accepted requests not yet answered
        self._accepting = threading.Event()
        self._accepting.set()
        self._quiet = threading.Event()  # the I/O thread has stopped queueing requests
        self._writer_done = threading.Event()
        pending = self._spool.recover()
        if pending:
            log.warning("The fee spool %s holds %d fee(s) to replay.", self._spool.path, pending)
        self._state = "spooling" if pending else "running"
        self._threads = [
            threading.Thread(target=self._serve, name="fee-io", daemon=True),
            threading.Thread(target=self._write, name="fee-writer", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        log.info("The fee receiver listens on %s (table %s).", self.endpoint, self._fee.table)

    def _stop(self, timeout: float) -> None:
        if self._state == "stopped":
            return
        self._state = "stopping"
        self._accepting.clear()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in self._threads):
            log.warning("The fee receiver did not finish within %.1f s; closing it anyway.", timeout)
        else:
            self._context.term()
        self._spool.close()
        self._threads = []
        self._state = "stopped"
        log.info("The fee receiver on %s stopped.", self.endpoint)

    # -- the I/O thread ------------------------------------------------------------------

    def _serve(self) -> None:
        router, replies = self._router, self._replies
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(replies, zmq.POLLIN)
        accepting = True
        try:
            while True:
                events = dict(poller.poll(100))
                if replies in events:
                    self._forward_replies()
                if accepting and router in events:
                    self._receive()
                if accepting and not self._accepting.is_set():
                    accepting = False
                    poller.unregister(router)
                    self._quiet.set()
                if not accepting and self._writer_done.is_set():
                    self._forward_replies()
                    return
        except Exception:
            log.exception("The fee receiver's I/O loop failed.")
            self._quiet.set()
        finally:
            self._quiet.set()
            replies.close(0)
            router.close(LINGER_MS)

    def _forward_replies(self) -> None:
        while True:
            try:
                frames = self._replies.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._router.send_multipart(frames)
            peer = frames[0]
            left = self._in_flight[peer] - 1
            if left:
                self._in_flight[peer] = left
            else:
                del self._in_flight[peer]

    def _receive(self) -> None:
        """Handle what the ROUTER holds now (bounded, so replies are not starved)."""
        for _ in range(1000):
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._counts["requests"] += 1
            envelope, body = _split(frames)
            try:
                if len(envelope) > MAX_HOPS + 2 or any(len(f) > MAX_ROUTING_ID for f in envelope[1:]):
                    envelope = frames[:1]  # answer the connection itself, not a route it made up
                    raise MalformedRequest("invalid routing envelope")
                if len(body) != 1:
                    raise MalformedRequest("empty request" if not body else "multipart request")
                fee = parse_request(body[0])
            except MalformedRequest as exc:
                self._counts["malformed"] += 1
                log.error("Malformed fee request (%s): %s", exc.reason, _excerpt(body))
                self._router.send_multipart([*envelope, f"FALSE {exc.reason}".encode()])
                continue
            peer = envelope[0]
            in_flight = self._in_flight.get(peer, 0)
            if in_flight >= MAX_PER_PEER:
                self._counts["busy"] += 1
                self._router.send_multipart([*envelope, BUSY])
                continue
            try:
                self._queue.put_nowait(_Request(envelope, fee))
            except queue.Full:
                self._counts["busy"] += 1
                self._router.send_multipart([*envelope, BUSY])
                continue
            self._in_flight[peer] = in_flight + 1

    # -- the writer thread ---------------------------------------------------------------

    def _write(self) -> None:
        push = self._context.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 0)
        push.setsockopt(zmq.LINGER, -1)  # inproc: delivered as soon as the I/O thread reads
        push.connect(self._replies_endpoint)
        self._push = push
        self._table_ready = False
        self._retry_at = 0.0
        self._retry_delay = RETRY_MIN
        try:
            while True:
                if self._spool.pending and time.monotonic() >= self._retry_at:
                    self._replay()
                batch = self._next_batch()
                if batch:
                    self._handle(batch)
                elif self._quiet.is_set() and self._queue.empty():
                    return
        except Exception:
            log.exception("The fee writer failed; requests it held got no reply.")
        finally:
            self._writer_done.set()
            push.close()

    def _next_batch(self) -> list[_Request]:
        try:
            batch = [self._queue.get(timeout=0.1)]
        except queue.Empty:
            return []
        while len(batch) < MAX_BATCH:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _handle(self, batch: list[_Request]) -> None:
        fees = [request.fee for request in batch]
        if not self._spool.pending:
            try:
                self._store(fees)
            except DatabaseError as exc:
                self._database_down(exc)
            else:
                self._counts["stored"] += len(batch)
                self._reply(batch, TRUE)
                return
        try:
            self._spool.append(fees)
        except OSError as exc:
            log.error(
                "Cannot write the fee spool %s: %s; %d request(s) refused.", self._spool.path, exc, len(batch)
            )
            self._reply(batch, b"FALSE database and spool unavailable")
            return
        self._counts["spooled"] += len(batch)
        self._state = "spooling" if self._state == "running" else self._state
        self._reply(batch, TRUE)

    def _replay(self) -> None:
        """Move spooled fees into the table, oldest first, for at most REPLAY_SLICE seconds."""
        until = time.monotonic() + REPLAY_SLICE
        while self._spool.pending and time.monotonic() < until:
            fees, offset = self._spool.read(MAX_BATCH)
            try:
                if fees:
                    self._store(fees)
            except DatabaseError as exc:
                self._database_down(exc)
                return
            self._spool.replayed(offset, len(fees))
            self._counts["replayed"] += len(fees)
        if not self._spool.pending:
            log.info("The fee spool is replayed; fees go straight to the table again.")
            if self._state == "spooling":
                self._state = "running"

    def _store(self, fees: list[Fee]) -> None:
        if not self._table_ready:
            fee_store.create_table(self._db, self._fee.table)
            self._table_ready = True
        result = fee_store.store(self._db, self._fee.table, fees, self.process)
        if self._retry_delay > RETRY_MIN:
            log.info("The database answers again.")
        self._retry_delay = RETRY_MIN
        self._counts["duplicates"] += result.duplicates
        for repeat, kept in result.conflicts:
            log.warning(
                "Fee ticket %d repeated with different values (login %d, volume %s); "
                "keeping the first (login %d, volume %s).",
                repeat.ticket,
                repeat.login,
                repeat.volume,
                kept.login,
                kept.volume,
            )

    def _database_down(self, exc: DatabaseError) -> None:
        if self._retry_delay == RETRY_MIN:
            log.error("Cannot store fees (%s); spooling them to %s until it answers.", exc, self._spool.path)
        self._retry_at = time.monotonic() + self._retry_delay
        self._retry_delay = min(RETRY_MAX, self._retry_delay * 2)

    def _reply(self, batch: list[_Request], reply: bytes) -> None:
        for request in batch:
            self._push.send_multipart([*request.envelope, reply])


def _split(frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """Routing envelope (up to the empty delimiter a REQ socket adds) and the body frames."""
    try:
        cut = frames.index(b"", 1) + 1
    except ValueError:
        cut = 1  # a DEALER peer that sent no delimiter
    return frames[:cut], frames[cut:]


def _excerpt(frames: list[bytes]) -> str:
    """The frames escaped for the log, joined by ``|``, cut past MAX_REQUEST bytes."""
    text = b"|".join(frame[: MAX_REQUEST + 1] for frame in frames[: MAX_REQUEST + 1])
    if len(text) <= MAX_REQUEST:
        return escape_body(text)
    size = sum(len(f) for f in frames) + len(frames) - 1
    return f"{escape_body(text[:MAX_REQUEST])} …[cut: {size} bytes in {len(frames)} frame(s)]"


def _settings(fee: FeeConfig) -> tuple[str, str, str]:
    return fee.listen, fee.table, str(fee.spool)
