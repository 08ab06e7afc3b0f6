"""An e-mail job: the JSON object of contract §13, checked field by field.

Every problem is an ``InvalidJob`` naming the field, so that the dead letter says what to fix.
Addresses are checked with email-validator (syntax only, never DNS; reserved names such as
``localhost`` or ``.test`` are refused): the standard library's parser accepts what SMTP
servers refuse (no dot-atom rules, no length limits, no IDNA).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.headerregistry import Address
from typing import Any

from email_validator import EmailNotValidError, validate_email

MAX_RECIPIENTS = 1000
MAX_NAME = 100  # a display name, encoded as one word, stays well within a header line
MAX_HEADER_VALUE = 900  # a header line stays under SMTP's 998 with its name
# Headers edm writes itself from the job's fields; a job sets them through those fields.
OWN_HEADERS = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "reply-to",
        "subject",
        "date",
        "message-id",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "list-unsubscribe",
        "list-unsubscribe-post",
        "sender",
        "return-path",
    }
)
FIELDS = frozenset(
    {"to", "cc", "bcc", "from", "reply_to", "subject", "text", "html", "template", "vars"}
    | {"headers", "unsubscribe", "id", "rcpt"}
)
_HEADER_NAME = re.compile(r"[!-9;-~]{1,76}")  # RFC 5322 ftext: printable ASCII but ':'
_NAME_ADDR = re.compile(r"\s*(.*?)\s*<([^<>]*)>\s*", re.DOTALL)
_TEMPLATE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*")
_UNSUBSCRIBE = re.compile(r"(https?://|mailto:)[!-~]+")


class InvalidJob(Exception):
    """The job cannot be sent as it is; ``field`` names what to fix."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True)
class Job:
    """A checked job. Addresses are ``Address`` objects with an ASCII (IDNA) domain."""

    raw: Mapping[str, Any]  # the JSON object as received, to make copies of
    key: str  # what the Message-ID derives from: ``id``, else the AMQP message_id, else the body
    to: tuple[Address, ...]
    cc: tuple[Address, ...] = ()
    bcc: tuple[Address, ...] = ()
    sender: Address | None = None
    reply_to: tuple[Address, ...] = ()
    subject: str = ""
    text: str | None = None
    html: str | None = None
    template: str | None = None
    vars: Mapping[str, Any] = field(default_factory=dict)
    headers: tuple[tuple[str, str], ...] = ()
    unsubscribe: tuple[str, ...] = ()
    rcpt: tuple[str, ...] | None = None  # set on edm's copies: the envelope recipients still owed

    @property
    def recipients(self) -> tuple[str, ...]:
        """The envelope: ``rcpt`` when set, else to, cc and bcc, each address once."""
        if self.rcpt is not None:
            return self.rcpt
        return tuple(dict.fromkeys(a.addr_spec for a in (*self.to, *self.cc, *self.bcc)))

    def copy_for(self, recipients: list[str]) -> bytes:
        """A job for only ``recipients`` (the same mail, and the same Message-ID)."""
        raw = dict(self.raw)
        raw["id"] = self.key
        raw["rcpt"] = recipients
        return json.dumps(raw, ensure_ascii=False).encode("utf-8")


def parse(body: bytes, message_id: str | None, max_size: int) -> Job:
    """Read and check a job; ``InvalidJob`` names the field at fault."""
    if len(body) > max_size:
        raise InvalidJob("body", f"{len(body)} bytes, larger than smtp.max_size ({max_size})")
    try:
        raw = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise InvalidJob("body", f"not JSON ({_short(exc)})") from None
    if not isinstance(raw, dict):
        raise InvalidJob("body", "must be a JSON object")
    unknown = sorted(set(raw) - FIELDS)
    if unknown:
        raise InvalidJob(_name(unknown[0]), f"unknown field (expected: {', '.join(sorted(FIELDS))})")
    if raw.get("to") in (None, "", []):
        raise InvalidJob("to", "missing (an address or a list of them)")
    key = _optional_text(raw, "id", 200)
    if key is None:
        key = message_id or "sha256:" + hashlib.sha256(body).hexdigest()
    to = _addresses(raw, "to")
    cc = _addresses(raw, "cc")
    bcc = _addresses(raw, "bcc")
    if len(to) + len(cc) + len(bcc) > MAX_RECIPIENTS:
        raise InvalidJob("to", f"more than {MAX_RECIPIENTS} recipients in to, cc and bcc")
    sender = _addresses(raw, "from")
    if len(sender) > 1:
        raise InvalidJob("from", "must be one address")
    text, html, template = (_optional_text(raw, k) for k in ("text", "html", "template"))
    if text is None and html is None and template is None:
        raise InvalidJob("text", "the job has no content: give text, html or template")
    if template is not None and (not _TEMPLATE_NAME.fullmatch(template) or ".." in template):
        raise InvalidJob("template", f"{template[:100]!r} is not a template name")
    variables = raw.get("vars", {})
    if not isinstance(variables, dict):
        raise InvalidJob("vars", "must be an object")
    subject = _optional_text(raw, "subject") or ""
    _header_value("subject", subject)
    job = Job(
        raw=raw,
        key=key,
        to=to,
        cc=cc,
        bcc=bcc,
        sender=sender[0] if sender else None,
        reply_to=_addresses(raw, "reply_to"),
        subject=subject,
        text=text,
        html=html,
        template=template,
        vars=variables,
        headers=_headers(raw.get("headers")),
        unsubscribe=_unsubscribe(raw.get("unsubscribe")),
    )
    if "rcpt" in raw:
        own = set(job.recipients)
        rcpt = tuple(a.addr_spec for a in _addresses(raw, "rcpt"))
        if not rcpt or not set(rcpt) <= own:
            raise InvalidJob("rcpt", "must list some of the addresses of to, cc and bcc")
        job = Job(**{**job.__dict__, "rcpt": tuple(dict.fromkeys(rcpt))})
    return job


