"""One deadline for a series of waits on the database (``Transactions.bounded()``).

The deadline of the current scope lives in a context variable: the socket waits of a
PyMySQL connection read it (``edm.db._pymysql_private``), so that a liveness ping, the
reconnect after it and the transaction share ``database.timeout`` instead of taking it each.
"""

from __future__ import annotations

import math
import select
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

MIN_WAIT = 0.001  # seconds; what a wait gets past its deadline (0 would make a socket non-blocking)

# The deadline (time.monotonic()) of the current bounded() scope; None outside one.
_DEADLINE: ContextVar[float | None] = ContextVar("edm_db_deadline", default=None)


@contextmanager
def until(at: float) -> Iterator[float]:
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


def wait_limit(timeout: float | None) -> float | None:
    """A socket timeout of ``timeout`` seconds, cut to what the current scope has left."""
    at = _DEADLINE.get()
    if at is None:
        return timeout
    left = max(at - time.monotonic(), MIN_WAIT)
    return left if timeout is None or left < timeout else timeout


def readable(fd: int, deadline: float) -> bool:
    """Whether ``fd`` turns readable (an answer, or the connection's end) by ``deadline``."""
    poller = select.poll()  # not select(): a daemon's descriptors may pass FD_SETSIZE
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(math.ceil((deadline - time.monotonic()) * 1000), 0)))
