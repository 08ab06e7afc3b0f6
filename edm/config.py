"""The configuration file: locate, parse, validate into frozen dataclasses.

Every error names the key it is about (``amqp.prefetch: must be an integer >= 1``) so an
operator can fix the file without reading code. Unknown keys are errors: a typo must not
silently fall back to a default.
"""

from __future__ import annotations

import grp
import os
import pwd
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

from edm.config_fields import boolean as _bool
from edm.config_fields import integer as _int
from edm.config_fields import keys_of as _keys
from edm.config_fields import number as _number
from edm.config_fields import optional_string as _optional_str
from edm.config_fields import path as _path
from edm.config_fields import readable_file as _readable_file
from edm.config_fields import reject_unknown as _reject_unknown
from edm.config_fields import string as _str
from edm.dburl import parse_url
from edm.errors import ConfigError, DatabaseError
from edm.handlers.api import BUILT_IN_HANDLERS
from edm.plugins import PluginsConfig
from edm.plugins import parse as parse_plugins
from edm.redact import mask_url, passwords_in

SYSTEM_CONFIG = Path("/etc/edm/mq.yaml")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# A file without these is more likely a wrong file than a wish for every default.
REQUIRED_SECTIONS = ("amqp", "log", "daemon")
MAX_DATABASE_TIMEOUT = 86400  # seconds; PyMySQL refuses a connect timeout past a year


@dataclass(frozen=True)
class AmqpTlsConfig:
    """How ``amqps://`` URLs check the broker and prove who we are (no effect on ``amqp://``)."""

    ca_file: Path | None = None  # None: the system's CAs
    cert_file: Path | None = None
    key_file: Path | None = None
    verify: bool = True


@dataclass(frozen=True)
class AmqpConfig:
    url: tuple[str, ...] = ("amqp://guest:guest@127.0.0.1:5672/%2F",)
    heartbeat: int = 60
    retry_max: float = 30.0
    exchange: str = "email"
    exchange_type: str = "direct"
    queue: str = "email"
    routing_key: str = "email"
    durable: bool = True
    prefetch: int = 1
    threads: int = 1  # handler threads in the consumer process; 1 keeps the inline path
    queue_arguments: Mapping[str, Any] = field(default_factory=dict)
    handler: str = "edm.handlers:log_message"  # or a built-in name: log (the same), smtp
    handler_options: Mapping[str, Any] = field(default_factory=dict)
    max_retries: int = 3
    workers: int = 1  # consumer processes, each with its own connection, each supervised alone
    retry_delays: tuple[float, ...] = (10.0, 60.0, 300.0)  # seconds; the n-th retry waits [min(n, len) - 1]
    tls: AmqpTlsConfig = field(default_factory=AmqpTlsConfig)
    # The consumer's fast lane (edm.amqp.fastlane) and flushing I/O loop; false: pika's plain path.
    fast_lane: bool = True


@dataclass(frozen=True)
class LogConfig:
    dir: Path = Path("logs")
    name: str = "edm"
    level: str = "INFO"
    keep_days: int = 0
    fsync: bool = False
    max_line: int = 0


@dataclass(frozen=True)
class DaemonConfig:
    pidfile: Path = Path("run/edm.pid")
    user: str | None = None
    group: str | None = None
    umask: int = 0o077
    stop_timeout: float = 30.0


