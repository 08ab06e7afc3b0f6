"""The fee receiver: ZeroMQ REQ clients send ``ticket,login,volume``; we answer TRUE once
the fee is durable (committed to the table, or fsynced to the spool while the database is
unreachable) and ``FALSE <reason>`` for anything else.

One thread owns the ROUTER socket bound to ``plugins.fee.listen`` and up to IN_FLIGHT (2)
pooled connections, and loops: take every request waiting now (up to MAX_BATCH), answer the
malformed ones, send the valid ones to the database as one transaction (group commit; without
a processing step, see ``process()``, that transaction is one round trip), and answer each
batch once its transaction has committed. While one batch commits, the next is gathered and
sent on the other connection, so the database's commit (its log flush, about 0.3 ms here)
is no longer a pause in which nothing else is stored; MariaDB flushes the two commits
together. A batch never holds a ticket that a batch still in flight holds: it waits for that
one first, so a ticket's fees reach the table in the order they came. While the database is
down the batches go to the spool instead and are replayed into the table, in order, once it
answers again (see fee_sink). A batch whose answer has not come within ``database.timeout``
counts as unreachable too (a partition that drops packets, a stalled server): the poll
waits no longer than the earliest deadline, the batch goes to the spool and its clients get
TRUE, and its connection is closed, never to be used again (``edm.db``). The connections go
back to the pool after IDLE_MS without a request.

Why one thread: each request handed from an I/O thread to a writer thread and its reply
handed back cost two thread wake-ups and a fight for the GIL. Measured with 16 REQ clients
against a local MariaDB on two cores, the receiver spent 134 µs of CPU per request with an
I/O thread and a writer, and 72 µs alone; more writers (2, 4) were slower still, since a REQ
client has one request in flight at a time and more writers only split the batches. The
same held for libzmq's own proxy: a ROUTER in front of worker threads (DEALER sockets over
inproc) stored 10,100 requests/s with one worker, 8,700 with two and 7,300 with three. The
second transaction in flight needs no thread: its connection's socket is polled beside the
ROUTER (``edm.db.Session.send_atomic``).

Limits, so that a flood or a hostile peer cannot exhaust memory or the pool:

* at most MAX_BATCH requests are read before the batch is stored and answered; what clients
  send meanwhile waits in libzmq, which buffers at most RCVHWM (64) messages per connection
  before it stops reading from it (the sender then waits: backpressure, not refusal).
  libzmq takes the connections in turn, so one connection cannot crowd out the others.
* at most MAX_PER_PEER (100) requests of one connection go into one batch (a REQ client
  has one at a time; this caps DEALER peers that pipeline); beyond that the client is told
  ``FALSE busy`` at once.
* the receiver uses at most IN_FLIGHT pooled connections, and never more than
  ``database.pool_size``: with a pool of one, one batch at a time.
* libzmq refuses a frame larger than MAX_FRAME (16 KiB, sixteen times the largest valid
  request) by dropping the connection before buffering it: a REQ client that sent one gets
  no reply (its recv ends only with its own RCVTIMEO; ``ZMQ_REQ_RELAXED`` lets it send
  again) and reconnects. Frames up to MAX_FRAME get ``FALSE <reason>`` like any bad request.
  So one connection holds at most about RCVHWM x MAX_FRAME (1 MiB) in the receiver.
* replies to a client that left or does not read are dropped (the ROUTER is not
  mandatory), so a client can never block the receiver.

* at most MAX_FRAMES (64) frames of one message reach Python. A message with more drops
  its connection at the frame past the cap: the receiver learns the connection of each
  message from libzmq (ZMQ_SRCFD, the connection's descriptor) and shuts it down
  (``PeerCap.drop``); libzmq and the kernel then discard what the peer had not yet
  delivered, unread. What libzmq had already queued of it whole (at most RCVHWM + 1
  messages) is still read, frame by frame, never held together, and answered
  ``FALSE too many frames`` (to nobody: the peer is gone) and counted as malformed. A valid
  request has at most MAX_HOPS + 3 frames (the connection's routing id, the hops, the empty
  delimiter, the body); the headroom lets the envelope checks above say what is wrong with
  a message that is merely odd. The drop is logged once per address at WARNING
  (``Dropped the fee client at ADDRESS:PORT: a message of more than 64 frames``).
* at most MAX_UNFINISHED (1 MiB + 64 KiB: the largest message the receiver looks at,
  MAX_FRAMES frames of MAX_FRAME, and room) read by libzmq from one connection without the
  receiver taking a whole message of it. libzmq hands a multipart message over only once
  its last frame has come, holds its frames until then (RCVHWM counts whole messages,
  MAXMSGSIZE one frame) and keeps each short frame in a 64-byte slot: a raw ZMTP peer that
  never ended a message grew the receiver by some 20 times what it sent. A watch beside the
  peer cap (``PeerCap.guard_messages``) looks every 50 ms at the bytes libzmq has read from
  each connection (the kernel's TCP_INFO less its receive queue) and at the whole messages
  the receiver took from it (counted per descriptor, one dict update a message), and drops
  a connection past the bound, logged as above (``… bytes without finishing a message``).
* at most MAX_PEERS (1,024) TCP connections at once (``fee_guard.PeerCap``: libzmq has no
  such option; its socket monitor reports each accepted connection, and one beyond the cap
  is shut down as soon as the report is read, normally before its handshake is over).

So with single-frame requests the receiver holds at most about MAX_PEERS x RCVHWM x
MAX_FRAME (1 GiB at worst, 1 MiB a connection) in libzmq and one message of MAX_FRAMES
frames in Python; an unfinished message holds at most MAX_UNFINISHED of the wire, plus what
libzmq reads before the next look (measured: 1.9 MB and 40 MiB of memory in one-byte
frames, against 1.8 GB for 90 MB before the watch). Without ZMQ_SRCFD (a libzmq that drops
it: it is deprecated since 4.3) the receiver says so at start with a WARNING and reads an
over-long message to its end instead, and an unfinished one is not bounded; CURVE
(``plugins.fee.curve``) still stops strangers at the handshake, and so does listening on a
trusted interface only.
"""

