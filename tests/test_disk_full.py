"""A full disk under log.dir: the disk's fault, never the messages'.

The log writer cuts a torn record back to the last whole line; the daemon holds the messages
back in the queue (nothing acked unlogged, nothing dead-lettered), says why in `status`, and
resumes by itself once the log can be written. The disk is a real tmpfs of a few MiB, mounted
by the test (which runs as root) and unmounted in teardown, after the daemon is stopped.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import EdmEnv, alive, wait_for

from edm.errors import LogWriteError
from edm.logs import DailyLog

PAGE = os.sysconf("SC_PAGE_SIZE")
LINE = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def umount(path: Path) -> None:
    """Unmount, waiting for the last open file to close; lazily if it never does."""

    def unmounted() -> bool:
        return subprocess.run(["umount", str(path)], capture_output=True).returncode == 0

    try:
        wait_for(unmounted, timeout=10, interval=0.2)
    except AssertionError:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=True)
        raise


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "2m") -> Iterator[Path]:
    path.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, f"cannot mount a tmpfs (the test runs as root): {result.stderr}"
    try:
        yield path
    finally:
        umount(path)


def fill(path: Path) -> None:
    """Write ``path`` until the file system has no block left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    chunk = b"\0" * 65536
    try:
        while True:
            os.write(fd, chunk)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    assert os.statvfs(path.parent).f_bavail == 0


def well_formed(data: bytes) -> list[str]:
    """Every line of a log file: one record each, no partial line, at most one (+)."""
    assert data.endswith(b"\n"), f"the file ends in a partial line: {data[-120:]!r}"
    lines = data.decode("utf-8").split("\n")[:-1]
    for line in lines:
        assert LINE.match(line), f"not a record: {line[:200]!r}"
        assert not LINE.search(line, 1), f"two records glued on one line: {line[:300]!r}"
        assert line.count("(+)") <= 1, f"two message lines glued: {line[:300]!r}"
    return lines


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "disk") as mounted:
        yield mounted


@pytest.fixture
def disk_log(disk: Path) -> Iterator[DailyLog]:
    """A log on the tmpfs, closed before the tmpfs is unmounted."""
    daily = DailyLog(disk, "edm")
    yield daily
    daily.close()


# -- the writer ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [8000, 200_000], ids=["write", "writev"])
def test_a_record_the_full_disk_takes_only_part_of_is_cut_back(disk_log: DailyLog, size: int) -> None:
    daily, disk = disk_log, disk_log.directory
    daily.write("INFO", "the line before")
    path = daily.current_path
    fill(disk / "filler")
    before = path.read_bytes()
    # the file's last page still has room: a full disk takes part of the next record
    assert 0 < len(before) % PAGE and PAGE - len(before) % PAGE < size

    with pytest.raises(LogWriteError) as caught:
        daily.write("INFO", "x" * size)

    assert caught.value.errno == errno.ENOSPC
    assert isinstance(caught.value, OSError)
    assert str(caught.value) == f"{path}: No space left on device"
    assert path.read_bytes() == before
    (disk / "filler").unlink()
    daily.write("INFO", "the line after")
    lines = well_formed(path.read_bytes())
    assert [line[24:] for line in lines] == ["INFO the line before", "INFO the line after"]


