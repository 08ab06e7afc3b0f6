"""The fee receiver: ZeroMQ REQ clients send ``ticket,login,volume``; we answer TRUE once
the fee is durable (committed to the table, or fsynced to the spool while the database is
unreachable) and ``FALSE <reason>`` for anything else.

An I/O thread and WRITERS writer threads:

* the I/O thread owns the ROUTER socket bound to ``plugins.fee.listen``. It parses each
  request, answers malformed ones at once, and hands valid ones to a writer's queue (when
  MAX_QUEUE requests already wait the client gets ``FALSE busy``). A ticket always goes to
  the same writer (ticket modulo the number of writers), so one ticket's fees are stored in
  the order they came and the first values stay. It also sends the replies of the batches
  the writers answered; a writer wakes it with one inproc message per batch.
* a writer drains its queue in batches (group commit: one transaction for all the requests
  that arrived while its previous one committed; without a processing step, see
  ``process()``, that transaction is one round trip) and answers the batch once it is
  committed. It keeps its pooled connection while requests keep coming and gives it back
  after 0.1 s without any. While the database is down the writers append their batches to
  the one spool instead and replay it into the table, in order, once the database answers
  again (see fee_sink).

Writers and the pool: there are min(WRITERS, ``database.pool_size``) writers, each using one
connection at a time, so the receiver never holds more than that and never more than the
pool allows. WRITERS is 1: with REQ clients at most one request per client is in flight,
so a single writer already puts every waiting request into its next transaction, and more
writers only split those batches. Measured with 16 clients against a local MariaDB on two
cores (medians of 3 runs), 2 writers gave 27% fewer durable replies per second and 4
writers 53% fewer (smaller transactions cost more CPU per fee); with commits made 1-10 ms
slower, 2-4 writers gained at most about 15%.

Limits, so that a flood or a hostile peer cannot exhaust memory or the pool:

* at most MAX_QUEUE (10,000) accepted requests wait for the writers, all clients together,
  and at most MAX_PER_PEER (100) per connection (a REQ client has one at a time; this
  caps DEALER peers that pipeline); beyond either the client is told ``FALSE busy`` at
  once. Each writer uses one pooled connection at a time (see above).
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
from edm.errors import EdmError
from edm.logs import escape_body
from edm.plugins.fee_parse import MAX_REQUEST, Fee, MalformedRequest, parse_request
from edm.plugins.fee_sink import Sink
from edm.plugins.fee_spool import Spool

log = logging.getLogger(__name__)

BUSY = b"FALSE busy"
WRITERS = 1  # writer threads, each with its own connection; capped at database.pool_size
MAX_QUEUE = 10_000  # accepted requests waiting for the writers; beyond that: FALSE busy
MAX_PER_PEER = 100  # requests one connection may have in flight; beyond that: FALSE busy
MAX_BATCH = 500  # requests per transaction
MAX_FRAME = 16 << 10  # a bigger frame makes libzmq drop the peer instead of buffering it
RCVHWM = 64  # messages libzmq buffers per connection before it stops reading from it
MAX_HOPS = 4  # routing frames (proxies) a request may carry besides the connection's own
MAX_ROUTING_ID = 255  # bytes; ZMTP allows no longer routing id
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
        self._counts = dict.fromkeys(_COUNTS, 0)
        self._counts_lock = threading.Lock()  # for the writers' counts; the I/O thread's are its own
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
        if state == "running" and self._spool.pending:
            state = "spooling"
        if state in ("running", "spooling") and not all(t.is_alive() for t in self._threads):
            state = "failed"  # a thread died: the receiver no longer serves
        return {
            "state": state,
            "listen": self.endpoint or self._fee.listen,
            "queue": self._waiting() if self._state != "stopped" else 0,
            "spool_pending": self._spool.records,
            **self._counts,
        }

    def process(self, cursor: Any, fees: Sequence[Fee]) -> None:
        """The processing step between insert (status N) and status Y, inside the batch's
        transaction; raising rolls the batch back. Nothing to do by default.

        It runs in the writer threads (concurrently when there is more than one), and a
        subclass that overrides it gives up the one-round-trip transaction."""

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
        # One queue per writer; a ticket always goes to the same one (see the module docstring).
        self._queues: list[queue.SimpleQueue[_Request]] = [
            queue.SimpleQueue() for _ in range(max(1, min(WRITERS, self._db.pool_size)))
        ]
        # Answered batches for the I/O thread to send; each is followed by a wake-up on the
        # inproc replies socket (one message per batch rather than one per reply).
        self._answered: queue.SimpleQueue[tuple[list[_Request], bytes]] = queue.SimpleQueue()
        self._in_flight: dict[bytes, int] = {}  # connection -> accepted requests not yet answered
        self._accepting = threading.Event()
        self._accepting.set()
        self._quiet = threading.Event()  # the I/O thread has stopped queueing requests
        self._writer_done = threading.Event()  # set by the last writer to finish
        self._writers_left = len(self._queues)
        self._writers_lock = threading.Lock()
        process = None if type(self).process is FeePlugin.process else self.process
        self._sink = Sink(self._fee.table, self._spool, process, self._count)
        pending = self._spool.recover()
        if pending:
            log.warning("The fee spool %s holds %d fee(s) to replay.", self._spool.path, pending)
        self._state = "running"
        self._threads = [threading.Thread(target=self._serve, name="fee-io", daemon=True)]
        self._threads += [
            threading.Thread(target=self._write, args=(n,), name=f"fee-writer-{n}", daemon=True)
            for n in range(len(self._queues))
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
        while True:  # the wake-ups first, so that no answered batch is left behind them
            try:
                self._replies.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        while True:
            try:
                batch, reply = self._answered.get_nowait()
            except queue.Empty:
                return
            for request in batch:
                self._router.send_multipart([*request.envelope, reply])
                peer = request.envelope[0]
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
            if self._waiting() >= MAX_QUEUE:
                self._counts["busy"] += 1
                self._router.send_multipart([*envelope, BUSY])
                continue
            self._queues[fee.ticket % len(self._queues)].put(_Request(envelope, fee))
            self._in_flight[peer] = in_flight + 1

    def _count(self, name: str, n: int) -> None:
        with self._counts_lock:
            self._counts[name] += n

    def _waiting(self) -> int:
        """Accepted requests no writer has taken yet."""
        return sum(q.qsize() for q in self._queues)

    # -- the writer threads --------------------------------------------------------------

    def _write(self, index: int) -> None:
        requests = self._queues[index]
        push = self._context.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 0)
        push.setsockopt(zmq.LINGER, -1)  # inproc: delivered as soon as the I/O thread reads
        push.connect(self._replies_endpoint)
        session = self._db.session()  # the writer's own connection, kept while requests come
        try:
            while True:
                self._sink.replay(session)
                batch = self._next_batch(requests)
                if batch:
                    reply = self._sink.put(session, [request.fee for request in batch])
                    self._answered.put((batch, reply))
                    push.send(b"")  # wakes the I/O thread, which sends the replies
                    continue
                session.close()  # idle: the connection goes back to the pool
                if self._quiet.is_set() and requests.empty():
                    return
        except Exception:
            log.exception("A fee writer failed; requests it held got no reply.")
        finally:
            session.close()
            push.close()
            with self._writers_lock:
                self._writers_left -= 1
                if not self._writers_left:
                    self._writer_done.set()

    def _next_batch(self, requests: queue.SimpleQueue[_Request]) -> list[_Request]:
        """What waits for this writer now (up to MAX_BATCH): the requests that arrived while
        its previous batch committed share one transaction."""
        try:
            batch = [requests.get(timeout=0.1)]
        except queue.Empty:
            return []
        while len(batch) < MAX_BATCH:
            try:
                batch.append(requests.get_nowait())
            except queue.Empty:
                break
        return batch


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


_COUNTS = ("requests", "stored", "spooled", "replayed", "duplicates", "malformed", "busy")


def _settings(fee: FeeConfig) -> tuple[str, str, str]:
    return fee.listen, fee.table, str(fee.spool)
