"""Masking of passwords in URLs, DSNs and error texts; the standard library only.

A password is hidden where it stands as a password: the userinfo of a URL of any scheme
(``amqp://guest:***@host``), a ``password=``/``passwd=`` pair of a DSN, and, in the text of
an exception only, a known password standing alone as a token. The same letters anywhere
else — a queue ``qq_edm``, a path ``/srv/edm/``, the program's name — stay as they are.
"""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Iterable, Sequence
from typing import Protocol
from urllib.parse import unquote

MASK = "***"

# Shorter known passwords are not searched for as tokens: "1" or "ok" would hide real words.
MIN_TOKEN_SECRET = 3

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_SPACE = re.compile(r"\s")
_DSN = re.compile(
    r"""(?ix) (?P<key> \b (?:[\w.-]*[_.-])? passw(?:or)?d \s*=\s* )  # password=, db_passwd = …
    (?: '[^']*' | "[^"]*" | [^\s;&'"]+ )""",
)
# A known password inside an error text is masked only where no name character touches it:
# "qq_edm", "/srv/edm/", "edm.amqp.consumer" or "edm:log_message" keep their "edm".
_NAME_CHARS = r"\w\-./\\@:%+~"


def _password_span(url: str) -> tuple[int, int] | None:
    """Where the password of ``url`` (which starts with ``scheme://``) lies, if it has one.

    A well-formed URL is read as urllib (and so pika and PyMySQL) reads it: the authority
    ends at the first ``/``, ``?`` or ``#``, the userinfo at its last ``@``, the user at the
    first ``:``. A password holding an unencoded ``/``, ``?`` or ``#`` makes the URL
    malformed; its password is then taken up to the last ``@``, so that none of it shows.
    """
    start = url.find("://") + 3
    rest = url[start:]
    end_of_authority = next((i for i, c in enumerate(rest) if c in "/?#"), len(rest))
    authority = rest[:end_of_authority]
    at = authority.rfind("@")
    if at >= 0:
        colon = authority.find(":", 0, at)
        return (start + colon + 1, start + at) if colon >= 0 else None
    colon = authority.find(":")
    at = rest.rfind("@")
    if colon < 0 or at < end_of_authority or authority.startswith("[") or authority[colon + 1 :].isdigit():
        return None  # no userinfo at all, or host:port followed by an "@" in the path
    return start + colon + 1, start + at


def _urls(text: str) -> Iterable[tuple[int, int]]:
    """The spans of the URL-looking pieces of ``text``: from a scheme to a blank or the next URL."""
    starts = [m.start() for m in _SCHEME.finditer(text)]
    for i, start in enumerate(starts):
        stop = starts[i + 1] if i + 1 < len(starts) else len(text)
        blank = _SPACE.search(text, start, stop)
        yield start, blank.start() if blank else stop


def _mask_urls(text: str) -> str:
    pieces: list[str] = []
    done = 0
    for start, stop in _urls(text):
        span = _password_span(text[start:stop])
        if span is not None:
            pieces += [text[done : start + span[0]], MASK]
            done = start + span[1]
    return "".join(pieces) + text[done:] if pieces else text


def mask_url(url: str) -> str:
    """Hide the password of a URL of any scheme: ``amqp://guest:***@127.0.0.1:5672/%2F``.

    ``url`` is read as one URL (a blank in its password is hidden too); a string that is
    not a URL is masked as a text.
    """
    if _SCHEME.match(url):
        span = _password_span(url)
        return url if span is None else url[: span[0]] + MASK + url[span[1] :]
    return mask_text(url)


