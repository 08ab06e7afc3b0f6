"""The one database pool every plugin shares.

MySQL/MariaDB goes through DBUtils ``PooledDB`` over PyMySQL; ``sqlite:///path`` through a
small pool of stdlib ``sqlite3`` connections in WAL mode. Either way no more than
``database.pool_size`` connections are ever open: a caller that finds them all in use waits.
Driver exceptions are translated into ``DatabaseError`` where they leave this module, with
any password masked.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from edm.broker import mask_text
from edm.config import DatabaseConfig
from edm.errors import DatabaseError, DatabaseUnavailable

Dialect = Literal["mysql", "sqlite"]

CONNECT_TIMEOUT = 5  # seconds; a database that does not answer must not stall a reply for long
IO_TIMEOUT = 30


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
        raise DatabaseError(f"invalid database URL {mask_text(url)}") from None
    if parts.scheme == "sqlite":
        path = unquote(parts.path)
        if parts.netloc or not path or path == "/":
            raise DatabaseError(f"{mask_text(url)} must look like sqlite:///path/to/file.db")
        return DatabaseUrl("sqlite", path=Path(path))
    if parts.scheme == "mysql":
        database = unquote(parts.path.strip("/"))
        if not parts.hostname or not database:
            raise DatabaseError(f"{mask_text(url)} must look like mysql://user:pass@host:3306/db")
        return DatabaseUrl(
            "mysql",
            host=parts.hostname,
            port=port or 3306,
            user=unquote(parts.username or ""),
            password=unquote(parts.password or ""),
            database=database,
        )
    raise DatabaseError(f"{mask_text(url)} must start with mysql:// or sqlite:///")


class Database:
    """A bounded pool of DB-API connections; use ``connection()`` or ``transaction()``."""

    dialect: Dialect

    def __init__(self, url: DatabaseUrl, pool_size: int, masked_url: str) -> None:
        self.dialect = url.dialect
        self.pool_size = pool_size
        self.url = masked_url
        self._secrets = (url.password,) if url.password else ()
        self._backend: _Backend
        if url.dialect == "mysql":
            self._backend = _MysqlBackend(url, pool_size)
        else:
            assert url.path is not None
            self._backend = _SqliteBackend(url.path, pool_size)

    @classmethod
    def open(cls, cfg: DatabaseConfig) -> Database:
        """Build the pool; no connection is made until one is needed."""
        if cfg.url is None:
            raise DatabaseError("database.url: not set")
        return cls(parse_url(cfg.url), cfg.pool_size, mask_text(cfg.url))

    @property
    def placeholder(self) -> str:
        """The parameter marker of this dialect's driver (paramstyle)."""
        return "%s" if self.dialect == "mysql" else "?"

    @contextmanager
    def connection(self) -> Iterator[Any]:
        """A pooled DB-API connection, rolled back and returned to the pool on exit."""
        with self._checkout() as (con, _):
            yield con

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """A cursor inside an explicit transaction: committed on success, rolled back on error.

        The transaction is begun explicitly so the pool never silently reconnects and
        re-runs a later statement on a fresh connection after an earlier one was lost.
        """
        with self._checkout() as (con, clean), self._translated():
            self._backend.begin(con)
            cursor = con.cursor()
            try:
                yield cursor
                con.commit()
                clean.append(True)  # committed: no rollback round trip on the way back
            finally:
                with suppress(Exception):  # a dead connection cannot close its cursor
                    cursor.close()

    @contextmanager
    def _checkout(self) -> Iterator[tuple[Any, list[bool]]]:
        with self._translated():
            con = self._backend.acquire()
        clean: list[bool] = []
        try:
            with self._translated():
                yield con, clean
        finally:
            self._backend.release(con, rollback=not clean)

    def close(self) -> None:
        """Close the idle connections; the pool cannot be used afterwards."""
        self._backend.close()

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


class _Backend:
    unavailable: tuple[type[BaseException], ...] = ()
    errors: tuple[type[BaseException], ...] = ()

    def acquire(self) -> Any:
        raise NotImplementedError

    def release(self, con: Any, rollback: bool) -> None:
        raise NotImplementedError

    def begin(self, con: Any) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _MysqlBackend(_Backend):
    def __init__(self, url: DatabaseUrl, pool_size: int) -> None:
        import pymysql
        from dbutils.pooled_db import PooledDB

        self.unavailable = (pymysql.err.OperationalError, pymysql.err.InterfaceError)
        self.errors = (pymysql.err.Error,)
        self._pool = PooledDB(
            creator=pymysql,
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
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=IO_TIMEOUT,
            write_timeout=IO_TIMEOUT,
        )

    def acquire(self) -> Any:
        return self._pool.connection(shareable=False)

    def release(self, con: Any, rollback: bool) -> None:
        with suppress(Exception):  # a broken connection is dropped by the pool anyway
            if rollback:
                con.rollback()
            con.close()  # returns it to the pool

    def begin(self, con: Any) -> None:
        con.begin()

    def close(self) -> None:
        self._pool.close()


class _SqliteBackend(_Backend):
    unavailable = (sqlite3.OperationalError,)
    errors = (sqlite3.Error,)

    def __init__(self, path: Path, pool_size: int) -> None:
        self._path = path
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
        con = sqlite3.connect(self._path, timeout=IO_TIMEOUT, isolation_level=None, check_same_thread=False)
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

    def begin(self, con: sqlite3.Connection) -> None:
        con.execute("BEGIN IMMEDIATE")

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return
