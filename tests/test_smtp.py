"""The smtp handler against a real SMTP server (aiosmtpd on a free port), called directly.

Each test scripts the server's replies per recipient, calls ``SmtpHandler(options)(message)``
and reads back what the server received, the outcome raised and the log.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pika
import pytest
import trustme
from conftest import free_port
from smtpserver import SmtpServer

from edm.config import SMTP_OPTION, SmtpConfig
from edm.errors import ConfigError
from edm.handlers import counters
from edm.handlers.api import Message, Reject, Retry
from edm.handlers.log import MessageLog, use
from edm.handlers.smtp import RejectCopy, RetryCopy, SmtpHandler
from edm.handlers.smtp.journal import Journal
from edm.handlers.smtp.replies import REPORT_KEY
from edm.logs import DailyLog

JOB = {
    "to": ["Zoë Ünder <zoe@example.com>"],
    "from": "Newsletter <news@example.org>",
    "subject": "Grüße aus Köln",
    "text": "Hello Zoë\n",
    "id": "job-1",
}


def body(**fields: Any) -> bytes:
    job = {**JOB, **fields}
    return json.dumps({k: v for k, v in job.items() if v is not None}).encode()


def message(data: bytes, message_id: str | None = None, redelivered: bool = False) -> Message:
    return Message(data, "email", redelivered, pika.BasicProperties(message_id=message_id))


@pytest.fixture
def message_log(tmp_path: Path) -> Iterator[DailyLog]:
    daily = DailyLog(tmp_path / "logs", "edm")
    daily.open()
    use(MessageLog(daily))
    yield daily
    use(None)


@pytest.fixture(params=[False, True], ids=["one-by-one", "pipelining"])
def servers(request: pytest.FixtureRequest) -> Iterator[Callable[..., SmtpServer]]:
    """Every scripted test runs twice: commands one by one, and pipelined (RFC 2920)."""
    started: list[SmtpServer] = []

    def start(**kwargs: Any) -> SmtpServer:
        server = SmtpServer(free_port(), pipelining=request.param, **kwargs).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def handlers(tmp_path: Path, message_log: DailyLog) -> Iterator[Callable[..., SmtpHandler]]:
    made: list[SmtpHandler] = []

    def make(server: SmtpServer, scheme: str = "smtp", userinfo: str = "", **settings: Any) -> SmtpHandler:
        config = SmtpConfig(
            url=f"{scheme}://{userinfo}127.0.0.1:{server.port}",
            timeout=settings.pop("timeout", 5.0),
            journal=settings.pop("journal", tmp_path / "run" / "smtp.journal"),
            helo="edm.test",
        )
        handler = SmtpHandler({SMTP_OPTION: replace(config, **settings)})
        made.append(handler)
        return handler

    yield make
    for handler in made:
        handler.close()


def content(part: Any) -> str:
    """A part's text with the line ends of the wire (CRLF) read as newlines."""
    return str(part.get_content()).replace("\r\n", "\n")


def message_lines(daily: DailyLog) -> list[str]:
    text = "".join(p.read_text() for p in daily.directory.glob("edm.*.log"))
    return [line for line in text.splitlines() if " (+) " in line]


# -- 250 ------------------------------------------------------------------------------------------


