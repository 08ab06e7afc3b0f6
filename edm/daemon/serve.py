"""The daemon's body, shared by `edm start` (detached) and `edm run` (foreground)."""

from __future__ import annotations

import importlib
import logging
import os

from edm import plugins
from edm.config import Config
from edm.daemon.pidfile import Pidfile
from edm.daemon.process import Handshake, Outcome, Report, drop_privileges, resolve_identity
from edm.daemon.supervisor import Supervisor
from edm.errors import AlreadyRunning, EdmError
from edm.paths import make_dirs
from edm.worker.loop import open_logs

log = logging.getLogger(__name__)


def serve(config: Config, report: Report) -> int:
    """Take the pidfile, drop privileges, start the workers, report, supervise until stopped."""
    os.umask(config.daemon.umask)
    identity = resolve_identity(config.daemon.user, config.daemon.group)
    owner = (identity.uid, identity.gid) if identity is not None else None
    for directory in [config.daemon.pidfile.parent, config.log.dir, *config.plugins.directories()]:
        try:
            make_dirs(directory, owner=owner)
        except OSError as exc:
            failed = exc.filename or directory
            report(Handshake(Outcome.FAILED, error=f"cannot create directory {failed}: {exc.strerror}"))
            return 1
    pidfile = Pidfile(config.daemon.pidfile)
    try:
        pidfile.acquire()
    except AlreadyRunning as exc:
        report(Handshake(Outcome.ALREADY_RUNNING, pid=exc.pid, error=str(exc)))
        return 1
    try:
        if identity is not None:
            pidfile.chown(identity.uid, identity.gid)
            _preload(config)
        drop_privileges(identity)
        daily = open_logs(config)
        supervisor = Supervisor(config, pidfile, daily)
        error = supervisor.boot()
        if error is not None:
            supervisor.stopping = True
            supervisor.shutdown()
            report(Handshake(Outcome.FAILED, error=error))
            return 1
        report(Handshake(Outcome.STARTED, pid=os.getpid()))
        return supervisor.run()
    except EdmError as exc:
        report(Handshake(Outcome.FAILED, error=str(exc)))
        return 1
    except OSError as exc:
        report(Handshake(Outcome.FAILED, error=f"{exc.strerror or exc}: {exc.filename or ''}"))
        return 1
    finally:
        pidfile.release()


def _preload(config: Config) -> None:
    """Import what the workers need while we can still read every directory (root's home may
    be closed to the target user, and a worker forks from us with these modules loaded).
    By name: the plugins' modules are imported only when enabled (their extras are optional)."""
    modules = ["edm.worker.consumer", "edm.handlers", "pika.adapters.select_connection"]
    if plugins.enabled(config):
        modules += ["edm.worker.plugins", "edm.db", *plugins.preload_modules(config)]
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            log.debug("Could not preload %s: %s", name, exc)
    # Encodings and other lazily loaded stdlib pieces used on the hot path.
    "".encode("idna")
    b"".decode("utf-8", "surrogateescape")