from __future__ import annotations

import errno
import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import zmq

from edm.config import Config
from edm.db import Database, Session
from edm.errors import DatabaseError, DatabaseUnavailable, EdmError
from edm.logs import escape_body
from edm.plugins.fee.auth import Gate, load_server_keys
from edm.plugins.fee.config import FeeConfig, FeeCurve, fee_section
from edm.plugins.fee.guard import PeerCap
from edm.plugins.fee.parse import MAX_REQUEST, Fee, MalformedRequest, parse_request
from edm.plugins.fee.sink import Flight, Sink
from edm.plugins.fee.spool import Spool

log = logging.getLogger(__name__)

BUSY = b"FALSE busy"
MAX_BATCH = 500  # requests read before they are stored and answered
MAX_PER_PEER = 100  # requests of one connection in one batch; beyond that: FALSE busy
MAX_FRAME = 16 << 10  # a bigger frame makes libzmq drop the peer instead of buffering it
RCVHWM = 64  # messages libzmq buffers per connection before it stops reading from it
MAX_HOPS = 4  # routing frames (proxies) a request may carry besides the connection's own
MAX_ROUTING_ID = 255  # bytes; ZMTP allows no longer routing id
MAX_FRAMES = 64  # frames of one message kept; a valid request has at most MAX_HOPS + 3
MAX_PEERS = 1024  # TCP connections at once; more are shut down as they come
# Bytes libzmq may read from one connection without the receiver taking a whole message of
# it: the largest message the receiver looks at (MAX_FRAMES frames of MAX_FRAME), and room.
MAX_UNFINISHED = MAX_FRAMES * MAX_FRAME + (64 << 10)
MAX_DROPPED_IDS = 10_000  # routing ids of dropped connections remembered
LINGER_MS = 500
IDLE_MS = 100  # without a request for this long the connections go back to the pool
IN_FLIGHT = 2  # batches being stored at once, each on a pooled connection of its own

# pyzmq's flags as plain ints: its enum flags cost more than the calls they are passed to.
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
# The descriptor of the connection a message came on: deprecated since libzmq 4.3, still there.
_SRCFD = int(zmq.SRCFD) if hasattr(zmq, "SRCFD") else None


@dataclass
class _Request:
    envelope: list[bytes]
    fee: Fee


