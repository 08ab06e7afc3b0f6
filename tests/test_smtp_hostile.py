"""Hostile jobs: any bytes as a body is a Reject with a reason or a sent mail, never a crash, and
no value of a job ever adds a header or a recipient of its own."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
from conftest import free_port
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from smtpserver import SmtpServer

from edm.config import SMTP_OPTION, SmtpConfig
from edm.handlers.api import Message, Reject
from edm.handlers.log import MessageLog, use
from edm.handlers.smtp import SmtpHandler
from edm.logs import DailyLog

OWN = {"from", "to", "cc", "reply-to", "subject", "date", "message-id", "mime-version", "content-type"}
OWN |= {"content-transfer-encoding", "list-unsubscribe", "list-unsubscribe-post"}
HOSTILE = st.sampled_from(
    ["\r\n", "\n", "\r", "\0", "Bcc: evil@example.net", ":", "\x85", "\u2028", "=?utf-8?q?x?="]
)
TEXT = st.one_of(
    st.text(max_size=60), st.lists(st.one_of(st.text(max_size=10), HOSTILE), max_size=6).map("".join)
)


@pytest.fixture
def sender(tmp_path: Path) -> Iterator[tuple[SmtpHandler, SmtpServer]]:
    daily = DailyLog(tmp_path / "logs", "edm")
    daily.open()
    use(MessageLog(daily))
    server = SmtpServer(free_port()).start()
    config = SmtpConfig(url=f"smtp://127.0.0.1:{server.port}", journal=tmp_path / "journal", timeout=5)
    handler = SmtpHandler({SMTP_OPTION: config})
    yield handler, server
    handler.close()
    server.stop()
    use(None)


def jobs() -> st.SearchStrategy[bytes]:
    address = st.one_of(
        st.just("zoe@example.com"),
        st.just("Zoë <zoe@example.com>"),
        TEXT.map(lambda name: f"{name} <zoe@example.com>"),
        TEXT.map(lambda s: s + "@x"),
    )
    header_name = st.one_of(st.from_regex(r"X-[A-Za-z0-9-]{1,10}", fullmatch=True), TEXT)
    job = st.fixed_dictionaries(
        {"to": st.one_of(address, st.lists(address, max_size=3))},
        optional={
            "from": address,
            "cc": address,
            "subject": TEXT,
            "text": TEXT,
            "html": TEXT,
            "headers": st.dictionaries(header_name, TEXT, max_size=3),
            "unsubscribe": TEXT,
            "id": st.text(min_size=1, max_size=20),
            "reply_to": address,
            "vars": st.dictionaries(TEXT, TEXT, max_size=2),
        },
    )
    return st.one_of(
        st.binary(max_size=200),
        job.map(lambda j: json.dumps({"from": "news@example.org", "text": "x", **j}).encode()),
        job.map(lambda j: json.dumps(j, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=jobs())
def test_any_body_is_sent_or_rejected_with_a_reason_and_never_adds_a_header(
    sender: tuple[SmtpHandler, SmtpServer], body: bytes
) -> None:
    handler, server = sender
    before = len(server.script.received)
    try:
        handler(Message(body, "email", False, pika.BasicProperties()))
    except Reject as exc:
        assert exc.reason and ": " in exc.reason
        assert len(server.script.received) == before
        return
    if len(server.script.received) == before:
        return  # the same job came up again: already sent
    got = server.script.received[-1]
    job: dict[str, Any] = json.loads(body)
    own = OWN | {name.lower() for name in job.get("headers", {})}
    names = [name.lower() for name in got.message.keys()]
    assert set(names) <= own, names
    assert len(names) == len(set(names))
    assert got.recipients and all(r == "zoe@example.com" for r in got.recipients)