def test_a_job_is_delivered_with_the_headers_and_parts_it_asks_for(
    servers: Callable[..., SmtpServer],
    handlers: Callable[..., SmtpHandler],
    message_log: DailyLog,
    caplog: Any,
) -> None:
    server = servers()
    handler = handlers(server)
    job = body(
        cc="copy@bücher.example",
        bcc="hidden@example.net",
        reply_to="Replies <reply@example.org>",
        html="<p>Hello <b>Zoë</b></p>",
        unsubscribe=[
            "https://example.org/u?id=1&list=weekly-news-and-offers-for-everyone",
            "mailto:u@example.org",
        ],
        headers={"X-Campaign": "spring-2026", "X-Note": "Café"},
    )
    with caplog.at_level(logging.INFO, logger="edm.handlers.smtp"):
        handler(message(job))

    [got] = server.script.received
    assert got.sender == "news@example.org"
    assert got.recipients == ["zoe@example.com", "copy@xn--bcher-kva.example", "hidden@example.net"]
    mail = got.message
    assert str(mail["From"]) == "Newsletter <news@example.org>"
    assert mail["To"].addresses[0].display_name == "Zoë Ünder"
    assert "Bcc" not in mail and "hidden" not in got.data.decode()
    assert mail["Subject"] == "Grüße aus Köln"
    raw_headers = got.data.split(b"\r\n\r\n", 1)[0].decode("ascii").replace("\r\n ", " ")  # unfolded
    assert "=?utf-8?" in raw_headers and "Köln" not in raw_headers
    assert (
        "List-Unsubscribe: <https://example.org/u?id=1&list=weekly-news-and-offers-for-everyone>, "
        "<mailto:u@example.org>\r\n" in raw_headers
    )
    assert "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n" in raw_headers
    assert mail["X-Campaign"] == "spring-2026" and mail["X-Note"] == "Café"
    assert mail["Reply-To"].addresses[0].addr_spec == "reply@example.org"
    assert mail["Date"] is not None and mail["Message-ID"].endswith("@example.org>")
    assert mail.get_content_type() == "multipart/alternative"
    text, html = mail.iter_parts()
    assert content(text) == "Hello Zoë\n" and content(html) == "<p>Hello <b>Zoë</b></p>\n"
    [line] = message_lines(message_log)
    assert line.split(" INFO ", 1)[1].startswith('(+) {"to": ') and '"id": "job-1"' in line
    assert f"Sent {mail['Message-ID']} to 3 recipients: 250 2.0.0 Ok: queued" in caplog.messages


def test_the_message_id_is_the_same_for_the_same_job_and_differs_for_another(
    servers: Callable[..., SmtpServer], handlers: Callable[..., SmtpHandler], tmp_path: Path
) -> None:
    server = servers()
    first = handlers(server, journal=tmp_path / "a.journal")
    again = handlers(server, journal=tmp_path / "b.journal")  # no journal in common: sent twice
    no_id = body(id=None)
    first(message(body()))
    again(message(body(), redelivered=True))
    first(message(no_id, message_id="amqp-id-7"))
    again(message(no_id, message_id="amqp-id-7"))
    first(message(no_id))
    again(message(no_id))
    ids = server.script.message_ids()
    assert ids[0] == ids[1] and ids[2] == ids[3] and ids[4] == ids[5]
    assert len({ids[0], ids[2], ids[4]}) == 3


def test_a_job_in_the_journal_is_acked_without_sending(
    servers: Callable[..., SmtpServer],
    handlers: Callable[..., SmtpHandler],
    message_log: DailyLog,
    caplog: Any,
) -> None:
    server = servers()
    handler = handlers(server)
    handler(message(body()))
    with caplog.at_level(logging.INFO, logger="edm.handlers.smtp"):
        handler(message(body(), redelivered=True))
    assert len(server.script.received) == 1
    assert f"Already sent {server.script.message_ids()[0]}" in caplog.messages
    assert "[redelivered] (+) " in message_lines(message_log)[1]


def test_the_session_is_kept_between_jobs_and_opened_again_when_lost(
    servers: Callable[..., SmtpServer], handlers: Callable[..., SmtpHandler]
) -> None:
    server = servers()
    handler = handlers(server)
    for n in range(3):
        handler(message(body(id=f"kept-{n}")))
    assert server.script.sessions == 1 and server.script.helos == ["edm.test"]  # smtp.helo
    server.stop()
    again = SmtpServer(server.port).start()
    try:
        handler(message(body(id="after-restart")))  # the old session is dead: a new one, no Retry
        assert len(again.script.received) == 1
    finally:
        again.stop()


# -- refusals -------------------------------------------------------------------------------------


def test_550_for_every_recipient_is_a_reject_quoting_the_server(
    servers: Callable[..., SmtpServer], handlers: Callable[..., SmtpHandler]
) -> None:
    server = servers()
    server.script.replies = {
        "a@example.com": ["550 5.1.1 no such user a"],
        "b@example.com": ["550 5.1.1 no b"],
    }
    with pytest.raises(Reject) as raised:
        handlers(server)(message(body(to=["a@example.com", "b@example.com"])))
    assert "550 5.1.1 no such user a" in raised.value.reason and "550 5.1.1 no b" in raised.value.reason
    assert server.script.received == []


