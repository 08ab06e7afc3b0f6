"""Every private attribute of PyMySQL and DBUtils edm touches, and the check that they exist.

Two things need them. ``Session.send_atomic()`` leaves a transaction in flight: it sends the
packet with the first half of PyMySQL's ``Connection.query()`` (``_execute_command``) and
reads the outcome later with the second (``_read_query_result``), on the PyMySQL connection
under DBUtils' two wrappers (their ``_con``); the connection's socket says when the outcome
has come, and a connection given up is closed without a goodbye (``_force_close``). And
``bounded_connection()`` makes connections whose socket waits end by the deadline of the
current ``bounded()`` scope: PyMySQL reads ``connect_timeout``, ``_read_timeout`` and
``_write_timeout`` before each wait, and edm puts its own there.

At import ``MISSING`` lists what the installed PyMySQL and DBUtils lack (see
``edm.internals``). ``fast_path()`` is then False and says once, in a WARNING naming what is
missing, that edm takes the plain path: a transaction is sent and awaited in one call (no
second batch in flight on another connection), each wait is bounded by ``database.timeout``
alone, and a connection given up is closed the ordinary way. ``pyproject.toml`` pins the
versions this was checked against.
"""

from __future__ import annotations

import functools
import logging
from importlib.metadata import version
from typing import Any

import pymysql
from dbutils.pooled_db import PooledDedicatedDBConnection
from dbutils.steady_db import SteadyDBConnection
from pymysql.connections import Connection, MySQLResult

from edm.db.deadline import wait_limit
from edm.internals import Private, missing

log = logging.getLogger(__name__)

_COM_QUERY = 3  # pymysql.constants.COMMAND.COM_QUERY: a text query

PRIVATES = (
    # DBUtils: PooledDedicatedDBConnection -> SteadyDBConnection -> the PyMySQL connection
    Private(PooledDedicatedDBConnection, "_con"),
    Private(SteadyDBConnection, "_con"),
    # the two halves of Connection.query(), and what they leave behind
    Private(Connection, "_execute_command"),
    Private(Connection, "_read_query_result"),
    Private(Connection, "_result"),
    Private(MySQLResult, "has_next"),
    Private(Connection, "_sock"),
    Private(Connection, "_force_close"),
    # replaced by deadline-bounded descriptors: PyMySQL must still read them before a wait
    Private(Connection, "connect_timeout", read_by=(Connection,)),
    Private(Connection, "_read_timeout", read_by=(Connection,)),
    Private(Connection, "_write_timeout", read_by=(Connection,)),
)

MISSING: tuple[str, ...] = tuple(missing(PRIVATES))


@functools.cache
def fast_path() -> bool:
    """Whether PyMySQL and DBUtils have every internal edm uses; the first call that finds
    they have not logs the one WARNING that says what is missing."""
    if MISSING:
        log.warning(
            "PyMySQL %s / DBUtils %s lack what edm's database fast path relies on (%s); "
            "transactions are sent and awaited in one call, each wait is bounded by "
            "database.timeout alone, and a connection given up is closed the ordinary way.",
            version("PyMySQL"),
            version("DBUtils"),
            "; ".join(MISSING),
        )
    return not MISSING


def driver(pooled: Any) -> Connection | None:
    """The PyMySQL connection under a DBUtils pooled one; None on the plain path."""
    if not fast_path():
        return None
    found = getattr(pooled._con, "_con", None)
    return found if isinstance(found, Connection) else None


def send_query(con: Connection, sql: str) -> None:
    """The first half of ``con.query(sql)``: send it, read nothing."""
    con._execute_command(_COM_QUERY, sql.encode(con.encoding))


def read_results(con: Connection) -> None:
    """The second half: read the outcome of every statement sent; a failing one raises."""
    con._read_query_result()
    while con._result is not None and con._result.has_next:
        con.next_result()


def socket_fd(con: Connection) -> int:
    """The descriptor that turns readable when the server answers."""
    fd: int = con._sock.fileno()
    return fd


def force_close(con: Connection) -> None:
    """Close the socket at once: no COM_QUIT, which could wait on a full send buffer."""
    con._force_close()


def bounded_connection() -> type[Connection]:
    """PyMySQL's Connection class, with socket waits cut to what the current ``bounded()``
    scope has left (on the fast path); else PyMySQL's own class."""
    return _BoundedConnection if fast_path() else pymysql.connections.Connection


class _Timeout:
    """A connection's timeout attribute: read inside a ``bounded()`` scope, it is cut to what
    the scope has left."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._key = f"_edm{name}"

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return wait_limit(obj.__dict__.get(self._key))

    def __set__(self, obj: Any, value: float | None) -> None:
        obj.__dict__[self._key] = value


class _BoundedConnection(Connection):  # type: ignore[misc]  # PyMySQL has no type hints for mypy
    connect_timeout = _Timeout()
    _read_timeout = _Timeout()
    _write_timeout = _Timeout()
