"""The job as an RFC 5322 message, written with the standard library's ``email`` encoders.

Text and HTML make a ``multipart/alternative``; non-ASCII subjects, header values and display
names become RFC 2047 encoded words (``email.header``); body parts are 7bit when they can be,
else quoted-printable or base64, whichever is shorter, so any relay takes them (no 8BITMIME).
A long unsubscribe URL stays one readable ``<url>``, never encoded words.

The message is written directly rather than through ``EmailMessage``: the header registry and
generator cost about 2 ms of CPU per message, several times the rest of the job's handling
(parse, journal, SMTP) together. ``tests/test_smtp_compose.py`` holds the two to the same
result, read back with ``email``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
import time
from email import charset as charsets
from email.header import Header
from email.headerregistry import Address
from email.utils import formatdate, quote

from edm.handlers.smtp.job import Job
from edm.handlers.smtp.templates import Content

CRLF = "\r\n"
MAX_LINE = 998  # RFC 5322, without the CRLF
_UTF8_Q = charsets.Charset("utf-8")
_UTF8_Q.header_encoding = charsets.QP  # encoded words in Q: shorter and readable for Latin text
_UTF8_SHORTEST = charsets.Charset("utf-8")
_UTF8_SHORTEST.header_encoding = charsets.SHORTEST
_SPECIALS = frozenset('()<>[]:;@\\,."')


def message_id(job: Job, sender: Address) -> str:
    """The same job always gets the same Message-ID: a hash of its key, at the sender's domain."""
    token = hashlib.sha256(job.key.encode("utf-8", "surrogatepass")).hexdigest()[:40]
    return f"<{token}@{sender.domain}>"


def compose(job: Job, sender: Address, content: Content, msgid: str, now: float | None = None) -> bytes:
    """The message as the bytes to send after DATA (CRLF line ends)."""
    head = [
        "From: " + _address(sender),
        "To: " + _addresses(job.to),
    ]
    if job.cc:
        head.append("Cc: " + _addresses(job.cc))
    if job.reply_to:
        head.append("Reply-To: " + _addresses(job.reply_to))
    head.append(_unstructured("Subject", content.subject))
    head.append("Date: " + formatdate(time.time() if now is None else now, localtime=False, usegmt=True))
    head.append("Message-ID: " + msgid)
    if job.unsubscribe:
        head.append("List-Unsubscribe: " + ",\r\n ".join(f"<{u}>" for u in job.unsubscribe))
        if any(u.startswith("https://") for u in job.unsubscribe):
            head.append("List-Unsubscribe-Post: List-Unsubscribe=One-Click")
    head.extend(_unstructured(name, value) for name, value in job.headers)
    head.append("MIME-Version: 1.0")
    if content.text is not None and content.html is not None:
        text, html = _part("plain", content.text), _part("html", content.html)
        boundary = _boundary(text, html)
        head.append(f'Content-Type: multipart/alternative; boundary="{boundary}"')
        body = f"--{boundary}\r\n{text}\r\n--{boundary}\r\n{html}\r\n--{boundary}--\r\n"
        return (CRLF.join(head) + CRLF + CRLF + body).encode("ascii")
    single = _part("plain", content.text) if content.text is not None else _part("html", content.html or "")
    return (CRLF.join(head) + CRLF + single).encode("ascii")


def _address(address: Address) -> str:
    name, spec = address.display_name, address.addr_spec
    if not name:
        return spec
    if name.isascii():
        if any(c in _SPECIALS for c in name) or name != name.strip() or "  " in name or "=?" in name:
            return f'"{quote(name)}" <{spec}>'
        return f"{name} <{spec}>"
    # One encoded word, never split: readers differ on the space between two adjacent ones.
    return f"{_UTF8_SHORTEST.header_encode(name)} <{spec}>"


def _addresses(addresses: tuple[Address, ...]) -> str:
    return ",\r\n ".join(_address(a) for a in addresses)  # folded after each: any count fits


def _unstructured(name: str, value: str) -> str:
    if value.isascii() and "=?" not in value and len(name) + len(value) + 2 <= MAX_LINE:
        return f"{name}: {value}"
    # Encoded words, folded to short lines; a literal "=?" is encoded too, so no reader decodes it.
    return f"{name}: " + Header(value, _UTF8_Q, header_name=name).encode(linesep=CRLF)


def _part(subtype: str, text: str) -> str:
    """The headers and body of one text part, ``text`` with its line ends made CRLF."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n")
    if not lines.endswith("\n"):
        lines += "\n"
    data = lines.encode("utf-8")
    if data.isascii() and max(map(len, lines.split("\n"))) <= MAX_LINE and "\0" not in lines:
        cte, body = "7bit", lines.replace("\n", CRLF)
    else:
        qp = binascii.b2a_qp(data, istext=True).decode("ascii")
        b64 = base64.encodebytes(data).decode("ascii")
        cte, body = ("quoted-printable", qp) if len(qp) <= len(b64) else ("base64", b64)
        body = body.replace("\n", CRLF)
    return f'Content-Type: text/{subtype}; charset="utf-8"\r\nContent-Transfer-Encoding: {cte}\r\n\r\n{body}'


def _boundary(*parts: str) -> str:
    while True:
        boundary = "=_edm_" + secrets.token_hex(12)  # "=_" never occurs in QP or base64
        if not any(boundary in part for part in parts):
            return boundary
