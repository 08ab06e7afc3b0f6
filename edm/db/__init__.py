"""The database: one bounded pool every plugin shares (``Database``), a ``Session`` for a
series of transactions on one of its connections, and ``send_atomic()`` for a transaction
left in flight (``Pending``). See ``edm.db.pool``."""

from __future__ import annotations

from edm.db.backends import TlsRefused, require_tls, tls_context
from edm.db.pool import Database, Pending, Session, Transactions
from edm.dburl import DatabaseUrl, Dialect, parse_url

__all__ = [
    "Database",
    "DatabaseUrl",
    "Dialect",
    "Pending",
    "Session",
    "TlsRefused",
    "Transactions",
    "parse_url",
    "require_tls",
    "tls_context",
]
