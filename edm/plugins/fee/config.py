"""The fee receiver's section, ``plugins.fee``: parsed and checked here, by the plugin itself.

Pure: no ZeroMQ, no database. The registry (``edm.plugins``) calls ``parse`` with the raw
section; every error names its key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edm.config_fields import boolean, keys_of, path, readable_file, reject_unknown, string
from edm.errors import ConfigError

if TYPE_CHECKING:  # edm.config holds every plugin's section, this one included
    from edm.config import Config

PREFIX = "plugins.fee"


@dataclass(frozen=True)
class FeeCurve:
    """``plugins.fee.curve``: the server's secret certificate, the allowed clients' directory."""

    secret_key_file: Path
    clients_dir: Path


@dataclass(frozen=True)
class FeeConfig:
    enabled: bool = False
    listen: str = "tcp://127.0.0.1:5555"
    table: str = "fee"
    spool: Path = Path("run/fee.spool")
    curve: FeeCurve | None = None

    def directories(self) -> tuple[Path, ...]:
        """Directories to create (owned by the daemon's user) before privileges are dropped."""
        return (self.spool.parent,)


def parse(raw: Mapping[str, Any], base: Path) -> FeeConfig:
    """Validate ``plugins.fee``; relative paths resolve against ``base``."""
    reject_unknown(f"{PREFIX}.", raw, keys_of(FeeConfig))
    d = FeeConfig()
    table = string(raw, "table", PREFIX, d.table, 64)
    if not table.replace("_", "a").isalnum() or not table.isascii() or table[0].isdigit():
        raise ConfigError(f"{PREFIX}.table: must be a plain SQL identifier (letters, digits, _)")
    listen = string(raw, "listen", PREFIX, d.listen)
    if not listen.startswith(("tcp://", "ipc://", "inproc://")):
        raise ConfigError(f"{PREFIX}.listen: must be a ZeroMQ endpoint such as tcp://127.0.0.1:5555")
    return FeeConfig(
        enabled=boolean(raw, "enabled", PREFIX, d.enabled),
        listen=listen,
        table=table,
        spool=path(raw, "spool", PREFIX, "../run/fee.spool", base),
        curve=_parse_curve(raw.get("curve"), base),
    )


def _parse_curve(raw: Any, base: Path) -> FeeCurve | None:
    if raw is None:
        return None
    prefix = f"{PREFIX}.curve"
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix}: must be null or a mapping (secret_key_file, clients_dir)")
    reject_unknown(f"{prefix}.", raw, keys_of(FeeCurve))
    for key in ("secret_key_file", "clients_dir"):
        if raw.get(key) is None:
            raise ConfigError(f"{prefix}.{key}: required when {prefix} is set")
    secret = readable_file(raw, "secret_key_file", prefix, base)
    assert secret is not None
    clients = path(raw, "clients_dir", prefix, "", base)
    if not clients.is_dir():
        raise ConfigError(f"{prefix}.clients_dir: {clients}: no such directory")
    if not os.access(clients, os.R_OK | os.X_OK):
        raise ConfigError(f"{prefix}.clients_dir: {clients}: not readable")
    return FeeCurve(secret, clients)


def fee_section(config: Config) -> FeeConfig:
    """``config.plugins.fee``, typed."""
    section = config.plugins.sections["fee"]
    assert isinstance(section, FeeConfig)
    return section
