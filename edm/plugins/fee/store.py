"""SQL for the fee table: create it if missing, store a batch of fees in one transaction.

Every function takes the pool or a Session of it. Statements are built from the table
name, which config restricts to [A-Za-z0-9_], and placeholders for every value, but for
one exception: MySQL batch statements carry the fees' numbers written into the SQL (see
``_numbers``), because PyMySQL would only do the same, at a cost of several microseconds
per value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from edm.db import Pending, Transactions
from edm.errors import DuplicateKey
from edm.plugins.fee.parse import Fee

# Rows per statement: well under sqlite's bound-parameter limit and MySQL's packet size.
CHUNK = 500

Process = Callable[[Any, Sequence[Fee]], None]


@dataclass
class Stored:
    inserted: int = 0
    duplicates: int = 0
    # (the repeat, the values the table keeps) for repeats whose values differ
    conflicts: list[tuple[Fee, Fee]] = field(default_factory=list)


def quote(db: Transactions, table: str) -> str:
    """The table name quoted for the dialect; config already restricts it to [A-Za-z0-9_]."""
    return f"`{table}`" if db.dialect == "mysql" else f'"{table}"'


def create_table(db: Transactions, table: str) -> None:
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


def store(db: Transactions, table: str, fees: Sequence[Fee], process: Process | None) -> Stored:
    """Insert the new tickets (status N), process them, mark them Y, commit: all or nothing.

    A ticket already in the table, or earlier in the same batch, is a duplicate: no second
    row, the first values stay. Raises DatabaseError (nothing committed) on any failure.
    Without a processing step (``process`` None) a batch of new tickets is one round trip.
    """
    return finish(db, table, fees, process, send(db, table, fees, process))


def send(db: Transactions, table: str, fees: Sequence[Fee], process: Process | None) -> Pending | None:
    """``store()``'s first half. Without a processing step the batch's one-round-trip
    transaction is sent (``Transactions.send_atomic``), assuming no ticket is a repeat (the
    common case; only a batch with a repeat pays for the look-up in ``finish()``); with one,
    nothing is sent and ``finish()`` does it all."""
    if process is not None:
        return None
    unique = list(_first_of_each(fees).values())
    return db.send_atomic(
        [*_insert_statements(db, table, unique, "INSERT"), *_finish_statements(db, table, unique)]
    )


def finish(
    db: Transactions, table: str, fees: Sequence[Fee], process: Process | None, pending: Pending | None
) -> Stored:
    """``store()``'s second half: the outcome of what ``send()`` sent (``pending``), or the
    whole transaction when it sent nothing; returns what ``store()`` does."""
    kept = _first_of_each(fees)  # ticket -> the values the table keeps
    unique = list(kept.values())
    try:
        if pending is not None:
            _finish_at_once(pending)
        else:
            with db.transaction() as cur:
                if _insert(db, cur, table, unique) != len(unique):  # a repeat is not counted
                    raise _Repeats
                _finish(db, cur, table, unique, process)
    except _Repeats:
        pass
    else:
        return _tally(fees, kept, len(unique))
    with db.transaction() as cur:
        kept.update(_existing(db, cur, table, list(kept)))
        new = [fee for fee in unique if kept[fee.ticket] is fee]
        if new:
            _insert(db, cur, table, new)
            _finish(db, cur, table, new, process)
    return _tally(fees, kept, len(new))


def _first_of_each(fees: Sequence[Fee]) -> dict[int, Fee]:
    """Each ticket's first fee, in the order of the batch."""
    first: dict[int, Fee] = {}
    for fee in fees:
        first.setdefault(fee.ticket, fee)
    return first


def _tally(fees: Sequence[Fee], kept: dict[int, Fee], inserted: int) -> Stored:
    """Every fee that is not the one kept for its ticket is a duplicate."""
    result = Stored(inserted=inserted)
    for fee in fees:
        first = kept[fee.ticket]
        if first is not fee:
            result.duplicates += 1
            if not _same(fee, first):
                result.conflicts.append((fee, first))
    return result


class _Repeats(Exception):
    """Rolls back the fast path of a batch holding a ticket the table already has."""