def mask_text(text: str, secrets: Iterable[str] = ()) -> str:
    """Hide the passwords of every URL and ``password=`` pair in ``text``.

    ``secrets`` are known passwords, given only for the text of an error raised by a library:
    there, one standing alone as a token (``'hunter2'``, ``(hunter2)``) is hidden as well.
    """
    text = _mask_urls(text)
    if "=" in text and "passw" in text.lower():
        text = _DSN.sub(lambda m: m.group("key") + MASK, text)
    for secret in sorted({s for s in secrets if len(s) >= MIN_TOKEN_SECRET}, key=len, reverse=True):
        if secret in text:
            alone = rf"(?<![{_NAME_CHARS}]){re.escape(secret)}(?![{_NAME_CHARS}])"
            text = re.sub(alone, MASK, text)
    return text


def passwords_in(text: str) -> tuple[str, ...]:
    """The non-empty URL passwords written in ``text`` (a config file, say), as written."""
    found = []
    for start, stop in _urls(text):
        span = _password_span(text[start:stop])
        if span is not None and span[1] > span[0]:
            found.append(text[start + span[0] : start + span[1]])
    return tuple(found)


def url_secrets(urls: Iterable[str | None]) -> tuple[str, ...]:
    """The passwords of ``urls``, both as written and percent-decoded."""
    found: dict[str, None] = {}
    for url in urls:
        if url and _SCHEME.match(url):
            span = _password_span(url)
            if span is not None and span[1] > span[0]:
                written = url[span[0] : span[1]]
                found.update(dict.fromkeys((written, unquote(written))))
    return tuple(found)


class _UrlSetting(Protocol):
    @property
    def url(self) -> str | None: ...


class _UrlListSetting(Protocol):
    @property
    def url(self) -> Sequence[str]: ...


class SecretSettings(Protocol):
    """The parts of a config that hold passwords (``edm.config.Config`` is one)."""

    @property
    def amqp(self) -> _UrlListSetting: ...

    @property
    def database(self) -> _UrlSetting: ...


def secrets_of(config: SecretSettings) -> tuple[str, ...]:
    """Every password of a config: the broker URLs', the database URL's and smtp.url's."""
    # A section with a password of its own adds its URL here.
    smtp = getattr(config, "smtp", None)
    return url_secrets([*config.amqp.url, config.database.url, getattr(smtp, "url", None)])


class _ErrorText:
    """An exception given to a log call, rendered with the known passwords masked."""

    def __init__(self, exc: BaseException, secrets: Sequence[str]) -> None:
        self.exc = exc
        self.secrets = secrets

    def __str__(self) -> str:
        return mask_text(str(self.exc), self.secrets)

    def __repr__(self) -> str:
        return mask_text(repr(self.exc), self.secrets)


def mask_record(record: logging.LogRecord, secrets: Sequence[str] = ()) -> str:
    """A log record's text, with its traceback if any, passwords masked.

    URLs and DSNs are masked everywhere; the known ``secrets`` only inside the texts of the
    exceptions passed as arguments or being logged, since those come from libraries.
    """
    args = record.args
    if secrets and isinstance(args, tuple):
        args = tuple(_ErrorText(a, secrets) if isinstance(a, BaseException) else a for a in args)
    text = str(record.msg) % args if args else str(record.msg)
    text = mask_text(text)
    if record.exc_info and record.exc_info[1] is not None:
        text += "\n" + _mask_traceback(record.exc_info[1], secrets)
    return text


def _mask_traceback(exc: BaseException, secrets: Sequence[str]) -> str:
    """A traceback whose exception texts are masked with the known passwords; its frames
    (our file names and source lines) only as any text, so that a word of the code stays."""
    tb = traceback.TracebackException.from_exception(exc)
    errors: set[str] = set()
    todo, seen = [tb], set()
    while todo:
        one = todo.pop()
        if id(one) not in seen:
            seen.add(id(one))
            errors.update(one.format_exception_only())
            todo += [t for t in (one.__cause__, one.__context__) if t is not None]
            todo += getattr(one, "exceptions", None) or []  # an ExceptionGroup's members
    text = "".join(mask_text(chunk, secrets if chunk in errors else ()) for chunk in tb.format())
    return text.rstrip("\n")
