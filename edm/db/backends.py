"""The two kinds of connection pool behind ``Database``: MySQL/MariaDB and sqlite.

MySQL/MariaDB goes through DBUtils ``PooledDB`` over PyMySQL; ``sqlite:///path`` through a
small pool of stdlib ``sqlite3`` connections in WAL mode. Either way no more than
``database.pool_size`` connections are ever open: a caller that finds them all in use waits.

MySQL connections run at READ COMMITTED: with REPEATABLE READ an ``UPDATE … WHERE key IN
(…)`` that the optimizer runs as a scan (it does on a small table) locks every row it
passes, so concurrent writers of disjoint rows deadlock. They also allow multi-statement
packets, so that ``atomic()`` can send a whole transaction in one round trip.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import ssl
import threading
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pymysql
from dbutils.pooled_db import PooledDB
from pymysql.constants import CLIENT, ER

from edm.db import _pymysql_private as private
from edm.dburl import DatabaseUrl

if TYPE_CHECKING:
    from edm.config import DatabaseTls

log = logging.getLogger(__name__)

_CR_SSL_CONNECTION_ERROR = 2026  # pymysql.constants.CR.CR_SSL_CONNECTION_ERROR
# sqlite's extended result codes of a second row with the same key (sqlite3.IntegrityError)
_SQLITE_DUPLICATE = frozenset({1555, 2067})  # SQLITE_CONSTRAINT_PRIMARYKEY, SQLITE_CONSTRAINT_UNIQUE


class Backend:
    """What ``Database`` needs of a kind of pool; ``unavailable`` and ``errors`` are the driver
    exceptions it translates into DatabaseUnavailable and DatabaseError."""

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

    def driver(self, con: Any) -> pymysql.connections.Connection | None:
        """The driver's own connection under a pooled one, when send_atomic() can split a
        round trip on it; else None."""
        return None

    def duplicate(self, exc: BaseException) -> bool:
        """Whether a driver error says a statement would have made a second row with the same
        primary or unique key, and nothing else."""
        return False

    def close(self) -> None:
        raise NotImplementedError


class MysqlBackend(Backend):
    """DBUtils' PooledDB over PyMySQL, at READ COMMITTED, with multi-statement packets."""

    def __init__(self, url: DatabaseUrl, pool_size: int, timeout: float, tls: DatabaseTls | None) -> None:
        self.unavailable = (pymysql.err.OperationalError, pymysql.err.InterfaceError)
        self.errors = (pymysql.err.Error, TlsRefused)
        creator: Any = _PyMySQL()
        secure: dict[str, Any] = {}
        self._tls = tls is not None and tls.enabled
        if tls is not None and tls.enabled:
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

    def driver(self, con: Any) -> pymysql.connections.Connection | None:
        return private.driver(con)

    def duplicate(self, exc: BaseException) -> bool:
        return isinstance(exc, pymysql.err.IntegrityError) and bool(exc.args) and exc.args[0] == ER.DUP_ENTRY

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
                private.force_close(driver)
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
    answer and the reconnect that follows it then cost database.timeout together, not each
    (``edm.db._pymysql_private.bounded_connection``)."""

    threadsafety = 1

    def __init__(self) -> None:
        self.dbapi = self
        self.Error = pymysql.err.Error
        self.OperationalError = pymysql.err.OperationalError
        self.InterfaceError = pymysql.err.InterfaceError
        self.InternalError = pymysql.err.InternalError
        self.connect = private.bounded_connection()


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


class SqliteBackend(Backend):
    """A few stdlib sqlite3 connections to one file, in WAL mode."""

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

    def duplicate(self, exc: BaseException) -> bool:
        if not isinstance(exc, sqlite3.IntegrityError):
            return False
        code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
        if code is not None:
            return code in _SQLITE_DUPLICATE
        return str(exc).startswith("UNIQUE constraint failed")

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
