"""Where the fee receiver makes fees durable: the table, or the spool while the database is down.

Once anything is spooled, every later batch is spooled behind it until the replay has caught
up, so a ticket's spooled fee always reaches the table before a later fee of the same
ticket. The replay moves spooled fees into the table, oldest first, in slices of at most
REPLAY_SLICE seconds between batches, once the retry time has come. A Sink belongs to the
receiver's one thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from edm.db import Session
from edm.errors import DatabaseError
from edm.plugins import fee_store
from edm.plugins.fee_parse import Fee
from edm.plugins.fee_spool import Spool

log = logging.getLogger(__name__)

TRUE = b"TRUE"
UNAVAILABLE = b"FALSE database and spool unavailable"
REPLAY_BATCH = 500  # spooled fees per transaction
RETRY_MIN, RETRY_MAX = 0.5, 5.0  # seconds between attempts to reach a database that is down
REPLAY_SLICE = 0.2  # seconds of replay before the receiver looks at new requests again


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
        self._retry_delay = RETRY_MIN
        self._count = count

    def put(self, session: Session, fees: Sequence[Fee]) -> bytes:
        """Make the fees durable; the reply they all get (TRUE unless table and spool failed)."""
        if not self._spool.pending:
            try:
                self._store(session, fees)
            except DatabaseError as exc:
                self._database_down(exc)
            else:
                self._count("stored", len(fees))
                return TRUE
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
        if not self._table_ready:
            fee_store.create_table(session, self._table)
            self._table_ready = True
        result = fee_store.store(session, self._table, fees, self._process)
        if self._retry_delay > RETRY_MIN:
            log.info("The database answers again.")
        self._retry_delay = RETRY_MIN
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
        if self._retry_delay == RETRY_MIN:
            path = self._spool.path
            log.error("Cannot store fees (%s); spooling them to %s until it answers.", exc, path)
        self._retry_at = time.monotonic() + self._retry_delay
        self._retry_delay = min(RETRY_MAX, self._retry_delay * 2)