@dataclass(frozen=True)
class DatabaseTls:
    """``database.tls``: TLS is asked for when a file is named or ``verify`` is false."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    verify: bool = True

    @property
    def enabled(self) -> bool:
        return self.ca_file is not None or self.cert_file is not None or not self.verify


@dataclass(frozen=True)
class DatabaseConfig:
    url: str | None = None
    pool_size: int = 8
    timeout: float = 5.0
    tls: DatabaseTls = field(default_factory=DatabaseTls)


@dataclass(frozen=True)
class MetricsConfig:
    listen: str | None = None  # "host:port" of /metrics and /healthz; None: not served


@dataclass(frozen=True)
class Config:
    path: Path
    amqp: AmqpConfig
    log: LogConfig
    daemon: DaemonConfig
    database: DatabaseConfig
    plugins: PluginsConfig
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    smtp: SmtpConfig = field(default_factory=lambda: SmtpConfig())


def find_config(explicit: str | None, environ: Mapping[str, str] = os.environ) -> Path:
    """Apply the lookup order: --config > $EDM_CONFIG > ./config/mq.yaml > /etc/edm/mq.yaml."""
    if explicit:
        return Path(explicit)
    if environ.get("EDM_CONFIG"):
        return Path(environ["EDM_CONFIG"])
    local = Path("config/mq.yaml")
    if local.exists():
        return local
    return SYSTEM_CONFIG


class _NoDuplicatesLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and alias expansion (YAML bombs)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise ConfigError(f"line {event.start_mark.line + 1}: YAML aliases are not allowed")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load(path: Path, environ: Mapping[str, str] = os.environ) -> Config:
    """Read and validate ``path``; raise ConfigError naming the key on any problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    if len(text) > 1_000_000:
        raise ConfigError(f"{path}: config file is larger than 1 MB")
    try:
        raw = yaml.load(text, Loader=_NoDuplicatesLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for name in REQUIRED_SECTIONS:
        if name not in raw:
            raise ConfigError(f"{name}: missing section (write '{name}: {{}}' to take every default)")
    return parse(raw, path.resolve(), environ)


def parse(raw: Mapping[str, Any], path: Path, environ: Mapping[str, str] = os.environ) -> Config:
    """Validate an already parsed document; relative paths resolve against ``path``'s directory."""
    base = path.parent
    sections = {"amqp", "log", "daemon", "database", "plugins", "metrics", "smtp"}
    _reject_unknown("", raw, sections)
    amqp = _parse_amqp(_section(raw, "amqp"), environ, base)
    log = _parse_log(_section(raw, "log"), base)
    daemon = _parse_daemon(_section(raw, "daemon"), base)
    database = _parse_database(_section(raw, "database"), environ, base)
    plugins = parse_plugins(_section(raw, "plugins"), base, database.url)
    metrics = _parse_metrics(_section(raw, "metrics"))
    smtp = _parse_smtp(_section(raw, "smtp"), base)
    return Config(path, with_smtp(amqp, smtp), log, daemon, database, plugins, metrics, smtp)


def _section(raw: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = raw.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: must be a mapping")
    return value


def check_amqp_url(url: str, key: str = "amqp.url") -> str:
    """Accept amqp:// and amqps:// URLs with a host; the error never shows the password."""
    if not isinstance(url, str) or not url:
        raise ConfigError(f"{key}: must be an amqp:// URL or a list of them")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ConfigError(f"{key}: invalid URL {mask_url(url)}") from None
    if parts.scheme not in ("amqp", "amqps"):
        raise ConfigError(f"{key}: {mask_url(url)} must start with amqp:// or amqps://")
    if not parts.hostname:
        raise ConfigError(f"{key}: {mask_url(url)} names no host")
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"{key}: {mask_url(url)} has an invalid port")
    if "ssl_options" in parse_qs(parts.query):
        # pika would build its own TLS context from it, bypassing amqp.tls and its checks.
        raise ConfigError(f"{key}: {mask_url(url)}: the ssl_options query is not supported; use amqp.tls")
    return url


def _parse_amqp(raw: Mapping[str, Any], environ: Mapping[str, str], base: Path) -> AmqpConfig:
    _reject_unknown("amqp.", raw, _keys(AmqpConfig))
    d = AmqpConfig()
    url_value: Any = environ.get("EDM_AMQP_URL") or raw.get("url", list(d.url))
    key = "EDM_AMQP_URL" if environ.get("EDM_AMQP_URL") else "amqp.url"
    if isinstance(url_value, str):
        urls = [u.strip() for u in url_value.split(",")] if key == "EDM_AMQP_URL" else [url_value]
    elif isinstance(url_value, list) and url_value:
        urls = url_value
    else:
        raise ConfigError(f"{key}: must be an amqp:// URL or a non-empty list of them")
    checked = tuple(check_amqp_url(u, key) for u in urls)
    exchange_type = raw.get("exchange_type", d.exchange_type)
    if exchange_type not in ("direct", "fanout", "topic", "headers"):
        raise ConfigError("amqp.exchange_type: must be one of direct, fanout, topic, headers")
    qargs = raw.get("queue_arguments", {}) or {}
    if not isinstance(qargs, dict) or not all(isinstance(k, str) for k in qargs):
        raise ConfigError("amqp.queue_arguments: must be a mapping of argument names to values")
    handler = _str(raw, "handler", "amqp", d.handler)
    if handler not in BUILT_IN_HANDLERS and (handler.count(":") != 1 or not all(handler.split(":"))):
        names = ", ".join(BUILT_IN_HANDLERS)
        raise ConfigError(f"amqp.handler: {handler!r} must be a built-in name ({names}) or 'module:attr'")
    options = raw.get("handler_options", {}) or {}
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise ConfigError("amqp.handler_options: must be a mapping of option names to values")
    return AmqpConfig(
        url=checked,
        heartbeat=_int(raw, "heartbeat", "amqp", d.heartbeat, 0),
        retry_max=_number(raw, "retry_max", "amqp", d.retry_max, 0.1),
        exchange=_str(raw, "exchange", "amqp", d.exchange),
        exchange_type=exchange_type,
        queue=_str(raw, "queue", "amqp", d.queue),
        routing_key=_str(raw, "routing_key", "amqp", d.routing_key),
        durable=_bool(raw, "durable", "amqp", d.durable),
        prefetch=_int(raw, "prefetch", "amqp", d.prefetch, 1),
        threads=_int(raw, "threads", "amqp", d.threads, 1),
        queue_arguments=dict(qargs),
        handler=handler,
        handler_options=dict(options),
        max_retries=_int(raw, "max_retries", "amqp", d.max_retries, 0),
        workers=_workers(raw),
        retry_delays=_retry_delays(raw.get("retry_delays", list(d.retry_delays))),
        tls=_parse_amqp_tls(raw.get("tls"), base),
        fast_lane=_bool(raw, "fast_lane", "amqp", d.fast_lane),
    )


MAX_WORKERS = 64


def _workers(raw: Mapping[str, Any]) -> int:
    value = _int(raw, "workers", "amqp", AmqpConfig().workers, 1)
    if value > MAX_WORKERS:
        raise ConfigError(f"amqp.workers: must be an integer between 1 and {MAX_WORKERS}")
    return value


def _retry_delays(value: Any) -> tuple[float, ...]:
    """``amqp.retry_delays``: a non-empty list of seconds, each a finite number > 0."""
    if not isinstance(value, list) or not value:
        raise ConfigError("amqp.retry_delays: must be a non-empty list of seconds, e.g. [10, 60, 300]")
    delays = []
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not 0 < item < float("inf"):
            raise ConfigError(f"amqp.retry_delays[{i}]: must be a number of seconds > 0, not {item!r}")
        if item * 1000 < 1:
            raise ConfigError(f"amqp.retry_delays[{i}]: must be at least 0.001 (one millisecond)")
        delays.append(float(item))
    return tuple(delays)


def _parse_amqp_tls(raw: Any, base: Path) -> AmqpTlsConfig:
    """Check the files now, with the errors an operator can act on, not at the first connect."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("amqp.tls: must be a mapping (ca_file, cert_file, key_file, verify)")
    _reject_unknown("amqp.tls.", raw, _keys(AmqpTlsConfig))
    files = {}
    for key in ("ca_file", "cert_file", "key_file"):
        files[key] = None if raw.get(key) is None else _path(raw, key, "amqp.tls", "", base)
    ca_file, cert_file, key_file = files["ca_file"], files["cert_file"], files["key_file"]
    if ca_file is not None:
        text = _read_pem(ca_file, "amqp.tls.ca_file")
        if "-----BEGIN CERTIFICATE-----" not in text:
            raise ConfigError(f"amqp.tls.ca_file: {ca_file} holds no PEM certificate")
        try:
            ssl.create_default_context(cafile=str(ca_file))
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError(f"amqp.tls.ca_file: {ca_file}: not a usable CA certificate ({exc})") from None
    if key_file is not None and cert_file is None:
        raise ConfigError("amqp.tls.key_file: set amqp.tls.cert_file too (the certificate of this key)")
    if cert_file is not None:
        check_client_certificate(cert_file, key_file, "amqp.tls")
    return AmqpTlsConfig(
        ca_file=ca_file, cert_file=cert_file, key_file=key_file, verify=_bool(raw, "verify", "amqp.tls", True)
    )


def _read_pem(path: Path, key: str) -> str:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        raise ConfigError(f"{key}: {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{key}: {path} is a directory, not a file") from None
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None


def _no_password() -> str:
    raise ConfigError("the key is encrypted: edm needs it unencrypted (readable by its user only)")


def check_client_certificate(cert_file: Path, key_file: Path | None, prefix: str) -> None:
    """A client certificate and its key must load together; the error names the key at fault."""
    cert_text = _read_pem(cert_file, f"{prefix}.cert_file")
    if "-----BEGIN CERTIFICATE-----" not in cert_text:
        raise ConfigError(f"{prefix}.cert_file: {cert_file} holds no PEM certificate")
    if key_file is None:
        if "PRIVATE KEY-----" not in cert_text:
            raise ConfigError(
                f"{prefix}.cert_file: {cert_file} holds no private key; set {prefix}.key_file to its key"
            )
        key_name = f"{prefix}.cert_file"
    else:
        if "PRIVATE KEY-----" not in _read_pem(key_file, f"{prefix}.key_file"):
            raise ConfigError(f"{prefix}.key_file: {key_file} holds no PEM private key")
        key_name = f"{prefix}.key_file"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(str(cert_file), None if key_file is None else str(key_file), _no_password)
    except ConfigError as exc:
        raise ConfigError(f"{key_name}: {exc}") from None
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise ConfigError(f"{key_name}: the key does not match the certificate {cert_file}") from None
        raise ConfigError(f"{key_name}: cannot load the certificate and key: {exc.reason or exc}") from None
    except OSError as exc:
        raise ConfigError(f"{key_name}: cannot read it: {exc.strerror or exc}") from None


def _parse_log(raw: Mapping[str, Any], base: Path) -> LogConfig:
    _reject_unknown("log.", raw, _keys(LogConfig))
    d = LogConfig()
    name = _str(raw, "name", "log", d.name)
    if "/" in name or name.startswith("."):
        raise ConfigError("log.name: must be a plain file name prefix (no '/', no leading '.')")
    level = raw.get("level", d.level)
    if not isinstance(level, str) or level.upper() not in LEVELS:
        raise ConfigError(f"log.level: must be one of {', '.join(LEVELS)}")
    return LogConfig(
        dir=_path(raw, "dir", "log", "../logs", base),
        name=name,
        level=level.upper(),
        keep_days=_int(raw, "keep_days", "log", d.keep_days, 0),
        fsync=_bool(raw, "fsync", "log", d.fsync),
        max_line=_int(raw, "max_line", "log", d.max_line, 0),
    )


def _parse_daemon(raw: Mapping[str, Any], base: Path) -> DaemonConfig:
    _reject_unknown("daemon.", raw, _keys(DaemonConfig))
    d = DaemonConfig()
    umask_value = raw.get("umask", "077")
    if isinstance(umask_value, int) and not isinstance(umask_value, bool):
        umask_value = f"{umask_value:03d}" if umask_value < 1000 else "x"
    if not isinstance(umask_value, str) or not umask_value.isdigit():
        raise ConfigError('daemon.umask: must be an octal string such as "077"')
    try:
        umask = int(umask_value, 8)
    except ValueError:
        raise ConfigError('daemon.umask: must be an octal string such as "077"') from None
    if umask > 0o777:
        raise ConfigError('daemon.umask: must be between "000" and "777"')
    user = _optional_str(raw, "user", "daemon")
    group = _optional_str(raw, "group", "daemon")
    if user is not None:
        try:
            pwd.getpwnam(user)
        except KeyError:
            raise ConfigError(f"daemon.user: no such user {user!r}") from None
    if group is not None:
        try:
            grp.getgrnam(group)
        except KeyError:
            raise ConfigError(f"daemon.group: no such group {group!r}") from None
    return DaemonConfig(
        pidfile=_path(raw, "pidfile", "daemon", "../run/edm.pid", base),
        user=user,
        group=group,
        umask=umask,
        stop_timeout=_number(raw, "stop_timeout", "daemon", d.stop_timeout, 0.1),
    )


def _parse_database(raw: Mapping[str, Any], environ: Mapping[str, str], base: Path) -> DatabaseConfig:
    _reject_unknown("database.", raw, _keys(DatabaseConfig))
    url = environ.get("EDM_DATABASE_URL") or _optional_str(raw, "url", "database")
    key = "EDM_DATABASE_URL" if environ.get("EDM_DATABASE_URL") else "database.url"
    if url is not None:
        check_database_url(url, key)
    try:
        timeout = _number(raw, "timeout", "database", DatabaseConfig().timeout, 0.0)
        if timeout <= 0 or timeout > MAX_DATABASE_TIMEOUT:
            raise ConfigError
    except ConfigError:
        limit = MAX_DATABASE_TIMEOUT
        raise ConfigError(f"database.timeout: must be a number of seconds > 0 and <= {limit}") from None
    tls = _parse_database_tls(raw.get("tls"), base)
    if tls.enabled and url is not None and not url.startswith("mysql:"):
        raise ConfigError(f"database.tls: TLS is for mysql:// URLs; {key} is {mask_url(url)}")
    return DatabaseConfig(
        url=url, pool_size=_int(raw, "pool_size", "database", 8, 1), timeout=timeout, tls=tls
    )


def _parse_database_tls(raw: Any, base: Path) -> DatabaseTls:
    """Files must exist and hold what they claim now, not at the first connection."""
    if raw is None:
        return DatabaseTls()
    if not isinstance(raw, dict):
        raise ConfigError("database.tls: must be a mapping (ca_file, cert_file, key_file, verify)")
    _reject_unknown("database.tls.", raw, _keys(DatabaseTls))
    ca, cert, key = (_readable_file(raw, name, "database.tls", base) for name in _TLS_FILES)
    if key is not None and cert is None:
        raise ConfigError("database.tls.key_file: needs database.tls.cert_file (the certificate of that key)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca is not None:
        try:
            context.load_verify_locations(cafile=ca)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"database.tls.ca_file: {ca}: not a PEM CA certificate ({exc})") from None
    if cert is not None:
        try:
            context.load_cert_chain(cert, keyfile=key, password=_NO_PASSWORD)  # never a prompt
        except (ssl.SSLError, OSError) as exc:
            name = "key_file" if key is not None else "cert_file"
            raise ConfigError(
                f"database.tls.{name}: {key or cert}: not a PEM certificate and its unencrypted key ({exc})"
            ) from None
    return DatabaseTls(ca, cert, key, _bool(raw, "verify", "database.tls", True))


_TLS_FILES = ("ca_file", "cert_file", "key_file")
_NO_PASSWORD = "".__str__  # an encrypted key fails instead of OpenSSL asking on the terminal


def check_database_url(url: str, key: str = "database.url") -> str:
    """Accept mysql://user:pass@host[:port]/db and sqlite:///path; never echo the password."""
    try:
        parse_url(url)
    except DatabaseError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    return url


def _parse_metrics(raw: Mapping[str, Any]) -> MetricsConfig:
    _reject_unknown("metrics.", raw, _keys(MetricsConfig))
    listen = _optional_str(raw, "listen", "metrics")
    if listen is not None:
        split_listen(listen)
    return MetricsConfig(listen=listen)


def split_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:9325`` for IPv6) as (host, port); ConfigError naming metrics.listen."""
    host, sep, port = listen.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or " " in host:
        raise ConfigError(f"metrics.listen: {listen!r} must be host:port, such as 127.0.0.1:9325")
    return host, int(port)


def password_warning(config: Config) -> str | None:
    """A warning when the file holds a password and others can read it."""
    try:
        mode = config.path.stat().st_mode
        text = config.path.read_text(encoding="utf-8")
    except OSError:
        return None
    if passwords_in(text) and mode & 0o044:
        return (
            f"{config.path}: holds a password and is readable by group or others "
            f"(mode {mode & 0o777:04o}); chmod 600 it"
        )
    return None


@dataclass(frozen=True)
class Essentials:
    """What stop and status need, taken from a file that may no longer validate as a whole."""

    path: Path
    pidfile: Path
    stop_timeout: float
    log_dir: Path
    log_name: str
    problem: str | None


def load_essentials(path: Path, environ: Mapping[str, str] = os.environ) -> Essentials:
    """The pidfile and log location even when another key is now invalid (so stop still works).

    Raises ConfigError only when the file cannot be read or these keys themselves are wrong.
    """
    try:
        config = load(path, environ)
        return Essentials(
            config.path,
            config.daemon.pidfile,
            config.daemon.stop_timeout,
            config.log.dir,
            config.log.name,
            None,
        )
    except ConfigError as exc:
        problem = str(exc)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_NoDuplicatesLoader)  # noqa: S506
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ConfigError):
        raise ConfigError(problem) from None
    if not isinstance(raw, dict):
        raise ConfigError(problem)
    base = path.resolve().parent
    daemon = _section(raw, "daemon")
    log_section = _section(raw, "log")
    return Essentials(
        path.resolve(),
        _path(daemon, "pidfile", "daemon", "../run/edm.pid", base),
        _number(daemon, "stop_timeout", "daemon", DaemonConfig().stop_timeout, 0.1),
        _path(log_section, "dir", "log", "../logs", base),
        _str(log_section, "name", "log", LogConfig().name),
        problem,
    )


# -- smtp: the settings of the smtp handler (contract §13) -------------------------------------

SMTP_HANDLER = BUILT_IN_HANDLERS["smtp"]
SMTP_OPTION = "smtp"  # the reserved key of amqp.handler_options that hands SmtpConfig to SmtpHandler
STARTTLS_MODES = ("auto", "always", "never")


@dataclass(frozen=True)
class SmtpConfig:
    url: str = "smtp://127.0.0.1:25"
    starttls: str = "auto"
    verify: bool = True
    ca_file: Path | None = None
    timeout: float = 30.0
    sender: str | None = None  # the key ``from``
    helo: str | None = None
    rate: float = 0.0
    templates: Path | None = None
    journal: Path = Path("run/smtp.journal")
    journal_days: int = 7
    max_size: int = 10485760
    # What the templates directory held when the file was read (name, mtime, size): a reload
    # after a template changed compares unequal, so the handler is rebuilt and reads it again.
    templates_seen: tuple[tuple[str, int, int], ...] = ()


def with_smtp(amqp: AmqpConfig, smtp: SmtpConfig) -> AmqpConfig:
    """The smtp handler gets its section in its options (the worker builds handlers from those)."""
    if BUILT_IN_HANDLERS.get(amqp.handler, amqp.handler) != SMTP_HANDLER:
        return amqp
    if SMTP_OPTION in amqp.handler_options:
        raise ConfigError(
            "amqp.handler_options.smtp: reserved; the smtp handler's settings are the smtp section"
        )
    return replace(amqp, handler_options={**amqp.handler_options, SMTP_OPTION: smtp})


def _parse_smtp(raw: Mapping[str, Any], base: Path) -> SmtpConfig:
    known = {"from" if f.name == "sender" else f.name for f in fields(SmtpConfig)} - {"templates_seen"}
    _reject_unknown("smtp.", raw, known)
    d = SmtpConfig()
    url = _str(raw, "url", "smtp", d.url, 2000)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ConfigError(f"smtp.url: invalid URL {mask_url(url)}") from None
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
        raise ConfigError(f"smtp.url: {mask_url(url)} must be smtp://host[:port] or smtps://host[:port]")
    if port == 0 or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"smtp.url: {mask_url(url)}: only a user, a password, a host and a port")
    if parts.password is not None and not parts.username:
        raise ConfigError(f"smtp.url: {mask_url(url)} has a password but no user")
    starttls = raw.get("starttls", d.starttls)
    if starttls not in STARTTLS_MODES:
        raise ConfigError(f"smtp.starttls: must be one of {', '.join(STARTTLS_MODES)}")
    if parts.scheme == "smtps" and starttls == "always":
        raise ConfigError("smtp.starttls: always is for smtp:// URLs; smtps:// is TLS from the start")
    ca_file = _readable_file(raw, "ca_file", "smtp", base)
    if ca_file is not None:
        try:
            ssl.create_default_context(cafile=str(ca_file))
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError(f"smtp.ca_file: {ca_file}: not a PEM CA certificate ({exc})") from None
    timeout = _number(raw, "timeout", "smtp", d.timeout, 0.001)
    sender = _optional_str(raw, "from", "smtp")
    if sender is not None and ("@" not in sender or "\r" in sender or "\n" in sender):
        raise ConfigError("smtp.from: must be an e-mail address (name@domain or Name <name@domain>)")
    helo = _optional_str(raw, "helo", "smtp")
    if helo is not None and (not helo.isascii() or any(c.isspace() for c in helo)):
        raise ConfigError("smtp.helo: must be a host name (ASCII, no blanks)")
    templates = None if raw.get("templates") is None else _path(raw, "templates", "smtp", "", base)
    if templates is not None and not templates.is_dir():
        raise ConfigError(f"smtp.templates: {templates}: no such directory")
    return SmtpConfig(
        url=url,
        starttls=starttls,
        verify=_bool(raw, "verify", "smtp", d.verify),
        ca_file=ca_file,
        timeout=timeout,
        sender=sender,
        helo=helo,
        rate=_number(raw, "rate", "smtp", d.rate, 0.0),
        templates=templates,
        journal=_path(raw, "journal", "smtp", "../run/smtp.journal", base),
        journal_days=_int(raw, "journal_days", "smtp", d.journal_days, 1),
        max_size=_int(raw, "max_size", "smtp", d.max_size, 1),
        templates_seen=() if templates is None else _templates_seen(templates),
    )


def _templates_seen(directory: Path) -> tuple[tuple[str, int, int], ...]:
    seen = []
    for root, _dirs, files in os.walk(directory):
        for name in files:
            path = Path(root, name)
            try:
                st = path.stat()
            except OSError:
                continue
            seen.append((str(path.relative_to(directory)), st.st_mtime_ns, st.st_size))
    return tuple(sorted(seen))
