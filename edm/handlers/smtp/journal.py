"""The journal of sent mail: one row per Message-ID, with the time and who got it (sqlite, WAL).

A job whose Message-ID lists every one of its recipients here was sent already and is acked
without sending: a redelivery after a crash between the server's 250 and the ack sends nothing
twice. The row is committed right after the server's 250, before the log line and the ack, so
that a duplicate can only come from a crash between that 250 and this commit. WAL with
``synchronous=NORMAL``: a commit survives the process being killed (the case above); only a
power loss may take back the last ones. Rows older than ``smtp.journal_days`` are deleted.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from pathlib import Path

from edm.errors import ConfigError

log = logging.getLogger(__name__)

PRUNE_EVERY = 3600.0  # seconds between deletions of old rows
BUSY_TIMEOUT = 30.0  # seconds to wait for another thread or worker's write
OPEN_RETRY = 0.01  # seconds before the first new try of an open that found the journal locked


class Journal:
    """One connection per handler thread; every thread and worker shares the file."""

    def __init__(self, path: Path, keep_days: int) -> None:
        self.path = path
        self.keep = keep_days * 86400.0
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.db = self._open(time.monotonic() + BUSY_TIMEOUT)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"smtp.journal: cannot open {path}: {exc}") from None
        self._pruned = 0.0
        self.prune()

    def _open(self, deadline: float) -> sqlite3.Connection:
        """Connect, switch to WAL and create the table, again while another process does the same.

        Workers that start together open a new journal at once, and sqlite answers "database is
        locked" at once, without its busy timeout, to one of two connections that both want the
        exclusive lock of the switch to WAL or of the first write.
        """
        wait = OPEN_RETRY
        while True:
            db = sqlite3.connect(
                str(self.path), timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute(
                    "CREATE TABLE IF NOT EXISTS sent ("
                    " message_id TEXT PRIMARY KEY, sent_at REAL NOT NULL, recipients TEXT NOT NULL)"
                )
                db.execute("CREATE INDEX IF NOT EXISTS sent_at ON sent (sent_at)")
                return db
            except sqlite3.OperationalError as exc:
                db.close()
                contended = "locked" in str(exc) or "busy" in str(exc)
                if not contended or time.monotonic() + wait > deadline:
                    raise
            except BaseException:
                db.close()
                raise
            time.sleep(wait)  # at start, in the worker: no message waits
            wait = min(wait * 2, 1.0)

    def delivered(self, message_id: str) -> set[str]:
        """The recipients that got this Message-ID already (empty when it is not in the journal)."""
        row = self.db.execute("SELECT recipients FROM sent WHERE message_id = ?", (message_id,)).fetchone()
        return set(json.loads(row[0])) if row else set()

    def record(self, message_id: str, recipients: list[str]) -> None:
        """Add ``recipients`` to the row of ``message_id``, committed when this returns."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            done = self.delivered(message_id)
            done.update(recipients)
            self.db.execute(
                "INSERT INTO sent (message_id, sent_at, recipients) VALUES (?, ?, ?)"
                " ON CONFLICT (message_id) DO UPDATE SET sent_at = excluded.sent_at,"
                " recipients = excluded.recipients",
                (message_id, time.time(), json.dumps(sorted(done))),
            )
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        if time.monotonic() - self._pruned > PRUNE_EVERY:
            self.prune()

    def prune(self) -> None:
        self._pruned = time.monotonic()
        gone = self.db.execute("DELETE FROM sent WHERE sent_at < ?", (time.time() - self.keep,)).rowcount
        if gone:
            log.info("The smtp journal forgot %d Message-IDs older than smtp.journal_days.", gone)

    def close(self) -> None:
        self.db.close()
