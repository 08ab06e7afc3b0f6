"""The plugin registry: each plugin parses its own config section and is built from it.

A new plugin adds one ``PluginSpec`` to ``REGISTRY``: its name (the section
``plugins.<name>``), the function that parses and validates that section (pure: it may not
import the plugin's runtime, which can need an optional extra such as pyzmq), and where its
class lives. The class is imported only when the plugin is enabled, by name, so that a config
without the plugin never needs its dependencies.

A plugin runs inside the daemon's plugin worker, under the same supervision as the consumer.
The worker calls ``start`` (bind sockets; raise EdmError to fail the start), ``reload`` with
a new validated Config on SIGHUP, ``status`` for `edm status`, and ``stop`` on shutdown
(finish what is in flight within ``timeout`` seconds).

A reload whose settings the plugin cannot apply (an endpoint in use) raises EdmError naming
the key, after the plugin went back to serving with all its previous settings: the worker
logs it and keeps running. ``failure`` tells the worker that the plugin no longer serves (a
thread of it died); the worker then exits so that the supervisor restarts it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from edm.config_fields import reject_unknown
from edm.errors import ConfigError
from edm.plugins.fee import config as fee_config

if TYPE_CHECKING:  # edm.config holds a PluginsConfig; edm.db needs edm.config
    from edm.config import Config
    from edm.db import Database


class PluginSection(Protocol):
    """What the registry needs of every plugin's parsed section."""

    @property
    def enabled(self) -> bool: ...

    def directories(self) -> tuple[Path, ...]: ...


class Plugin(Protocol):
    name: str

    def start(self) -> None: ...

    def reload(self, config: Config) -> None: ...

    def status(self) -> dict[str, Any]: ...

    def failure(self) -> str | None: ...

    def stop(self, timeout: float) -> None: ...


@dataclass(frozen=True)
class PluginSpec:
    name: str
    parse: Callable[[Mapping[str, Any], Path], PluginSection]  # the raw section, the config's directory
    factory: str  # "module:Class", called as Class(config, database)
    needs_database: bool = False
    preload: tuple[str, ...] = ()  # modules a worker that drops root must import before it does


REGISTRY: tuple[PluginSpec, ...] = (
    PluginSpec(
        "fee",
        parse=fee_config.parse,
        factory="edm.plugins.fee.receiver:FeePlugin",
        needs_database=True,
        preload=("zmq", "pymysql", "dbutils.pooled_db", "sqlite3"),
    ),
)
SPECS = {spec.name: spec for spec in REGISTRY}


@dataclass(frozen=True)
class PluginsConfig:
    """The ``plugins`` section: each registered plugin's own parsed section, by name.

    ``config.plugins.fee`` reads the fee plugin's section (typed by the plugin's module).
    """

    sections: Mapping[str, PluginSection]

    def __getattr__(self, name: str) -> Any:
        # Only for section names: dunders and the field itself must fail normally (pickle
        # probes for __setstate__ before ``sections`` exists).
        if name.startswith("_") or name == "sections":
            raise AttributeError(name)
        try:
            return self.sections[name]
        except KeyError:
            raise AttributeError(name) from None

    def enabled(self) -> list[str]:
        """Names of the plugins this config enables, in registry order."""
        return [name for name, section in self.sections.items() if section.enabled]

    def replacing(self, name: str, section: PluginSection) -> PluginsConfig:
        """A copy with one plugin's section swapped (a reload it could not apply keeps the old)."""
        return PluginsConfig({**self.sections, name: section})

    def directories(self) -> list[Path]:
        """Directories the enabled plugins write to, created before privileges are dropped."""
        return [d for name in self.enabled() for d in self.sections[name].directories()]


def parse(raw: Mapping[str, Any], base: Path, database_url: str | None) -> PluginsConfig:
    """Each plugin parses its own section; ConfigError names the key at fault."""
    reject_unknown("plugins.", raw, set(SPECS))
    sections: dict[str, PluginSection] = {}
    for spec in REGISTRY:
        section = raw.get(spec.name) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"plugins.{spec.name}: must be a mapping")
        sections[spec.name] = parsed = spec.parse(section, base)
        if parsed.enabled and spec.needs_database and database_url is None:
            raise ConfigError(f"database.url: required when plugins.{spec.name}.enabled is true")
    return PluginsConfig(sections)


def enabled(config: Config) -> list[str]:
    """Names of the plugins the config enables, without importing them."""
    return config.plugins.enabled()


def needs_database(config: Config) -> bool:
    return any(SPECS[name].needs_database for name in enabled(config))


def preload_modules(config: Config) -> list[str]:
    """What the enabled plugins import when built: their classes' modules and libraries."""
    found: list[str] = []
    for name in enabled(config):
        spec = SPECS[name]
        found += [spec.factory.partition(":")[0], *spec.preload]
    return found


def build(config: Config, database: Database | None) -> list[Plugin]:
    """Instantiate the enabled plugins. Their modules are imported by name only here, so that
    a config without a plugin never needs the plugin's extra (pyzmq for the fee receiver)."""
    plugins: list[Plugin] = []
    for name in enabled(config):
        spec = SPECS[name]
        module, _, attr = spec.factory.partition(":")
        factory = getattr(importlib.import_module(module), attr)
        if spec.needs_database and database is None:
            raise ConfigError(f"database.url: required when plugins.{name}.enabled is true")
        plugins.append(factory(config, database))
    return plugins
