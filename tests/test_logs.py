"""Escaping of message lines and the daily files (clock injected)."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import time
from pathlib import Path

import pika
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edm.handlers import Message
from edm.handlers.log import MessageLog
from edm.logs import DailyLog, escape_body, escape_body_bytes, message_text, unescape_body


def cut_escaped(escaped: str, body: bytes, max_line: int) -> str:
    """The contract's cut, written the obvious way: the reference message_text must match."""
    if max_line <= 0:
        return escaped
    encoded = escaped.encode("utf-8")
    if len(encoded) <= max_line:
        return escaped
    head = encoded[:max_line].decode("utf-8", "ignore")
    digest = hashlib.sha256(body).hexdigest()
    return f"{head} …[cut: {len(body)} bytes, sha256 {digest}]"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"plain text", "plain text"),
        (b"a\nb", "a\\nb"),
        (b"tab\there", "tab\\there"),
        (b"cr\rlf", "cr\\rlf"),
        (b"back\\slash", "back\\\\slash"),
        ("中文 ünïcödé".encode(), "中文 ünïcödé"),
        (b"\xff\xfeinvalid", "\\xff\\xfeinvalid"),
        (b"\x00\x01\x1b[31m\x7f", "\\x00\\x01\\x1b[31m\\x7f"),
        ("c1 \u0085 \u009f".encode(), "c1 \\u0085 \\u009f"),
        (b"\xe4\xb8", "\\xe4\\xb8"),  # a truncated UTF-8 sequence
        (b"", ""),
    ],
)
def test_escape(body: bytes, expected: str) -> None:
    assert escape_body(body) == expected
    assert "\n" not in escape_body(body)


@given(st.binary(max_size=300))
def test_escape_round_trips_and_stays_one_line(body: bytes) -> None:
    escaped = escape_body(body)
    assert "\n" not in escaped and "\r" not in escaped
    assert unescape_body(escaped) == body


@given(st.text(max_size=200))
def test_escape_round_trips_text(text: str) -> None:
    body = text.encode("utf-8", "surrogatepass")
    assert unescape_body(escape_body(body)) == body


def test_cut_long_lines() -> None:
    body = b"x" * 100 + "é".encode() * 10
    escaped = escape_body(body)
    cut = cut_escaped(escaped, body, 50)
    digest = hashlib.sha256(body).hexdigest()
    assert cut == "x" * 50 + f" …[cut: {len(body)} bytes, sha256 {digest}]"
    assert cut_escaped(escaped, body, 0) == escaped
    assert cut_escaped(escaped, body, len(escaped.encode())) == escaped
    # never cuts inside a multi-byte character
    odd = cut_escaped(escape_body("é".encode() * 10), "é".encode() * 10, 5)
    assert odd.startswith("éé …[cut: 20 bytes")


@given(st.binary(max_size=400), st.integers(min_value=0, max_value=300))
def test_message_text_escapes_only_what_it_keeps(body: bytes, max_line: int) -> None:
    expected = cut_escaped(escape_body(body), body, max_line).encode()
    assert message_text(body, max_line) == expected


@given(
    st.one_of(
        st.binary(max_size=300),
        st.text(st.characters(min_codepoint=0x1F, max_codepoint=0x80)).map(str.encode),
    )
)
def test_escaped_bytes_are_the_escaped_text_encoded(body: bytes) -> None:
    """Including the plain printable-ASCII bodies that skip decoding (and the backslash, which
    does not)."""
    assert escape_body_bytes(body) == escape_body(body).encode()


def test_chunked_escaping_of_big_bodies_matches() -> None:
    text_body = ("中文 line\n\t" * 20000).encode()  # multi-byte characters across chunk edges
    binary_body = bytes(range(256)) * 1000
    for body in (text_body, binary_body, b"a" * 65535 + "é".encode() + b"b" * 70000):
        assert escape_body_bytes(body) == escape_body(body).encode()