def test_550_for_one_of_three_sends_to_the_rest_and_dead_letters_a_copy_for_it(
    servers: Callable[..., SmtpServer], handlers: Callable[..., SmtpHandler], caplog: Any
) -> None:
    server = servers()
    server.script.replies = {"b@example.com": ["550 5.1.1 <b@example.com>: unknown"]}
    job = body(to=["a@example.com", "b@example.com", "c@example.com"])
    delivery = message(job)
    with caplog.at_level(logging.INFO, logger="edm.handlers.smtp"), pytest.raises(RejectCopy) as raised:
        handlers(server)(delivery)

    [got] = server.script.received
    assert got.recipients == ["a@example.com", "c@example.com"]
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        len(warning) == 1 and "b@example.com (550 5.1.1 <b@example.com>: unknown)" in warning[0].getMessage()
    )
    copy = json.loads(raised.value.body)
    assert copy["rcpt"] == ["b@example.com"] and copy["to"] == json.loads(job)["to"]
    assert delivery.body == raised.value.body  # what the consumer dead-letters
    assert "550 5.1.1" in raised.value.reason


def test_a_dead_lettered_copy_replayed_goes_only_to_its_recipient_with_the_same_message_id(
    servers: Callable[..., SmtpServer], handlers: Callable[..., SmtpHandler]
) -> None:
    server = servers()
    server.script.replies = {"b@example.com": ["550 5.1.1 unknown"]}
    handler = handlers(server)
    with pytest.raises(RejectCopy) as raised:
        handler(message(body(to=["a@example.com", "b@example.com"])))
    handler(message(raised.value.body))  # replayed once the address was fixed on the server
    first, second = server.script.received
    assert second.recipients == ["b@example.com"]
    assert first.message["Message-ID"] == second.message["Message-ID"]
    assert second.message["To"] == first.message["To"]


def test_450_then_250_is_a_retry_then_a_single_delivery(
    servers: Callable[..., SmtpServer], handlers: Callable[..., SmtpHandler]
) -> None:
    server = servers()
    server.script.replies = {"zoe@example.com": ["450 4.2.0 mailbox busy"]}
    handler = handlers(server)
    delivery = message(body())
    with pytest.raises(Retry) as raised:
        handler(delivery)
    assert "450 4.2.0 mailbox busy" in raised.value.reason
    assert server.script.received == []
    handler(delivery)
    assert len(server.script.received) == 1


def test_450_for_one_of_three_retries_only_that_one(
    servers: Callable[..., SmtpServer], handlers: Callable[..., SmtpHandler]
) -> None:
    server = servers()
    server.script.replies = {"b@example.com": ["451 4.7.1 greylisted"]}
    handler = handlers(server)
    delivery = message(body(to=["a@example.com", "b@example.com", "c@example.com"]))
    with pytest.raises(RetryCopy) as raised:
        handler(delivery)
    assert json.loads(raised.value.body)["rcpt"] == ["b@example.com"]
    handler(delivery)  # the consumer hands the copy back
    first, second = server.script.received
    assert first.recipients == ["a@example.com", "c@example.com"] and second.recipients == ["b@example.com"]
    assert first.message["Message-ID"] == second.message["Message-ID"]


def test_the_journal_keeps_a_retry_of_the_whole_job_from_sending_twice(
    servers: Callable[..., SmtpServer], handlers: Callable[..., SmtpHandler]
) -> None:
    server = servers()
    server.script.replies = {"b@example.com": ["451 4.7.1 greylisted"]}
    handler = handlers(server)
    job = body(to=["a@example.com", "b@example.com"])
    with pytest.raises(RetryCopy):
        handler(message(job))
    handler(message(job, redelivered=True))  # the original, as after a crash before the retry
    assert [r.recipients for r in server.script.received] == [["a@example.com"], ["b@example.com"]]


@pytest.mark.parametrize("reply", ["421 4.3.2 shutting down", "DROP"])
def test_421_or_a_dropped_connection_at_data_is_a_retry_and_the_next_try_delivers(
    servers: Callable[..., SmtpServer], handlers: Callable[..., SmtpHandler], reply: str
) -> None:
    server = servers()
    server.script.data_replies = [reply]
    handler = handlers(server)
    delivery = message(body())
    with pytest.raises(Retry) as raised:
        handler(delivery)
    assert "DATA" in raised.value.reason
    assert server.script.received == []
    handler(delivery)
    assert len(server.script.received) == 1


