"""metrics.listen: the main process serves Prometheus metrics and a health check.

The integration tests run the real daemon against the real RabbitMQ and scrape it over HTTP;
the exposition is read with prometheus_client's own parser.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
import zmq
from conftest import ROOT, EdmEnv, free_port, wait_for
from netutil import Client
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from rabbitnode import free_base, running_cluster

from edm.config import parse
from edm.errors import ConfigError
from edm.metrics import BUCKETS, FEE_RESULTS, Exporter, Latency, Ledger, View, health
from edm.metrics.http import registry

NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
# Every label edm exports: small, bounded sets (no queue names, no message ids).
LABELS = {"outcome", "worker", "state", "version", "result", "le", "code"}


# -- helpers -------------------------------------------------------------------------------------


def get(url: str, timeout: float = 5) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(listen: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` of one scrape."""
    status, text = get(f"http://{listen}/metrics")
    assert status == 200, text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(listen: str, name: str, **labels: str) -> float | None:
    return scrape(listen).get((name, tuple(sorted(labels.items()))))


def messages(listen: str, outcome: str) -> float | None:
    return value(listen, "edm_messages_total", outcome=outcome)


def metrics_env(make_env: Any, overrides: dict[str, Any] | None = None) -> tuple[EdmEnv, str]:
    listen = f"127.0.0.1:{free_port()}"
    doc = {"metrics": {"listen": listen}}
    for section, values in (overrides or {}).items():
        doc.setdefault(section, {}).update(values)
    return make_env(doc), listen


# -- the config key ------------------------------------------------------------------------------

BASE = {"amqp": {}, "log": {}, "daemon": {}}


def test_metrics_listen_is_off_by_default_and_takes_host_port(tmp_path: Any) -> None:
    path = tmp_path / "mq.yaml"
    assert parse(BASE, path).metrics.listen is None
    for good in ("127.0.0.1:9325", "localhost:1", "[::1]:9325", "0.0.0.0:65535"):
        assert parse({**BASE, "metrics": {"listen": good}}, path).metrics.listen == good


@pytest.mark.parametrize("bad", ["9325", "127.0.0.1", ":9325", "127.0.0.1:0", "host:70000", "h:x", 9325, ""])
def test_a_bad_metrics_listen_names_the_key(tmp_path: Any, bad: Any) -> None:
    with pytest.raises(ConfigError, match=r"^metrics\.listen: "):
        parse({**BASE, "metrics": {"listen": bad}}, tmp_path / "mq.yaml")


def test_an_unknown_metrics_key_names_itself(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match=r"^metrics\.port: unknown key"):
        parse({**BASE, "metrics": {"port": 9325}}, tmp_path / "mq.yaml")


# -- the pieces ----------------------------------------------------------------------------------


def test_the_ledger_keeps_a_dead_workers_counts() -> None:
    ledger = Ledger()
    ledger.report("consumer", {"handled": 7, "retried": 2, "dead_lettered": 1})
    ledger.report("consumer", {"handled": 10, "retried": 2, "dead_lettered": 1})
    ledger.bank("consumer")  # it died; its successor starts from zero
    assert ledger.totals()["handled"] == 10
    ledger.report("consumer", {"handled": 3, "retried": 0, "dead_lettered": 0})
    assert ledger.totals() == {"handled": 13, "retried": 2, "dead_lettered": 1}
    ledger.bank("consumer")
    ledger.bank("consumer")  # dying twice without a report adds nothing
    assert ledger.totals()["handled"] == 13


def test_smtp_replies_are_counted_by_code_and_only_bounded_labels_pass() -> None:
    ledger = Ledger()
    ledger.report("consumer", {"handled": 2, "smtp_replies": {"250": 2, "550": 1}})
    ledger.bank("consumer")
    ledger.report("consumer", {"handled": 1, "smtp_replies": {"250": 1, "timeout": 1}})
    ledger.report("consumer-2", {"smtp_replies": {"250": 4, "<script>": 9, "999": 1, "connection": "x"}})
    totals = ledger.totals()
    assert {k: v for k, v in totals.items() if k.startswith("smtp.")} == {
        "smtp.250": 7,
        "smtp.550": 1,
        "smtp.timeout": 1,
    }
    exporter = Exporter()
    exporter.ledger = ledger
    exporter.publish({"workers": {}})
    text = generate_latest(registry(lambda: exporter.view)).decode()
    assert 'edm_smtp_replies_total{code="250"} 7.0' in text
    assert 'edm_smtp_replies_total{code="timeout"} 1.0' in text
    assert "999" not in text and "script" not in text


