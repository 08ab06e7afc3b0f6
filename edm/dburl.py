"""``database.url``: mysql:// or sqlite:/// split into its parts; the password never shown.

Apart from the database package so that the config can check a URL without loading a driver.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from edm.errors import DatabaseError
from edm.redact import mask_url

Dialect = Literal["mysql", "sqlite"]


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