def test_5xx_at_data_is_a_reject_and_4xx_a_retry(
    servers: Callable[..., SmtpServer], handlers: Callable[..., SmtpHandler]
) -> None:
    server = servers()
    server.script.data_replies = ["554 5.7.1 spam", "452 4.3.1 full"]
    handler = handlers(server)
    with pytest.raises(Reject, match=r"554 5\.7\.1 spam"):
        handler(message(body(id="spam")))
    with pytest.raises(Retry, match=r"452 4\.3\.1 full"):
        handler(message(body(id="full")))


def test_a_server_slower_than_the_timeout_is_a_retry_within_it(
    servers: Callable[..., SmtpServer], handlers: Callable[..., SmtpHandler]
) -> None:
    server = servers()
    server.script.delay = 3.0
    handler = handlers(server, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(Retry, match=r"smtp\.timeout"):
        handler(message(body()))
    assert time.monotonic() - started < 2.5


def test_a_journal_that_cannot_be_opened_fails_the_build_naming_smtp_journal(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    config = SmtpConfig(journal=tmp_path / "file" / "smtp.journal")
    with pytest.raises(ConfigError, match=r"^smtp\.journal: cannot open"):
        SmtpHandler({SMTP_OPTION: config})


def test_nothing_listening_is_a_retry(handlers: Callable[..., SmtpHandler]) -> None:
    server = SmtpServer(free_port())  # not started
    with pytest.raises(Retry, match="cannot connect"):
        handlers(server)(message(body()))


# -- invalid jobs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (b"not json", "body"),
        (b"\xff\xfe", "body"),
        (b"[1, 2]", "body"),
        (body(to=None), "to"),
        (body(to="not an address"), "to"),
        (body(to=["a@example.com", "b@@example.com"]), "to[1]"),
        (body(**{"from": "x@"}), "from"),
        (body(subject="Hi\r\nBcc: victim@example.com"), "subject"),
        (body(headers={"X-Evil": "a\nBcc: victim@example.com"}), "headers.X-Evil"),
        (body(headers={"Bcc": "victim@example.com"}), "headers.Bcc"),
        (body(headers={"Bad Name": "x"}), "headers.Bad Name"),
        (body(unsubscribe="javascript:alert(1)"), "unsubscribe"),
        (body(text=None), "text"),
        (body(text=5), "text"),
        (body(colour="red"), "colour"),
        (body(template="welcome"), "template"),
        (body(text="x" * 2000), "body"),
    ],
)
def test_an_invalid_job_is_rejected_with_a_reason_naming_the_field(
    servers: Callable[..., SmtpServer], handlers: Callable[..., SmtpHandler], data: bytes, field: str
) -> None:
    server = servers()
    with pytest.raises(Reject) as raised:
        handlers(server, max_size=1500)(message(data))
    assert raised.value.reason.startswith(f"{field}: "), raised.value.reason
    assert server.script.received == []


def test_no_from_in_the_job_takes_smtp_from_and_none_at_all_is_a_reject(
    servers: Callable[..., SmtpServer], handlers: Callable[..., SmtpHandler]
) -> None:
    server = servers()
    with pytest.raises(Reject, match=r"^from: missing"):
        handlers(server)(message(body(**{"from": None})))
    handlers(server, sender="Default <default@example.org>")(message(body(**{"from": None})))
    assert server.script.received[0].sender == "default@example.org"


# -- templates ------------------------------------------------------------------------------------


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    directory = tmp_path / "templates"
    directory.mkdir()
    (directory / "welcome.txt").write_text("Hello {{ name }}, your code is {{ code }}.\n")
    (directory / "welcome.html").write_text("<p>Hello {{ name }}</p>\n")
    (directory / "plain.txt").write_text("Only text for {{ name }}\n")
    (directory / "evil.txt").write_text("{{ ''.__class__.__mro__ }}\n")
    (directory / "broken.txt").write_text("{% if %}\n")
    return directory


