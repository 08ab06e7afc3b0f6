"""One exception hierarchy; every message is meant for the operator who reads it."""

from __future__ import annotations

from collections.abc import Callable


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


class DatabaseError(EdmError):
    """The database refused a statement or the URL is unusable; the password is masked."""


class DatabaseUnavailable(DatabaseError):
    """The database cannot be reached (refused, timed out, connection lost)."""


class DuplicateKey(DatabaseError):
    """A statement would have made a second row with the same primary or unique key (MySQL's
    error 1062, sqlite's UNIQUE constraint); any other refusal is a plain DatabaseError."""


class LogWriteError(EdmError, OSError):
    """A log record could not be written (disk full, I/O error); nothing of it stayed in the file.

    It is the disk's fault, never the message's: the consumer holds its deliveries back instead
    of counting a handler failure. ``write(level, text)`` writes a record to the same log; the
    consumer probes with it. An OSError too, so callers that already catch OSError keep working.
    """

    def __init__(self, path: str, cause: OSError, write: Callable[[str, str], None]) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause), path)
        self.path = path
        self.reason = cause.strerror or str(cause)
        self.write = write

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"