class FakeClock:
    def __init__(self, start: dt.datetime) -> None:
        self.now = start.timestamp()

    def __call__(self) -> float:
        return self.now


def test_line_after_midnight_goes_to_the_next_days_file(tmp_path: Path) -> None:
    clock = FakeClock(dt.datetime(2026, 3, 1, 23, 59, 59, 500000))
    daily = DailyLog(tmp_path, "edm", clock=clock)
    sink = MessageLog(daily)
    sink.write(Message(b"before midnight", "rk", False, pika.BasicProperties()))
    clock.now += 1.0  # 00:00:00.5 the next day
    sink.write(Message(b"after\nmidnight", "rk", True, pika.BasicProperties()))
    first = (tmp_path / "edm.2026-03-01.log").read_text()
    second = (tmp_path / "edm.2026-03-02.log").read_text()
    assert first == "2026-03-01 23:59:59,500 INFO (+) before midnight\n"
    assert second == "2026-03-02 00:00:00,500 INFO [redelivered] (+) after\\nmidnight\n"
    assert (tmp_path / "edm.2026-03-01.log").stat().st_mode & 0o777 == 0o600


def test_keep_days_prunes_old_files_at_open_and_at_the_change_of_day(tmp_path: Path) -> None:
    for day in ("2026-02-20", "2026-02-26", "2026-02-27", "2026-02-28"):
        (tmp_path / f"edm.{day}.log").write_text("old\n")
    (tmp_path / "other.2026-01-01.log").write_text("not ours\n")
    clock = FakeClock(dt.datetime(2026, 3, 1, 12, 0, 0))
    daily = DailyLog(tmp_path, "edm", keep_days=2, clock=clock)
    daily.open()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["edm.2026-02-27.log", "edm.2026-02-28.log", "edm.2026-03-01.log", "other.2026-01-01.log"]
    clock.now += 86400
    daily.write("INFO", "next day")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["edm.2026-02-28.log", "edm.2026-03-01.log", "edm.2026-03-02.log", "other.2026-01-01.log"]


def test_reopen_and_reconfigure(tmp_path: Path) -> None:
    clock = FakeClock(dt.datetime(2026, 3, 1, 12, 0, 0))
    daily = DailyLog(tmp_path, "edm", clock=clock)
    daily.write("INFO", "one")
    (tmp_path / "edm.2026-03-01.log").rename(tmp_path / "moved.log")
    daily.reopen()
    daily.write("INFO", "two")
    assert (tmp_path / "edm.2026-03-01.log").read_text().endswith("INFO two\n")
    daily.reconfigure(tmp_path / "sub", "renamed", keep_days=0, fsync=True)
    daily.write("INFO", "three")
    assert (tmp_path / "sub" / "renamed.2026-03-01.log").read_text().endswith("INFO three\n")


def test_lines_from_two_writers_never_interleave(tmp_path: Path) -> None:
    a = DailyLog(tmp_path, "edm")
    b = DailyLog(tmp_path, "edm")
    for i in range(500):
        a.write("INFO", "a" * 3000 + str(i))
        b.write("INFO", "b" * 3000 + str(i))
    [path] = list(tmp_path.iterdir())
    lines = path.read_text().splitlines()
    assert len(lines) == 1000
    assert all(line.split(" ", 3)[3].strip("ab").isdigit() for line in lines)


def test_timestamp_format(tmp_path: Path) -> None:
    clock = FakeClock(dt.datetime(2026, 12, 31, 8, 5, 9, 7000))
    daily = DailyLog(tmp_path, "x", clock=clock)
    daily.write("WARNING", "hello")
    text = (tmp_path / "x.2026-12-31.log").read_text()
    assert text == "2026-12-31 08:05:09,007 WARNING hello\n"
    assert time.localtime(clock.now).tm_hour == 8
    assert os.listdir(tmp_path) == ["x.2026-12-31.log"]
