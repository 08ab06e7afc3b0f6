"""The peer bench/smtp.py measures edm's smtp handler against: a Celery task around smtplib.

What a user would write instead of edm: the task builds the message with the standard
library's ``email.message.EmailMessage`` (text + html, the unsubscribe headers, a Message-ID
from the job's id) and sends it with ``smtplib`` over a session kept per thread (per process
under prefork), opened again when lost. ``acks_late`` and a prefetch multiplier of 1, as the
Celery documentation advises for long tasks that must not be lost.

Its settings come from the environment: ``BENCH_BROKER`` (an amqp:// URL), ``BENCH_QUEUE``,
``BENCH_SMTP`` (host:port).
"""

from __future__ import annotations

import os
import smtplib
import threading
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any

from celery import Celery

app = Celery("edm_bench", broker=os.environ.get("BENCH_BROKER", "amqp://guest:guest@127.0.0.1:5672//"))
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_default_queue=os.environ.get("BENCH_QUEUE", "celery"),
    worker_enable_remote_control=False,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)

_local = threading.local()


def _session() -> smtplib.SMTP:
    smtp: smtplib.SMTP | None = getattr(_local, "smtp", None)
    if smtp is None:
        host, port = os.environ.get("BENCH_SMTP", "127.0.0.1:25").rsplit(":", 1)
        smtp = _local.smtp = smtplib.SMTP(host, int(port), local_hostname="bench.example", timeout=30)
    return smtp


def build(job: dict[str, Any]) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = job["from"]
    msg["To"] = job["to"]
    msg["Subject"] = job["subject"]
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = f"<{job['id']}@bench.example>"
    if job.get("unsubscribe"):
        msg["List-Unsubscribe"] = f"<{job['unsubscribe']}>"
        msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    msg.set_content(job["text"])
    if job.get("html"):
        msg.add_alternative(job["html"], subtype="html")
    return msg


@app.task(name="bench.send_mail")
def send_mail(job: dict[str, Any]) -> None:
    msg = build(job)
    try:
        _session().send_message(msg)
    except (smtplib.SMTPServerDisconnected, OSError):
        _local.smtp = None  # the kept session was lost: once more on a new one
        _session().send_message(msg)