def address(value: str, where: str) -> Address:
    """``name@domain`` or ``Display Name <name@domain>``, the domain made ASCII (IDNA)."""
    if any(c in value for c in "\r\n\0"):
        raise InvalidJob(where, "CR, LF or NUL in an address")
    match = _NAME_ADDR.fullmatch(value)
    name, spec = (match.group(1), match.group(2)) if match else ("", value.strip())
    if len(name) > MAX_NAME:
        raise InvalidJob(where, f"display name longer than {MAX_NAME} characters")
    if any(ord(c) < 32 or c == "\x7f" for c in name):
        raise InvalidJob(where, "control characters in the display name")
    name = " ".join((name[1:-1] if len(name) >= 2 and name[0] == name[-1] == '"' else name).split())
    checked = _checked(spec)
    if isinstance(checked, EmailNotValidError):
        raise InvalidJob(where, f"{spec[:100]!r} is not a valid address: {checked}")
    local, _, domain = checked.rpartition("@")
    try:
        return Address(display_name=name, username=local, domain=domain)
    except (ValueError, TypeError) as exc:
        raise InvalidJob(where, f"{value[:100]!r}: {exc}") from None


@functools.lru_cache(maxsize=4096)
def _checked(spec: str) -> str | EmailNotValidError:
    """The address with its domain in ASCII, or why it is not one (a job's sender and its
    regular recipients come again and again: the check is the costliest part of a job)."""
    try:
        checked = validate_email(spec, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as exc:
        return exc
    return checked.ascii_email or EmailNotValidError("no ASCII form")


def _addresses(raw: Mapping[str, Any], key: str) -> tuple[Address, ...]:
    value = raw.get(key)
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise InvalidJob(key, "must be an address or a list of addresses")
    if len(values) > MAX_RECIPIENTS:
        raise InvalidJob(key, f"more than {MAX_RECIPIENTS} addresses")
    return tuple(address(v, key if len(values) == 1 else f"{key}[{i}]") for i, v in enumerate(values))


def _optional_text(raw: Mapping[str, Any], key: str, max_len: int | None = None) -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidJob(key, "must be a string")
    if "\0" in value:
        raise InvalidJob(key, "holds a NUL character")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidJob(key, "not valid Unicode (a lone surrogate)") from None
    if max_len is not None and not 0 < len(value) <= max_len:
        raise InvalidJob(key, f"must be 1 to {max_len} characters")
    return value


def _header_value(name: str, value: str) -> None:
    if "\r" in value or "\n" in value:
        raise InvalidJob(name, "CR or LF in a header value")
    if len(value) > MAX_HEADER_VALUE:
        raise InvalidJob(name, f"longer than {MAX_HEADER_VALUE} characters")
    if any((ord(c) < 32 and c != "\t") or c == "\x7f" for c in value):
        raise InvalidJob(name, "control characters in a header value")


def _headers(value: Any) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise InvalidJob("headers", "must be an object of header names to strings")
    headers = []
    for name, text in value.items():
        where = f"headers.{_name(name)}"
        if not _HEADER_NAME.fullmatch(name):
            raise InvalidJob(where, "not a header name (printable ASCII, no ':' or blank)")
        if name.lower() in OWN_HEADERS:
            raise InvalidJob(where, "written by edm from the job's fields; set those instead")
        if not isinstance(text, str):
            raise InvalidJob(where, "must be a string")
        _header_value(where, text)
        headers.append((name, text))
    return tuple(headers)


def _unsubscribe(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else value
    if (
        not isinstance(values, list)
        or not 0 < len(values) <= 2
        or not all(isinstance(v, str) for v in values)
    ):
        raise InvalidJob("unsubscribe", "must be a URL or mailto: (or a list of one of each)")
    for one in values:
        if not _UNSUBSCRIBE.fullmatch(one) or "<" in one or ">" in one or len(one) > 800:
            raise InvalidJob("unsubscribe", f"{one[:100]!r} is not an http(s) URL or a mailto: address")
    return tuple(values)


def _name(name: str) -> str:
    """A name from the job as it may stand in a reason: as it is, or quoted when odd."""
    return name if name.isascii() and name.isprintable() and len(name) <= 80 else repr(name[:80])


def _short(exc: BaseException) -> str:
    return str(exc)[:200] or type(exc).__name__
