"""The one database pool every plugin shares: ``Database``, and ``Session`` for a series of
transactions on one of its connections.

Driver exceptions are translated into ``DatabaseError`` where they leave this package, with
any password masked: ``DatabaseUnavailable`` for a database that cannot be reached,
``DuplicateKey`` for a second row with the same unique key (MySQL's error 1062, sqlite's
UNIQUE constraint), ``DatabaseError`` for anything else.

``atomic()`` sends a whole transaction in one MySQL multi-statement packet. Every value is a
bound parameter escaped by the driver (or, in the fee store, a number rendered by ``int()``
or ``Decimal``), so a value can never end one statement and start another. MariaDB gets that
packet as one anonymous compound statement (``BEGIN NOT ATOMIC … END``) and so answers it
with one result instead of one per statement: PyMySQL wakes up once per transaction instead
of four times (the fee batch's client CPU went from about 280 to 125 µs, its round trip from
770 to 680 µs). MySQL, which has no such statement, gets the plain packet.

``Session.send_atomic()`` splits that round trip in two: it sends the packet and returns a
Pending whose ``fileno()`` turns readable when the outcome has arrived, so that one thread can
keep a transaction in flight on each of several sessions (the fee receiver does). It needs
PyMySQL's two halves of ``Connection.query()`` (``edm.db._pymysql_private``); where they are
not there, or the server would answer with one result per statement, it is plain ``atomic()``.

``database.timeout`` bounds every wait on the database: connecting, each read and write, and
a transaction in flight. Where several waits follow one another — the pool's liveness ping,
its reconnect, the transaction — they share one deadline (``bounded()``), so that a database
that stops answering (a partition that drops packets, a stalled server) costs a caller that
long once, not once per wait. A transaction in flight that gets no answer by its deadline is
given up: its connection is closed, never used again (the pool makes a new one), and the
Pending raises DatabaseUnavailable. The server may still commit it; the caller must be able
to take that (the fee table's ticket is its primary key).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from typing import TYPE_CHECKING, Any

from edm.db import _pymysql_private as private
from edm.db.backends import Backend, MysqlBackend, SqliteBackend
from edm.db.deadline import readable, until
from edm.dburl import DatabaseUrl, Dialect, parse_url
from edm.errors import DatabaseError, DatabaseUnavailable, DuplicateKey
from edm.redact import mask_text, mask_url

if TYPE_CHECKING:
    import pymysql

    from edm.config import DatabaseConfig, DatabaseTls

DEFAULT_TIMEOUT = 5.0  # seconds; database.timeout's default (edm.config.DatabaseConfig)

Statements = Sequence[tuple[str, Sequence[Any]]]


class Transactions:
    """``connection()``, ``transaction()`` and ``atomic()`` over what ``_checkout()`` hands out."""

    dialect: Dialect

    timeout: float  # database.timeout

    @property
    def placeholder(self) -> str:
        """The parameter marker of this dialect's driver (paramstyle)."""
        return "%s" if self.dialect == "mysql" else "?"

    def bounded(self) -> AbstractContextManager[float]:
        """A scope in which every wait on the database, together, ends within database.timeout
        from now (or by an enclosing scope's deadline, if sooner); yields the deadline."""
        return until(time.monotonic() + self.timeout)

    @contextmanager
    def connection(self) -> Iterator[Any]:
        """A pooled DB-API connection, rolled back on exit."""
        with self._checkout() as (con, _):
            yield con

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """A cursor inside an explicit transaction: committed on success, rolled back on error.

        The transaction is begun explicitly so the pool never silently reconnects and
        re-runs a later statement on a fresh connection after an earlier one was lost.
        """
        with self._checkout() as (con, clean):
            self._begin(con)
            cursor = con.cursor()
            try:
                yield cursor
                con.commit()
                clean.append(True)  # committed: no rollback round trip on the way back
            finally:
                with suppress(Exception):  # a dead connection cannot close its cursor
                    cursor.close()

    def atomic(self, statements: Statements) -> None:
        """Run the statements as one transaction, all or nothing; raise DatabaseError on failure.

        MySQL gets them between START TRANSACTION and COMMIT in one packet: one round trip,
        and the server stops at the first failing statement, so nothing after it (the
        COMMIT included) runs. A lost connection may make the pool resend the packet on a
        fresh one, which is safe because the packet is the whole transaction. sqlite runs
        them in ``transaction()``.
        """
        if self.dialect != "mysql":
            with self.transaction() as cur:
                for sql, params in statements:
                    cur.execute(sql, params)
            return
        with self.bounded(), self._checkout() as (con, clean):
            sql, params = _packet(statements, self._compound(con))
            cursor = con.cursor()
            try:
                cursor.execute(sql, params or None)  # None: no % formatting of the SQL
                while cursor.nextset():  # a failing statement raises here; the COMMIT's OK ends it
                    pass
                clean.append(True)
            finally:
                with suppress(Exception):
                    cursor.close()

    def send_atomic(self, statements: Statements) -> Pending:
        """``atomic()`` in two halves: send the transaction now, learn its outcome from the
        returned Pending's ``finish()``. Here both happen at once; a Session of a MariaDB
        pool really leaves the transaction in flight (see ``Session.send_atomic``)."""
        try:
            self.atomic(statements)
        except DatabaseError as exc:
            return Pending(error=exc)
        return Pending()

    def _checkout(self) -> AbstractContextManager[tuple[Any, list[bool]]]:
        """A connection and a list to append True to once it needs no rollback; errors translated."""
        raise NotImplementedError

    def _compound(self, con: Any) -> bool:
        """Whether the server runs ``BEGIN NOT ATOMIC … END`` (MariaDB does, MySQL does not)."""
        raise NotImplementedError

    def _begin(self, con: Any) -> None:
        raise NotImplementedError


