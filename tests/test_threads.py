"""``amqp.threads``: many handlers at once in one consumer process (contract §12)."""

from __future__ import annotations

import re
import threading
from collections import Counter

from conftest import EdmEnv, wait_for

STARTED = re.compile(r" INFO Started (.*) in (edm-handler-\d+)\.$")


def configure(env: EdmEnv, **amqp: object) -> None:
    env.doc["amqp"].update(handler="edm_thread_handlers:sleepy", **amqp)
    env.write_config()


def events(env: EdmEnv) -> list[tuple[str, str]]:
    """("start" | "end", body) in the order the log has them."""
    out = []
    for line in env.log_text().splitlines():
        started = STARTED.search(line)
        if started:
            out.append(("start", started[1]))
        elif " (+) " in line:
            out.append(("end", line.split(" (+) ", 1)[1]))
    return out


def most_at_once(env: EdmEnv) -> int:
    running = most = 0
    for kind, _body in events(env):
        running += 1 if kind == "start" else -1
        most = max(most, running)
    return most


def test_eight_threads_overlap_and_a_stop_finishes_what_they_started(edm_env: EdmEnv) -> None:
    # Given 8 handler threads and 80 messages that each take 0.5 s
    configure(edm_env, threads=8)
    edm_env.start()
    bodies = [f"sleep=0.5 job {i}" for i in range(80)]
    edm_env.publish([b.encode() for b in bodies])
    # When 24 are done, edm is stopped
    wait_for(lambda: len(edm_env.bodies_logged()) >= 24, timeout=30)
    assert edm_env.cli("stop").returncode == 0
    # Then the handlers ran side by side, each in its own thread
    assert most_at_once(edm_env) >= 4
    threads = {m[2] for m in map(STARTED.search, edm_env.log_text().splitlines()) if m}
    assert len(threads) == 8
    # and every message started was finished and acked; the rest waits in the queue, none lost
    started = [body for kind, body in events(edm_env) if kind == "start"]
    logged = edm_env.bodies_logged()
    assert Counter(started) == Counter(logged), "a started message was not finished"
    assert len(set(logged)) == len(logged), "a message was handled twice"
    left = [body.decode() for body, _ in edm_env.drain_queue()]
    assert sorted(logged + left) == sorted(bodies)
    assert "prefetch 8, 8 handler threads)." in edm_env.log_text()


def test_all_threads_in_a_slow_handler_keep_the_connection(edm_env: EdmEnv) -> None:
    configure(edm_env, threads=4, heartbeat=2)
    edm_env.start()
    edm_env.publish([f"sleep=6 slow {i}".encode() for i in range(4)] + [b"quick"])
    wait_for(lambda: len(edm_env.bodies_logged()) == 5, timeout=40)
    assert most_at_once(edm_env) == 4
    log = edm_env.log_text()
    assert log.count("Connected to") == 1, log
    assert "Lost the connection" not in log and "[redelivered]" not in log
    assert edm_env.queue_depth() == 0
    assert edm_env.cli("stop").returncode == 0


def test_reload_from_one_thread_to_four_and_back_during_a_stream(edm_env: EdmEnv) -> None:
    configure(edm_env, threads=1)
    pid = edm_env.start()
    bodies = [f"sleep=0.01 job {i}" for i in range(600)]
    publisher = threading.Thread(target=edm_env.publish, args=([b.encode() for b in bodies],))
    publisher.start()
    for threads, after in ((4, 100), (1, 300)):
        wait_for(lambda a=after: len(edm_env.bodies_logged()) >= a, timeout=60)
        configure(edm_env, threads=threads)
        assert edm_env.cli("reload").returncode == 0
        wait_for(lambda t=threads: edm_env.state()["workers"]["consumer"].get("threads") == t, timeout=20)
    publisher.join(timeout=60)
    wait_for(lambda: len(set(edm_env.bodies_logged())) == 600 and edm_env.queue_depth() == 0, timeout=60)
    logged = edm_env.bodies_logged()
    assert sorted(set(logged)) == sorted(bodies)
    assert len(logged) == 600, Counter(b for b in logged if logged.count(b) > 1)
    assert "4 handler threads" in edm_env.log_text()
    assert edm_env.main_pid() == pid
    assert edm_env.cli("stop").returncode == 0


def test_a_stop_past_the_timeout_names_the_hung_handler_threads(edm_env: EdmEnv) -> None:
    # Given 4 handler threads, two of them stuck in a handler far longer than daemon.stop_timeout
    edm_env.doc["daemon"]["stop_timeout"] = 2
    configure(edm_env, threads=4)
    edm_env.start()
    edm_env.publish([b"sleep=60 stuck 1", b"sleep=60 stuck 2"])
    wait_for(
        lambda: (
            sorted(body for kind, body in events(edm_env) if kind == "start")
            == [
                "sleep=60 stuck 1",
                "sleep=60 stuck 2",
            ]
        )
    )
    hung = sorted(m[2] for m in map(STARTED.search, edm_env.log_text().splitlines()) if m)
    # the main process knows of both from the worker's state reports
    wait_for(lambda: edm_env.state()["workers"]["consumer"].get("busy") == 2)
    worker = edm_env.worker_pid()
    # When edm is stopped
    result = edm_env.cli("stop")
    assert result.returncode == 0, result.stderr
    # Then the SIGKILL warning names each hung thread and how long it has been handling
    named = re.compile(
        rf"The consumer worker \(pid {worker}\) did not stop within 2 s; still in a handler: "
        rf"{hung[0]} \(handling for (\d+) s\), {hung[1]} \(handling for (\d+) s\); sending SIGKILL\."
    )
    warning = named.search(edm_env.log_text())
    assert warning, edm_env.log_text()
    assert all(2 <= int(seconds) <= 10 for seconds in warning.groups())
    assert named.search(result.stderr), result.stderr  # `edm stop` says the same
    # and the two messages were never acked: they are back in the queue
    wait_for(lambda: edm_env.queue_depth() == 2)
