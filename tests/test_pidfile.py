"""The locked pidfile: single instance, stale detection, no symlinks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edm.daemon.pidfile import Pidfile, PidState, probe
from edm.errors import AlreadyRunning, PidfileError


def test_lock_probe_and_release(tmp_path: Path) -> None:
    path = tmp_path / "edm.pid"
    assert probe(path).state is PidState.ABSENT
    pidfile = Pidfile(path)
    pidfile.acquire()
    assert path.read_text() == f"{os.getpid()}\n"
    assert path.stat().st_mode & 0o777 == 0o644
    assert probe(path).state is PidState.RUNNING
    with pytest.raises(AlreadyRunning) as info:
        Pidfile(path).acquire()
    assert info.value.pid == os.getpid()
    assert str(info.value) == f"edm is already running (pid {os.getpid()})"
    pidfile.release()
    assert not path.exists()


def test_a_killed_owner_leaves_a_stale_file_that_is_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "edm.pid"
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[2]);"
        "from pathlib import Path; from edm.daemon.pidfile import Pidfile;"
        "Pidfile(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(60)"
    )
    root = str(Path(__file__).resolve().parent.parent)
    child = subprocess.Popen([sys.executable, "-c", code, str(path), root], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"locked\n"
        assert probe(path) == probe(path)
        assert probe(path).state is PidState.RUNNING
        assert probe(path).pid == child.pid
        child.kill()
        child.wait()
        found = probe(path)
        assert found.state is PidState.STALE and found.pid == child.pid
        taken = Pidfile(path)
        taken.acquire()
        assert probe(path).pid == os.getpid()
        taken.release()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_symlinked_pidfile_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_text("precious\n")
    link = tmp_path / "edm.pid"
    link.symlink_to(target)
    with pytest.raises(PidfileError, match="symlink"):
        Pidfile(link).acquire()
    assert target.read_text() == "precious\n"


def test_world_writable_directory_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "open"
    directory.mkdir()
    directory.chmod(0o777)
    with pytest.raises(PidfileError, match="world-writable"):
        Pidfile(directory / "edm.pid").acquire()


def test_garbage_in_the_pidfile(tmp_path: Path) -> None:
    path = tmp_path / "edm.pid"
    path.write_text("not a pid\n")
    found = probe(path)
    assert found.state is PidState.STALE and found.pid is None
    pidfile = Pidfile(path)
    pidfile.acquire()
    pidfile.release()
    time.sleep(0)
