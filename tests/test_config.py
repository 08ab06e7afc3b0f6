"""Config validation: every error names its key; unknown keys and unsafe YAML are refused."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import EdmEnv

from edm.config import find_config, load, parse
from edm.errors import ConfigError
from edm.handlers import loader

ROOT = Path(__file__).resolve().parent.parent


def _parse(doc: dict[str, Any], environ: dict[str, str] | None = None, base: Path = Path("/etc/edm")):
    return parse(doc, base / "mq.yaml", environ or {})


def test_the_shipped_config_is_the_contracts_defaults() -> None:
    config = load(ROOT / "config" / "mq.yaml", {})
    assert config.amqp.url == ("amqp://guest:guest@127.0.0.1:5672/%2F",)
    assert (config.amqp.exchange, config.amqp.queue, config.amqp.routing_key) == ("email",) * 3
    assert config.amqp.prefetch == 1 and config.amqp.durable and config.amqp.max_retries == 3
    assert config.log.dir == ROOT / "logs"
    assert config.daemon.pidfile == ROOT / "run" / "edm.pid"
    assert config.daemon.umask == 0o077
    assert config.plugins.fee.spool == ROOT / "run" / "fee.spool"
    assert config.database.url is None and config.database.pool_size == 8


def test_defaults_when_sections_are_missing() -> None:
    config = _parse({})
    assert config.amqp.handler == "edm.handlers:log_message"
    assert config.log.dir == Path("/etc/logs")
    assert config.daemon.stop_timeout == 30


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        ({"amqp": {"prefetch": 0}}, "amqp.prefetch: must be an integer >= 1"),
        ({"amqp": {"prefetch": "1"}}, "amqp.prefetch: must be an integer >= 1"),
        ({"amqp": {"prefetch": True}}, "amqp.prefetch: must be an integer >= 1"),
        ({"amqp": {"prefech": 1}}, "amqp.prefech: unknown key"),
        ({"amqq": {}}, "amqq: unknown key"),
        ({"amqp": {"url": "http://x"}}, "amqp.url: http://x must start with amqp://"),
        ({"amqp": {"url": "amqp://u:pw@host:99999/"}}, "amqp.url:"),
        ({"amqp": {"url": []}}, "amqp.url:"),
        ({"amqp": {"url": 5}}, "amqp.url:"),
        ({"amqp": {"heartbeat": -1}}, "amqp.heartbeat:"),
        ({"amqp": {"retry_max": "fast"}}, "amqp.retry_max:"),
        ({"amqp": {"durable": "yes"}}, "amqp.durable: must be true or false"),
        ({"amqp": {"exchange_type": "fancy"}}, "amqp.exchange_type:"),
        ({"amqp": {"handler": "nocolon"}}, "amqp.handler:"),
        ({"amqp": {"queue_arguments": [1]}}, "amqp.queue_arguments:"),
        ({"amqp": {"queue": ""}}, "amqp.queue:"),
        ({"amqp": "x"}, "amqp: must be a mapping"),
        ({"log": {"level": "LOUD"}}, "log.level:"),
        ({"log": {"name": "../escape"}}, "log.name:"),
        ({"log": {"keep_days": -1}}, "log.keep_days:"),
        ({"log": {"max_line": 1.5}}, "log.max_line:"),
        ({"daemon": {"umask": "999"}}, "daemon.umask:"),
        ({"daemon": {"user": "no-such-user-xyz"}}, "daemon.user: no such user"),
        ({"daemon": {"stop_timeout": 0}}, "daemon.stop_timeout:"),
        ({"database": {"url": "postgres://x/y"}}, "database.url:"),
        ({"database": {"pool_size": 0}}, "database.pool_size:"),
        ({"plugins": {"fee": {"enabled": True}}}, "database.url: required"),
        ({"plugins": {"fee": {"table": "fee; drop"}}}, "plugins.fee.table:"),
        ({"plugins": {"fee": {"listen": "5555"}}}, "plugins.fee.listen:"),
        ({"plugins": {"sms": {}}}, "plugins.sms: unknown key"),
    ],
)
def test_errors_name_the_key(doc: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        _parse(doc)
    assert str(info.value).startswith(key), str(info.value)


def test_passwords_never_appear_in_errors() -> None:
    with pytest.raises(ConfigError) as info:
        _parse({"amqp": {"url": "amqp://user:hunter22@host:99999/"}})
    assert "hunter22" not in str(info.value) and "***" in str(info.value)
    with pytest.raises(ConfigError) as info:
        _parse({"database": {"url": "postgres://user:hunter22@host/db"}})
    assert "hunter22" not in str(info.value)


def test_environment_overrides() -> None:
    env = {"EDM_AMQP_URL": "amqp://a:b@h1/%2F,amqp://a:b@h2/%2F", "EDM_DATABASE_URL": "sqlite:///x.db"}
    config = _parse({"amqp": {"url": "amqp://ignored/"}}, env)
    assert config.amqp.url == ("amqp://a:b@h1/%2F", "amqp://a:b@h2/%2F")
    assert config.database.url == "sqlite:///x.db"
    with pytest.raises(ConfigError, match=r"^EDM_AMQP_URL:"):
        _parse({}, {"EDM_AMQP_URL": "nonsense"})


def test_url_list_and_relative_paths(tmp_path: Path) -> None:
    config = _parse(
        {
            "amqp": {"url": ["amqp://h1/", "amqps://h2:5671/v"]},
            "log": {"dir": "l"},
            "daemon": {"pidfile": "/run/x.pid"},
        },
        base=tmp_path,
    )
    assert config.amqp.url == ("amqp://h1/", "amqps://h2:5671/v")
    assert config.log.dir == tmp_path / "l"
    assert config.daemon.pidfile == Path("/run/x.pid")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "amqp: missing section"),
        ("amqp: {}\nlog: {}\n", "daemon: missing section"),
        ("a: &x [1]\nb: *x\n", "aliases are not allowed"),
        ("amqp: !!python/object/apply:os.system ['true']\n", "invalid YAML"),
        ("amqp: {prefetch: 1}\namqp: {prefetch: 2}\n", "duplicate key"),
        ("amqp: [unclosed\n", "invalid YAML"),
        ("- a list\n", "top level must be a mapping"),
    ],
)
def test_hostile_yaml(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "mq.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=problem):
        load(path, {})


def test_yaml_bomb_is_refused_quickly(tmp_path: Path) -> None:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 10):
        prev = chr(ord("a") + i - 1)
        cur = chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    path = tmp_path / "mq.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="aliases"):
        load(path, {})


def test_missing_file_and_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load(tmp_path / "nope.yaml", {})
    assert find_config("/x.yaml", {"EDM_CONFIG": "/y.yaml"}) == Path("/x.yaml")
    assert find_config(None, {"EDM_CONFIG": "/y.yaml"}) == Path("/y.yaml")
    monkeypatch.chdir(tmp_path)
    assert find_config(None, {}) == Path("/etc/edm/mq.yaml")
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "mq.yaml").write_text("{}")
    assert find_config(None, {}) == Path("config/mq.yaml")


def test_load_handler() -> None:
    assert loader.load("edm.handlers:log_message").build().call is loader.load("log").build().call
    with pytest.raises(ConfigError, match=r"amqp\.handler: cannot import"):
        loader.load("no_such_mod_xyz:f")
    with pytest.raises(ConfigError, match="has no callable 'nope'"):
        loader.load("os:nope")
    with pytest.raises(ConfigError, match=r"amqp\.handler: 'mail' is not a built-in handler \(log, smtp\)"):
        loader.load("mail")
    with pytest.raises(ConfigError, match=r"amqp\.handler_options: .* is a function"):
        loader.load("log", {"x": 1})


@pytest.mark.parametrize(
    ("section", "values", "needle"),
    [
        ("amqp", {"typo_key": 1}, "amqp.typo_key: unknown key"),
        ("amqp", {"prefetch": "many"}, "amqp.prefetch: must be an integer >= 1"),
        ("amqp", {"url": "amqp://user:topsecret@host:0/"}, "amqp.url:"),
    ],
)
def test_cli_config_errors_exit_1_naming_the_key(
    edm_env: EdmEnv, section: str, values: dict[str, Any], needle: str
) -> None:
    edm_env.doc[section].update(values)
    edm_env.write_config()
    for command in ("check-config", "start", "reload"):
        result = edm_env.cli(command)
        assert result.returncode == 1, (command, result.stdout, result.stderr)
        assert needle in result.stderr, (command, result.stderr)
        assert "Traceback" not in result.stderr and "topsecret" not in result.stderr
    assert edm_env.cli("status").returncode == 3  # nothing was started


def test_check_config_warns_about_a_readable_password(edm_env: EdmEnv) -> None:
    edm_env.config_path.chmod(0o644)
    result = edm_env.cli("check-config")
    assert result.returncode == 0
    assert "readable by group or others" in result.stdout
    assert "guest:guest" not in result.stdout
    edm_env.config_path.chmod(0o600)
    assert "readable" not in edm_env.cli("check-config").stdout


def test_status_with_an_unreadable_config_is_4(edm_env: EdmEnv) -> None:
    edm_env.config_path.write_text("daemon: [broken\n")
    assert edm_env.cli("status").returncode == 4
    os.unlink(edm_env.config_path)
    assert edm_env.cli("status").returncode == 4


def test_usage_errors_exit_2(edm_env: EdmEnv) -> None:
    assert edm_env.cli("frobnicate").returncode == 2
    assert edm_env.cli().returncode == 2


def test_yaml_dump_of_shipped_config_has_every_key() -> None:
    shipped = yaml.safe_load((ROOT / "config" / "mq.yaml").read_text())
    assert set(shipped) == {"amqp", "log", "daemon", "database", "plugins", "metrics", "smtp"}
