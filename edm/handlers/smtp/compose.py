"""The job as an RFC 5322 message, with the standard library's ``email`` package.

Text and HTML make a ``multipart/alternative``; non-ASCII subjects and display names become
RFC 2047 encoded words; the body parts are quoted-printable or base64 (7-bit clean, so a
server without 8BITMIME takes them). Header lines may run to 998 characters before folding,
so that a long unsubscribe URL stays one readable ``<url>`` and never turns into encoded words.
"""

from __future__ import annotations

import hashlib
import time
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate

from edm.handlers.smtp.job import Job
from edm.handlers.smtp.templates import Content

POLICY = policy.SMTP.clone(cte_type="7bit", max_line_length=998)


def message_id(job: Job, sender: Address) -> str:
    """The same job always gets the same Message-ID: a hash of its key, at the sender's domain."""
    token = hashlib.sha256(job.key.encode("utf-8", "surrogatepass")).hexdigest()[:40]
    return f"<{token}@{sender.domain}>"


def compose(job: Job, sender: Address, content: Content, msgid: str, now: float | None = None) -> bytes:
    """The message as the bytes to send after DATA (CRLF line ends)."""
    msg = EmailMessage(policy=POLICY)
    msg["From"] = sender
    msg["To"] = job.to
    if job.cc:
        msg["Cc"] = job.cc
    if job.reply_to:
        msg["Reply-To"] = job.reply_to
    msg["Subject"] = content.subject
    msg["Date"] = formatdate(time.time() if now is None else now, localtime=False, usegmt=True)
    msg["Message-ID"] = msgid
    if job.unsubscribe:
        msg["List-Unsubscribe"] = ", ".join(f"<{u}>" for u in job.unsubscribe)
        if any(u.startswith("https://") for u in job.unsubscribe):
            msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    for name, value in job.headers:
        msg[name] = value
    if content.text is not None:
        msg.set_content(content.text, charset="utf-8")
        if content.html is not None:
            msg.add_alternative(content.html, subtype="html", charset="utf-8")
    else:
        msg.set_content(content.html or "", subtype="html", charset="utf-8")
    return msg.as_bytes()
