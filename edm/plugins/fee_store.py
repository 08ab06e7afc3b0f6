"""SQL for the fee table: create it if missing, store a batch of fees in one transaction.

Statements are built from the table name, which config restricts to [A-Za-z0-9_], and
placeholders; every value is a bound parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from edm.db import Database
from edm.plugins.fee_parse import Fee

# Rows per statement: well under sqlite's bound-parameter limit and MySQL's packet size.
CHUNK = 500

Process = Callable[[Any, Sequence[Fee]], None]


@dataclass
class Stored:
    inserted: int = 0
    duplicates: int = 0
    # (the repeat, the values the table keeps) for repeats whose values differ
    conflicts: list[tuple[Fee, Fee]] = field(default_factory=list)


def quote(db: Database, table: str) -> str:
    """The table name quoted for the dialect; config already restricts it to [A-Za-z0-9_]."""
    return f"`{table}`" if db.dialect == "mysql" else f'"{table}"'


def create_table(db: Database, table: str) -> None:
    """Create the fee table unless it exists; an existing table is used as it is."""
    if db.dialect == "mysql":
        sql = (
            f"CREATE TABLE IF NOT EXISTS {quote(db, table)} ("
            " ticket BIGINT NOT NULL PRIMARY KEY,"
            " login BIGINT NOT NULL,"
            " volume DECIMAL(20,4) NOT NULL,"
            " status CHAR(1) NOT NULL DEFAULT 'N',"
            " created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP"
            ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
        )
    else:
        # sqlite has no exact decimal: a DECIMAL column has NUMERIC affinity, which turns
        # 9999999999999999.9999 into a float. Text keeps every digit.
        sql = (
            f"CREATE TABLE IF NOT EXISTS {quote(db, table)} ("
            " ticket BIGINT NOT NULL PRIMARY KEY,"
            " login BIGINT NOT NULL,"
            " volume TEXT NOT NULL,"
            " status CHAR(1) NOT NULL DEFAULT 'N',"
            " created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"
        )
    with db.transaction() as cur:
        cur.execute(sql)


def store(db: Database, table: str, fees: Sequence[Fee], process: Process) -> Stored:
    """Insert the new tickets (status N), process them, mark them Y, commit: all or nothing.

    A ticket already in the table, or earlier in the same batch, is a duplicate: no second
    row, the first values stay. Raises DatabaseError (nothing committed) on any failure.
    """
    result = Stored()
    first: dict[int, Fee] = {}
    for fee in fees:
        kept = first.setdefault(fee.ticket, fee)
        if kept is not fee:
            result.duplicates += 1
            if not _same(fee, kept):
                result.conflicts.append((fee, kept))
    unique = list(first.values())
    # The common case has no repeats: insert straight away and let the row count prove it
    # (a repeat is not counted). Only a batch with a repeat pays for the look-up.
    try:
        with db.transaction() as cur:
            if _insert(db, cur, table, unique) != len(unique):
                raise _Repeats
            _finish(db, cur, table, unique, process)
    except _Repeats:
        pass
    else:
        result.inserted = len(unique)
        return result
    with db.transaction() as cur:
        existing = _existing(db, cur, table, [fee.ticket for fee in unique])
        new = []
        for fee in unique:
            stored = existing.get(fee.ticket)
            if stored is None:
                new.append(fee)
            else:
                result.duplicates += 1
                if not _same(fee, stored):
                    result.conflicts.append((fee, stored))
        if new:
            _insert(db, cur, table, new)
            _finish(db, cur, table, new, process)
        result.inserted = len(new)
    return result


class _Repeats(Exception):
    """Rolls back the fast path of a batch holding a ticket the table already has."""


def _insert(db: Database, cur: Any, table: str, fees: list[Fee]) -> int:
    """Insert with status N, skipping tickets already present; return the rows inserted."""
    p = db.placeholder
    verb = "INSERT" if db.dialect == "mysql" else "INSERT OR IGNORE"
    on_duplicate = " ON DUPLICATE KEY UPDATE ticket = ticket" if db.dialect == "mysql" else ""
    inserted = 0
    for chunk in _chunks(fees):
        rows = ", ".join([f"({p}, {p}, {p}, 'N')"] * len(chunk))
        params: list[Any] = []
        for fee in chunk:
            params += [fee.ticket, fee.login, _volume_param(db, fee.volume)]
        cur.execute(
            f"{verb} INTO {quote(db, table)} (ticket, login, volume, status) VALUES {rows}{on_duplicate}",
            params,
        )
        inserted += max(cur.rowcount, 0)
    return inserted


def _finish(db: Database, cur: Any, table: str, fees: list[Fee], process: Process) -> None:
    """The processing step, then status Y."""
    process(cur, fees)
    for chunk in _chunks([fee.ticket for fee in fees]):
        marks = _marks(db.placeholder, len(chunk))
        sql = f"UPDATE {quote(db, table)} SET status = 'Y' WHERE status = 'N' AND ticket IN ({marks})"  # noqa: S608
        cur.execute(sql, chunk)


def _existing(db: Database, cur: Any, table: str, tickets: list[int]) -> dict[int, Fee]:
    found: dict[int, Fee] = {}
    for chunk in _chunks(tickets):
        marks = _marks(db.placeholder, len(chunk))
        cur.execute(f"SELECT ticket, login, volume FROM {quote(db, table)} WHERE ticket IN ({marks})", chunk)  # noqa: S608
        for ticket, login, volume in cur.fetchall():
            found[int(ticket)] = Fee(int(ticket), int(login), Decimal(str(volume)))
    return found


def _same(a: Fee, b: Fee) -> bool:
    return a.login == b.login and a.volume == b.volume


def _volume_param(db: Database, volume: Decimal) -> object:
    # sqlite3 has no Decimal adapter; text keeps all 20 digits where a float would not.
    return volume if db.dialect == "mysql" else f"{volume:f}"


def _marks(placeholder: str, n: int) -> str:
    return ", ".join([placeholder] * n)


def _chunks(items: list[Any]) -> Iterator[list[Any]]:
    for start in range(0, len(items), CHUNK):
        yield items[start : start + CHUNK]