def test_a_template_renders_both_parts_and_the_subject_with_html_escaped(
    servers: Callable[..., SmtpServer], handlers: Callable[..., SmtpHandler], templates: Path
) -> None:
    server = servers()
    handler = handlers(server, templates=templates)
    job = body(
        text=None, template="welcome", subject="Welcome, {{ name }}!", vars={"name": "<Zoë>", "code": 7}
    )
    handler(message(job))
    mail = server.script.received[0].message
    text, html = mail.iter_parts()
    assert mail["Subject"] == "Welcome, <Zoë>!"
    assert content(text) == "Hello <Zoë>, your code is 7.\n"
    assert content(html) == "<p>Hello &lt;Zoë&gt;</p>\n"
    handler(message(body(id="plain", text=None, template="plain", vars={"name": "A"})))
    assert server.script.received[1].message.get_content_type() == "text/plain"


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"template": "welcome", "vars": {"name": "x"}}, "vars: "),  # code is undefined
        ({"template": "missing"}, "template: no missing.txt nor missing.html"),
        ({"template": "evil"}, "template: "),
        ({"template": "broken"}, "template: broken.txt line 1"),
        ({"template": "../etc/passwd"}, "template: "),
        ({"template": "plain", "vars": {"name": "x"}, "subject": "{{ nope }}"}, "vars: "),
    ],
)
def test_a_template_problem_is_a_reject_naming_the_field(
    servers: Callable[..., SmtpServer],
    handlers: Callable[..., SmtpHandler],
    templates: Path,
    fields: dict[str, Any],
    reason: str,
) -> None:
    server = servers()
    with pytest.raises(Reject) as raised:
        handlers(server, templates=templates)(message(body(text=None, **fields)))
    assert raised.value.reason.startswith(reason), raised.value.reason


# -- TLS and AUTH ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


@pytest.mark.parametrize("scheme", ["smtp", "smtps"])
def test_tls_is_verified_with_the_ca_and_refused_without_it(
    servers: Callable[..., SmtpServer],
    handlers: Callable[..., SmtpHandler],
    ca: trustme.CA,
    tmp_path: Path,
    scheme: str,
) -> None:
    key = "tls" if scheme == "smtp" else "implicit_tls"
    server = servers(**{key: server_context(ca)})
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with pytest.raises(Retry, match="certificate not trusted"):
        handlers(server, scheme)(message(body(id="untrusted")))
    handlers(server, scheme, ca_file=ca_file, starttls="always" if scheme == "smtp" else "auto")(
        message(body())
    )
    assert len(server.script.received) == 1


@pytest.mark.parametrize("scheme", ["smtp", "smtps"])
def test_verify_false_sends_and_warns_once(
    servers: Callable[..., SmtpServer],
    handlers: Callable[..., SmtpHandler],
    ca: trustme.CA,
    caplog: Any,
    scheme: str,
) -> None:
    key = "tls" if scheme == "smtp" else "implicit_tls"
    server = servers(**{key: server_context(ca)})
    with caplog.at_level(logging.WARNING, logger="edm.handlers.smtp"):
        for n in range(2):
            handlers(server, scheme, verify=False)(message(body(id=f"unverified-{n}")))
    assert len(server.script.received) == 2
    warnings = [r.getMessage() for r in caplog.records if "smtp.verify is false" in r.getMessage()]
    assert len(warnings) == 1


def test_starttls_always_without_an_offer_is_a_retry(
    servers: Callable[..., SmtpServer], handlers: Callable[..., SmtpHandler]
) -> None:
    server = servers()
    with pytest.raises(Retry, match="does not offer STARTTLS"):
        handlers(server, starttls="always")(message(body()))


@pytest.mark.parametrize(
    ("mechanism", "exclude", "password"),
    [
        ("PLAIN", ["LOGIN"], "s3cr3t-Pässwort"),
        ("PLAIN", ["LOGIN"], "s3cr3t-Password"),
        ("LOGIN", ["PLAIN"], "s3cr3t-Password"),
    ],
)
def test_auth_logs_in_and_no_log_line_holds_the_password(
    servers: Callable[..., SmtpServer],
    handlers: Callable[..., SmtpHandler],
    caplog: Any,
    mechanism: str,
    exclude: list[str],
    password: str,
) -> None:
    server = servers(auth=("mailer", password), auth_exclude=exclude)
    with caplog.at_level(logging.DEBUG):
        handlers(server, userinfo=f"mailer:{quote(password)}@")(message(body()))
        with pytest.raises(Retry) as raised:
            handlers(server, userinfo="mailer:wrong-wrong@")(message(body(id="wrong")))
    assert server.script.logins == [(mechanism, "mailer")]
    assert "AUTH as mailer" in raised.value.reason and "wrong-wrong" not in raised.value.reason
    assert len(server.script.received) == 1
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert password not in text and quote(password) not in text and "wrong-wrong" not in text


# -- rate -----------------------------------------------------------------------------------------


