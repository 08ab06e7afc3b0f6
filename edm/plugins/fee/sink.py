"""Where the fee receiver makes fees durable: the table, or the spool while the database is down.

Once anything is spooled, every later batch is spooled behind it until the replay has caught
up, so a ticket's spooled fee always reaches the table before a later fee of the same
ticket. The replay moves spooled fees into the table, oldest first, in slices of at most
REPLAY_SLICE seconds between batches, once the retry time has come (and only while no batch
is in flight). Batches in flight together never share a ticket (the receiver sees to it), so
the order in which their outcomes arrive does not matter. A Sink belongs to the receiver's
one thread.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from edm.backoff import Backoff
from edm.db import Pending, Session
from edm.errors import DatabaseError
from edm.plugins.fee import store as fee_store
from edm.plugins.fee.parse import Fee
from edm.plugins.fee.spool import Spool

log = logging.getLogger(__name__)

TRUE = b"TRUE"
UNAVAILABLE = b"FALSE database and spool unavailable"
REPLAY_BATCH = 500  # spooled fees per transaction
RETRY_MIN, RETRY_MAX = 0.5, 5.0  # seconds between attempts to reach a database that is down
REPLAY_SLICE = 0.2  # seconds of replay before the receiver looks at new requests again


@dataclass(eq=False)
class Flight:
    """A batch of fees on its way to being durable: the fee path's one in-flight type.

    ``Sink.start()`` sends it to the table on ``session`` (the transaction ``pending`` when it
    is left in flight) or spools it and sets ``reply`` at once; ``Sink.finish()`` completes it
    and returns the reply every fee of it gets. ``envelopes`` and ``tickets`` are the
    receiver's: whom to answer (one per fee), and the tickets a later batch must not share
    while this one is in flight."""

    fees: list[Fee]
    session: Session
    envelopes: list[list[bytes]]
    tickets: set[int]
    pending: Pending | None = None
    reply: bytes | None = None  # known already (spooled, or refused); None: the table's outcome

    def fileno(self) -> int:
        """What to wait on before ``Sink.finish()``; -1 when it need not wait."""
        return -1 if self.pending is None else self.pending.fileno()

    @property
    def deadline(self) -> float:
        """When the database's answer is given up (database.timeout after the batch was
        sent): ``Sink.finish()`` then spools the batch without waiting any longer."""
        return math.inf if self.pending is None else self.pending.deadline


class Sink:
    def __init__(
        self,
        table: str,
        spool: Spool,
        process: fee_store.Process | None,
        count: Callable[[str, int], None],
    ) -> None:
        """``count(name, n)`` adds to the receiver's counters stored, spooled, replayed, duplicates."""
        self._table = table
        self._spool = spool
        self._process = process
        self._table_ready = False
        self._retry_at = 0.0
        self._retry = Backoff(RETRY_MIN, RETRY_MAX)
        self._count = count

    def prepare(self, sessions: Sequence[Session]) -> None:
        """Connect the sessions and create the table before the first request needs them.

        A database that does not answer now is only noted (within database.timeout for all of
        it): the first batch meets it again and goes to the spool then."""
        if not sessions:
            return
        try:
            with sessions[0].bounded():
                for session in sessions:
                    with session.connection():
                        pass
                self._ready(sessions[0])
        except DatabaseError as exc:
            log.warning("The database does not answer yet (%s); fees are spooled while it does not.", exc)

    def start(self, flight: Flight) -> None:
        """Send the flight's fees to the table (or spool them, see the module); ``finish()``
        completes it. Between the two the flight's session takes no other work."""
        if self._spool.pending:
            flight.reply = self._spooled(flight.fees)
            return
        try:
            self._ready(flight.session)
            flight.pending = fee_store.send(flight.session, self._table, flight.fees, self._process)
        except DatabaseError as exc:
            self._database_down(exc)
            flight.reply = self._spooled(flight.fees)

    def finish(self, flight: Flight) -> bytes:
        """Wait for a started flight's outcome, until its deadline at most; the reply its fees
        all get.

        A batch the table refused, or whose answer did not come by the deadline, goes to the
        spool, behind whatever is spooled already.
        """
        if flight.reply is not None:
            return flight.reply
        try:
            result = fee_store.finish(flight.session, self._table, flight.fees, self._process, flight.pending)
        except DatabaseError as exc:
            self._database_down(exc)
            flight.reply = self._spooled(flight.fees)
            return flight.reply
        self._stored(result)
        self._count("stored", len(flight.fees))
        flight.reply = TRUE
        return TRUE

    def _spooled(self, fees: Sequence[Fee]) -> bytes:
        try:
            self._spool.append(fees)
        except OSError as exc:
            path = self._spool.path
            log.error("Cannot write the fee spool %s: %s; %d request(s) refused.", path, exc, len(fees))
            return UNAVAILABLE
        self._count("spooled", len(fees))
        return TRUE

    def replay(self, session: Session) -> None:
        """Move spooled fees into the table, oldest first, for at most REPLAY_SLICE seconds,
        when the spool holds some and the retry time has come."""
        if not self._spool.pending or time.monotonic() < self._retry_at:
            return
        until = time.monotonic() + REPLAY_SLICE
        while self._spool.pending and time.monotonic() < until:
            fees, offset = self._spool.read(REPLAY_BATCH)
            try:
                if fees:
                    self._store(session, fees)
            except DatabaseError as exc:
                self._database_down(exc)
                return
            self._spool.replayed(offset, len(fees))
            self._count("replayed", len(fees))
            done = not self._spool.pending  # (a local: mypy keeps the loop's narrowing of the property)
            if done:
                log.info("The fee spool is replayed; fees go straight to the table again.")

    def _store(self, session: Session, fees: Sequence[Fee]) -> None:
        self._ready(session)
        self._stored(fee_store.store(session, self._table, fees, self._process))

    def _ready(self, session: Session) -> None:
        if not self._table_ready:
            fee_store.create_table(session, self._table)
            self._table_ready = True

    def _stored(self, result: fee_store.Stored) -> None:
        if self._retry.peek() > RETRY_MIN:
            log.info("The database answers again.")
        self._retry.reset()
        self._count("duplicates", result.duplicates)
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
        if self._retry.peek() == RETRY_MIN:
            path = self._spool.path
            log.error("Cannot store fees (%s); spooling them to %s until it answers.", exc, path)
        self._retry_at = time.monotonic() + self._retry.next()
