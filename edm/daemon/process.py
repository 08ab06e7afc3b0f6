"""Detaching (python-daemon) with a start handshake, directories, and the privilege drop.

``edm start`` must return only once the daemon runs, and fail with the daemon's own reason
when it does not. The CLI forks, the child detaches with python-daemon (double fork, setsid,
chdir /, umask, stdio on /dev/null) and the daemon reports a ``Handshake`` (one JSON object:
started, already running, or failed with its reason) through a pipe the CLI reads.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import select
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import daemon as python_daemon

from edm.errors import DaemonError

HANDSHAKE_MAX = 4000  # bytes: one write below PIPE_BUF, so the CLI's first read holds it whole


class Outcome(str, Enum):
    STARTED = "started"
    ALREADY_RUNNING = "already_running"
    FAILED = "failed"


@dataclass(frozen=True)
class Handshake:
    """The daemon's one reply to the command that started it."""

    outcome: Outcome
    pid: int | None = None
    error: str | None = None

    def encode(self) -> bytes:
        error = self.error
        while True:
            data = json.dumps({"outcome": self.outcome.value, "pid": self.pid, "error": error}).encode()
            if len(data) <= HANDSHAKE_MAX or not error:
                return data
            error = error[: len(error) * HANDSHAKE_MAX // len(data) - 16] + " …"

    @classmethod
    def decode(cls, data: bytes) -> Handshake:
        try:
            doc = json.loads(data)
            pid = doc["pid"]
            error = doc["error"]
            if not (pid is None or isinstance(pid, int)) or not (error is None or isinstance(error, str)):
                raise ValueError(data)
            return cls(Outcome(doc["outcome"]), pid, error)
        except (ValueError, KeyError, TypeError):
            text = data.decode("utf-8", "replace")
            raise DaemonError(f"the daemon sent an unreadable start report: {text[:200]!r}") from None


Report = Callable[[Handshake], None]


@dataclass(frozen=True)
class Identity:
    """Who the daemon runs as once privileges are dropped."""

    user: str | None
    uid: int
    gid: int
    groups: tuple[int, ...]


def resolve_identity(user: str | None, group: str | None) -> Identity | None:
    """The target identity, None when there is nothing to change; errors name the key."""
    if user is None and group is None:
        return None
    try:
        entry = pwd.getpwnam(user) if user else pwd.getpwuid(os.getuid())
    except KeyError:
        raise DaemonError(f"daemon.user: no such user {user!r}") from None
    gid = entry.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise DaemonError(f"daemon.group: no such group {group!r}") from None
    if os.geteuid() != 0:
        # Naming the user (and group) we already are needs no switch and no root.
        if entry.pw_uid == os.getuid() and (group is None or gid == os.getgid()):
            return None
        who = f"user {user!r}" if user else f"group {group!r}"
        raise DaemonError(f"daemon.user: cannot run as {who}: edm must be started as root to switch users")
    groups = tuple(sorted({gid, *os.getgrouplist(entry.pw_name, gid)}))
    return Identity(entry.pw_name, entry.pw_uid, gid, groups)


def drop_privileges(identity: Identity | None) -> None:
    """setgid, setgroups, setuid — in that order — then prove root cannot be regained."""
    if identity is None:
        return
    os.setgroups(list(identity.groups))
    os.setgid(identity.gid)
    os.setuid(identity.uid)
    if identity.uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise DaemonError("privilege drop failed: setuid(0) succeeded after dropping root")
    if os.getuid() != identity.uid or os.geteuid() != identity.uid or os.getegid() != identity.gid:
        raise DaemonError("privilege drop failed: the process did not take the target uid/gid")


def detach(umask: int, body: Callable[[Report], int], timeout: float) -> Handshake:
    """Run ``body`` in a detached daemon; wait for its handshake and return it.

    ``body(report)`` runs in the daemon and calls ``report`` once: STARTED with its pid once
    it runs, ALREADY_RUNNING, or FAILED with the reason before it gives up.
    """
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        os.close(read_fd)
        code = 1

        def report(handshake: Handshake) -> None:
            try:
                os.write(write_fd, handshake.encode())
                os.close(write_fd)
            except OSError:
                pass

        try:
            context = python_daemon.DaemonContext(
                umask=umask, files_preserve=[write_fd], signal_map={}, detach_process=True
            )
            context.open()
            code = body(report)
        except BaseException as exc:  # noqa: BLE001 - report, then leave without a traceback
            report(Handshake(Outcome.FAILED, error=f"{type(exc).__name__}: {exc}"))
        finally:
            os._exit(code)
    os.close(write_fd)
    os.waitpid(child, 0)
    message = _read_handshake(read_fd, timeout)
    os.close(read_fd)
    if not message:
        return Handshake(Outcome.FAILED, error="the daemon exited during start (see its log)")
    return Handshake.decode(message)


def _read_handshake(fd: int, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DaemonError(f"the daemon did not report within {timeout:g} s (see its log)")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        data = os.read(fd, 65536)
        if not data:
            return b"".join(chunks)
        # One report is one write of less than PIPE_BUF bytes: the first read holds it whole.
        # (Waiting for EOF would wait for the workers too, which inherited the pipe.)
        return data
