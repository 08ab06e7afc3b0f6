"""`amqp.workers`: N consumer processes, each supervised alone, each its own line in `status`.

The real `edm` against the real RabbitMQ: the processes, their connections, a kill -9 of one,
and a reload that changes their number while the main process keeps its PID.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import urllib.request
from collections import Counter
from typing import Any

from conftest import EdmEnv, free_port, wait_for

NAMES = ["consumer", "consumer-2", "consumer-3"]


def workers(env: EdmEnv) -> dict[str, Any]:
    return dict(env.state().get("workers", {}))


def all_consuming(env: EdmEnv, names: list[str]) -> bool:
    found = workers(env)
    return sorted(found) == sorted(names) and all(
        found[n].get("state") == "RUNNING" and found[n].get("activity") == "consuming" for n in names
    )


def test_three_consumer_processes_each_supervised_alone(edm_env: EdmEnv) -> None:
    # Given three consumer processes
    listen = f"127.0.0.1:{free_port()}"
    edm_env.doc["amqp"]["workers"] = 3
    edm_env.doc["metrics"] = {"listen": listen}
    edm_env.write_config()
    main = edm_env.start()
    wait_for(lambda: all_consuming(edm_env, NAMES), timeout=20)
    wait_for(lambda: edm_env._consumers() == 3)

    # Then each is a connected consumer for the metrics, and the daemon is healthy
    def connected() -> list[str]:
        with urllib.request.urlopen(f"http://{listen}/metrics", timeout=5) as response:
            text = response.read().decode()
        return [n for n in NAMES if f'edm_consumer_connected{{worker="{n}"}} 1.0' in text]

    wait_for(lambda: connected() == NAMES)
    with urllib.request.urlopen(f"http://{listen}/healthz", timeout=5) as response:
        assert response.status == 200

    # Then status shows one line per process, and --json one entry each
    status = edm_env.cli("status")
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0] == f"edm is running (pid {main})"
    shown = [line.strip().split(":")[0] for line in lines if line.startswith("  consumer")]
    assert shown == NAMES
    doc = json.loads(edm_env.cli("status", "--json").stdout)
    assert sorted(doc["workers"]) == NAMES
    pids = {name: doc["workers"][name]["pid"] for name in NAMES}
    assert len(set(pids.values())) == 3

    # When one is killed mid-stream
    bodies = [f"message {i}".encode() for i in range(300)]
    edm_env.publish(bodies[:150])
    os.kill(pids["consumer-2"], signal.SIGKILL)
    edm_env.publish(bodies[150:])

    # Then only it is restarted, and every message is logged
    wait_for(lambda: (workers(edm_env).get("consumer-2") or {}).get("restarts") == 1, timeout=10)
    wait_for(lambda: all_consuming(edm_env, NAMES), timeout=20)
    now = {name: w["pid"] for name, w in workers(edm_env).items()}
    assert now["consumer"] == pids["consumer"] and now["consumer-3"] == pids["consumer-3"]
    assert now["consumer-2"] != pids["consumer-2"]
    assert [workers(edm_env)[n]["restarts"] for n in NAMES] == [0, 1, 0]
    wait_for(lambda: set(bodies) <= {b.split(" [")[0].encode() for b in edm_env.bodies_logged()}, timeout=20)
    assert "The consumer-2 worker killed by SIGKILL; restarting it" in edm_env.log_text()


def test_a_reload_changes_the_number_of_consumer_processes(edm_env: EdmEnv) -> None:
    main = edm_env.start()
    first = edm_env.worker_pid()
    # When amqp.workers goes from 1 to 3, the two new ones start and the first stays
    edm_env.doc["amqp"]["workers"] = 3
    edm_env.write_config()
    assert edm_env.cli("reload").returncode == 0
    wait_for(lambda: all_consuming(edm_env, NAMES), timeout=20)
    assert edm_env.worker_pid() == first and edm_env.main_pid() == main
    wait_for(lambda: edm_env._consumers() == 3)
    # When it goes back to 1, the extra ones stop and leave status
    edm_env.doc["amqp"]["workers"] = 1
    edm_env.write_config()
    assert edm_env.cli("reload").returncode == 0
    wait_for(lambda: sorted(workers(edm_env)) == ["consumer"], timeout=20)
    wait_for(lambda: edm_env._consumers() == 1)
    assert edm_env.worker_pid() == first and edm_env.main_pid() == main
    edm_env.publish([b"after the reloads"])
    wait_for(lambda: "after the reloads" in edm_env.bodies_logged())
    assert "The consumer-3 worker stopped (no longer configured)." in edm_env.log_text()


def test_a_reload_changes_workers_and_threads_together_during_a_stream(edm_env: EdmEnv) -> None:
    # Given one consumer process with one thread and a stream of 900 messages of 10 ms
    edm_env.doc["amqp"].update(handler="edm_thread_handlers:sleepy", workers=1, threads=1)
    edm_env.write_config()
    main = edm_env.start()
    bodies = [f"sleep=0.01 job {i}" for i in range(900)]
    publisher = threading.Thread(target=edm_env.publish, args=([b.encode() for b in bodies],))
    publisher.start()

    def running(names: list[str], threads: int) -> bool:
        found = workers(edm_env)
        return all_consuming(edm_env, names) and all(found[n].get("threads") == threads for n in names)

    # When a reload raises both to 3 processes of 4 threads, and a later one lowers them to 2 × 1
    for count, threads, after in ((3, 4, 100), (2, 1, 400)):
        wait_for(lambda a=after: len(edm_env.bodies_logged()) >= a, timeout=60)
        edm_env.doc["amqp"].update(workers=count, threads=threads)
        edm_env.write_config()
        assert edm_env.cli("reload").returncode == 0
        wait_for(lambda c=count, t=threads: running(NAMES[:c], t), timeout=30)
    publisher.join(timeout=60)

    # Then every message is logged exactly once, and the main process is the same
    wait_for(lambda: len(set(edm_env.bodies_logged())) == 900 and edm_env.queue_depth() == 0, timeout=60)
    logged = edm_env.bodies_logged()
    assert sorted(set(logged)) == sorted(bodies)
    assert len(logged) == 900, Counter(b for b in logged if logged.count(b) > 1)
    assert edm_env.main_pid() == main
    log = edm_env.log_text()
    assert "4 handler threads" in log and "The consumer-3 worker stopped (no longer configured)." in log
    assert edm_env.cli("stop").returncode == 0
