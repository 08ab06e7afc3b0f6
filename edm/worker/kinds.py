"""The worker processes the supervisor can start, by name.

Each is named by ``module:function`` and imported when the supervisor first starts one, so
that the main process loads what a kind needs only when that kind runs: a daemon without
plugins never loads the database drivers (PyMySQL, DBUtils, cryptography; about 4 MiB of
RSS in the main process and in every worker forked from it).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from multiprocessing.connection import Connection

from edm.config import Config

WorkerMain = Callable[[Config, Connection], int]

WORKERS: dict[str, str] = {
    "consumer": "edm.worker.consumer:consumer_main",
    "plugins": "edm.worker.plugins:plugins_main",
}


def worker_main(kind: str) -> WorkerMain:
    """The main function of a worker kind (KeyError for an unknown kind)."""
    module, _, name = WORKERS[kind].partition(":")
    main: WorkerMain = getattr(importlib.import_module(module), name)
    return main