def test_no_smtp_metric_without_smtp_replies() -> None:
    exporter = Exporter()
    exporter.ledger.report("consumer", {"handled": 1})
    exporter.publish({"workers": {}})
    assert "edm_smtp_replies" not in generate_latest(registry(lambda: exporter.view)).decode()


def test_latency_buckets_span_microseconds_to_a_minute() -> None:
    latency = Latency()
    for seconds in (0.000004, 0.00001, 0.0003, 2.0, 3600.0):
        latency.observe(seconds)
    counts = latency.report()["counts"]
    assert counts[0] == 2  # 4 µs and exactly 10 µs: "le" includes the bound
    assert counts[BUCKETS.index(0.0005)] == 1
    assert counts[BUCKETS.index(2.5)] == 1
    assert counts[-1] == 1  # above the largest bound: only in +Inf
    assert BUCKETS[0] <= 0.00001 and BUCKETS[-1] >= 30


def test_health_names_every_reason() -> None:
    running = {"state": "RUNNING", "pid": 10, "connected": True, "activity": "consuming"}
    assert health(View({"workers": {"consumer": running}})) == (True, "ok")
    assert health(View()) == (False, "edm is starting")
    down = {**running, "connected": False, "activity": "backing off"}
    fatal = {"state": "FATAL", "pid": None, "last_error": "cannot open the log"}
    ok, text = health(View({"workers": {"consumer": down, "plugins": fatal}}))
    assert not ok
    assert text == (
        "the consumer is not connected to the broker (backing off); "
        "the plugins worker is FATAL: cannot open the log"
    )


# -- the daemon ----------------------------------------------------------------------------------


def test_counters_survive_a_killed_consumer(make_env: Any) -> None:
    env, listen = metrics_env(make_env)
    env.start()
    wait_for(lambda: get(f"http://{listen}/healthz") == (200, "ok\n"))  # RUNNING after STARTSECS
    # Given 1,000 messages handled
    env.publish([f"m{i}".encode() for i in range(1000)])
    wait_for(lambda: messages(listen, "ok") == 1000, timeout=60)
    assert value(listen, "edm_worker_restarts_total", worker="consumer") == 0
    assert value(listen, "edm_handler_seconds_count") == 1000
    # When the consumer is killed, the endpoint answers meanwhile and never counts back
    worker = env.worker_pid()
    assert worker is not None
    os.kill(worker, signal.SIGKILL)
    seen: list[float | None] = []

    def restarted() -> bool:
        seen.append(messages(listen, "ok"))
        return value(listen, "edm_worker_restarts_total", worker="consumer") == 1

    wait_for(restarted, timeout=30)
    env.wait_consuming()
    env.publish([f"n{i}".encode() for i in range(500)])
    # Then the counters go on from where they were
    wait_for(lambda: messages(listen, "ok") == 1500, timeout=60)
    assert seen and all(v == 1000 for v in seen), seen
    assert value(listen, "edm_handler_seconds_count") == 1500
    assert value(listen, "edm_consumer_connected", worker="consumer") == 1
    assert value(listen, "edm_queue_messages_ready") is not None
    assert messages(listen, "dead_lettered") == 0
    assert env.cli("stop").returncode == 0


def test_retries_and_dead_letters_are_counted_as_they_happen(make_env: Any) -> None:
    env, listen = metrics_env(
        make_env,
        {"amqp": {"handler": "edm_test_handlers:fail_poison", "max_retries": 2, "retry_delays": [1]}},
    )
    env.start()
    env.publish([b"poison 1", b"good 1", b"poison 2", b"good 2", b"poison 3"])
    wait_for(lambda: messages(listen, "dead_lettered") == 3, timeout=60)
    # each poison message was retried twice, then dead-lettered once; the good ones are ok
    assert messages(listen, "retried") == 6
    assert messages(listen, "ok") == 2
    assert messages(listen, "rejected") == 0
    assert len(env.drain_queue(f"{env.queue}.dead")) == 3
    # every call is timed: a retry is a delivery of its own (5 first calls + 6 retries)
    assert value(listen, "edm_handler_seconds_count") == 11
    assert env.cli("stop").returncode == 0


