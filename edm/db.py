"""The one database pool every plugin shares.

MySQL/MariaDB goes through DBUtils ``PooledDB`` over PyMySQL; ``sqlite:///path`` through a
small pool of stdlib ``sqlite3`` connections in WAL mode. Either way no more than
``database.pool_size`` connections are ever open: a caller that finds them all in use waits.
Driver exceptions are translated into ``DatabaseError`` where they leave this module, with
any password masked.

MySQL connections run at READ COMMITTED: with REPEATABLE READ an ``UPDATE … WHERE key IN
(…)`` that the optimizer runs as a scan (it does on a small table) locks every row it
passes, so concurrent writers of disjoint rows deadlock.

MySQL connections also allow multi-statement packets so that ``atomic()`` can send a whole
transaction in one round trip. Every value is a bound parameter escaped by the driver (or,
in fee_store, a number rendered by ``int()`` or ``Decimal``), so a value can never end one
statement and start another. MariaDB gets that packet as one anonymous compound statement
(``BEGIN NOT ATOMIC … END``) and so answers it with one result instead of one per
statement: PyMySQL wakes up once per transaction instead of four times (the fee batch's
client CPU went from about 280 to 125 µs, its round trip from 770 to 680 µs). MySQL, which
has no such statement, gets the plain packet.

``Session.send_atomic()`` splits that round trip in two: it sends the packet and returns a
Pending whose ``fileno()`` turns readable when the outcome has arrived, so that one thread can
keep a transaction in flight on each of several sessions (the fee receiver does). It uses
PyMySQL's own two halves of ``Connection.query()`` (``_execute_command`` and
``_read_query_result``), reached through DBUtils' wrappers; where they are not there, or the
server would answer with one result per statement, it is plain ``atomic()``.

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

import logging
import math
import queue
import select
import sqlite3
import ssl
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from edm.config import DatabaseConfig, DatabaseTls
from edm.errors import DatabaseError, DatabaseUnavailable
from edm.redact import mask_text, mask_url

log = logging.getLogger(__name__)

Dialect = Literal["mysql", "sqlite"]

_COM_QUERY = 3  # pymysql.constants.COMMAND.COM_QUERY: a text query
_MIN_WAIT = 0.001  # seconds; what a wait gets past its deadline (0 would make a socket non-blocking)

# The deadline (time.monotonic()) of the current bounded() scope; None outside one.
_DEADLINE: ContextVar[float | None] = ContextVar("edm_db_deadline", default=None)


@contextmanager
def _until(at: float) -> Iterator[float]:
    """A scope whose waits on the database all end by ``at``, or by an enclosing scope's
    deadline when that comes first; yields the deadline in force."""
    outer = _DEADLINE.get()
    if outer is not None and outer < at:
        at = outer
    token = _DEADLINE.set(at)
    try:
        yield at
    finally:
        _DEADLINE.reset(token)


def _wait_limit(timeout: float | None) -> float | None:
    """A socket timeout of ``timeout`` seconds, cut to what the current scope has left."""
    at = _DEADLINE.get()
    if at is None:
        return timeout
    left = max(at - time.monotonic(), _MIN_WAIT)
    return left if timeout is None or left < timeout else timeout


@dataclass(frozen=True)
class DatabaseUrl:
    """A parsed ``database.url``; ``password`` is never part of repr() or messages."""

    dialect: Dialect
    host: str = ""
    port: int = 3306
    user: str = ""
    password: str = ""
    database: str = ""
    path: Path | None = None

    def __repr__(self) -> str:
        where = self.path if self.dialect == "sqlite" else f"{self.user}@{self.host}:{self.port}"
        return f"DatabaseUrl({self.dialect}, {where}/{self.database})"


def parse_url(url: str) -> DatabaseUrl:
    """Split a mysql:// or sqlite:/// URL; user and password are percent-decoded."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise DatabaseError(f"invalid database URL {mask_url(url)}") from None
    if parts.scheme == "sqlite":
        path = unquote(parts.path)
        if parts.netloc or not path or path == "/":
            raise DatabaseError(f"{mask_url(url)} must look like sqlite:///path/to/file.db")
        return DatabaseUrl("sqlite", path=Path(path))
    if parts.scheme == "mysql":
        database = unquote(parts.path.strip("/"))
        if not parts.hostname or not database:
            raise DatabaseError(f"{mask_url(url)} must look like mysql://user:pass@host:3306/db")
        return DatabaseUrl(
            "mysql",
            host=parts.hostname,
            port=port or 3306,
            user=unquote(parts.username or ""),
            password=unquote(parts.password or ""),
            database=database,
        )
    raise DatabaseError(f"{mask_url(url)} must start with mysql:// or sqlite:///")


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
        return _until(time.monotonic() + self.timeout)

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

    def atomic(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
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
        sql, params = _packet(statements)
        with self.bounded(), self._checkout() as (con, clean):
            if self._compound(con):
                sql = f"BEGIN NOT ATOMIC {sql}; END"
            cursor = con.cursor()
            try:
                cursor.execute(sql, params or None)  # None: no % formatting of the SQL
                while cursor.nextset():  # a failing statement raises here; the COMMIT's OK ends it
                    pass
                clean.append(True)
            finally:
                with suppress(Exception):
                    cursor.close()

    def send_atomic(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> Pending:
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

    deadline = math.inf

    def __init__(self, error: DatabaseError | None = None) -> None:
        self._error = error

    def fileno(self) -> int:
        return -1

    def finish(self) -> None:
        if self._error is not None:
            raise self._error


class _InFlight(Pending):
    """A transaction a Session sent and has not read the outcome of."""

    def __init__(self, session: Session, driver: Any, deadline: float) -> None:
        super().__init__()
        self._session = session
        self._driver = driver
        self._fd: int = driver._sock.fileno()
        self.deadline = deadline

    def fileno(self) -> int:
        return self._fd

    def finish(self) -> None:
        """Wait for the outcome until the deadline at most; past it, give the transaction up."""
        session, driver = self._session, self._driver
        if session.in_flight is self:
            session.in_flight = None
            if not _readable(self._fd, self.deadline):
                session._abandon()
                self._error = DatabaseUnavailable(session._db._describe_silence())
            else:
                try:
                    with _until(self.deadline), session._checkout() as (_, clean):
                        driver._read_query_result()  # a failing statement raises here
                        while driver._result is not None and driver._result.has_next:
                            driver.next_result()
                        clean.append(True)
                except DatabaseError as exc:
                    self._error = exc
        super().finish()  # the outcome, as often as asked


def _readable(fd: int, deadline: float) -> bool:
    """Whether ``fd`` turns readable (an answer, or the connection's end) by ``deadline``."""
    poller = select.poll()  # not select(): a daemon's descriptors may pass FD_SETSIZE
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(math.ceil((deadline - time.monotonic()) * 1000), 0)))