def test_a_cut_that_fails_is_mended_before_the_next_record(
    disk_log: DailyLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    daily, disk = disk_log, disk_log.directory
    daily.write("INFO", "the line before")
    path = daily.current_path
    fill(disk / "filler")
    real_ftruncate = os.ftruncate

    def refuse(fd: int, length: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "ftruncate", refuse)
    with pytest.raises(LogWriteError):
        daily.write("INFO", "x" * 8000)
    assert not path.read_bytes().endswith(b"\n")  # the cut failed: a partial record is left

    (disk / "filler").unlink()
    monkeypatch.setattr(os, "ftruncate", real_ftruncate)
    daily.write("INFO", "the line after")
    lines = well_formed(path.read_bytes())
    assert [line[24:] for line in lines] == ["INFO the line before", "INFO the line after"]


def test_a_file_that_cannot_be_cut_gets_the_next_record_on_a_line_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    daily = DailyLog(tmp_path, "edm")
    path = daily.current_path
    path.write_bytes(b"2026-01-01 00:00:00,000 INFO a whole line\n2026-01-01 00:00:00,001 INFO (+) a tor")

    def refuse(fd: int, length: int) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")  # an append-only file (chattr +a)

    monkeypatch.setattr(os, "ftruncate", refuse)
    daily.write("INFO", "the next record")
    lines = path.read_bytes().decode().split("\n")
    assert lines[1] == "2026-01-01 00:00:00,001 INFO (+) a tor"
    assert LINE.match(lines[2]) and lines[2].endswith(" INFO the next record")
    daily.close()


def test_a_partial_record_left_by_an_earlier_run_is_cut_at_open(tmp_path: Path) -> None:
    daily = DailyLog(tmp_path, "edm")
    path = daily.current_path
    path.write_bytes(b"2026-01-01 00:00:00,000 INFO a whole line\n2026-01-01 00:00:00,001 INFO (+) a tor")
    daily.write("INFO", "the next record")
    lines = well_formed(path.read_bytes())
    assert lines[0] == "2026-01-01 00:00:00,000 INFO a whole line"
    assert lines[1].endswith(" INFO the next record") and len(lines) == 2
    daily.close()


def test_a_failing_fsync_takes_the_record_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    daily = DailyLog(tmp_path, "edm", fsync=True)
    daily.write("INFO", "the line before")
    before = daily.current_path.read_bytes()

    def fail(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(LogWriteError) as caught:
        daily.write("INFO", "(+) a message that is not durable")
    assert caught.value.errno == errno.EIO
    assert daily.current_path.read_bytes() == before
    daily.close()


# -- the daemon ----------------------------------------------------------------------------------


@pytest.fixture
def full_disk_env(tmp_path: Path) -> Iterator[tuple[EdmEnv, Path]]:
    """A daemon whose log.dir is a 2 MiB tmpfs; stopped before the tmpfs is unmounted.

    Its prefetch is 10, so that deliveries wait in the consumer when the disk fills up.
    """
    with tmpfs(tmp_path / "disk") as mounted:
        base = tmp_path / "env"
        base.mkdir()
        env = EdmEnv(base, {"log": {"dir": str(mounted)}, "amqp": {"prefetch": 10}})
        try:
            yield env, mounted
        finally:
            pids = env.all_pids() + sorted(env.started_pids)
            env.teardown()
            wait_for(lambda: not any(alive(p) for p in pids), timeout=20)


def consumer_status(env: EdmEnv) -> dict[str, object]:
    result = env.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    worker: dict[str, object] = json.loads(result.stdout)["workers"]["consumer"]
    return worker


def test_a_full_disk_holds_the_messages_in_the_queue_until_it_has_room(
    full_disk_env: tuple[EdmEnv, Path],
) -> None:
    env, disk = full_disk_env
    dead_queue = f"{env.queue}.dead"
    env.start()
    # 400 messages; ten of them bigger (12 kB) than the room a page of the disk gives
    bodies = [
        f"disk-full {i:04d} " + ("0123456789" * 1200 if 40 <= i < 50 else "abcdefghij" * 20)
        for i in range(400)
    ]
    log_path = env.log_files()[0]

    def failing() -> bool:
        return str(env.state()["workers"]["consumer"]["activity"]).startswith("log write failing: ")

    def all_back() -> bool:
        """Every message not logged is back in the queue: none acked unlogged, none held."""
        return env._consumers() == 0 and len(env.message_lines()) + env.queue_depth() == 400

    # Given a log file whose last page is partly used, on a disk that is then filled
    env.publish([b.encode() for b in bodies[:40]])
    wait_for(lambda: len(env.message_lines()) == 40, timeout=30)
    fill(disk / "filler")

    # When the rest arrives
    env.publish([b.encode() for b in bodies[40:]])

    # Then the consumer holds off, says why, and dead-letters nothing
    wait_for(lambda: failing() or env.queue_depth(dead_queue) > 0, timeout=60)
    assert env.queue_depth(dead_queue) == 0
    wait_for(all_back, timeout=60)
    assert env.queue_depth(dead_queue) == 0
    activity = str(consumer_status(env)["activity"])
    assert activity == f"log write failing: {log_path}: No space left on device"
    text = env.cli("status")
    assert text.returncode == 0 and f", pid {env.worker_pid()}, {activity}, " in text.stdout, text.stdout
    assert env.queue_depth() == 360
    wait_for(lambda: consumer_status(env)["queue_depth"] == 360, timeout=15)  # sampled every 5 s
    assert log_path.read_bytes().endswith(b"\n"), "a partial line was left"

    # When a page comes free, the line that says the log works again fits in it, the 12 kB
    # messages do not: the consumer resumes by itself, takes a burst of them (prefetch 10),
    # fails on the first and gives back the ones it still holds, each time
    with open(disk / "filler", "r+b") as filler:
        filler.truncate(filler.seek(0, os.SEEK_END) - PAGE)
    wait_for(lambda: "Writing the log works again" in env.log_text(), timeout=30)
    wait_for(all_back, timeout=60)
    assert failing() and env.queue_depth() == 360 and env.queue_depth(dead_queue) == 0
    assert log_path.read_bytes().endswith(b"\n"), "a partial line was left"

    # When there is room again, every message is logged, once, each line whole
    (disk / "filler").unlink()
    wait_for(lambda: len(env.message_lines()) >= 400 and env.queue_depth() == 0, timeout=60)
    env.wait_consuming(timeout=15)
    lines = well_formed(log_path.read_bytes())
    logged = [line.split(" (+) ", 1)[1] for line in lines if " (+) " in line]
    counts = Counter(logged)
    assert sorted(counts) == sorted(bodies)
    # Nothing here loses a connection, so not even a [redelivered] line is logged twice.
    assert [body[:20] for body, n in counts.items() if n > 1] == []
    assert env.queue_depth(dead_queue) == 0
    assert consumer_status(env)["dead_lettered"] == 0
    recovered = [line for line in lines if "Writing the log works again after" in line]
    assert all(f"({log_path}: No space left on device)" in line for line in recovered), recovered
    assert env.cli("stop").returncode == 0
