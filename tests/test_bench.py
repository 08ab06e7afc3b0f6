"""The benchmark keeps working: `bench/run.py --quick` runs end to end and proves correctness.

It asserts what every run must get right (each message logged exactly once, queues left
empty, everything it made removed) and never a speed: speeds belong to the bench's report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pika
import pytest
from conftest import AMQP_URL, ROOT, alive, root_connection


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    result = subprocess.run(
        [sys.executable, "bench/run.py", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("EDM_")},
            "PYTHONPATH": str(ROOT),
            "EDM_TEST_AMQP_URL": AMQP_URL,
        },
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Correctness: every message logged exactly once" in result.stdout
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def test_every_throughput_run_logs_each_message_once_and_empties_its_queue(quick: dict[str, Any]) -> None:
    throughput = quick["throughput"]
    expected = {"blocking-p1", "select-p1", "plain-p1", "edm-p1", "blocking-p50", "edm-p50"}
    assert expected | {"metrics-p1", "metrics-p50"} <= set(throughput)
    for key, consumer in throughput.items():
        assert consumer["ok"], key
        for run in consumer["runs"]:
            assert run["lines"] == run["unique"] == run["messages"] == 2000, (key, run)
            assert run["missing"] == run["duplicates"] == run["redelivered"] == 0, (key, run)
            assert run["queue_left"] == 0, (key, run)


def test_php_is_measured_when_installed_and_said_so_when_not(quick: dict[str, Any]) -> None:
    if quick["php"]:
        assert quick["throughput"]["php-p1"]["ok"]
    else:
        assert "php-p1" not in quick["throughput"]
        goal = next(t for t in quick["targets"] if "php-amqp" in t["name"])
        assert goal["status"] == "not measured (php-amqp not installed)"


def test_latency_rss_publish_and_fee_runs_are_complete(quick: dict[str, Any]) -> None:
    for kind, run in quick["latency"].items():
        assert run["lines"] == run["unique"] == run["messages"] > 0, kind
        assert run["duplicates"] == run["queue_left"] == 0, kind
    rss = quick["rss"]
    assert rss["lines"] == rss["unique"] == rss["messages"] and rss["queue_left"] == 0
    assert set(rss["after"]) >= {"main", "consumer"}
    publish = quick["publish"]
    assert publish["queued"] == publish["messages"]
    fee = quick["fee"]
    for run in fee["runs"]:
        assert run["edm"]["requests"] == run["edm"]["rows"] == run["requests"]
        assert run["reference"]["rows"] == run["requests"]


def test_results_carry_machine_info_and_targets(quick: dict[str, Any]) -> None:
    machine = quick["machine"]
    assert machine["nproc"] >= 1 and machine["rabbitmq"] and machine["python"] and machine["git_commit"]
    assert [t["status"] for t in quick["targets"]]
    assert quick["correct"] is True and quick["failures"] == []


def test_nothing_is_left_behind(quick: dict[str, Any]) -> None:
    cleanup = quick["cleanup"]
    assert cleanup["problems"] == [] and cleanup["killed"] == []
    assert not Path(quick["tmp"]).exists()
    assert cleanup["edm_pids"]
    assert not [pid for pid in cleanup["edm_pids"] if alive(pid) and _runs_bench_config(pid, quick["tmp"])]
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        for name in quick["queues"]:
            channel = connection.channel()
            with pytest.raises(pika.exceptions.ChannelClosedByBroker):
                channel.queue_declare(name, passive=True)
    finally:
        connection.close()
    con = root_connection()
    try:
        with con.cursor() as cur:
            cur.execute(
                "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE() "
                "AND table_name LIKE %s",
                (f"%{quick['tag']}%",),
            )
            assert cur.fetchone()[0] == 0
    finally:
        con.close()


def _runs_bench_config(pid: int, tmp: str) -> bool:
    try:
        return tmp.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
