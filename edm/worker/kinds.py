"""The worker processes the supervisor can start, by name."""

from __future__ import annotations

from collections.abc import Callable
from multiprocessing.connection import Connection

from edm.config import Config
from edm.worker.consumer import consumer_main
from edm.worker.plugins import plugins_main

WORKERS: dict[str, Callable[[Config, Connection], int]] = {
    "consumer": consumer_main,
    "plugins": plugins_main,
}
