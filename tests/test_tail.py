"""``edm tail``: the end of today's log, and following it across days and rotations."""

from __future__ import annotations

import datetime as dt
import io
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edm.cli.tail import BLOCK, last_lines, run_tail
from edm.config import Config, parse
from edm.logs import DailyLog

DAY1 = dt.datetime(2024, 3, 9, 23, 59, 58).timestamp()  # local time, like the log files
DAY2 = dt.datetime(2024, 3, 10, 0, 0, 1).timestamp()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class SyncOut(io.StringIO):
    """A StringIO the test can read while the follower writes from its thread."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()

    def write(self, s: str) -> int:
        with self.lock:
            return super().write(s)

    def text(self) -> str:
        with self.lock:
            return self.getvalue()


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return parse({"log": {"dir": "logs", "name": "edm"}}, tmp_path / "mq.yaml", environ={})


def path_for(config: Config, date: str) -> Path:
    return DailyLog(config.log.dir, config.log.name).path_for(date)


def append(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as f:
        f.write(data)


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.01)


@pytest.fixture
def follower(config: Config) -> Iterator[Callable[..., SyncOut]]:
    """Start ``run_tail(..., follow=True)`` in a thread; stopped and joined at the end."""
    stop = threading.Event()
    threads: list[threading.Thread] = []
    results: list[int] = []

    def start(clock: Clock, lines: int = 10) -> SyncOut:
        out = SyncOut()
        thread = threading.Thread(
            target=lambda: results.append(
                run_tail(config, lines, True, clock=clock, out=out, poll=0.01, stop=stop)
            )
        )
        thread.start()
        threads.append(thread)
        return out

    yield start
    stop.set()
    for thread in threads:
        thread.join(timeout=5)
        assert not thread.is_alive()
    assert results == [0] * len(threads)


# -- the last N lines ----------------------------------------------------------------------
def test_prints_the_last_n_lines_of_todays_file(config):
    path = path_for(config, "2024-03-09")
    append(path, b"".join(b"line %d\n" % i for i in range(1, 101)))
    append(path_for(config, "2024-03-08"), b"yesterday\n")
    out = io.StringIO()

    assert run_tail(config, 3, clock=Clock(DAY1), out=out) == 0

    assert out.getvalue() == "line 98\nline 99\nline 100\n"


def test_default_is_ten_lines_and_a_short_file_is_printed_whole(config):
    path = path_for(config, "2024-03-09")
    append(path, b"a\nb\n")
    out = io.StringIO()
    run_tail(config, clock=Clock(DAY1), out=out)
    assert out.getvalue() == "a\nb\n"

    append(path, b"".join(b"%d\n" % i for i in range(20)))
    out = io.StringIO()
    run_tail(config, clock=Clock(DAY1), out=out)
    assert out.getvalue().splitlines() == [str(i) for i in range(10, 20)]


def test_an_unterminated_last_line_is_printed(config):
    append(path_for(config, "2024-03-09"), b"one\ntwo\nthree")
    out = io.StringIO()
    run_tail(config, 2, clock=Clock(DAY1), out=out)
    assert out.getvalue() == "two\nthree\n"


def test_zero_lines_prints_nothing(config):
    append(path_for(config, "2024-03-09"), b"one\n")
    out = io.StringIO()
    run_tail(config, 0, clock=Clock(DAY1), out=out)
    assert out.getvalue() == ""


def test_no_file_yet_prints_nothing_and_succeeds(config):
    out = io.StringIO()
    assert run_tail(config, 10, clock=Clock(DAY1), out=out) == 0
    assert out.getvalue() == ""


def test_invalid_utf8_is_replaced_not_fatal(config):
    append(path_for(config, "2024-03-09"), b"caf\xc3\xa9 \xff\xfe ok\n")
    out = io.StringIO()
    run_tail(config, 1, clock=Clock(DAY1), out=out)
    assert out.getvalue() == "café \ufffd\ufffd ok\n"


def test_last_lines_reads_only_the_end_of_a_big_file(tmp_path, monkeypatch):
    path = tmp_path / "big.log"
    line = b"x" * 99 + b"\n"
    path.write_bytes(line * 50_000)  # 5 MB
    reads: list[int] = []
    real_pread = os.pread

    def counting_pread(fd: int, n: int, offset: int) -> bytes:
        reads.append(n)
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", counting_pread)
    fd = os.open(path, os.O_RDONLY)
    try:
        complete, partial = last_lines(fd, os.fstat(fd).st_size, 5)
    finally:
        os.close(fd)
    assert complete == [line[:-1]] * 5 and partial == b""
    assert sum(reads) <= BLOCK


def test_last_lines_across_block_boundaries(tmp_path):
    path = tmp_path / "f.log"
    lines = [b"%05d " % i + b"y" * (i % 300) for i in range(3000)]
    path.write_bytes(b"\n".join(lines) + b"\n")
    fd = os.open(path, os.O_RDONLY)
    try:
        for count in (1, 7, 500, 2999, 3000, 5000):
            complete, partial = last_lines(fd, os.fstat(fd).st_size, count)
            assert complete == lines[-count:]
            assert partial == b""
    finally:
        os.close(fd)


# -- following -----------------------------------------------------------------------------
def test_follow_prints_new_lines(config, follower):
    path = path_for(config, "2024-03-09")
    append(path, b"old 1\nold 2\n")
    out = follower(Clock(DAY1), lines=1)
    wait_for(lambda: out.text() == "old 2\n")

    append(path, b"new 1\nnew ")
    wait_for(lambda: "new 1\n" in out.text())
    append(path, b"2\n")

    wait_for(lambda: out.text() == "old 2\nnew 1\nnew 2\n")


def test_follow_moves_to_the_next_days_file_at_midnight(config, follower):
    clock = Clock(DAY1)
    day1, day2 = path_for(config, "2024-03-09"), path_for(config, "2024-03-10")
    append(day1, b"before\n")
    out = follower(clock)
    wait_for(lambda: out.text() == "before\n")

    append(day1, b"last line of day 1\n")
    wait_for(lambda: "last line of day 1" in out.text())
    clock.now = DAY2
    time.sleep(0.05)  # the follower notices the new day before the file exists
    append(day2, b"first line of day 2\n")

    wait_for(lambda: out.text() == "before\nlast line of day 1\nfirst line of day 2\n")


def test_follow_waits_for_the_file_to_appear(config, follower):
    out = follower(Clock(DAY1))
    time.sleep(0.05)
    append(path_for(config, "2024-03-09"), b"hello\n")
    wait_for(lambda: out.text() == "hello\n")


def test_follow_survives_delete_and_recreate(config, follower):
    path = path_for(config, "2024-03-09")
    append(path, b"first\n")
    out = follower(Clock(DAY1))
    wait_for(lambda: out.text() == "first\n")

    path.unlink()
    time.sleep(0.05)
    append(path, b"second\n")

    wait_for(lambda: out.text() == "first\nsecond\n")
    append(path, b"third\n")
    wait_for(lambda: out.text() == "first\nsecond\nthird\n")


def test_follow_reads_the_rest_of_a_rotated_file_then_the_new_one(config, follower):
    path = path_for(config, "2024-03-09")
    append(path, b"a\n")
    out = follower(Clock(DAY1))
    wait_for(lambda: out.text() == "a\n")

    # logrotate-style: the writer keeps its descriptor on the moved file for a while.
    with path.open("ab") as writer:
        path.rename(path.with_suffix(".log.1"))
        writer.write(b"b (written to the moved file)\n")
        writer.flush()
        wait_for(lambda: "b (written" in out.text())
        append(path, b"c\n")

    wait_for(lambda: out.text() == "a\nb (written to the moved file)\nc\n")


def test_follow_after_truncation_starts_from_the_top(config, follower):
    path = path_for(config, "2024-03-09")
    append(path, b"long line before truncation\n")
    out = follower(Clock(DAY1))
    wait_for(lambda: out.text() == "long line before truncation\n")

    with path.open("r+b") as f:
        f.truncate(0)
    time.sleep(0.05)
    append(path, b"x\n")

    wait_for(lambda: out.text().endswith("x\n"))


def test_ctrl_c_ends_follow_with_exit_0(config, monkeypatch):
    append(path_for(config, "2024-03-09"), b"a\n")

    class Interrupting(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            raise KeyboardInterrupt

    out = io.StringIO()
    assert run_tail(config, 10, True, clock=Clock(DAY1), out=out, stop=Interrupting()) == 0
    assert out.getvalue() == "a\n"


def test_a_non_utf8_terminal_gets_replacement_characters(config):
    append(path_for(config, "2024-03-09"), "naïve ☃\n".encode())
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="ascii")

    assert run_tail(config, 1, clock=Clock(DAY1), out=out) == 0

    assert raw.getvalue() == b"na?ve ?\n"