def _packet(statements: Sequence[tuple[str, Sequence[Any]]]) -> tuple[str, list[Any]]:
    """The statements as one multi-statement transaction, and their parameters in order."""
    sql = "; ".join(["START TRANSACTION", *(sql for sql, _ in statements), "COMMIT"])
    return sql, [param for _, values in statements for param in values]


class Database(Transactions):
    """A bounded pool of DB-API connections; use ``connection()``, ``transaction()``,
    ``atomic()``, or ``session()`` for a series of them on one connection."""

    def __init__(
        self,
        url: DatabaseUrl,
        pool_size: int,
        masked_url: str,
        timeout: float = DatabaseConfig.timeout,
        tls: DatabaseTls | None = None,
    ) -> None:
        self.dialect = url.dialect
        self.pool_size = pool_size
        self.timeout = timeout
        self.url = masked_url
        self._secrets = (url.password,) if url.password else ()
        self._backend: _Backend
        if url.dialect == "mysql":
            self._backend = _MysqlBackend(url, pool_size, timeout, tls or DatabaseTls())
        else:
            assert url.path is not None
            self._backend = _SqliteBackend(url.path, pool_size, timeout)

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
            raise DatabaseError(self._describe(exc)) from None

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

    def send_atomic(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> Pending:
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
        sql, params = _packet(statements)
        try:
            with self.bounded() as deadline, self._checkout() as (con, clean):
                driver = self._db._backend.driver(con)
                split = driver is not None and self._compound(con)
                if split:
                    sql = f"BEGIN NOT ATOMIC {sql}; END"
                    if params:
                        sql = driver.cursor().mogrify(sql, params)
                    driver._execute_command(_COM_QUERY, sql.encode(driver.encoding))
                clean.append(True)  # sent whole (or nothing): finish() rolls back if it fails
        except DatabaseError as exc:
            return Pending(error=exc)
        if not split:
            return super().send_atomic(statements)
        self.in_flight = _InFlight(self, driver, deadline)
        return self.in_flight

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


class _Backend:
    unavailable: tuple[type[BaseException], ...] = ()
    errors: tuple[type[BaseException], ...] = ()

    def acquire(self) -> Any:
        raise NotImplementedError

    def release(self, con: Any, rollback: bool) -> None:
        raise NotImplementedError

    def discard(self, con: Any) -> None:
        """Close the connection for good and give its place in the pool back."""
        raise NotImplementedError

    def begin(self, con: Any) -> None:
        raise NotImplementedError

    def rollback(self, con: Any) -> None:
        raise NotImplementedError

    def compound(self, con: Any) -> bool:
        return False

    def driver(self, con: Any) -> Any:
        """The driver's own connection under a pooled one, when send_atomic() can split a
        round trip on it; else None."""
        return None

    def close(self) -> None:
        raise NotImplementedError


class _MysqlBackend(_Backend):
    def __init__(self, url: DatabaseUrl, pool_size: int, timeout: float, tls: DatabaseTls) -> None:
        import pymysql
        from dbutils.pooled_db import PooledDB
        from pymysql.constants import CLIENT

        self._driver_class = pymysql.connections.Connection
        self.unavailable = (pymysql.err.OperationalError, pymysql.err.InterfaceError)
        self.errors = (pymysql.err.Error, TlsRefused)
        creator: Any = _PyMySQL(pymysql)
        secure: dict[str, Any] = {}
        self._tls = tls.enabled
        if tls.enabled:
            creator = _TlsConnect(creator)
            secure["ssl"] = tls_context(tls)
            if not tls.verify:
                log.warning(
                    "database.tls.verify is false: the certificate of the database server %s:%d "
                    "is not verified, so anyone on the way can pose as it.",
                    url.host,
                    url.port,
                )
        self._pool = PooledDB(
            creator=creator,
            mincached=0,
            maxcached=pool_size,
            maxshared=0,  # a connection is never shared between threads
            maxconnections=pool_size,
            blocking=True,  # wait for a free connection rather than exceed the size
            ping=1,  # check a connection when it is taken from the pool; reconnect if dead
            reset=False,  # release() rolls back itself, and only when not committed
            host=url.host,
            port=url.port,
            user=url.user,
            password=url.password,
            database=url.database,
            charset="utf8mb4",
            autocommit=False,
            client_flag=CLIENT.MULTI_STATEMENTS,  # atomic(): a transaction in one packet
            init_command="SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
            connect_timeout=timeout,
            read_timeout=timeout,
            write_timeout=timeout,
            **secure,
        )
        self._compound: bool | None = None  # learnt from the first connection's server

    def acquire(self) -> Any:
        con = self._pool.connection(shareable=False)
        driver = self.driver(con)
        if driver is not None and not driver.open:
            # The pool's ping failed and so did its reconnect, which it keeps quiet about: once
            # more, for the error to report (within a bounded() scope that has run out, at once).
            try:
                driver.connect()
                if self._tls:
                    require_tls(driver)
            except BaseException:
                self.release(con, rollback=False)
                raise
        return con

    def driver(self, con: Any) -> Any:
        # DBUtils: PooledDedicatedDBConnection -> SteadyDBConnection -> the PyMySQL one.
        driver = getattr(getattr(con, "_con", None), "_con", None)
        if not isinstance(driver, self._driver_class):
            return None
        halves = ("_execute_command", "_read_query_result", "next_result", "_sock", "_force_close")
        return driver if all(hasattr(driver, name) for name in halves) else None

    def release(self, con: Any, rollback: bool) -> None:
        with suppress(Exception):  # a broken connection is dropped by the pool anyway
            if rollback:
                con.rollback()
            con.close()  # returns it to the pool

    def discard(self, con: Any) -> None:
        # Closing the driver's socket ends the connection; the pool takes its wrapper back and,
        # its liveness ping failing at once, connects afresh when it is next handed out.
        driver = self.driver(con)
        with suppress(Exception):
            if driver is not None:
                driver._force_close()  # no COM_QUIT: a full send buffer would make it wait
        with suppress(Exception):
            con.close()

    def begin(self, con: Any) -> None:
        con.begin()

    def rollback(self, con: Any) -> None:
        con.rollback()

    def compound(self, con: Any) -> bool:
        if self._compound is None:
            cursor = con.cursor()
            try:
                cursor.execute("SELECT VERSION()")
                (version,) = cursor.fetchone()
            finally:
                cursor.close()
            self._compound = "mariadb" in str(version).lower()
        return self._compound

    def close(self) -> None:
        self._pool.close()


class _PyMySQL:
    """PyMySQL as DBUtils sees a DB-API module, but making connections whose socket waits
    also end by the deadline of the current ``bounded()`` scope: a liveness ping that gets no
    answer and the reconnect that follows it then cost database.timeout together, not each."""

    threadsafety = 1

    def __init__(self, pymysql: Any) -> None:
        self.dbapi = self
        self.Error = pymysql.err.Error
        self.OperationalError = pymysql.err.OperationalError
        self.InterfaceError = pymysql.err.InterfaceError
        self.InternalError = pymysql.err.InternalError
        # PyMySQL reads these three attributes before each wait (connect, read, write). A
        # version that did not would still bound each wait by database.timeout alone.
        self.connect = type(
            "BoundedConnection",
            (pymysql.connections.Connection,),
            {"connect_timeout": _Timeout(), "_read_timeout": _Timeout(), "_write_timeout": _Timeout()},
        )


class _Timeout:
    """A connection's timeout attribute: read inside a ``bounded()`` scope, it is cut to what
    the scope has left."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._key = f"_edm{name}"

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return _wait_limit(obj.__dict__.get(self._key))

    def __set__(self, obj: Any, value: float | None) -> None:
        obj.__dict__[self._key] = value


def tls_context(tls: DatabaseTls) -> ssl.SSLContext:
    """The client side of ``database.tls``: the server's certificate and host name are checked
    against ``ca_file`` (else the system's CAs) unless ``verify`` is false."""
    context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.cert_file is not None:
        context.load_cert_chain(tls.cert_file, keyfile=tls.key_file, password="".__str__)
    return context


class TlsRefused(Exception):
    """The database link could not be made secure: no TLS from the server, or a certificate
    that failed verification. Not a sign of a database that is down: a retry cannot help."""


class _TlsConnect:
    """``pymysql.connect`` for ``database.tls``: a session the server did not encrypt is closed
    and refused. PyMySQL before 1.2 quietly goes on in plaintext when the server offers no
    TLS, so the server is asked (``Ssl_cipher``) whatever the driver's version; a handshake
    that fails verification becomes TlsRefused instead of a "cannot connect" that would pass
    for a database that is down."""

    def __init__(self, dbapi: Any) -> None:
        self.dbapi = dbapi
        self.threadsafety = dbapi.threadsafety

    def connect(self, *args: Any, **kwargs: Any) -> Any:
        try:
            con = self.dbapi.connect(*args, **kwargs)
        except self.dbapi.OperationalError as exc:
            cause = getattr(exc, "original_exception", None)
            if isinstance(cause, ssl.SSLError):
                raise TlsRefused(f"TLS handshake failed: {cause}") from None
            if exc.args and exc.args[0] == _CR_SSL_CONNECTION_ERROR:
                raise TlsRefused(f"the server does not offer TLS ({exc.args[-1]})") from None
            raise
        try:
            require_tls(con)
        except BaseException:
            con.close()
            raise
        return con


_CR_SSL_CONNECTION_ERROR = 2026  # pymysql.constants.CR.CR_SSL_CONNECTION_ERROR


def require_tls(con: Any) -> None:
    """Raise TlsRefused unless the server says this session is encrypted."""
    cursor = con.cursor()
    try:
        cursor.execute("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        row = cursor.fetchone()
    finally:
        cursor.close()
    if not row or not row[1]:
        raise TlsRefused("the server did not encrypt the session (database.tls asks for TLS)")


class _SqliteBackend(_Backend):
    unavailable = (sqlite3.OperationalError,)
    errors = (sqlite3.Error,)

    def __init__(self, path: Path, pool_size: int, timeout: float) -> None:
        self._path = path
        self._timeout = timeout
        self._idle: queue.LifoQueue[sqlite3.Connection] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(pool_size)
        self._closed = False

    def acquire(self) -> sqlite3.Connection:
        self._slots.acquire()
        try:
            try:
                return self._idle.get_nowait()
            except queue.Empty:
                return self._connect()
        except BaseException:
            self._slots.release()
            raise

    def _connect(self) -> sqlite3.Connection:
        self._path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions; transaction() begins explicitly.
        timeout = self._timeout  # how long a statement waits for another writer's lock
        con = sqlite3.connect(self._path, timeout=timeout, isolation_level=None, check_same_thread=False)
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")  # a committed fee survives power loss
        except BaseException:
            con.close()
            raise
        return con

    def release(self, con: sqlite3.Connection, rollback: bool) -> None:
        try:
            if con.in_transaction:
                con.rollback()
            if self._closed:
                con.close()
            else:
                self._idle.put(con)
        except sqlite3.Error:
            con.close()
        finally:
            self._slots.release()

    def discard(self, con: sqlite3.Connection) -> None:
        con.close()
        self._slots.release()

    def begin(self, con: sqlite3.Connection) -> None:
        con.execute("BEGIN IMMEDIATE")

    def rollback(self, con: sqlite3.Connection) -> None:
        if con.in_transaction:
            con.rollback()

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return
