"""The smtp section: defaults, errors naming the key, how it reaches the handler, its password."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import EdmEnv

from edm.config import SMTP_OPTION, SmtpConfig, parse
from edm.errors import ConfigError
from edm.handlers import loader
from edm.handlers.smtp import SmtpHandler
from edm.redact import mask_url, secrets_of


def _parse(doc: dict[str, Any], base: Path = Path("/etc/edm")) -> Any:
    return parse(doc, base / "mq.yaml", {})


def test_the_defaults_are_the_contracts() -> None:
    smtp = _parse({}).smtp
    assert smtp.url == "smtp://127.0.0.1:25" and smtp.starttls == "auto" and smtp.verify
    assert smtp.timeout == 30 and smtp.rate == 0 and smtp.journal_days == 7 and smtp.max_size == 10485760
    assert smtp.sender is None and smtp.helo is None and smtp.templates is None and smtp.ca_file is None
    assert smtp.journal == Path("/etc/run/smtp.journal")  # relative to the config file's directory


def test_from_and_the_other_keys_are_read(tmp_path: Path) -> None:
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "a.txt").write_text("x")
    smtp = _parse(
        {
            "smtp": {
                "url": "smtps://mailer:pw@mail.example.org:465",
                "from": "News <news@example.org>",
                "helo": "edm.example.org",
                "rate": 2.5,
                "templates": "templates",
                "journal": "run/j.db",
                "timeout": 3,
            }
        },
        tmp_path,
    ).smtp
    assert smtp.sender == "News <news@example.org>" and smtp.helo == "edm.example.org" and smtp.rate == 2.5
    assert smtp.templates == tmp_path / "templates" and smtp.journal == tmp_path / "run" / "j.db"
    assert [name for name, _, _ in smtp.templates_seen] == ["a.txt"]


@pytest.mark.parametrize(
    ("smtp", "key"),
    [
        ({"url": "http://host"}, "smtp.url"),
        ({"url": "smtp://"}, "smtp.url"),
        ({"url": "smtp://host/path"}, "smtp.url"),
        ({"url": "smtp://:pw@host"}, "smtp.url"),
        ({"starttls": "sometimes"}, "smtp.starttls"),
        ({"url": "smtps://host", "starttls": "always"}, "smtp.starttls"),
        ({"verify": "no"}, "smtp.verify"),
        ({"ca_file": "/nonexistent/ca.pem"}, "smtp.ca_file"),
        ({"timeout": 0}, "smtp.timeout"),
        ({"rate": -1}, "smtp.rate"),
        ({"from": "nobody"}, "smtp.from"),
        ({"helo": "two words"}, "smtp.helo"),
        ({"templates": "/nonexistent/templates"}, "smtp.templates"),
        ({"journal_days": 0}, "smtp.journal_days"),
        ({"max_size": 0}, "smtp.max_size"),
        ({"form": "typo@example.org"}, "smtp.form"),
    ],
)
def test_an_invalid_value_names_its_key(smtp: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        _parse({"smtp": smtp})
    assert str(raised.value).startswith(f"{key}: "), raised.value


def test_an_error_about_the_url_never_shows_its_password() -> None:
    with pytest.raises(ConfigError) as raised:
        _parse({"smtp": {"url": "smtp://mailer:hunter22@host/path"}})
    assert "hunter22" not in str(raised.value) and "mailer:***@host" in str(raised.value)


def test_the_smtp_handler_gets_the_section_in_its_options() -> None:
    config = _parse({"amqp": {"handler": "smtp"}, "smtp": {"rate": 3}})
    assert config.amqp.handler_options == {SMTP_OPTION: config.smtp}
    assert _parse({"amqp": {"handler": "edm.handlers.smtp:SmtpHandler"}}).amqp.handler_options[SMTP_OPTION]
    assert _parse({"smtp": {"rate": 3}}).amqp.handler_options == {}  # the log handler takes none
    with pytest.raises(ConfigError, match=r"^amqp\.handler_options\.smtp: reserved"):
        _parse({"amqp": {"handler": "smtp", "handler_options": {"smtp": 1}}})


def test_the_handler_refuses_options_of_its_own_and_a_missing_section(tmp_path: Path) -> None:
    factory = loader.load("smtp", {"speed": 1, SMTP_OPTION: SmtpConfig(journal=tmp_path / "j")})
    with pytest.raises(ConfigError, match=r"amqp\.handler_options\.speed: the smtp handler takes no options"):
        factory.build()
    with pytest.raises(ConfigError, match="got no smtp section"):
        SmtpHandler({})
    with pytest.raises(ConfigError, match=r"^smtp\.from: "):
        SmtpHandler({SMTP_OPTION: SmtpConfig(sender="a@b@c", journal=tmp_path / "j")})


def test_the_smtp_password_is_a_secret_and_masked() -> None:
    config = _parse({"smtp": {"url": "smtp://mailer:p%40ss-word@mail.example.org:587"}})
    assert {"p%40ss-word", "p@ss-word"} <= set(secrets_of(config))
    assert mask_url(config.smtp.url) == "smtp://mailer:***@mail.example.org:587"


def test_check_config_accepts_an_smtp_setup(edm_env: EdmEnv) -> None:
    edm_env.doc["amqp"]["handler"] = "smtp"
    edm_env.doc["smtp"] = {"url": "smtp://127.0.0.1:2525", "from": "news@example.org"}
    edm_env.write_config()
    result = edm_env.cli("check-config")
    assert result.returncode == 0, result.stderr
    edm_env.doc["smtp"]["starttls"] = "maybe"
    edm_env.write_config()
    result = edm_env.cli("check-config")
    assert result.returncode == 1 and "smtp.starttls" in result.stderr