class Pending:
    """A transaction sent by ``send_atomic()``: ``finish()`` returns once it has committed and
    raises DatabaseError when it did not. ``fileno()`` is the socket that turns readable when
    the outcome has arrived, or -1 when it is known already (``finish()`` does not wait then).
    ``deadline`` (time.monotonic()) is when ``finish()`` gives the transaction up.
    """

    def __init__(
        self,
        error: DatabaseError | None = None,
        session: Session | None = None,
        driver: pymysql.connections.Connection | None = None,
        deadline: float = math.inf,
    ) -> None:
        self._error = error
        self._session = session  # with a driver: the session it is in flight on
        self._driver = driver
        self._fd = -1 if driver is None else private.socket_fd(driver)
        self.deadline = deadline

    def fileno(self) -> int:
        return self._fd

    def finish(self) -> None:
        """Wait for the outcome until the deadline at most; past it, give the transaction up."""
        session, driver = self._session, self._driver
        if session is not None and driver is not None and session.in_flight is self:
            session.in_flight = None
            self._error = session._outcome(driver, self._fd, self.deadline)
        if self._error is not None:
            raise self._error  # the outcome, as often as asked


def _packet(statements: Statements, compound: bool) -> tuple[str, list[Any]]:
    """The statements as one multi-statement transaction (a MariaDB compound statement with
    ``compound``), and their parameters in order."""
    sql = "; ".join(["START TRANSACTION", *(sql for sql, _ in statements), "COMMIT"])
    if compound:
        sql = f"BEGIN NOT ATOMIC {sql}; END"
    return sql, [param for _, values in statements for param in values]


class Database(Transactions):
    """A bounded pool of DB-API connections; use ``connection()``, ``transaction()``,
    ``atomic()``, or ``session()`` for a series of them on one connection."""

    def __init__(
        self,
        url: DatabaseUrl,
        pool_size: int,
        masked_url: str,
        timeout: float = DEFAULT_TIMEOUT,
        tls: DatabaseTls | None = None,
    ) -> None:
        self.dialect = url.dialect
        self.pool_size = pool_size
        self.timeout = timeout
        self.url = masked_url
        self._secrets = (url.password,) if url.password else ()
        self._backend: Backend
        if url.dialect == "mysql":
            self._backend = MysqlBackend(url, pool_size, timeout, tls)
        else:
            assert url.path is not None
            self._backend = SqliteBackend(url.path, pool_size, timeout)

    @classmethod
    def open(cls, cfg: DatabaseConfig) -> Database:
        """Build the pool; no connection is made until one is needed."""
        if cfg.url is None:
            raise DatabaseError("database.url: not set")
        return cls(parse_url(cfg.url), cfg.pool_size, mask_url(cfg.url), cfg.timeout, cfg.tls)

    def session(self) -> Session:
        """A Session: one pooled connection kept for a series of transactions until closed."""
        return Session(self)

    def close(self) -> None:
        """Close the idle connections; the pool cannot be used afterwards."""
        self._backend.close()

    @contextmanager
    def _checkout(self) -> Iterator[tuple[Any, list[bool]]]:
        with self.bounded(), self._translated():  # the pool's ping, and its reconnect if that fails
            con = self._backend.acquire()
        clean: list[bool] = []
        try:
            with self._translated():
                yield con, clean
        finally:
            self._backend.release(con, rollback=not clean)

    def _begin(self, con: Any) -> None:
        self._backend.begin(con)

    def _compound(self, con: Any) -> bool:
        return self._backend.compound(con)

    @contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except self._backend.unavailable as exc:
            raise DatabaseUnavailable(self._describe(exc)) from None
        except self._backend.errors as exc:
            error = DuplicateKey if self._backend.duplicate(exc) else DatabaseError
            raise error(self._describe(exc)) from None

    def _describe(self, exc: BaseException) -> str:
        text = mask_text(str(exc) or type(exc).__name__, self._secrets)
        return f"database {self.url}: {text}"

    def _describe_silence(self) -> str:
        return f"database {self.url}: no answer within {self.timeout:g} s (database.timeout)"


