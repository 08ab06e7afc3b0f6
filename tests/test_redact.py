"""Masking hides a password where it stands as one, and never the same letters elsewhere."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edm.config import parse
from edm.redact import mask_record, mask_text, mask_url, passwords_in, secrets_of, url_secrets

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("amqp://guest:guest@127.0.0.1:5672/%2F", "amqp://guest:***@127.0.0.1:5672/%2F"),
        ("amqps://edm:s3cret@mq.example.com/prod", "amqps://edm:***@mq.example.com/prod"),
        ("mysql://root:hunter2@db:3306/fees", "mysql://root:***@db:3306/fees"),
        ("smtp://mailer:pw@smtp.example.com:587", "smtp://mailer:***@smtp.example.com:587"),
        ("smtps://mailer:pw@smtp.example.com", "smtps://mailer:***@smtp.example.com"),
        ("sqlite:///var/lib/edm/fee.db", "sqlite:///var/lib/edm/fee.db"),
        ("amqp://guest@127.0.0.1/", "amqp://guest@127.0.0.1/"),
        ("amqp://127.0.0.1:5672/%2F", "amqp://127.0.0.1:5672/%2F"),
        ("amqp://u:@h/", "amqp://u:***@h/"),
        ("amqp://u:p%40ss%3Aw%2Frd@h/", "amqp://u:***@h/"),  # percent-encoded @ : /
        ("amqp://u:p@ss@h:5672/", "amqp://u:***@h:5672/"),  # unencoded @: the last one ends it
        ("amqp://u:a:b@h/", "amqp://u:***@h/"),  # unencoded : belongs to the password
        ("amqp://u:ab/cd@h:5672/%2F", "amqp://u:***@h:5672/%2F"),  # unencoded /: malformed
        ("amqp://u:a b@h/", "amqp://u:***@h/"),  # one URL: a blank does not end it
        ("amqp://h:5672/v@x", "amqp://h:5672/v@x"),  # an @ in the path is no userinfo
        ("amqp://u:p@[::1]:5672/", "amqp://u:***@[::1]:5672/"),
    ],
)
def test_a_url_of_any_scheme_shows_its_user_and_not_its_password(url: str, masked: str) -> None:
    assert mask_url(url) == masked
    assert mask_text(url) == masked or " " in url


def test_the_secrets_of_a_url_are_its_password_as_written_and_decoded() -> None:
    assert url_secrets(["amqp://u:p%40ss@h/", "mysql://r:pw@h/db", None, "sqlite:///x.db"]) == (
        "p%40ss",
        "p@ss",
        "pw",
    )
    assert url_secrets(["amqp://u@h/", "amqp://u:@h/", "not a url"]) == ()


def test_the_secrets_of_a_config_are_every_broker_url_and_the_database_url(tmp_path: Path) -> None:
    raw = {
        "amqp": {"url": ["amqp://a:first@h1/", "amqp://b:second@h2/"]},
        "database": {"url": "mysql://c:third@db/fees"},
    }
    config = parse(raw, tmp_path / "mq.yaml", environ={})
    assert secrets_of(config) == ("first", "second", "third")


def test_passwords_written_in_a_config_file_are_found() -> None:
    text = 'amqp:\n  url: ["amqp://u:p@h/", \'amqp://v:q@h2\']\ndatabase: {url: "mysql://r@db/x"}\n'
    assert passwords_in(text) == ("p", "q")
    assert passwords_in("amqp:\n  url: amqp://guest@h/\n") == ()


def test_every_url_in_a_text_is_masked_lists_included() -> None:
    urls = ["amqp://u:edm@h1:5672/%2F", "amqp://v:edm@h2:5672/%2F"]
    assert mask_text(str(urls)) == "['amqp://u:***@h1:5672/%2F', 'amqp://v:***@h2:5672/%2F']"
    assert mask_text(",".join(urls)) == "amqp://u:***@h1:5672/%2F,amqp://v:***@h2:5672/%2F"
    assert mask_text(f"Cannot connect to {urls[0]}: Connection refused.") == (
        "Cannot connect to amqp://u:***@h1:5672/%2F: Connection refused."
    )


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("host=db user=edm password=s3cret dbname=fees", "host=db user=edm password=*** dbname=fees"),
        ("Server=db;Password='a b c';Database=fees", "Server=db;Password=***;Database=fees"),
        ("mysql://db/fees?passwd=s3cret&charset=utf8", "mysql://db/fees?passwd=***&charset=utf8"),
        ("EDM_DB_PASSWORD = s3cret", "EDM_DB_PASSWORD = ***"),
    ],
)
def test_a_password_pair_of_a_dsn_is_masked(text: str, masked: str) -> None:
    assert mask_text(text) == masked


@pytest.mark.parametrize(
    "text",
    [
        "edm 0.1.0 starting (pid 42, config /tmp/edm_email_guest_failover/config/mq.yaml).",
        "Consuming from queue qq_edm (exchange email, routing key guest.edm, prefetch 1).",
        "Started the consumer worker (pid 43); handler edm.handlers:log_message.",
        "home node 'c1@localhost' of durable queue 'qq_edm.dead' in vhost '/' is down",
        "Access denied for user 'root'@'localhost' (using password: YES)",
        "Cannot connect to amqp://edm_user:***@127.0.0.1:1/%2F: Connection refused.",
        "/srv/edm/email/guest-edm/x.edm~ %edm+email",
    ],
)
@pytest.mark.parametrize("password", ["edm", "email", "guest"])
def test_the_password_letters_elsewhere_stay_readable(text: str, password: str) -> None:
    assert mask_text(text) == text
    assert mask_text(text.replace("***", password)) == text  # and a URL's own password goes
    record = logging.LogRecord("edm", logging.INFO, __file__, 1, "%s", (text,), None)
    assert mask_record(record, (password,)) == text


def test_a_url_inside_an_error_text_is_masked() -> None:
    error = ValueError("Port could not be cast: amqp://edm_user:email@127.0.0.1:x/%2F")
    record = logging.LogRecord("edm", logging.ERROR, __file__, 1, "Reload refused: %s", (error,), None)
    assert (
        mask_record(record) == "Reload refused: Port could not be cast: amqp://edm_user:***@127.0.0.1:x/%2F"
    )


def test_a_known_password_quoted_by_an_error_is_masked_but_not_in_our_own_words() -> None:
    error = RuntimeError("login refused for password 'hunter22' (hunter22)")
    record = logging.LogRecord(
        "edm", logging.ERROR, __file__, 1, "Queue hunter22: %s; %r", (error, error), None
    )
    assert mask_record(record, ("hunter22",)) == (
        "Queue hunter22: login refused for password '***' (***); "
        "RuntimeError(\"login refused for password '***' (***)\")"
    )
    assert mask_text("queue qq_hunter22, path /hunter22/x, 'hunter22'", ["hunter22"]) == (
        "queue qq_hunter22, path /hunter22/x, '***'"
    )


def test_a_traceback_masks_its_error_texts_and_leaves_the_code_alone() -> None:
    consumer = "consumer"  # the password is also a word of the code below
    try:
        try:
            raise ConnectionError(f"refused: amqp://u:{consumer}@h/ and '{consumer}'")
        except ConnectionError as exc:
            raise RuntimeError(f"the {consumer} failed") from exc
    except RuntimeError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("edm", logging.CRITICAL, __file__, 1, "Worker crashed.", (), exc_info)
    text = mask_record(record, (consumer,))
    assert text.startswith("Worker crashed.\nTraceback")
    assert "ConnectionError: refused: amqp://u:***@h/ and '***'\n" in text
    assert text.endswith("RuntimeError: the *** failed")
    assert '    raise RuntimeError(f"the {consumer} failed") from exc\n' in text


def test_a_short_password_is_not_searched_for_as_a_token() -> None:
    assert mask_text("error (1045, 'ok')", ["ok", "1"]) == "error (1045, 'ok')"


_PASSWORDS = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=24)
_SCHEMES = st.sampled_from(["amqp", "amqps", "mysql", "smtp", "smtps"])


@given(scheme=_SCHEMES, password=_PASSWORDS)
def test_any_percent_encoded_password_is_masked(scheme: str, password: str) -> None:
    url = f"{scheme}://edm_user:{quote(password, safe='')}@host.example:1234/v"
    assert mask_url(url) == f"{scheme}://edm_user:***@host.example:1234/v"
    assert password in url_secrets([url])


# urllib drops tabs and line ends from a URL and refuses brackets; these are masked all the same.
_UNENCODED = st.text(
    st.characters(exclude_characters="/?#[]", exclude_categories=("Cc",)), min_size=1, max_size=24
)


@given(scheme=_SCHEMES, password=_UNENCODED)
def test_an_unencoded_password_is_masked_the_way_urllib_reads_it(scheme: str, password: str) -> None:
    url = f"{scheme}://edm_user:{password}@host.example:1234/v"
    assert urlsplit(url).password == password
    assert mask_url(url) == f"{scheme}://edm_user:***@host.example:1234/v"
    assert url_secrets([url])[0] == password


_NAME_PART = st.text(st.characters(categories=("L", "Nd")), min_size=1, max_size=8)


@given(
    password=st.sampled_from(["edm", "email", "guest", "s3cr3t"]),
    parts=st.lists(_NAME_PART, max_size=3),
    glue=st.sampled_from(["_", ".", "/", "-", ":", "@"]),
)
def test_a_name_holding_the_password_stays_whole(password: str, parts: list[str], glue: str) -> None:
    name = glue.join([*parts, password, *parts]) if parts else f"qq{glue}{password}"
    text = f"queue {name} at /srv/{name}/mq.yaml ({name})"
    assert mask_text(text) == text
    assert mask_text(f"error: '{name}'", [password]) == f"error: '{name}'"


def test_the_module_and_the_status_command_load_no_pika_and_no_other_edm_module() -> None:
    probe = (
        "import sys, edm.redact; first = sorted(m for m in sys.modules if m.startswith(('edm', 'pika')));"
        "import edm.cli.main; print(first, 'pika' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "['edm', 'edm.redact'] False"
