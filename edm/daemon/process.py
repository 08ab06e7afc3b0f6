"""Detaching (python-daemon) with a start handshake, directories, and the privilege drop.

``edm start`` must return only once the daemon runs, and fail with the daemon's own reason
when it does not. The CLI forks, the child detaches with python-daemon (double fork, setsid,
chdir /, umask, stdio on /dev/null) and the daemon reports ``ok`` or its error through a pipe
the CLI reads.
"""

from __future__ import annotations

import grp
import os
import pwd
import select
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import daemon as python_daemon

from edm.errors import DaemonError

READY = b"ready:"


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
    if os.geteuid() != 0 and _is_self(user, group):
        return None
    if os.geteuid() != 0:
        who = f"user {user!r}" if user else f"group {group!r}"
        raise DaemonError(f"daemon.user: cannot run as {who}: edm must be started as root to switch users")
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
    groups = tuple(sorted({gid, *os.getgrouplist(entry.pw_name, gid)}))
    return Identity(entry.pw_name, entry.pw_uid, gid, groups)


def _is_self(user: str | None, group: str | None) -> bool:
    """Naming the user (and group) we already are needs no switch and no root."""
    try:
        same_user = user is None or pwd.getpwnam(user).pw_uid == os.getuid()
        same_group = group is None or grp.getgrnam(group).gr_gid == os.getgid()
    except KeyError:
        return False
    return same_user and same_group


def make_dirs(path: Path, identity: Identity | None) -> None:
    """Create missing directories (0750) and hand the new ones to the daemon's user."""
    missing = []
    current = path
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o750)
        except FileExistsError:
            continue
        except OSError as exc:
            raise DaemonError(f"cannot create directory {directory}: {exc.strerror}") from None
        if identity is not None:
            os.chown(directory, identity.uid, identity.gid)


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


def detach(umask: int, body: Callable[[Callable[[bytes], None]], int], timeout: float) -> int:
    """Run ``body`` in a detached daemon; wait for its handshake; return the daemon's pid.

    ``body(report)`` runs in the daemon and calls ``report(READY + pid)`` once it runs, or
    ``report(b"error text")`` before it gives up. The CLI prints the error on stderr.
    """
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        os.close(read_fd)
        code = 1
        try:
            context = python_daemon.DaemonContext(
                umask=umask, files_preserve=[write_fd], signal_map={}, detach_process=True
            )
            context.open()

            def report(message: bytes) -> None:
                try:
                    os.write(write_fd, message[:4000])
                    os.close(write_fd)
                except OSError:
                    pass

            code = body(report)
        except BaseException as exc:  # noqa: BLE001 - report, then leave without a traceback
            try:
                os.write(write_fd, f"{type(exc).__name__}: {exc}".encode())
            except OSError:
                pass
        finally:
            os._exit(code)
    os.close(write_fd)
    os.waitpid(child, 0)
    message = _read_handshake(read_fd, timeout)
    os.close(read_fd)
    if message.startswith(READY):
        return int(message[len(READY) :] or 0)
    text = message.decode("utf-8", "replace") or "the daemon exited during start (see its log)"
    raise DaemonError(text)


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
