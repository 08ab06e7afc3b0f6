"""Checks of single config values, shared by ``edm.config`` and each plugin's own section.

Every check takes the section's raw mapping, the key and the section's dotted prefix, so
its error names the key (``plugins.fee.table: must be ...``). Imports nothing of edm but
its errors: a plugin's config module can use it without pulling in the rest of the config.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from edm.errors import ConfigError


def reject_unknown(prefix: str, raw: Mapping[str, Any], known: set[str]) -> None:
    """A key the section does not know is an error: a typo must not fall back to a default."""
    for key in raw:
        if key not in known:
            name = f"{prefix}{key}"
            hint = ", ".join(sorted(known))
            raise ConfigError(f"{name}: unknown key (expected one of: {hint})")


def keys_of(cls: type) -> set[str]:
    """The keys of a section: the fields of its dataclass."""
    return {f.name for f in fields(cls)}


def integer(raw: Mapping[str, Any], key: str, prefix: str, default: int, minimum: int) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{prefix}.{key}: must be an integer >= {minimum}")
    return value


def number(raw: Mapping[str, Any], key: str, prefix: str, default: float, minimum: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum:
        raise ConfigError(f"{prefix}.{key}: must be a number >= {minimum:g}")
    if value != value or value == float("inf"):
        raise ConfigError(f"{prefix}.{key}: must be a finite number")
    return float(value)


def boolean(raw: Mapping[str, Any], key: str, prefix: str, default: bool) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{prefix}.{key}: must be true or false")
    return value


def string(raw: Mapping[str, Any], key: str, prefix: str, default: str, max_len: int = 255) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{prefix}.{key}: must be a non-empty string")
    if len(value) > max_len:
        raise ConfigError(f"{prefix}.{key}: must be at most {max_len} characters")
    return value


def optional_string(raw: Mapping[str, Any], key: str, prefix: str) -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{prefix}.{key}: must be a non-empty string or null")
    return value


def path(raw: Mapping[str, Any], key: str, prefix: str, default: str, base: Path) -> Path:
    """A path; a relative one resolves against ``base`` (the config file's directory)."""
    value = raw.get(key, default)
    if not isinstance(value, str) or not value or "\0" in value:
        raise ConfigError(f"{prefix}.{key}: must be a path")
    found = Path(value)
    return Path(os.path.normpath(found if found.is_absolute() else base / found))


def readable_file(raw: Mapping[str, Any], key: str, prefix: str, base: Path) -> Path | None:
    """A file that exists and edm can read now, not at its first use; None when unset."""
    if raw.get(key) is None:
        return None
    found = path(raw, key, prefix, "", base)
    if not found.is_file():
        raise ConfigError(f"{prefix}.{key}: {found}: no such file")
    if not os.access(found, os.R_OK):
        raise ConfigError(f"{prefix}.{key}: {found}: not readable")
    return found
