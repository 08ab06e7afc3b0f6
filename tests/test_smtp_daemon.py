"""The smtp handler in the real daemon: consumed from RabbitMQ, delivered to a real SMTP server."""

from __future__ import annotations

import json
import os
import random
import signal
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import AMQP_URL, EdmEnv, alive, free_port, wait_for
from netutil import TcpProxy
from prometheus_client.parser import text_string_to_metric_families
from smtpserver import SmtpServer


@pytest.fixture
def server() -> Iterator[SmtpServer]:
    started = SmtpServer(free_port()).start()
    yield started
    started.stop()


@pytest.fixture
def smtp_env(make_env: Callable[..., EdmEnv], server: SmtpServer) -> EdmEnv:
    env = make_env(
        {
            "amqp": {"handler": "smtp", "max_retries": 0},
            "smtp": {
                "url": f"smtp://127.0.0.1:{server.port}",
                "timeout": 5,
                "journal": "../run/smtp.journal",
            },
        }
    )
    env.extra_queues.add(f"{env.queue}.dead")
    return env


def job(**fields: Any) -> bytes:
    return json.dumps(
        {"to": "zoe@example.com", "from": "news@example.org", "subject": "Hi", "text": "Hello", **fields}
    ).encode()


def dead_letters(env: EdmEnv, count: int) -> list[tuple[bytes, dict[str, Any]]]:
    dead = f"{env.queue}.dead"
    wait_for(lambda: env.queue_depth(dead) >= count, timeout=20)
    return env.drain_queue(dead)


def test_a_job_is_sent_logged_and_acked(smtp_env: EdmEnv, server: SmtpServer) -> None:
    smtp_env.start()
    smtp_env.publish([job(id="e2e-1")])
    wait_for(lambda: len(server.script.received) == 1, timeout=20)
    msgid = server.script.received[0].message["Message-ID"]
    wait_for(lambda: f"INFO Sent {msgid} to 1 recipients: 250 " in smtp_env.log_text())
    assert len(smtp_env.message_lines()) == 1
    wait_for(lambda: smtp_env.queue_depth() == 0)
    assert smtp_env.cli("stop").returncode == 0


def test_an_invalid_job_is_dead_lettered_with_the_field_named(smtp_env: EdmEnv, server: SmtpServer) -> None:
    smtp_env.start()
    smtp_env.publish([json.dumps({"text": "no recipient"}).encode()])
    [(body, headers)] = dead_letters(smtp_env, 1)
    assert body == b'{"text": "no recipient"}'
    assert headers["x-edm-error"].startswith("Reject: to: missing")
    assert server.script.received == []


def test_a_recipient_refused_for_good_is_dead_lettered_alone_and_the_rest_get_the_mail(
    smtp_env: EdmEnv, server: SmtpServer
) -> None:
    server.script.replies = {"b@example.com": ["550 5.1.1 <b@example.com>: Recipient address rejected"]}
    smtp_env.start()
    smtp_env.publish([job(to=["a@example.com", "b@example.com", "c@example.com"], id="partial")])
    [(body, headers)] = dead_letters(smtp_env, 1)
    copy = json.loads(body)
    assert copy["rcpt"] == ["b@example.com"] and copy["id"] == "partial"
    assert "550 5.1.1" in headers["x-edm-error"]
    assert [r.recipients for r in server.script.received] == [["a@example.com", "c@example.com"]]
    assert "WARNING" in next(
        line for line in smtp_env.log_text().splitlines() if "refused recipients" in line
    )


def test_a_job_sent_already_is_acked_without_sending(smtp_env: EdmEnv, server: SmtpServer) -> None:
    smtp_env.start()
    smtp_env.publish([job(id="twice"), job(id="twice")])
    wait_for(lambda: "Already sent <" in smtp_env.log_text(), timeout=20)
    wait_for(lambda: smtp_env.queue_depth() == 0)
    assert len(server.script.received) == 1
    assert len(smtp_env.message_lines()) == 2