def _finish_at_once(pending: Pending) -> None:
    """The outcome of the insert, mark-Y and commit sent in one round trip; _Repeats when a
    ticket is already there.

    The INSERT has no IGNORE: a ticket the table holds fails it with a duplicate key (MySQL's
    error 1062, sqlite's UNIQUE constraint), which stops the packet before the COMMIT. Any
    other failure is raised as it is: it is no repeat, and the careful path would only meet
    it again.
    """
    try:
        pending.finish()
    except DuplicateKey:
        raise _Repeats from None


def _insert(db: Transactions, cur: Any, table: str, fees: list[Fee]) -> int:
    """Insert with status N, skipping tickets already present; return the rows inserted."""
    inserted = 0
    for sql, params in _insert_statements(db, table, fees, "INSERT OR IGNORE"):
        cur.execute(sql, params or None)
        inserted += max(cur.rowcount, 0)
    return inserted


def _insert_statements(
    db: Transactions, table: str, fees: list[Fee], verb: str
) -> Iterator[tuple[str, list[Any]]]:
    """INSERT (status N) statements; ``INSERT OR IGNORE`` skips tickets already present."""
    p = db.placeholder
    suffix = ""
    if verb == "INSERT OR IGNORE" and db.dialect == "mysql":
        verb, suffix = "INSERT", " ON DUPLICATE KEY UPDATE ticket = ticket"
    for chunk in _chunks(fees):
        params: list[Any] = []
        if db.dialect == "mysql":
            rows = ", ".join([f"({_numbers(fee.ticket, fee.login)}, {fee.volume:f}, 'N')" for fee in chunk])
        else:
            rows = ", ".join([f"({p}, {p}, {p}, 'N')"] * len(chunk))
            for fee in chunk:
                params += [fee.ticket, fee.login, _volume_param(db, fee.volume)]
        yield f"{verb} INTO {quote(db, table)} (ticket, login, volume, status) VALUES {rows}{suffix}", params


def _finish(db: Transactions, cur: Any, table: str, fees: list[Fee], process: Process | None) -> None:
    """The processing step, then status Y."""
    if process is not None:
        process(cur, fees)
    for sql, params in _finish_statements(db, table, fees):
        cur.execute(sql, params or None)


def _finish_statements(db: Transactions, table: str, fees: list[Fee]) -> Iterator[tuple[str, list[Any]]]:
    for chunk in _chunks([fee.ticket for fee in fees]):
        if db.dialect == "mysql":
            marks, params = _numbers(*chunk), []
        else:
            marks, params = _marks(db.placeholder, len(chunk)), chunk
        yield f"UPDATE {quote(db, table)} SET status = 'Y' WHERE status = 'N' AND ticket IN ({marks})", params  # noqa: S608


def _existing(db: Transactions, cur: Any, table: str, tickets: list[int]) -> dict[int, Fee]:
    found: dict[int, Fee] = {}
    for chunk in _chunks(tickets):
        marks = _marks(db.placeholder, len(chunk))
        cur.execute(f"SELECT ticket, login, volume FROM {quote(db, table)} WHERE ticket IN ({marks})", chunk)  # noqa: S608
        for ticket, login, volume in cur.fetchall():
            found[int(ticket)] = Fee(int(ticket), int(login), Decimal(str(volume)))
    return found


def _same(a: Fee, b: Fee) -> bool:
    return a.login == b.login and a.volume == b.volume


def _volume_param(db: Transactions, volume: Decimal) -> object:
    # sqlite3 has no Decimal adapter; text keeps all 20 digits where a float would not.
    return volume if db.dialect == "mysql" else f"{volume:f}"


def _numbers(*values: int) -> str:
    """Integers as SQL literals, comma-separated. ``int()`` renders an int as digits and a
    sign only, which is all PyMySQL's escaping of an int does; a Decimal volume goes in with
    format ``f`` (digits, sign and point), as PyMySQL's ``str()`` of it would."""
    return ", ".join([str(int(value)) for value in values])


def _marks(placeholder: str, n: int) -> str:
    return ", ".join([placeholder] * n)


def _chunks(items: list[Any]) -> Iterator[list[Any]]:
    for start in range(0, len(items), CHUNK):
        yield items[start : start + CHUNK]