def test_rate_limits_the_messages_per_second_of_the_process(
    servers: Callable[..., SmtpServer], handlers: Callable[..., SmtpHandler]
) -> None:
    server = servers()
    first, second = handlers(server, rate=25.0), handlers(server, rate=25.0)  # two threads, one bucket
    started = time.monotonic()
    for n in range(13):
        (first if n % 2 else second)(message(body(id=f"rate-{n}")))
    assert time.monotonic() - started >= 12 / 25 * 0.95 - 1 / 25  # a burst of one, then 25 per second
    assert len(server.script.received) == 13


# -- the journal ----------------------------------------------------------------------------------


def test_the_journal_forgets_message_ids_after_journal_days(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "smtp.journal", keep_days=2)
    journal.record("<old@example.org>", ["a@example.com"])
    journal.record("<new@example.org>", ["a@example.com", "b@example.com"])
    three_days = time.time() - 3 * 86400
    journal.db.execute("UPDATE sent SET sent_at = ? WHERE message_id = '<old@example.org>'", (three_days,))
    journal.close()
    again = Journal(tmp_path / "smtp.journal", keep_days=2)  # prunes when opened, then hourly
    assert again.delivered("<old@example.org>") == set()
    assert again.delivered("<new@example.org>") == {"a@example.com", "b@example.com"}
    assert again.db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    again.close()


def test_lines_that_start_with_a_dot_arrive_as_written(
    servers: Callable[..., SmtpServer], handlers: Callable[..., SmtpHandler]
) -> None:
    server = servers()
    text = ".\n.leading dot\n..two dots\nend.\n"
    handlers(server)(message(body(text=text)))
    assert content(server.script.received[0].message) == text


# -- the replies counted for edm_smtp_replies_total ------------------------------------------------


def counted_since(before: dict[str, int]) -> dict[str, int]:
    now = counters.report().get(REPORT_KEY, {})
    return {code: n - before.get(code, 0) for code, n in now.items() if n != before.get(code, 0)}


def test_each_deciding_reply_is_counted_by_code_and_no_reply_as_timeout_or_connection(
    servers: Callable[..., SmtpServer], handlers: Callable[..., SmtpHandler]
) -> None:
    server = servers()
    server.script.replies = {
        "zoe@example.com": ["450 4.2.0 mailbox busy"],
        "b@example.com": ["550 5.1.1 no such user"],
    }
    handler = handlers(server)
    before = counters.report().get(REPORT_KEY, {})
    with pytest.raises(Retry):
        handler(message(body()))  # 450 at RCPT
    handler(message(body()))  # then 250 at the end of DATA
    with pytest.raises(RejectCopy):
        handler(message(body(to=["a@example.com", "b@example.com"], id="two")))  # 550 for one, 250
    assert counted_since(before) == {"450": 1, "250": 2, "550": 1}

    slow = servers()
    slow.script.delay = 3.0
    before = counters.report().get(REPORT_KEY, {})
    with pytest.raises(Retry):
        handlers(slow, timeout=0.5)(message(body(id="slow")))
    with pytest.raises(Retry):
        handlers(SmtpServer(free_port()))(message(body(id="nobody")))  # nothing listening
    assert counted_since(before) == {"timeout": 1, "connection": 1}


def _open_journal_at_once(path: Path, barrier: Any, results: Any) -> None:
    barrier.wait()
    try:
        Journal(path, keep_days=1).db.close()
        results.put("ok")
    except ConfigError as exc:
        results.put(str(exc))


def test_workers_that_start_together_all_open_a_new_journal(tmp_path: Path) -> None:
    # Given four worker processes that open the same new journal at the same moment, twenty
    # times over (sqlite answers "database is locked" at once to one of two connections that
    # switch a new file to WAL together; before the retry, about one open in ten failed)
    context = multiprocessing.get_context("fork")
    failures = []
    for n in range(20):
        barrier, results = context.Barrier(4), context.Queue()
        path = tmp_path / f"journal-{n}.sqlite"
        processes = [
            context.Process(target=_open_journal_at_once, args=(path, barrier, results)) for _ in range(4)
        ]
        for process in processes:
            process.start()
        failures += [r for r in (results.get(timeout=60) for _ in processes) if r != "ok"]
        for process in processes:
            process.join(timeout=60)
    # Then every one of them opened it
    assert failures == []
