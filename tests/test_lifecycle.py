"""The daemon's lifecycle, end to end: the real `edm` process against the real RabbitMQ."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import EdmEnv, alive, wait_for

from edm.config import load
from edm.daemon.pidfile import Pidfile
from edm.daemon.process import HANDSHAKE_MAX, Handshake, Outcome
from edm.daemon.serve import serve
from edm.daemon.statusfile import Killed, StopRecord, read_stop_record, write_stop_record
from edm.errors import DaemonError
from edm.logs import escape_body


def test_start_consume_stop(edm_env: EdmEnv) -> None:
    # Given a started daemon
    pid = edm_env.start()
    wait_for(lambda: edm_env.state()["workers"]["consumer"]["state"] == "RUNNING")
    status = edm_env.cli("status")
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[0] == f"edm is running (pid {pid})"
    assert f"consumer: RUNNING, pid {edm_env.worker_pid()}, consuming" in status.stdout

    # When 200 messages of every kind are published
    bodies = [f"message {i} ü\n\t\\ 中文".encode() + bytes([i % 256]) for i in range(200)]
    edm_env.publish(bodies)

    # Then every one is logged once, as its exact escaped line
    wait_for(lambda: len(edm_env.message_lines()) >= 200, timeout=20)
    assert edm_env.bodies_logged() == [escape_body(b) for b in bodies]
    for line in edm_env.message_lines():
        assert line[:23].count(":") == 2 and line[23:29] == " INFO ", line

    # And a second start says so and changes nothing
    again = edm_env.cli("start")
    assert again.returncode == 0
    assert again.stdout.strip() == f"edm is already running (pid {pid})"

    # When it is stopped
    stop = edm_env.cli("stop")
    assert stop.returncode == 0, stop.stderr
    assert not alive(pid)
    assert not edm_env.pidfile.exists()
    status = edm_env.cli("status")
    assert status.returncode == 3
    assert status.stdout.splitlines()[0] == "edm is not running"
    assert edm_env.queue_depth() == 0
    log = edm_env.log_text()
    assert "edm 0.1.0 starting" in log and "edm stopped" in log
    assert "amqp://guest:***@127.0.0.1:5672/%2F" in log


def test_files_and_modes(edm_env: EdmEnv) -> None:
    edm_env.start()
    assert edm_env.pidfile.stat().st_mode & 0o777 == 0o644
    for log_file in edm_env.log_files():
        assert log_file.stat().st_mode & 0o777 == 0o600
    assert not edm_env.log_dir.stat().st_mode & 0o002
    assert not edm_env.pidfile.parent.stat().st_mode & 0o002
    stop = edm_env.cli("stop")
    assert stop.returncode == 0


def test_kill_9_leaves_a_stale_pidfile_that_start_takes_over(edm_env: EdmEnv) -> None:
    pid = edm_env.start()
    pids = edm_env.all_pids()
    assert len(pids) >= 2
    for p in pids:
        os.kill(p, signal.SIGKILL)
    wait_for(lambda: not any(alive(p) for p in pids))

    status = edm_env.cli("status")
    assert status.returncode == 1, status.stdout
    assert status.stdout.splitlines()[0] == f"edm is dead but pidfile exists (pid {pid})"

    new_pid = edm_env.start()
    assert new_pid != pid
    edm_env.publish([b"after the crash"])
    wait_for(lambda: "after the crash" in edm_env.bodies_logged())
    assert edm_env.cli("stop").returncode == 0


def test_graceful_stop_during_a_stream_loses_and_duplicates_nothing(edm_env: EdmEnv) -> None:
    edm_env.start()
    total = 2000
    bodies = [f"stream {i}".encode() for i in range(total)]
    publisher = threading.Thread(target=edm_env.publish, args=(bodies,))
    publisher.start()
    wait_for(lambda: len(edm_env.message_lines()) >= 300, timeout=30)
    stop = edm_env.cli("stop")
    assert stop.returncode == 0, stop.stderr
    publisher.join(timeout=60)

    logged = edm_env.bodies_logged()
    left = [body.decode() for body, _ in edm_env.drain_queue()]
    assert len(logged) == len(set(logged)), "a message was logged twice"
    assert sorted(logged + left) == sorted(b.decode() for b in bodies)
    assert len(left) > 0, "the stop came too late to prove anything"


def test_stop_when_not_running(edm_env: EdmEnv) -> None:
    result = edm_env.cli("stop")
    assert result.returncode == 0
    assert "not running" in result.stdout
    assert edm_env.cli("reload").returncode == 7


def test_reload_changes_the_log_name_and_keeps_the_pid(edm_env: EdmEnv) -> None:
    pid = edm_env.start()
    edm_env.publish([b"before reload"])
    wait_for(lambda: "before reload" in edm_env.bodies_logged())

    edm_env.doc["log"]["name"] = "renamed"
    edm_env.write_config()
    result = edm_env.cli("reload")
    assert result.returncode == 0, result.stderr
    wait_for(lambda: "Reloaded the config" in edm_env.log_text("renamed"), timeout=1.5)
    edm_env.wait_consuming()
    edm_env.publish([b"after reload"])
    wait_for(lambda: "after reload" in edm_env.bodies_logged("renamed"))
    assert "after reload" not in edm_env.bodies_logged("edm")
    assert edm_env.main_pid() == pid
    assert alive(pid)

    # An invalid config is refused by the command and nothing is sent
    edm_env.doc["amqp"]["prefetch"] = 0
    edm_env.write_config()
    refused = edm_env.cli("reload")
    assert refused.returncode == 1
    assert "amqp.prefetch" in refused.stderr

    # and refused by the daemon too when it gets the signal anyway
    os.kill(pid, signal.SIGHUP)
    wait_for(lambda: "Reload refused" in edm_env.log_text("renamed"))
    edm_env.publish([b"still the old config"])
    wait_for(lambda: "still the old config" in edm_env.bodies_logged("renamed"))
    assert edm_env.main_pid() == pid
    assert edm_env.cli("stop").returncode == 0


def test_reload_switches_the_queue_without_loss(edm_env: EdmEnv) -> None:
    pid = edm_env.start()
    new_queue = edm_env.queue + "-new"
    edm_env.extra_queues.add(new_queue)
    edm_env.publish([f"old {i}".encode() for i in range(50)])

    edm_env.doc["amqp"]["queue"] = new_queue
    edm_env.write_config()
    assert edm_env.cli("reload").returncode == 0

    def consuming_new() -> bool:
        return edm_env.state()["workers"]["consumer"].get("queue") == new_queue

    wait_for(consuming_new, timeout=5)
    old_queue, edm_env.queue = edm_env.queue, new_queue  # publish() binds the new queue too
    edm_env.wait_consuming()
    edm_env.publish([f"new {i}".encode() for i in range(50)])
    wait_for(lambda: sum(b.startswith("new ") for b in edm_env.bodies_logged()) == 50)
    logged = edm_env.bodies_logged()
    assert len(logged) == len(set(logged))
    # the old queue's messages are either logged or still in the old queue, once each
    left = [b.decode() for b, _ in edm_env.drain_queue(old_queue) if b.startswith(b"old ")]
    old_logged = [b for b in logged if b.startswith("old ")]
    assert sorted(old_logged + left) == sorted(f"old {i}" for i in range(50))
    assert edm_env.main_pid() == pid
    assert edm_env.cli("stop").returncode == 0


def test_usr1_reopens_the_log(edm_env: EdmEnv) -> None:
    pid = edm_env.start()
    [current] = edm_env.log_files()
    moved = current.with_name("rotated.log")
    current.rename(moved)
    os.kill(pid, signal.SIGUSR1)
    wait_for(lambda: edm_env.log_files() and "reopened the log files" in edm_env.log_text())
    edm_env.publish([b"after rotation"])
    wait_for(lambda: "after rotation" in edm_env.bodies_logged())
    assert "after rotation" not in moved.read_text()
    assert edm_env.cli("stop").returncode == 0


def test_consumer_killed_is_restarted_within_5s(edm_env: EdmEnv) -> None:
    pid = edm_env.start()
    worker = edm_env.worker_pid()
    assert worker is not None and worker != pid
    os.kill(worker, signal.SIGKILL)
    killed_at = time.monotonic()

    def replaced() -> bool:
        new = edm_env.worker_pid()
        return new is not None and new != worker

    # The promise is 5 s; the bound leaves room for a loaded 2-core machine (the status file
    # that tells the new PID is itself rewritten once a second).
    wait_for(replaced, timeout=8)
    assert time.monotonic() - killed_at < 8
    edm_env.wait_consuming(timeout=20)
    assert edm_env.main_pid() == pid
    status = edm_env.cli("status")
    assert f"pid {edm_env.worker_pid()}" in status.stdout
    assert "restarts 1" in status.stdout
    assert "killed by SIGKILL" in edm_env.log_text()
    edm_env.publish([b"after the worker died"])
    wait_for(lambda: "after the worker died" in edm_env.bodies_logged())
    assert edm_env.cli("stop").returncode == 0


def test_broker_unreachable_at_start_is_not_an_error(edm_env: EdmEnv) -> None:
    edm_env.doc["amqp"]["url"] = "amqp://guest:secret-pw@127.0.0.1:1/%2F"
    edm_env.write_config()
    result = edm_env.cli("start")
    assert result.returncode == 0, result.stderr
    wait_for(lambda: "Cannot connect to amqp://guest:***@127.0.0.1:1/%2F" in edm_env.log_text())
    assert edm_env.cli("status").returncode == 0
    assert "secret-pw" not in edm_env.log_text()
    assert edm_env.cli("stop").returncode == 0


def test_unimportable_handler_fails_start_with_the_key(edm_env: EdmEnv) -> None:
    edm_env.doc["amqp"]["handler"] = "no_such_module_xyz:handle"
    edm_env.write_config()
    result = edm_env.cli("start")
    assert result.returncode == 1
    assert "amqp.handler" in result.stderr and "no_such_module_xyz" in result.stderr
    assert "Traceback" not in result.stderr
    assert edm_env.cli("status").returncode == 3


def test_run_in_the_foreground(edm_env: EdmEnv) -> None:
    import subprocess
    import sys

    from conftest import ROOT

    process = subprocess.Popen(
        [sys.executable, "-m", "edm", "--config", str(edm_env.config_path), "run"],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: edm_env.main_pid() == process.pid)
        edm_env.wait_consuming()
        edm_env.publish([b"foreground"])
        wait_for(lambda: "foreground" in edm_env.bodies_logged())
        # a second instance on the same pidfile is refused
        second = edm_env.cli("run", timeout=30)
        assert second.returncode == 1
        assert f"already running (pid {process.pid})" in second.stderr
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        assert not edm_env.pidfile.exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_stop_that_has_to_sigkill_says_so(edm_env: EdmEnv) -> None:
    edm_env.doc["amqp"]["handler"] = "edm_test_handlers:slow"
    edm_env.doc["daemon"]["stop_timeout"] = 1
    edm_env.write_config()
    main = edm_env.start()
    # a record left by an earlier daemon is not this stop's: it must not be reported
    record = edm_env.pidfile.with_name("edm.stopped.json")
    write_stop_record(record, StopRecord(main + 100000, (Killed("plugins", 1, 9.0),)))
    edm_env.publish([b"sleep=30 stuck"])
    wait_for(lambda: "The slow handler started on b'sleep=30 stuck'" in edm_env.log_text())
    wait_for(lambda: edm_env.state()["workers"]["consumer"].get("busy") == 1)
    worker = edm_env.worker_pid()
    result = edm_env.cli("stop")
    assert result.returncode == 0
    # the handler runs inline, in the worker's main thread: the warning names it
    message = re.compile(
        rf"The consumer worker \(pid {worker}\) did not stop within 1 s; "
        r"still in a handler: MainThread \(handling for [1-9]\d* s\); sending SIGKILL\."
    )
    assert message.fullmatch(result.stderr.removeprefix("edm: ").rstrip("\n")), result.stderr
    assert re.search(rf"WARNING {message.pattern}", edm_env.log_text())
    assert not edm_env.pidfile.exists()
    assert not record.exists()  # read by this stop, then removed
    # the message that was in hand was never acked: it is back in the queue
    wait_for(lambda: edm_env.queue_depth() == 1)


def test_the_start_handshake_is_one_structured_reply() -> None:
    """Given each outcome, the reply survives the pipe as it was sent; a long reason is cut to
    fit one atomic pipe write; anything else on the pipe is an error, never a guess."""
    for sent in (
        Handshake(Outcome.STARTED, pid=4321),
        Handshake(Outcome.ALREADY_RUNNING, pid=77, error="edm is already running (pid 77)"),
        Handshake(Outcome.FAILED, error="amqp.handler: cannot import 'nope' — ü"),
    ):
        assert Handshake.decode(sent.encode()) == sent
    long = Handshake(Outcome.FAILED, error="ü" * 10_000).encode()
    assert len(long) <= HANDSHAKE_MAX
    assert Handshake.decode(long).error.startswith("üüü")  # type: ignore[union-attr]
    with pytest.raises(DaemonError, match="unreadable start report"):
        Handshake.decode(b"edm is already running (pid 5)")


def test_serve_reports_already_running_as_a_structured_reply(edm_env: EdmEnv) -> None:
    """Given the pidfile locked by another process, the daemon's body replies ALREADY_RUNNING
    with that PID (what `edm start` prints, exit 0), not a message to be matched."""
    config = load(edm_env.config_path)
    config.daemon.pidfile.parent.mkdir(parents=True, exist_ok=True)
    holder = Pidfile(config.daemon.pidfile)
    holder.acquire(pid=31337)
    replies: list[Handshake] = []
    umask = os.umask(0o022)
    try:
        assert serve(config, replies.append) == 1
    finally:
        os.umask(umask)
        holder.release()
    assert replies == [
        Handshake(Outcome.ALREADY_RUNNING, pid=31337, error="edm is already running (pid 31337)")
    ]


def test_stop_record_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "edm.stopped.json"
    assert read_stop_record(path) is None
    hung = ("edm-handler-3 (handling for 31 s)",)
    record = StopRecord(
        12, (Killed("consumer", 13, 1.5), Killed("plugins", 14, 30.0), Killed("consumer-2", 15, 30.0, hung))
    )
    write_stop_record(path, record)
    assert read_stop_record(path) == record
    assert (
        record.killed[0].message == "The consumer worker (pid 13) did not stop within 1.5 s; sending SIGKILL."
    )
    assert record.killed[2].message == (
        "The consumer-2 worker (pid 15) did not stop within 30 s; "
        "still in a handler: edm-handler-3 (handling for 31 s); sending SIGKILL."
    )
    path.write_text('{"pid": 12, "killed": [{"worker": "consumer"}]}')
    assert read_stop_record(path) is None
