"""A pidfile that holds an exclusive lock for the daemon's life.

The lock, not the file's existence, says whether edm runs: a pidfile left by kill -9 or a
power loss is unlocked, so it is recognised as stale and simply taken over on the next start.
The lock is flock(2) on the open file description; workers close their inherited copy so
only the main process holds it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from edm.errors import AlreadyRunning, PidfileError


class PidState(Enum):
    RUNNING = "running"
    STALE = "stale"
    ABSENT = "absent"


@dataclass(frozen=True)
class PidProbe:
    """What the pidfile says: whether a process holds its lock, and the PID written in it."""

    state: PidState
    pid: int | None


def check_directory(directory: Path) -> None:
    """Refuse a pidfile directory that others could write to (a symlink attack surface)."""
    try:
        st = os.stat(directory)
    except OSError as exc:
        raise PidfileError(f"daemon.pidfile: cannot use directory {directory}: {exc.strerror}") from None
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise PidfileError(
            f"daemon.pidfile: directory {directory} is world-writable; use a directory owned by edm's user"
        )


class Pidfile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    def acquire(self, pid: int | None = None) -> None:
        """Create or take over the pidfile, lock it and write ``pid``; AlreadyRunning if locked."""
        check_directory(self.path.parent)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise PidfileError(
                    f"daemon.pidfile: {self.path} is a symlink; refusing to follow it"
                ) from None
            raise PidfileError(f"daemon.pidfile: cannot open {self.path}: {exc.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise PidfileError(f"daemon.pidfile: {self.path} is not a regular file")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise AlreadyRunning(_parse_pid(os.pread(fd, 64, 0))) from None
            self.fd = fd
            os.fchmod(fd, 0o644)
            self.write(pid if pid is not None else os.getpid())
        except BaseException:
            if self.fd != fd:
                os.close(fd)
            raise

    def write(self, pid: int) -> None:
        data = f"{pid}\n".encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        os.fsync(self.fd)

    def chown(self, uid: int, gid: int) -> None:
        os.fchown(self.fd, uid, gid)

    def release(self) -> None:
        """Remove the file and drop the lock (in that order, so nobody sees it unlocked)."""
        if self.fd < 0:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError:
            # Not removable (a directory we may not write to): empty it so it reads as stale.
            os.ftruncate(self.fd, 0)
        os.close(self.fd)
        self.fd = -1

    def close_inherited(self) -> None:
        """In a forked worker: close our copy without touching the file or the lock."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _parse_pid(data: bytes) -> int | None:
    try:
        pid = int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return None
    return pid if pid > 0 else None


def probe(path: Path) -> PidProbe:
    """RUNNING when some process holds the lock; STALE when the file is there unlocked."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return PidProbe(PidState.ABSENT, None)
    except OSError as exc:
        raise PidfileError(f"daemon.pidfile: cannot read {path}: {exc.strerror}") from None
    try:
        pid = _parse_pid(os.read(fd, 64))
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return PidProbe(PidState.RUNNING, pid)
        # Unlocked. The daemon may be between creating and locking the file: only then does
        # a live process own the PID it wrote; otherwise the file is a leftover.
        return PidProbe(PidState.STALE, pid)
    finally:
        os.close(fd)