def test_a_reload_reads_changed_templates(smtp_env: EdmEnv, server: SmtpServer) -> None:
    templates = smtp_env.base / "config" / "templates"
    templates.mkdir()
    (templates / "hello.txt").write_text("first {{ name }}\n")
    smtp_env.doc["smtp"]["templates"] = "templates"
    smtp_env.write_config()
    smtp_env.start()
    smtp_env.publish([job(text=None, template="hello", vars={"name": "A"}, id="t1")])
    wait_for(lambda: len(server.script.received) == 1, timeout=20)
    (templates / "hello.txt").write_text("second version {{ name }}\n")
    assert smtp_env.cli("reload").returncode == 0
    wait_for(lambda: "Applying new AMQP settings" in smtp_env.log_text(), timeout=10)
    smtp_env.publish([job(text=None, template="hello", vars={"name": "B"}, id="t2")])
    wait_for(lambda: len(server.script.received) == 2, timeout=20)
    texts = [r.message.get_content().replace("\r\n", "\n") for r in server.script.received]
    assert texts == ["first A\n", "second version B\n"]


def test_a_kill_after_the_servers_250_before_the_ack_sends_nothing_twice(
    make_env: Callable[..., EdmEnv], server: SmtpServer
) -> None:
    """The broker link is stalled while the server answers 250: the journal is committed and
    the log written, but the ack cannot reach the broker. The consumer is then killed -9; the
    broker gives the message to its successor, which acks it without sending."""
    proxy = TcpProxy(("127.0.0.1", 5672))
    try:
        env = make_env(
            {
                "amqp": {"handler": "smtp", "url": AMQP_URL.replace(":5672/", f":{proxy.port}/")},
                "smtp": {"url": f"smtp://127.0.0.1:{server.port}", "journal": "../run/smtp.journal"},
            }
        )
        env.start()
        server.script.on_data = proxy.stall
        env.publish([job(id="kill-after-250")])  # published straight to the broker, not through the proxy
        wait_for(lambda: "INFO Sent <" in env.log_text(), timeout=20)
        worker = env.worker_pid()
        assert worker is not None
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: not alive(worker))
        server.script.on_data = None
        proxy.cut()  # the broker sees the connection go: the unacked message goes back to the queue
        proxy.resume()
        proxy.restore()
        wait_for(lambda: "Already sent <" in env.log_text(), timeout=30)
        wait_for(lambda: env.queue_depth() == 0)
        assert len(server.script.received) == 1
        assert "[redelivered] (+) " in env.message_lines()[-1]
    finally:
        proxy.close()


def test_500_jobs_and_three_kills_send_each_message_once_but_one_per_kill(
    smtp_env: EdmEnv, server: SmtpServer
) -> None:
    smtp_env.publish([job(id=f"bulk-{n}") for n in range(500)])
    smtp_env.start()
    for threshold in sorted(random.sample(range(50, 450), 3)):
        wait_for(lambda t=threshold: len(server.script.received) >= t, timeout=60)
        worker = smtp_env.worker_pid()
        assert worker is not None
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda w=worker: smtp_env.worker_pid() not in (None, w), timeout=30)
    wait_for(
        lambda: smtp_env.queue_depth() == 0 and len(set(server.script.message_ids())) == 500, timeout=120
    )
    ids = server.script.message_ids()
    assert len(ids) - len(set(ids)) <= 3, sorted(i for i in set(ids) if ids.count(i) > 1)


def smtp_replies(listen: str) -> dict[str, float]:
    """``edm_smtp_replies_total`` by code, from one scrape of the daemon's /metrics."""
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        sample.labels["code"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "edm_smtp_replies"
        for sample in family.samples
        if sample.name == "edm_smtp_replies_total"
    }


def test_smtp_replies_are_exported_by_code_and_survive_a_killed_worker(
    smtp_env: EdmEnv, server: SmtpServer
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    smtp_env.doc["metrics"] = {"listen": listen}
    smtp_env.write_config()
    server.script.replies = {"gone@example.com": ["550 5.1.1 <gone@example.com>: no such user"]}
    smtp_env.start()
    # Given three jobs sent (250 each) and one refused for good (550 at RCPT)
    smtp_env.publish([job(id=f"m-{n}") for n in range(3)] + [job(to="gone@example.com", id="gone")])
    wait_for(lambda: smtp_replies(listen) == {"250": 3, "550": 1}, timeout=30)
    assert len(server.script.received) == 3
    assert len(dead_letters(smtp_env, 1)) == 1
    # When the consumer is killed, the counts stay and go on from there
    worker = smtp_env.worker_pid()
    assert worker is not None
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: smtp_env.worker_pid() not in (None, worker), timeout=30)
    smtp_env.wait_consuming()
    assert smtp_replies(listen) == {"250": 3, "550": 1}
    smtp_env.publish([job(id="after-the-kill")])
    wait_for(lambda: smtp_replies(listen) == {"250": 4, "550": 1}, timeout=30)
    assert smtp_env.cli("stop").returncode == 0
