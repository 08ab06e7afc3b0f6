"""The composer writes what ``EmailMessage`` would: both read back with ``email`` must agree."""

from __future__ import annotations

import json
from email import message_from_bytes, policy
from email.headerregistry import Address
from email.message import EmailMessage
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from edm.handlers.smtp.compose import compose, message_id
from edm.handlers.smtp.job import InvalidJob, Job, parse
from edm.handlers.smtp.templates import Content

REFERENCE = policy.SMTP.clone(cte_type="7bit", max_line_length=998)
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)
LINE = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=120)


def reference(job: Job, sender: Address, content: Content, msgid: str) -> bytes:
    """The same message built the plain way, with EmailMessage."""
    msg = EmailMessage(policy=REFERENCE)
    msg["From"] = sender
    msg["To"] = job.to
    if job.cc:
        msg["Cc"] = job.cc
    if job.reply_to:
        msg["Reply-To"] = job.reply_to
    msg["Subject"] = content.subject
    msg["Message-ID"] = msgid
    if job.unsubscribe:
        msg["List-Unsubscribe"] = ", ".join(f"<{u}>" for u in job.unsubscribe)
    for name, value in job.headers:
        msg[name] = value
    if content.text is not None:
        msg.set_content(content.text, charset="utf-8")
        if content.html is not None:
            msg.add_alternative(content.html, subtype="html", charset="utf-8")
    else:
        msg.set_content(content.html or "", subtype="html", charset="utf-8")
    return msg.as_bytes()


def read(data: bytes) -> dict[str, Any]:
    mail = message_from_bytes(data, policy=policy.default)
    assert isinstance(mail, EmailMessage)
    parts = list(mail.iter_parts()) if mail.is_multipart() else [mail]
    return {
        "headers": {
            name: str(mail[name])
            for name in ("From", "To", "Cc", "Reply-To", "Subject", "Message-ID", "X-Extra")
        },
        "addresses": [
            (a.display_name, a.addr_spec)
            for name in ("From", "To", "Cc")
            if mail[name]
            for a in mail[name].addresses
        ],
        "unsubscribe": str(mail["List-Unsubscribe"]).replace(" ", "") if mail["List-Unsubscribe"] else None,
        "type": mail.get_content_type(),
        "parts": [(p.get_content_type(), p.get_content().replace("\r\n", "\n").rstrip("\n")) for p in parts],
    }


@settings(max_examples=150, deadline=None)
@given(
    names=st.lists(LINE, min_size=1, max_size=4),
    subject=LINE,
    text=st.one_of(st.none(), TEXT),
    html=st.one_of(st.none(), TEXT),
    extra=LINE,
    unsubscribe=st.booleans(),
)
def test_the_composer_and_email_message_agree(
    names: list[str], subject: str, text: str | None, html: str | None, extra: str, unsubscribe: bool
) -> None:
    raw: dict[str, Any] = {
        "to": [f'"{n}" <to{i}@example.com>'.replace('""', "") for i, n in enumerate(names[:-1] or names)],
        "cc": f"{names[-1]} <cc@bücher.example>",
        "from": "News <news@example.org>",
        "subject": subject,
        "text": text if text is not None or html is not None else "",
        "html": html,
        "headers": {"X-Extra": extra},
    }
    if unsubscribe:
        raw["unsubscribe"] = ["https://example.org/u?" + "x" * 300, "mailto:u@example.org"]
    try:
        job = parse(json.dumps(raw).encode(), None, 10**7)
    except InvalidJob:
        return  # a name or value the job refuses: nothing to compare
    assert job.sender is not None
    content = Content(job.subject, job.text, job.html)
    msgid = message_id(job, job.sender)
    ours, theirs = compose(job, job.sender, content, msgid), reference(job, job.sender, content, msgid)
    assert ours.isascii() and all(len(line) <= 998 for line in ours.split(b"\r\n"))
    assert b"\n" not in ours.replace(b"\r\n", b"")
    assert read(ours) == read(theirs)
