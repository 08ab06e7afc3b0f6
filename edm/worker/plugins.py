"""The plugin worker: one shared database pool, every enabled plugin on top of it."""

from __future__ import annotations

import logging
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import Any

from edm import plugins
from edm.config import Config
from edm.db import Database
from edm.errors import EdmError
from edm.logs import DailyLog
from edm.worker.loop import Reactor, SelectReactor, Service, boot

log = logging.getLogger(__name__)


class PluginsService:
    def __init__(self, started: list[plugins.Plugin], database: Database | None, stop_timeout: float) -> None:
        self.started = started
        self.database = database
        self.stop_timeout = stop_timeout

    def apply(self, new: Config, running: Config) -> tuple[Config, str | None]:
        runs = new
        if new.database != running.database:
            # The pool is opened once, at the worker's start: it keeps its settings.
            log.warning("database: the changed settings apply at the next restart of edm.")
            runs = replace(runs, database=running.database)
        errors = []
        for plugin in self.started:
            try:
                plugin.reload(new)
            except EdmError as exc:  # the plugin serves on with its running settings
                log.error("%s", exc)
                errors.append(str(exc))
                kept = running.plugins.sections[plugin.name]
                runs = replace(runs, plugins=runs.plugins.replacing(plugin.name, kept))
        self.stop_timeout = runs.daemon.stop_timeout
        return runs, "; ".join(errors) or None

    def snapshot(self) -> dict[str, Any]:
        return {"state": "running", "plugins": {p.name: p.status() for p in self.started}}

    def failure(self) -> str | None:
        for plugin in self.started:
            reason = plugin.failure()
            if reason is not None:
                return f"The {plugin.name} plugin no longer serves ({reason})"
        return None

    def close(self) -> None:
        for plugin in reversed(self.started):
            try:
                plugin.stop(self.stop_timeout)
            except Exception:
                log.error("The %s plugin failed to stop cleanly.", plugin.name, exc_info=True)
        if self.database is not None:
            self.database.close()
        log.info("The plugins stopped.")


def plugins_main(config: Config, conn: Connection) -> int:
    """The plugin worker."""

    def start(_daily: DailyLog) -> tuple[Service, Reactor]:
        database = Database.open(config.database) if plugins.needs_database(config) else None
        service = PluginsService([], database, config.daemon.stop_timeout)
        try:
            for plugin in plugins.build(config, database):
                plugin.start()
                service.started.append(plugin)
        except BaseException:
            service.close()
            raise
        return service, SelectReactor()

    return boot(conn, config, start)
