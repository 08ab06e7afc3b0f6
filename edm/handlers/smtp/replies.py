"""The SMTP replies this process got, by code: ``edm_smtp_replies_total{code}`` (contract §14).

Every handler thread's session counts into the process-wide ``smtp_replies`` counts
(:mod:`edm.handlers.counters`), which the consumer worker reports to the main process.

What counts: each reply that decided something about a message — the reply to the end of
DATA, a refusal at MAIL FROM, each recipient refused or deferred at RCPT, a refusal at
EHLO, STARTTLS or AUTH — by its 3-digit code; ``timeout`` when the server did not answer
within ``smtp.timeout`` and ``connection`` when there was no reply to count (a refused or
lost connection, a certificate not trusted). The label set stays bounded: a code outside
200–599 counts as ``other``.
"""

from __future__ import annotations

from edm.handlers.counters import counts

REPORT_KEY = "smtp_replies"  # the key of the worker's status report (see edm.metrics)
TIMEOUT = "timeout"
CONNECTION = "connection"
OTHER = "other"

_COUNTS = counts(REPORT_KEY)


def count(reply: int | str) -> None:
    """Count one reply code (an int) or one of TIMEOUT and CONNECTION."""
    if isinstance(reply, int):
        reply = str(reply) if 200 <= reply <= 599 else OTHER
    _COUNTS.add(reply)
