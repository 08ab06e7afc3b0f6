"""The ``smtp`` handler (contract §13): each job delivered to the relay of ``smtp.url``.

``amqp.handler: smtp`` builds one ``SmtpHandler`` per handler thread. Its settings are the
``smtp`` section, which the configuration hands over in ``amqp.handler_options`` under the
reserved key ``smtp`` (``edm.config.with_smtp``): the worker builds handlers from those options.

Outcomes: the server's 250 → the journal, the message's log line, ``Sent …``, the ack. An
invalid job or a permanent refusal → ``Reject``. Recipients refused for good while others got
the mail → a WARNING naming them and a dead letter holding only them; recipients still owed
(4xx), a timeout or a lost connection → ``Retry`` of only those still owed.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Mapping
from email.headerregistry import Address
from typing import Any

from edm.config import SMTP_OPTION, SmtpConfig
from edm.errors import ConfigError
from edm.handlers.api import Message, Reject, Retry
from edm.handlers.log import log_message
from edm.handlers.smtp.compose import compose, message_id
from edm.handlers.smtp.job import InvalidJob, Job, address, parse
from edm.handlers.smtp.journal import Journal
from edm.handlers.smtp.rate import shared
from edm.handlers.smtp.sender import Delivery, Permanent, Session, Temporary
from edm.handlers.smtp.templates import Templates

__all__ = ["RejectCopy", "RetryCopy", "SmtpHandler"]

log = logging.getLogger(__name__)


class RejectCopy(Reject):
    """Dead-letter ``body`` (a copy of the job for the refused recipients) instead of the job."""

    def __init__(self, reason: str, body: bytes) -> None:
        super().__init__(reason)
        self.body = body


class RetryCopy(Retry):
    """Retry ``body`` (a copy of the job for the recipients still owed) instead of the job."""

    def __init__(self, reason: str, body: bytes) -> None:
        super().__init__(reason)
        self.body = body


class SmtpHandler:
    """One handler thread's sender: its SMTP session, templates and journal connection."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        settings = options.get(SMTP_OPTION)
        if not isinstance(settings, SmtpConfig):
            raise ConfigError("amqp.handler: the smtp handler got no smtp section (use amqp.handler: smtp)")
        others = sorted(set(options) - {SMTP_OPTION})
        if others:
            raise ConfigError(
                f"amqp.handler_options.{others[0]}: the smtp handler takes no options; "
                "its settings are the smtp section"
            )
        self.settings = settings
        try:
            self.default_from = None if settings.sender is None else address(settings.sender, "smtp.from")
        except InvalidJob as exc:
            raise ConfigError(f"smtp.from: {exc.problem}") from None
        self.templates = Templates(settings.templates)
        self.journal = Journal(settings.journal, settings.journal_days)
        self.session = Session(settings)
        self.bucket = shared(settings.rate)

    def __call__(self, message: Message) -> None:
        try:
            job = parse(message.body, message.message_id, self.settings.max_size)
            sender = job.sender or self.default_from
            if sender is None:
                raise InvalidJob("from", "missing, and smtp.from is not set")
            msgid = message_id(job, sender)
        except InvalidJob as exc:
            raise Reject(str(exc)) from None
        try:
            done = self.journal.delivered(msgid)
        except sqlite3.Error as exc:
            raise Retry(f"smtp.journal: cannot read {self.settings.journal}: {exc}") from None
        owed = [r for r in job.recipients if r not in done]
        if not owed:
            log_message(message)
            log.info("Already sent %s", msgid)
            return
        data = self._compose(job, sender, msgid)
        if self.bucket is not None:
            self.bucket.take()
        try:
            delivery = self.session.send(sender.addr_spec, owed, data)
        except Temporary as exc:
            raise Retry(str(exc)) from None
        except Permanent as exc:
            raise Reject(str(exc)) from None
        self._outcome(message, job, msgid, delivery)

    def _compose(self, job: Job, sender: Address, msgid: str) -> bytes:
        try:
            content = self.templates.content(job)
            data = compose(job, sender, content, msgid)
        except InvalidJob as exc:
            raise Reject(str(exc)) from None
        except (ValueError, TypeError, LookupError) as exc:  # UnicodeError is a ValueError
            raise Reject(f"body: cannot make a message of the job: {type(exc).__name__}: {exc}") from None
        if len(data) > self.settings.max_size:
            raise Reject(f"max_size: the message is {len(data)} bytes, over smtp.max_size")
        return data

    def _outcome(self, message: Message, job: Job, msgid: str, delivery: Delivery) -> None:
        if delivery.accepted:
            try:
                self.journal.record(msgid, delivery.accepted)
            except sqlite3.Error as exc:  # sent already: retrying would send it twice
                log.error(
                    "smtp.journal: could not record %s (%s); a redelivery would send it again.", msgid, exc
                )
            log_message(message)
            log.info("Sent %s to %d recipients: %s", msgid, len(delivery.accepted), delivery.reply)
        refused = "; ".join(f"{rcpt} ({why})" for rcpt, why in delivery.refused.items())
        if delivery.refused and delivery.accepted:
            log.warning("%s was not sent to %d refused recipients: %s", msgid, len(delivery.refused), refused)
        if delivery.deferred:
            # The refused go along: asked again, they are refused again and dead-lettered alone.
            still = [*delivery.deferred, *delivery.refused]
            deferred = "; ".join(f"{rcpt} ({why})" for rcpt, why in delivery.deferred.items())
            raise self._copy(RetryCopy, message, job, still, f"recipients deferred: {deferred}")
        if delivery.refused:
            if not delivery.accepted:
                raise Reject(f"every recipient refused: {refused}")
            raise self._copy(
                RejectCopy, message, job, list(delivery.refused), f"recipients refused: {refused}"
            )

    @staticmethod
    def _copy(
        kind: type[RejectCopy] | type[RetryCopy],
        message: Message,
        job: Job,
        recipients: list[str],
        reason: str,
    ) -> RejectCopy | RetryCopy:
        """The outcome for a copy of the job that holds only ``recipients``.

        The consumer dead-letters or retries ``message.body``, so the copy replaces it there too.
        """
        body = job.copy_for(recipients)
        message.body = body
        return kind(reason, body)

    def close(self) -> None:
        self.session.close()
        self.journal.close()