def test_a_reject_counts_as_rejected_not_as_dead_lettered(make_env: Any) -> None:
    env, listen = metrics_env(
        make_env,
        {"amqp": {"handler": "edm_class_handlers:Tagged", "handler_options": {"tag": "m"}, "max_retries": 0}},
    )
    env.start()
    env.publish([b"reject this", b"fine"])
    wait_for(lambda: messages(listen, "rejected") == 1 and messages(listen, "ok") == 1, timeout=30)
    assert messages(listen, "dead_lettered") == 0
    assert messages(listen, "retried") == 0
    assert len(env.drain_queue(f"{env.queue}.dead")) == 1
    assert env.cli("stop").returncode == 0


def test_every_name_and_label_follows_the_prometheus_rules(make_env: Any) -> None:
    env, listen = metrics_env(make_env)
    env.start()
    env.publish([b"one"])
    wait_for(lambda: messages(listen, "ok") == 1)
    status, text = get(f"http://{listen}/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    expected = {
        "edm_messages": "counter",
        "edm_handler_seconds": "histogram",
        "edm_worker_restarts": "counter",
        "edm_worker_state": "gauge",
        "edm_consumer_connected": "gauge",
        "edm_queue_messages_ready": "gauge",
        "edm_build_info": "gauge",
    }
    assert {name: families[name].type for name in expected if name in families} == expected
    for family in families.values():
        assert family.name.startswith("edm_") and NAME.match(family.name), family.name
        assert family.documentation, family.name
        for sample in family.samples:
            assert NAME.match(sample.name)
            if family.type == "counter":
                assert sample.name == family.name + "_total", sample.name
            else:
                assert not sample.name.endswith("_total"), sample.name
            for label in sample.labels:
                assert LABEL.match(label) and not label.startswith("__"), label
                assert label in LABELS, label
    # base units: seconds, never milli- or microseconds
    assert not [n for n in families if re.search(r"(milli|micro|_ms$|_us$)", n)]
    outcomes = {s.labels["outcome"] for s in families["edm_messages"].samples}
    assert outcomes == {"ok", "retried", "dead_lettered", "rejected"}
    assert env.cli("stop").returncode == 0


