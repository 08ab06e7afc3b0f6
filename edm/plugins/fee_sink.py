"""Where the fee writers make fees durable: the table, or the spool while the database is down.

One Sink is shared by all writer threads. A writer owns its tickets (the I/O thread routes a
ticket always to the same writer), so the table and the spool need no per-ticket locking;
what the Sink guards is what the writers share:

* the spool: appends, reads and the replay's progress go under one lock. Once anything is
  spooled, every writer spools behind it until the replay has caught up, so a ticket's
  spooled fee always reaches the table before a later fee of the same ticket.
* the replay: one writer at a time moves spooled fees into the table, oldest first.
* the retry clock while the database is down.
"""

from __future__ import annotations

import logging
import threading
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
REPLAY_SLICE = 0.2  # seconds of replay before the writer looks at new requests again


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
        self._spool_lock = threading.Lock()
        self._replay_lock = threading.Lock()  # held by the one writer replaying
        self._lock = threading.Lock()  # the retry clock
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
        with self._spool_lock:
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
        when the spool holds some, the retry time has come and no other writer is at it."""
        if not self._spool.pending or time.monotonic() < self._retry_at:
            return
        if not self._replay_lock.acquire(blocking=False):
            return
        try:
            self._replay_slice(session)
        finally:
            self._replay_lock.release()

    def _replay_slice(self, session: Session) -> None:
        until = time.monotonic() + REPLAY_SLICE
        while self._spool.pending and time.monotonic() < until:
            with self._spool_lock:
                fees, offset = self._spool.read(REPLAY_BATCH)
            try:
                if fees:
                    self._store(session, fees)
            except DatabaseError as exc:
                self._database_down(exc)
                return
            with self._spool_lock:
                self._spool.replayed(offset, len(fees))
                done = not self._spool.pending
            self._count("replayed", len(fees))
            if done:
                log.info("The fee spool is replayed; fees go straight to the table again.")

    def _store(self, session: Session, fees: Sequence[Fee]) -> None:
        if not self._table_ready:
            fee_store.create_table(session, self._table)
            self._table_ready = True
        result = fee_store.store(session, self._table, fees, self._process)
        with self._lock:
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
        now = time.monotonic()
        with self._lock:
            if now < self._retry_at:
                return  # another writer met the same outage and set the next attempt
            if self._retry_delay == RETRY_MIN:
                path = self._spool.path
                log.error("Cannot store fees (%s); spooling them to %s until it answers.", exc, path)
            self._retry_at = now + self._retry_delay
            self._retry_delay = min(RETRY_MAX, self._retry_delay * 2)
