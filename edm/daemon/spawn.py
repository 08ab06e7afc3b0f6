"""Forking a worker process and the channel between it and the supervisor.

Each worker gets one end of a socketpair wrapped as a multiprocessing Connection: the
supervisor sends ``("reload", Config)`` and ``("stop", None)``; the worker sends dict events
(``ready``, ``fatal``, ``state``). A worker dies with its supervisor (PR_SET_PDEATHSIG), so
a kill -9 of the main process never leaves an orphan consuming on its own.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from edm.config import Config

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_BOOT = 3  # the worker could not start (bad handler, bind failed): do not respawn blindly

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


def send_event(conn: Connection, event: str, **fields: Any) -> None:
    """Tell the supervisor something; a closed channel means the supervisor is gone."""
    try:
        conn.send({"event": event, **fields})
    except OSError:
        pass
