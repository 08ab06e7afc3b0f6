"""One exception hierarchy; every message is meant for the operator who reads it."""

from __future__ import annotations


class EdmError(Exception):
    """Base class of every error edm reports without a traceback."""


class ConfigError(EdmError):
    """The configuration cannot be used; the message names the key."""


class PidfileError(EdmError):
    """The pidfile cannot be created, locked or read."""


class AlreadyRunning(PidfileError):
    """Another process holds the pidfile's lock."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        super().__init__(f"edm is already running (pid {pid if pid is not None else '?'})")


class DaemonError(EdmError):
    """Detaching, privilege drop or the start handshake failed."""


class BrokerError(EdmError):
    """The AMQP broker refused or dropped us."""


class HandlerError(EdmError):
    """The message handler cannot be loaded."""


class DatabaseError(EdmError):
    """The database refused a statement or the URL is unusable; the password is masked."""


class DatabaseUnavailable(DatabaseError):
    """The database cannot be reached (refused, timed out, connection lost)."""