class FeePlugin:
    name = "fee"
    _context: zmq.Context[zmq.Socket[bytes]]  # while started
    _router: zmq.Socket[bytes]  # bound to the listen endpoint, while started

    def __init__(self, config: Config, database: Database) -> None:
        self._config = config
        self._db = database
        self.endpoint: str | None = None  # what the ROUTER is bound to (the resolved port)
        self._state = "stopped"
        self._lock = threading.Lock()  # start/stop/reload
        self._counts = dict.fromkeys(_COUNTS, 0)  # written by the receiver thread only
        self._spool = Spool(fee_section(config).spool)
        self._thread: threading.Thread | None = None
        self._storing = 0  # requests in the batch being stored
        self._failure: str | None = None  # why the receiver's thread died
        self._gate: Gate | None = None  # CURVE: who may talk to the receiver
        self._peer_cap: PeerCap | None = None
        self._srcfd = _SRCFD is not None  # the receiver learns each message's connection
        self._dropped_ids: set[bytes] = set()
        self._tls_checked = False

    @property
    def _fee(self) -> FeeConfig:
        return fee_section(self._config)

    # -- the Plugin protocol -------------------------------------------------------------

    def start(self) -> None:
        """Bind the listen endpoint and start serving; EdmError when the endpoint cannot be bound."""
        with self._lock:
            if self._state != "stopped":
                return
            self._start()

    def stop(self, timeout: float) -> None:
        """Stop taking requests, answer every accepted one, close the socket."""
        with self._lock:
            self._stop(timeout)

    def reload(self, config: Config) -> None:
        """Apply a new config; a changed endpoint, table or spool restarts the receiver's thread.

        Nothing is given up before its replacement is in hand: a new endpoint is bound while
        the old one still serves, and the old spool's pending fees are moved into the new one
        (see ``Spool.take_over``) before the receiver switches to it. A setting that cannot be
        applied raises EdmError naming its key; the receiver then serves on with every one of
        its previous settings (the fee settings change together or not at all)."""
        with self._lock:
            old, new = self._fee, fee_section(config)
            if _settings(new) == _settings(old) or self._state == "stopped":
                if new.spool != old.spool:
                    self._spool = Spool(new.spool)
                self._config = config
                if self._gate is not None and new.curve is not None:
                    self._gate.reload(new.curve)
                return
            if _settings(new)[3] != _settings(old)[3]:
                # The server's key pair is set on the socket before it binds, and the socket is
                # kept while it serves: a new key, or CURVE turned on or off, needs a restart.
                raise EdmError(
                    "plugins.fee.curve: a new server key, or CURVE turned on or off, applies at the "
                    f"next restart of edm; keeping the running fee settings ({old.listen})"
                )
            log.info("The fee receiver's settings changed; restarting it on %s.", new.listen)
            router = self._router
            if new.listen != old.listen:
                try:
                    router = self._bind(new.listen, holding=self.endpoint, curve=new.curve)
                except EdmError as exc:
                    raise EdmError(f"{exc}; keeping {old.listen}") from None
            if not self._halt(config.daemon.stop_timeout):
                # Its thread still holds the socket and the spool: let the worker be restarted.
                if router is not self._router:
                    router.close(0)
                timeout = config.daemon.stop_timeout
                self._failure = f"the fee receiver did not stop within {timeout:g} s for a reload"
                raise EdmError(f"plugins.fee: {self._failure}; restarting it with the running settings")
            spool = self._spool
            if new.spool != old.spool:
                spool = Spool(new.spool)
                try:
                    moved = spool.take_over(self._spool)
                except OSError as exc:
                    if router is not self._router:
                        router.close(0)
                    self._run()
                    raise EdmError(
                        f"plugins.fee.spool: cannot move the pending fees of {old.spool} to {new.spool}: "
                        f"{exc.strerror or exc}; keeping {old.spool}"
                    ) from None
                if moved:
                    log.info("Moved %d pending fee(s) from the spool %s to %s.", moved, old.spool, new.spool)
            if router is not self._router:
                self._router.close(LINGER_MS)  # its peer cap's monitor ends with it
                self._router = router
                self.endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
                self._peer_cap = self._cap_peers()
            if self._gate is not None and new.curve is not None:
                self._gate.reload(new.curve)
            self._config = config
            self._spool = spool
            self._run()

    def failure(self) -> str | None:
        """Why the receiver no longer serves (its thread died), or None."""
        return self._failure

    def status(self) -> dict[str, Any]:
        state = self._state
        if state == "running" and self._spool.pending:
            state = "spooling"
        if state in ("running", "spooling") and not (self._thread and self._thread.is_alive()):
            state = "failed"  # the thread died: the receiver no longer serves
        return {
            "state": state,
            "listen": self.endpoint or self._fee.listen,
            "queue": self._storing if self._state != "stopped" else 0,
            "spool_pending": self._spool.records,
            **self._counts,
        }

    def process(self, cursor: Any, fees: Sequence[Fee]) -> None:
        """The processing step between insert (status N) and status Y, inside the batch's
        transaction; raising rolls the batch back. Nothing to do by default.

        It runs in the receiver's thread: while it runs no request is read (they wait in
        libzmq's buffers). A subclass that overrides it gives up the one-round-trip
        transaction."""

    # -- lifecycle -----------------------------------------------------------------------

    def _start(self) -> None:
        self._check_database_tls()
        curve = self._fee.curve
        self._context = zmq.Context()
        try:
            if curve is not None:
                self._gate = Gate(self._context, curve)  # the ZAP handler, before the first peer
            self._router = self._bind(self._fee.listen, curve=curve)
        except EdmError:
            self._close_gate()
            self._context.term()
            raise
        self.endpoint = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._peer_cap = self._cap_peers()
        self._run()

    def _bind(
        self, listen: str, holding: str | None = None, curve: FeeCurve | None = None
    ) -> zmq.Socket[bytes]:
        """A ROUTER socket bound to ``listen`` (a CURVE server with ``curve``); EdmError naming
        the key when it cannot be bound. ``holding``: the endpoint we are bound to already."""
        keys = load_server_keys(curve) if curve is not None else None
        router: zmq.Socket[bytes] = self._context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, LINGER_MS)
        router.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME)
        router.setsockopt(zmq.RCVHWM, RCVHWM)
        if keys is not None:
            router.setsockopt(zmq.CURVE_SERVER, 1)
            router.setsockopt(zmq.CURVE_PUBLICKEY, keys[0])
            router.setsockopt(zmq.CURVE_SECRETKEY, keys[1])
        try:
            router.bind(listen)
        except zmq.ZMQError as exc:
            router.close(0)
            # (pyzmq's strerror repeats the endpoint; libzmq's own text does not)
            reason = exc.strerror if exc.errno is None else zmq.strerror(exc.errno)
            port = _port(listen)
            if exc.errno == errno.EADDRINUSE and port and holding and port == _port(holding):
                reason += " (this receiver holds that port itself: a restart applies the change)"
            raise EdmError(f"plugins.fee.listen: cannot bind {listen}: {reason}") from None
        return router

    def _run(self) -> None:
        """Start the receiver's thread on the bound socket, with the current table and spool."""
        self._accepting = threading.Event()
        self._accepting.set()
        process = None if type(self).process is FeePlugin.process else self.process
        self._sink = Sink(self._fee.table, self._spool, process, self._count)
        pending = self._spool.recover()
        if pending:
            log.warning("The fee spool %s holds %d fee(s) to replay.", self._spool.path, pending)
        self._state = "running"
        self._thread = threading.Thread(target=self._serve, name="fee-receiver", daemon=True)
        self._thread.start()
        log.info("The fee receiver listens on %s (table %s).", self.endpoint, self._fee.table)

    def _halt(self, timeout: float) -> bool:
        """Stop the receiver's thread once it has answered every request it accepted; whether
        it finished within ``timeout``. The socket stays bound (requests wait in libzmq)."""
        self._state = "stopping"
        self._accepting.clear()
        assert self._thread is not None
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _stop(self, timeout: float) -> None:
        if self._state == "stopped":
            return
        if self._halt(timeout):
            self._router.close(LINGER_MS)  # its peer cap's monitor ends with it
            self._close_gate()
            self._context.term()
        else:
            log.warning("The fee receiver did not finish within %.1f s; closing it anyway.", timeout)
        self._spool.close()
        self._thread = None
        self._storing = 0
        self._state = "stopped"
        log.info("The fee receiver on %s stopped.", self.endpoint)

    def _cap_peers(self) -> PeerCap | None:
        endpoint = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        if not endpoint.startswith("tcp://"):
            return None  # ipc: the file's permissions say who connects; inproc: this process
        cap = PeerCap(self._router, int(endpoint.rsplit(":", 1)[1]), MAX_PEERS, self._fee.curve is not None)
        if self._srcfd:
            cap.guard_messages(MAX_UNFINISHED)
        else:
            log.warning(
                "This libzmq does not tell the connection of a message (ZMQ_SRCFD): a message of "
                "more than %d frames is read to its end instead of dropping its sender, and an "
                "unfinished one is not bounded.",
                MAX_FRAMES,
            )
        return cap

    def _close_gate(self) -> None:
        if self._gate is not None:
            self._gate.stop()
            self._gate = None

    def _check_database_tls(self) -> None:
        """With ``database.tls``, a link that cannot be made secure fails the start (a wrong CA,
        a server without TLS): spooling would only hide it. A database that is down does not:
        fees are spooled until it answers, as without TLS. Checked at the first start."""
        if self._tls_checked or not self._config.database.tls.enabled:
            return
        try:
            with self._db.connection():
                pass
        except DatabaseUnavailable:
            return
        except DatabaseError as exc:
            raise EdmError(f"database.tls: {exc}") from None
        self._tls_checked = True

    # -- the receiver thread -------------------------------------------------------------

    def _serve(self) -> None:
        router = self._router
        sessions = [self._db.session() for _ in range(min(IN_FLIGHT, self._db.pool_size))]
        free = list(sessions)  # sessions with no batch in flight
        flight: dict[int, Flight] = {}  # by the database socket its outcome arrives on
        poller = zmq.Poller()
        idle_since = time.monotonic()
        try:
            self._sink.prepare(sessions)
            while self._accepting.is_set():
                if not flight:
                    self._sink.replay(free[0])
                # Wait for outcomes, and for requests while a session is free.
                poller.register(router, zmq.POLLIN if free else 0)
                ready = poller.poll(_wait_ms(flight))
                taken = False
                for fd, _ in ready:
                    if fd is router:
                        taken = True
                    else:
                        poller.unregister(fd)
                        self._answer(flight.pop(fd), free)
                for fd in _overdue(flight):  # no answer within database.timeout: spooled
                    poller.unregister(fd)
                    self._answer(flight.pop(fd), free)
                if not taken or not free:
                    if not flight and time.monotonic() - idle_since >= IDLE_MS / 1000:
                        for session in sessions:
                            session.close()  # idle: the connections go back to the pool
                    continue
                idle_since = time.monotonic()
                batch = self._receive()
                if not batch:
                    continue
                fees = [request.fee for request in batch]
                tickets = {fee.ticket for fee in fees}
                for fd, other in list(flight.items()):
                    if not tickets.isdisjoint(other.tickets):  # a ticket's fees are stored in order
                        poller.unregister(fd)
                        self._answer(flight.pop(fd), free)
                new = Flight(fees, free.pop(), [request.envelope for request in batch], tickets)
                self._sink.start(new)
                self._storing += len(fees)
                fd = new.fileno()
                if fd < 0:
                    self._answer(new, free)  # done already
                else:
                    flight[fd] = new
                    poller.register(fd, zmq.POLLIN)
        except Exception as exc:
            log.exception("The fee receiver failed; requests it held got no reply.")
            self._failure = f"the fee receiver failed: {type(exc).__name__}: {exc}"
            flight.clear()
        finally:
            try:
                for done in flight.values():
                    self._answer(done, free)  # stopping: every accepted request
            except Exception as exc:
                log.exception("The fee receiver failed; requests it held got no reply.")
                self._failure = f"the fee receiver failed: {type(exc).__name__}: {exc}"
            for session in sessions:
                session.close()

    def _answer(self, done: Flight, free: list[Session]) -> None:
        """Wait for a batch's outcome, answer its requests, free its session."""
        reply = self._sink.finish(done)
        free.append(done.session)
        self._storing -= len(done.fees)
        for envelope in done.envelopes:
            self._send(envelope, reply)

    def _receive(self) -> list[_Request]:
        """The valid requests waiting now, up to MAX_BATCH; the others answered at once."""
        batch: list[_Request] = []
        per_peer: dict[bytes, int] = {}
        for _ in range(MAX_BATCH):
            try:
                frames = self._recv_frames()
            except zmq.Again:
                break
            self._counts["requests"] += 1
            envelope, body = _split(frames)
            try:
                if len(envelope) > MAX_HOPS + 2 or any(len(f) > MAX_ROUTING_ID for f in envelope[1:]):
                    envelope = frames[:1]  # answer the connection itself, not a route it made up
                    raise MalformedRequest("invalid routing envelope")
                if len(body) != 1:
                    many = "too many frames" if len(frames) > MAX_FRAMES else "multipart request"
                    raise MalformedRequest("empty request" if not body else many)
                fee = parse_request(body[0])
            except MalformedRequest as exc:
                self._counts["malformed"] += 1
                log.error("Malformed fee request (%s): %s", exc.reason, _excerpt(body))
                self._send(envelope, f"FALSE {exc.reason}".encode())
                continue
            peer = envelope[0]
            taken = per_peer.get(peer, 0)
            if taken >= MAX_PER_PEER:
                self._counts["busy"] += 1
                self._send(envelope, BUSY)
                continue
            per_peer[peer] = taken + 1
            batch.append(_Request(envelope, fee))
        return batch

    def _recv_frames(self) -> list[bytes]:
        """One whole message, without waiting; zmq.Again when there is none. Of a message
        longer than MAX_FRAMES, the first MAX_FRAMES + 1 frames (the one too many tells the
        caller), and its connection is dropped; the other frames, already whole in libzmq's
        queue, are read and dropped one by one, never held together."""
        recv = self._router.recv
        frame = recv(_NOBLOCK, copy=False)
        frames = [frame.bytes]
        cap = self._peer_cap if self._srcfd else None
        fd = self._source(frame) if cap is not None else -1
        while frame.more:
            frame = recv(_NOBLOCK, copy=False)
            if len(frames) <= MAX_FRAMES:
                frames.append(frame.bytes)
                if len(frames) > MAX_FRAMES and fd >= 0:
                    self._drop(fd, frames[0])
        if fd >= 0:
            done = cap.done  # type: ignore[union-attr]  # fd >= 0 only with a cap
            done[fd] = done.get(fd, 0) + 1
        return frames

    def _source(self, frame: zmq.Frame) -> int:
        """The descriptor of the connection a message came on (ZMQ_SRCFD); -1 when unknown."""
        try:
            return int(frame.get(_SRCFD))  # type: ignore[arg-type]
        except zmq.ZMQError as exc:
            self._srcfd = False
            if self._peer_cap is not None:
                self._peer_cap.stop_guard()
            log.warning(
                "libzmq does not tell the connection of a message (ZMQ_SRCFD: %s): a message of "
                "more than %d frames is read to its end instead of dropping its sender, and an "
                "unfinished one is not bounded.",
                exc,
                MAX_FRAMES,
            )
            return -1

    def _drop(self, fd: int, routing_id: bytes) -> None:
        """Drop the connection that sent a message over MAX_FRAMES, once per connection: the
        messages it had queued carry the same routing id, and the descriptor may by then hold
        another peer's connection. (A peer that sets its own routing id to one dropped before,
        which libzmq allows only once that queue is read, has its long messages read to the
        end, as without the drop; the unfinished-message watch still applies to it.)"""
        if routing_id in self._dropped_ids:
            return
        if len(self._dropped_ids) >= MAX_DROPPED_IDS:
            self._dropped_ids.clear()
        self._dropped_ids.add(routing_id)
        assert self._peer_cap is not None
        self._peer_cap.drop(fd, f"a message of more than {MAX_FRAMES} frames")

    def _send(self, envelope: list[bytes], reply: bytes) -> None:
        send = self._router.send
        for frame in envelope:
            send(frame, _SNDMORE)
        send(reply)

    def _count(self, name: str, n: int) -> None:
        self._counts[name] += n


def _wait_ms(flight: dict[int, Flight]) -> int:
    """How long to wait for the next event: IDLE_MS, or less when a batch's deadline is sooner."""
    if not flight:
        return IDLE_MS
    left = min(done.deadline for done in flight.values()) - time.monotonic()
    return IDLE_MS if left * 1000 >= IDLE_MS else max(0, math.ceil(left * 1000))


def _overdue(flight: dict[int, Flight]) -> list[int]:
    """The batches in flight whose database.timeout has run out (by their socket)."""
    now = time.monotonic()
    return [fd for fd, done in flight.items() if done.deadline <= now]


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


def _port(endpoint: str) -> str | None:
    """The port of a tcp:// endpoint (binding a second address on a port we listen on fails)."""
    if not endpoint.startswith("tcp://"):
        return None
    return endpoint.rpartition(":")[2]


def _settings(fee: FeeConfig) -> tuple[str, str, str, str | None]:
    # clients_dir is not here: a reload reads it again in place
    secret = str(fee.curve.secret_key_file) if fee.curve is not None else None
    return fee.listen, fee.table, str(fee.spool), secret
