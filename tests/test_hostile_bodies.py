"""Hostile AMQP bodies: each is one escaped line, acked; memory stays bounded; edm goes on."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from conftest import EdmEnv, wait_for

from edm.logs import escape_body, escape_body_bytes, unescape_body

MIB = 1024 * 1024


def _vm(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{key} not found for pid {pid}")


HOSTILE = [
    b"\x1b[2J\x1b[31mterminal takeover\x07\x1b]0;title\x07",
    "c1 controls \u0085\u009b\u0090".encode(),
    b"\xff\xfe\x00\x00invalid utf-8 \xc3\x28 \xed\xa0\x80",
    bytes(range(256)),
    b"line\n" * 100_000,
    b"",
    b"\\n is not a newline\\",
    "中文 ✓ \u2028 \ufeff".encode(),
]


def test_hostile_bodies_are_one_line_each(edm_env: EdmEnv) -> None:
    edm_env.start()
    edm_env.publish([*HOSTILE, b"after the hostile ones"])
    wait_for(lambda: "after the hostile ones" in edm_env.bodies_logged(), timeout=30)
    lines = edm_env.message_lines()
    assert len(lines) == len(HOSTILE) + 1
    for line, body in zip(lines, HOSTILE, strict=False):
        escaped = line.split(" (+) ", 1)[1]
        assert escaped == escape_body(body)
        assert unescape_body(escaped) == body
    raw = b"".join(p.read_bytes() for p in edm_env.log_files())
    assert b"\x1b" not in raw and b"\r" not in raw and "\u0085".encode() not in raw
    assert edm_env.queue_depth() == 0
    assert edm_env.cli("stop").returncode == 0


def test_a_huge_body_is_logged_whole_with_bounded_memory(edm_env: EdmEnv) -> None:
    edm_env.start()
    edm_env.wait_consuming()  # the worker has imported, connected and settled
    worker = edm_env.worker_pid()
    assert worker is not None
    before = _vm(worker, "VmHWM")
    body = os.urandom(16 * MIB)
    edm_env.publish([body, b"small one after"])
    wait_for(lambda: edm_env.queue_depth() == 0, timeout=60, interval=0.5)
    wait_for(lambda: b"(+) small one after\n" in edm_env.log_files()[0].read_bytes()[-100:], timeout=30)
    peak = _vm(worker, "VmHWM")
    growth = peak - before
    print(f"worker RSS grew {growth / MIB:.1f} MiB for a {len(body) / MIB:.0f} MiB body")
    # The body itself, pika's frames and the escaped line (up to 4 bytes per byte):
    # a small multiple of the body, never a runaway.
    assert growth < 6 * len(body), f"grew {growth / MIB:.0f} MiB for a {len(body) / MIB:.0f} MiB body"
    raw = edm_env.log_files()[0].read_bytes()
    [line] = [x for x in raw.split(b"\n") if len(x) > MIB]
    assert line.split(b" (+) ", 1)[1] == escape_body_bytes(body)  # the whole body, one line
    assert edm_env.queue_depth() == 0
    assert edm_env.cli("stop").returncode == 0


def test_max_line_cuts_and_says_what_it_cut(edm_env: EdmEnv) -> None:
    edm_env.doc["log"]["max_line"] = 100
    edm_env.write_config()
    edm_env.start()
    big = b"A" * 50 + b"\n" * 200 + os.urandom(4 * MIB)
    edm_env.publish([big, b"short"])
    wait_for(lambda: "short" in edm_env.bodies_logged(), timeout=30)
    cut_line, short_line = edm_env.message_lines()
    digest = hashlib.sha256(big).hexdigest()
    escaped = cut_line.split(" (+) ", 1)[1]
    assert escaped == "A" * 50 + "\\n" * 25 + f" …[cut: {len(big)} bytes, sha256 {digest}]"
    assert short_line.endswith(" (+) short")
    assert edm_env.cli("stop").returncode == 0
