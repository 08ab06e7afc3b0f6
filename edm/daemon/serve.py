"""The daemon's body, shared by `edm start` (detached) and `edm run` (foreground)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from edm import plugins
from edm.config import Config
from edm.daemon.pidfile import Pidfile
from edm.daemon.process import READY, drop_privileges, make_dirs, resolve_identity
from edm.daemon.supervisor import Supervisor
from edm.errors import AlreadyRunning, EdmError
from edm.logs import setup_logging
from edm.redact import secrets_of
from edm.worker.main import open_daily

log = logging.getLogger(__name__)

Report = Callable[[bytes], None]


def serve(config: Config, report: Report) -> int:
    """Take the pidfile, drop privileges, start the workers, report, supervise until stopped."""
    os.umask(config.daemon.umask)
    identity = resolve_identity(config.daemon.user, config.daemon.group)
    directories = [config.daemon.pidfile.parent, config.log.dir]
    if "fee" in plugins.enabled(config):
        directories.append(config.plugins.fee.spool.parent)
    for directory in directories:
        make_dirs(directory, identity)
    pidfile = Pidfile(config.daemon.pidfile)
    try:
        pidfile.acquire()
    except AlreadyRunning as exc:
        report(str(exc).encode())
        return 1
    try:
        if identity is not None:
            pidfile.chown(identity.uid, identity.gid)
            _preload(config)
        drop_privileges(identity)
        daily = open_daily(config)
        setup_logging(daily, config.log.level, secrets_of(config))
        supervisor = Supervisor(config, pidfile, daily)
        error = supervisor.boot()
        if error is not None:
            supervisor.stopping = True
            supervisor.shutdown()
            report(error.encode())
            return 1
        report(READY + str(os.getpid()).encode())
        return supervisor.run()
    except EdmError as exc:
        report(str(exc).encode())
        return 1
    except OSError as exc:
        report(f"{exc.strerror or exc}: {exc.filename or ''}".encode())
        return 1
    finally:
        pidfile.release()


def _preload(config: Config) -> None:
    """Import what the workers need while we can still read every directory (root's home may
    be closed to the target user, and a worker forks from us with these modules loaded)."""
    import importlib

    modules = ["edm.amqp.consumer", "edm.worker.main", "edm.handlers", "pika.adapters.select_connection"]
    if plugins.enabled(config):
        modules += ["edm.db", "edm.plugins.fee.receiver", "pymysql", "dbutils.pooled_db", "zmq", "sqlite3"]
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            log.debug("Could not preload %s: %s", name, exc)
    # Encodings and other lazily loaded stdlib pieces used on the hot path.
    "".encode("idna")
    b"".decode("utf-8", "surrogateescape")