def test_a_port_in_use_is_a_start_error_naming_the_key(make_env: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        env = make_env({"metrics": {"listen": listen}})
        result = env.cli("start")
    assert result.returncode == 1
    assert f"metrics.listen: cannot listen on {listen}: Address already in use" in result.stderr
    assert env.main_pid() is None or not env.all_pids()


def test_a_reload_moves_the_endpoint_and_metrics_are_off_by_default(make_env: Any) -> None:
    env = make_env()
    env.start()
    listen = f"127.0.0.1:{free_port()}"
    with pytest.raises(urllib.error.URLError):
        get(f"http://{listen}/metrics", timeout=2)
    env.doc["metrics"] = {"listen": listen}
    env.write_config()
    assert env.cli("reload").returncode == 0
    wait_for(lambda: _answer(listen) == (200, "ok\n"), timeout=15)
    # the old endpoint closes when a reload moves it
    other = f"127.0.0.1:{free_port()}"
    env.doc["metrics"] = {"listen": other}
    env.write_config()
    assert env.cli("reload").returncode == 0
    wait_for(lambda: _answer(other), timeout=15)
    with pytest.raises(urllib.error.URLError):
        get(f"http://{listen}/metrics", timeout=2)
    # a port in use at a reload is an error in the log; the running endpoint stays
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        env.doc["metrics"] = {"listen": busy}
        env.write_config()
        assert env.cli("reload").returncode == 0
        refused = f"metrics.listen: cannot listen on {busy}: Address already in use; keeping {other}."
        wait_for(lambda: refused in env.log_text())
    assert _answer(other) is not None
    assert env.cli("stop").returncode == 0


def _answer(listen: str) -> tuple[int, str] | None:
    try:
        return get(f"http://{listen}/healthz", timeout=2)
    except urllib.error.URLError:
        return None


def test_healthz_is_503_with_the_reason_while_a_worker_is_fatal(make_env: Any) -> None:
    env, listen = metrics_env(make_env)
    env.start()
    wait_for(lambda: get(f"http://{listen}/healthz") == (200, "ok\n"))
    # Given a log directory the next consumer cannot open (a file stands in its place)
    log_dir = env.log_dir
    parked = log_dir.with_name("logs-parked")
    log_dir.rename(parked)
    log_dir.write_text("not a directory\n")
    try:
        worker = env.worker_pid()
        assert worker is not None
        os.kill(worker, signal.SIGKILL)
        # Then the supervisor gives up on it, and the endpoint says so
        wait_for(lambda: value(listen, "edm_worker_state", worker="consumer", state="FATAL") == 1, 30)
        status, text = get(f"http://{listen}/healthz")
        assert status == 503
        assert text.startswith("the consumer worker is FATAL: "), text
        assert value(listen, "edm_consumer_connected", worker="consumer") == 0
        assert value(listen, "edm_worker_restarts_total", worker="consumer") >= 1  # type: ignore[operator]
    finally:
        log_dir.unlink()
        parked.rename(log_dir)
    # When the cause is fixed and edm reloaded, it is healthy again
    assert env.cli("reload").returncode == 0
    wait_for(lambda: get(f"http://{listen}/healthz") == (200, "ok\n"), timeout=20)
    assert env.cli("stop").returncode == 0


def test_fee_requests_and_spool_are_exported_and_survive_a_restart(make_env: Any, table: str) -> None:
    port = free_port()
    env, listen = metrics_env(
        make_env,
        {
            "database": {"url": "mysql://root@127.0.0.1:3306/test", "pool_size": 4},
            "plugins": {"fee": {"enabled": True, "listen": f"tcp://127.0.0.1:{port}", "table": table}},
        },
    )
    env.start()
    wait_for(lambda: env.worker_pid("plugins") is not None)

    def ask(*bodies: bytes) -> None:
        client = Client(zmq.Context.instance(), f"tcp://127.0.0.1:{port}")
        try:
            for body in bodies:
                client.ask(body)
        finally:
            client.close()

    def fee(result: str) -> float | None:
        return value(listen, "edm_fee_requests_total", result=result)

    ask(b"1001,7,1.5", b"1002,7,2", b"1001,7,1.5", b"12,abc,1")
    wait_for(lambda: fee("stored") == 3 and fee("malformed") == 1, timeout=15)
    assert fee("duplicates") == 1
    assert (fee("spooled"), fee("busy")) == (0, 0)
    assert value(listen, "edm_fee_spool_pending") == 0
    # a killed plugin worker does not take its counts along
    worker = env.worker_pid("plugins")
    assert worker is not None
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: value(listen, "edm_worker_restarts_total", worker="plugins") == 1, timeout=30)
    wait_for(lambda: env.worker_pid("plugins") not in (None, worker), timeout=30)
    ask(b"1003,8,1")
    wait_for(lambda: fee("stored") == 4, timeout=15)
    assert fee("malformed") == 1
    assert env.cli("stop").returncode == 0


# -- a broker of the test's own, stopped while edm runs -----------------------------------------


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[Callable[..., subprocess.CompletedProcess[str]]]:
    """One RabbitMQ node of the test's own (scripts/rabbit-cluster --nodes 1), never the system's;
    yields ``run(*args)`` for the script's commands, ``urls`` giving its AMQP URL. Torn down
    by the PIDs the node recorded."""
    with running_cluster(tmp_path / "broker", free_base(nodes=1), 1) as node:
        yield node.run


@pytest.mark.slow
def test_healthz_is_503_while_the_broker_is_stopped(make_env: Any, private_broker: Any) -> None:
    url = private_broker("urls").stdout.split()[0]
    env, listen = metrics_env(make_env, {"amqp": {"url": url}})
    assert env.cli("start").returncode == 0
    wait_for(lambda: get(f"http://{listen}/healthz") == (200, "ok\n"), timeout=30)
    assert value(listen, "edm_consumer_connected", worker="consumer") == 1
    # When the broker stops, edm is not ready for work, says why, and goes on answering
    stop = private_broker("stop", "1")
    assert stop.returncode == 0, stop.stderr
    wait_for(lambda: get(f"http://{listen}/healthz")[0] == 503, timeout=60)
    status, text = get(f"http://{listen}/healthz")
    assert status == 503
    assert text.startswith("the consumer is not connected to the broker ("), text
    assert value(listen, "edm_consumer_connected", worker="consumer") == 0
    # And once the broker is back, so is the health
    start = private_broker("start", "1")
    assert start.returncode == 0, start.stderr
    wait_for(lambda: get(f"http://{listen}/healthz") == (200, "ok\n"), timeout=60)
    assert value(listen, "edm_worker_restarts_total", worker="consumer") == 0
    assert env.cli("stop").returncode == 0


# -- a real Prometheus server scrapes edm -------------------------------------------------------


