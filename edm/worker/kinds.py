"""The worker processes the supervisor can start, by name.

Each is named by ``module:function`` and imported in the worker process, after the fork
(``Kind``): the main process never loads what a worker needs (pika and the consumer, the
handlers; the database drivers PyMySQL, DBUtils and cryptography, about 4 MiB) and stays as
small as a supervisor can be. A worker that is restarted imports its module again, which
costs it a fraction of a second of its start, never the main process anything.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

from edm.config import Config

WorkerMain = Callable[[Config, Connection], int]

WORKERS: dict[str, str] = {
    "consumer": "edm.worker.consumer:consumer_main",
    "plugins": "edm.worker.plugins:plugins_main",
}


def worker_main(kind: str) -> WorkerMain:
    """The main function of a worker kind, imported now (KeyError for an unknown kind)."""
    module, _, name = WORKERS[kind].partition(":")
    main: WorkerMain = getattr(importlib.import_module(module), name)
    return main


@dataclass(frozen=True)
class Kind:
    """A worker kind's main, imported only when it is called (in the forked worker)."""

    name: str

    def __call__(self, config: Config, conn: Connection) -> int:
        return worker_main(self.name)(config, conn)