class Session(Transactions):
    """One pooled connection kept for a series of transactions, so that each skips the
    pool's check-out and its liveness check (a round trip). It counts against the pool
    until closed. After a lost connection the session gives it back and checks out (and
    so checks) a fresh one for its next transaction."""

    def __init__(self, db: Database) -> None:
        self.dialect = db.dialect
        self.timeout = db.timeout
        self._db = db
        self._con: Any = None
        self.in_flight: Pending | None = None  # sent by send_atomic(), not finished yet

    def send_atomic(self, statements: Statements) -> Pending:
        """Send ``atomic()``'s one-packet transaction and return without waiting for it.

        Only where the server answers the packet with one result (MariaDB's compound
        statement) does the transaction stay in flight; anywhere else this is ``atomic()``.
        Until the Pending is finished the session's connection is busy: the session takes no
        other work, and ``close()`` waits for the outcome first.
        """
        if self.in_flight is not None:
            raise RuntimeError("the session has a transaction in flight")
        if self.dialect != "mysql":
            return super().send_atomic(statements)
        try:
            with self.bounded() as deadline, self._checkout() as (con, clean):
                driver = self._db._backend.driver(con)
                if driver is not None and self._compound(con):
                    sql, params = _packet(statements, compound=True)
                    if params:
                        sql = driver.cursor().mogrify(sql, params)
                    private.send_query(driver, sql)
                else:
                    driver = None
                clean.append(True)  # sent whole (or nothing): finish() rolls back if it fails
        except DatabaseError as exc:
            return Pending(error=exc)
        if driver is None:
            return super().send_atomic(statements)
        self.in_flight = Pending(session=self, driver=driver, deadline=deadline)
        return self.in_flight

    def _outcome(
        self, driver: pymysql.connections.Connection, fd: int, deadline: float
    ) -> DatabaseError | None:
        """Read the outcome of the transaction in flight on ``driver`` (by ``deadline`` at
        most: past it, the transaction is given up and its connection closed)."""
        if not readable(fd, deadline):
            self._abandon()
            return DatabaseUnavailable(self._db._describe_silence())
        try:
            with until(deadline), self._checkout() as (_, clean):
                private.read_results(driver)  # a failing statement raises here
                clean.append(True)
        except DatabaseError as exc:
            return exc
        return None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Give the connection back to the pool; the next transaction checks one out again."""
        if self.in_flight is not None:
            with suppress(DatabaseError):
                self.in_flight.finish()
        con, self._con = self._con, None
        if con is not None:
            self._db._backend.release(con, rollback=False)

    def _abandon(self) -> None:
        """Drop the connection (a transaction on it got no answer in time): closed, so that a
        late answer is never read and the connection never used again."""
        con, self._con = self._con, None
        if con is not None:
            self._db._backend.discard(con)

    @contextmanager
    def _checkout(self) -> Iterator[tuple[Any, list[bool]]]:
        if self._con is None:
            with self.bounded(), self._db._translated():  # the pool's ping, and its reconnect
                self._con = self._db._backend.acquire()
        con, clean = self._con, list[bool]()
        try:
            with self._db._translated():
                yield con, clean
        except DatabaseUnavailable:
            self._con = None
            self._db._backend.release(con, rollback=True)
            raise
        finally:
            if not clean and self._con is not None:
                try:
                    with self._db._translated():
                        self._db._backend.rollback(con)
                except DatabaseError:
                    self._con = None
                    self._db._backend.release(con, rollback=False)

    def _begin(self, con: Any) -> None:
        self._db._backend.begin(con)

    def _compound(self, con: Any) -> bool:
        return self._db._backend.compound(con)
