"""Forking a worker process and the channel between it and the supervisor.

Each worker gets one end of a socketpair wrapped as a multiprocessing Connection: the
supervisor sends ``(Command, payload)`` tuples (``reload`` with the new Config, ``stop``,
``reopen``); the worker sends dict events ``{"event": Event, ...}`` (``ready``, ``fatal``,
``reloaded``, ``state``). A worker dies with its supervisor (PR_SET_PDEATHSIG), so a kill -9
of the main process never leaves an orphan consuming on its own.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from enum import Enum
from multiprocessing.connection import Connection
from typing import Any

from edm.config import Config

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_BOOT = 3  # the worker could not start (bad handler, bind failed): do not respawn blindly

STATE_INTERVAL = 1.0  # seconds between a worker's state events (and the status file's rewrites)


class Command(str, Enum):
    """What the supervisor asks of a worker."""

    RELOAD = "reload"  # payload: the new, validated Config
    STOP = "stop"
    REOPEN = "reopen"  # the log files (logrotate)


class Event(str, Enum):
    """What a worker tells the supervisor."""

    READY = "ready"  # pid: it serves
    FATAL = "fatal"  # error: it cannot start (it exits with EXIT_BOOT)
    RELOADED = "reloaded"  # config: the one it runs now; error: what it could not apply, or None
    STATE = "state"  # its snapshot, every STATE_INTERVAL and at once when it changes


WorkerMain = Callable[[Config, Connection], int]

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` when the parent dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def spawn(main: WorkerMain, config: Config, close_in_child: Callable[[], None]) -> tuple[int, Connection]:
    """Fork a worker running ``main(config, conn)``; return its pid and our end of the channel."""
    parent_sock, child_sock = socket.socketpair()
    parent_pid = os.getpid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, measured by the integration tests
        code = EXIT_CRASH
        try:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            signal.set_wakeup_fd(-1)
            parent_sock.close()
            close_in_child()
            die_with_parent()
            if os.getppid() != parent_pid:
                os._exit(EXIT_CRASH)
            conn = Connection(child_sock.detach())
            code = main(config, conn)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else EXIT_CRASH
        except BaseException:
            log.critical("Worker crashed.", exc_info=True)
            code = EXIT_CRASH
        finally:
            logging.shutdown()
            os._exit(code)
    child_sock.close()
    return pid, Connection(parent_sock.detach())


def send_event(conn: Connection, event: Event, **fields: Any) -> None:
    """Tell the supervisor something; a closed channel means the supervisor is gone."""
    try:
        conn.send({"event": event.value, **fields})
    except OSError:
        pass


def send_command(conn: Connection, command: Command, payload: Any = None) -> None:
    """Ask a worker something; a closed channel means the worker is gone (it is reaped)."""
    try:
        conn.send((command.value, payload))
    except OSError:
        pass
