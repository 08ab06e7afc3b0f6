"""Plugins run inside the daemon's plugin worker, under the same supervision as the consumer.

A plugin is built from the whole Config and the worker's shared Database (None when no
plugin needs one). The worker calls ``start`` (bind sockets; raise EdmError to fail the
start), ``reload`` with a new validated Config on SIGHUP, ``status`` for `edm status`, and
``stop`` on shutdown (finish what is in flight within ``timeout`` seconds).

A reload whose settings the plugin cannot apply (an endpoint in use) raises EdmError naming
the key, after the plugin went back to serving with all its previous settings: the worker
logs it and keeps running. ``failure`` tells the worker that the plugin no longer serves (a
thread of it died); the worker then exits so that the supervisor restarts it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from edm.config import Config
    from edm.db import Database


class Plugin(Protocol):
    name: str

    def start(self) -> None: ...

    def reload(self, config: Config) -> None: ...

    def status(self) -> dict[str, Any]: ...

    def failure(self) -> str | None: ...

    def stop(self, timeout: float) -> None: ...


def enabled(config: Config) -> list[str]:
    """Names of the plugins the config enables, without importing them."""
    return ["fee"] if config.plugins.fee.enabled else []


def build(config: Config, database: Database | None) -> list[Plugin]:
    """Instantiate the enabled plugins; imports (pyzmq) happen only here."""
    plugins: list[Plugin] = []
    if config.plugins.fee.enabled:
        from edm.plugins.fee.receiver import FeePlugin

        assert database is not None
        plugins.append(FeePlugin(config, database))
    return plugins