def prometheus_query(port: int, query: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    try:
        status, text = get(url)
    except urllib.error.URLError:
        return []  # not listening yet
    if status != 200:
        return []
    doc = json.loads(text)
    assert doc["status"] == "success", doc
    result: list[dict[str, Any]] = doc["data"]["result"]
    return result


@pytest.mark.slow
def test_a_prometheus_server_scrapes_edm(make_env: Any, tmp_path: Path) -> None:
    env, listen = metrics_env(make_env)
    env.start()
    env.publish([f"p{i}".encode() for i in range(300)])
    wait_for(lambda: messages(listen, "ok") == 300, timeout=60)
    # Given Prometheus on a loopback port with a data dir of its own, scraping edm every second
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [{"job_name": "edm", "static_configs": [{"targets": [listen]}]}],
            }
        )
    )
    server = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("wb"),
    )
    try:
        # When it has scraped edm twice (successfully)
        def scraped_twice() -> bool:
            rows = prometheus_query(port, 'sum_over_time(up{job="edm"}[1m])')
            return bool(rows) and float(rows[0]["value"][1]) >= 2

        wait_for(scraped_twice, timeout=60, interval=0.5)
        # Then its API gives edm's count
        rows = prometheus_query(port, 'edm_messages_total{outcome="ok"}')
        assert [(r["metric"]["job"], r["value"][1]) for r in rows] == [("edm", "300")]
        rows = prometheus_query(port, 'edm_build_info{job="edm"}')
        assert len(rows) == 1 and rows[0]["metric"]["version"]
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    assert env.cli("stop").returncode == 0


# -- contrib: the dashboard and the alert rules --------------------------------------------------

CONTRIB = ROOT / "contrib"


def exported_names() -> set[str]:
    """Every sample and family name edm's collector exports, with every worker and the fee plugin."""
    exporter = Exporter()
    consumer = {"state": "RUNNING", "pid": 2, "connected": True, "queue_depth": 0, "restarts": 0}
    fee = {"state": "running", "spool_pending": 0, **dict.fromkeys(FEE_RESULTS, 0)}
    plugins = {"state": "RUNNING", "pid": 3, "restarts": 0, "plugins": {"fee": fee}}
    exporter.ledger.report("consumer", {"handled": 1, "latency": Latency().report()})
    exporter.publish({"workers": {"consumer": consumer, "plugins": plugins}})
    text = generate_latest(registry(lambda: exporter.view)).decode()
    families = list(text_string_to_metric_families(text))
    return {f.name for f in families} | {s.name for f in families for s in f.samples}


def test_the_grafana_dashboard_names_only_metrics_edm_exports() -> None:
    dashboard = json.loads((CONTRIB / "grafana" / "edm.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    for query in dashboard["templating"]["list"]:
        if isinstance(query.get("query"), dict):
            exprs.append(query["query"]["query"])
    used = {name for expr in exprs for name in re.findall(r"\bedm_[a-z_]+", expr)}
    assert used - exported_names() == set()
    # the panels the dashboard promises
    titles = " | ".join(p["title"] for p in dashboard["panels"])
    for needed in ("by outcome", "latency", "Queue depth", "restarts", "Fee requests", "spool"):
        assert needed in titles, needed
    assert {"edm_messages_total", "edm_handler_seconds_bucket", "edm_fee_spool_pending"} <= used


def test_the_alert_rules_pass_promtool_and_name_only_metrics_edm_exports() -> None:
    rules = CONTRIB / "prometheus" / "edm.rules.yml"
    check = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    # the alerts fire when they should (promtool's rule unit tests)
    tests = CONTRIB / "prometheus" / "edm.rules.test.yml"
    unit = subprocess.run(["promtool", "test", "rules", str(tests)], capture_output=True, text=True)
    assert unit.returncode == 0, unit.stdout + unit.stderr
    config = subprocess.run(
        ["promtool", "check", "config", str(CONTRIB / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert config.returncode == 0, config.stdout + config.stderr
    doc = yaml.safe_load(rules.read_text())
    alerts = {r["alert"]: r["expr"] for g in doc["groups"] for r in g["rules"]}
    assert {"EdmConsumerDisconnected", "EdmDeadLettersRising", "EdmFeeSpoolPending", "EdmWorkerFatal"} <= set(
        alerts
    )
    used = {name for expr in alerts.values() for name in re.findall(r"\bedm_[a-z_]+", expr)}
    assert used - exported_names() == set()
