"""One SMTP session, kept open between jobs and opened again when lost (``smtplib``).

``send`` speaks MAIL, RCPT and DATA itself rather than ``sendmail``, to keep each recipient's
reply and the DATA reply. Its outcome is a ``Delivery`` (who got the mail, who was refused for
good, who is still owed) or an exception: ``Temporary`` (4xx, a timeout, a lost or refused
connection, a certificate that fails verification) or ``Permanent`` (5xx at MAIL FROM or DATA).
"""

from __future__ import annotations

import base64
import logging
import re
import smtplib
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from edm.config import SmtpConfig
from edm.handlers.smtp.replies import CONNECTION, TIMEOUT, count
from edm.redact import mask_url

log = logging.getLogger(__name__)

# A session unused for this long is checked with NOOP before a job: servers drop idle ones.
IDLE_CHECK = 10.0

_DOT = re.compile(rb"^\.", re.MULTILINE)  # a line starting with "." gets another (RFC 5321 4.5.2)

_warned_lock = threading.Lock()
_warned_unverified: set[str] = set()  # per process: the WARNING of verify: false comes once


class Failure(Exception):
    """The server's reply or what went wrong, as one line for the log and ``x-edm-error``."""


class Temporary(Failure):
    """Try again later: nothing, or only part, was sent."""


class Permanent(Failure):
    """The server refused the message itself for good (5xx at MAIL FROM or DATA)."""


@dataclass
class Delivery:
    accepted: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # 5xx at RCPT: recipient -> reply
    deferred: dict[str, str] = field(default_factory=dict)  # 4xx at RCPT: recipient -> reply
    reply: str = ""  # the reply to the end of DATA, when sent


def reply_text(code: int, text: bytes | str) -> str:
    line = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    return f"{code} {' '.join(line.split())}"[:500]


def tls_context(settings: SmtpConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=None if settings.ca_file is None else str(settings.ca_file))
    if not settings.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class Session:
    """The session of one handler thread; ``send`` opens it when needed."""

    def __init__(self, settings: SmtpConfig) -> None:
        self.settings = settings
        parts = urlsplit(settings.url)
        self.smtps = parts.scheme == "smtps"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (465 if self.smtps else 25)
        self.user = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password or "")
        self.where = mask_url(settings.url)
        self.context = tls_context(settings)
        self._smtp: smtplib.SMTP | None = None
        self._last_used = 0.0
        self._helo = settings.helo  # looked up once (smtplib would ask the resolver at every connect)

    # -- the session ---------------------------------------------------------------------------

    def _open(self) -> smtplib.SMTP:
        s = self.settings
        if self._helo is None:
            self._helo = socket.getfqdn()
        if not s.verify:
            with _warned_lock:
                first = s.url not in _warned_unverified
                _warned_unverified.add(s.url)
            if first:
                log.warning("smtp.verify is false: the certificate of %s is not checked.", self.where)
        try:
            if self.smtps:
                smtp: smtplib.SMTP = smtplib.SMTP_SSL(
                    self.host, self.port, local_hostname=self._helo, timeout=s.timeout, context=self.context
                )
            else:
                smtp = smtplib.SMTP(self.host, self.port, local_hostname=self._helo, timeout=s.timeout)
        except ssl.SSLCertVerificationError as exc:
            count(CONNECTION)
            raise Temporary(f"TLS to {self.where}: certificate not trusted: {exc.verify_message}") from None
        except (smtplib.SMTPException, OSError) as exc:
            _count(exc)
            raise Temporary(f"cannot connect to {self.where}: {_describe(exc)}") from None
        try:
            self._greet(smtp)
        except BaseException:
            smtp.close()
            raise
        log.debug("Opened an SMTP session with %s.", self.where)
        return smtp

    def _greet(self, smtp: smtplib.SMTP) -> None:
        s = self.settings
        try:
            code, text = smtp.ehlo()
            if code != 250:
                count(code)
                raise Temporary(f"EHLO at {self.where}: {reply_text(code, text)}")
            if not self.smtps and s.starttls != "never":
                if smtp.has_extn("starttls"):
                    code, text = smtp.starttls(context=self.context)
                    smtp.ehlo()
                elif s.starttls == "always":
                    raise Temporary(f"{self.where} does not offer STARTTLS (smtp.starttls: always)")
            if self.user is not None:
                self._login(smtp, self.user, self.password)
        except ssl.SSLCertVerificationError as exc:
            count(CONNECTION)
            raise Temporary(
                f"STARTTLS with {self.where}: certificate not trusted: {exc.verify_message}"
            ) from None
        except smtplib.SMTPAuthenticationError as exc:
            count(exc.smtp_code)
            reply = reply_text(exc.smtp_code, exc.smtp_error)
            raise Temporary(f"AUTH as {self.user} at {self.where} failed: {reply} (smtp.url)") from None
        except smtplib.SMTPNotSupportedError:
            raise Temporary(f"{self.where} offers no AUTH the user of smtp.url could use") from None
        except smtplib.SMTPResponseException as exc:
            count(exc.smtp_code)
            raise Temporary(f"{self.where}: {reply_text(exc.smtp_code, exc.smtp_error)}") from None
        except (smtplib.SMTPException, OSError) as exc:
            _count(exc)
            raise Temporary(f"{self.where}: {_describe(exc)}") from None

    @staticmethod
    def _login(smtp: smtplib.SMTP, user: str, password: str) -> None:
        """smtplib's AUTH, or AUTH PLAIN in UTF-8 (RFC 4616) itself: smtplib sends ASCII only."""
        if (user + password).isascii():
            smtp.login(user, password)
            return
        if "PLAIN" not in smtp.esmtp_features.get("auth", "").upper().split():
            raise smtplib.SMTPNotSupportedError("non-ASCII credentials need AUTH PLAIN")
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode("ascii")
        code, text = smtp.docmd("AUTH", f"PLAIN {token}")
        if code != 235:
            raise smtplib.SMTPAuthenticationError(code, text)

    def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        try:
            smtp.quit()
        except (smtplib.SMTPException, OSError):
            smtp.close()

    def _drop(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            smtp.close()

    def _ready(self) -> smtplib.SMTP:
        """The open session, checked with NOOP after a while unused, else a new one."""
        smtp = self._smtp
        if smtp is not None and time.monotonic() - self._last_used > IDLE_CHECK:
            try:
                code, _ = smtp.noop()
            except (smtplib.SMTPException, OSError):
                code = 0
            if code != 250:
                self._drop()
                smtp = None
        if smtp is None:
            smtp = self._smtp = self._open()
        return smtp

    # -- one message ---------------------------------------------------------------------------

    def send(self, sender: str, recipients: list[str], data: bytes) -> Delivery:
        """MAIL, RCPT for each recipient, DATA to those accepted."""
        reused = self._smtp is not None
        try:
            try:
                return self._attempt(sender, recipients, data)
            except _Lost as lost:
                if not reused or lost.started:
                    raise
            # The kept session died while unused (nothing was sent on it): once more, anew.
            return self._attempt(sender, recipients, data)
        except _Lost as lost:
            raise Temporary(str(lost)) from None
        finally:
            self._last_used = time.monotonic()

    def _attempt(self, sender: str, recipients: list[str], data: bytes) -> Delivery:
        smtp = self._ready()
        step = _Step()
        try:
            return self._transaction(smtp, step, sender, recipients, data)
        except (smtplib.SMTPServerDisconnected, smtplib.SMTPResponseException, OSError) as exc:
            _count(exc)
            self._drop()
            raise _Lost(f"{step.name} at {self.where}: {_describe(exc)}", step.name != "MAIL FROM") from None
        except _Lost:
            self._drop()
            raise

    def _transaction(
        self, smtp: smtplib.SMTP, step: _Step, sender: str, recipients: list[str], data: bytes
    ) -> Delivery:
        if smtp.has_extn("pipelining"):
            return self._pipelined(smtp, step, sender, recipients, data)
        delivery = Delivery()
        # docmd, not mail() and rcpt(): those parse each address again (edm checked them)
        self._mail(smtp, sender, smtp.docmd("mail", f"FROM:<{sender}>"))
        step.name = "RCPT TO"
        for rcpt in recipients:
            self._rcpt(delivery, rcpt, smtp.docmd("rcpt", f"TO:<{rcpt}>"))
        if not delivery.accepted:
            self._reset(smtp)
            return delivery
        step.name = "DATA"
        try:
            reply = smtp.data(data)
        except smtplib.SMTPDataError as exc:  # DATA itself refused (no 354)
            reply = exc.smtp_code, _bytes(exc.smtp_error)
        return self._end(smtp, delivery, reply)

    def _pipelined(
        self, smtp: smtplib.SMTP, step: _Step, sender: str, recipients: list[str], data: bytes
    ) -> Delivery:
        """RFC 2920: MAIL, every RCPT and DATA in one write, then their replies in order."""
        delivery = Delivery()
        commands = [f"MAIL FROM:<{sender}>", *(f"RCPT TO:<{rcpt}>" for rcpt in recipients), "DATA"]
        smtp.send("".join(f"{command}\r\n" for command in commands).encode("ascii"))
        mail = smtp.getreply()
        if mail[0] == 421 or mail[0] < 0:
            self._mail(smtp, sender, mail)  # raises _Lost
        step.name = "RCPT TO"
        for rcpt in recipients:
            self._rcpt(delivery, rcpt, smtp.getreply())
        step.name = "DATA"
        code, text = smtp.getreply()
        if code == 354 and not (mail[0] == 250 and delivery.accepted):
            smtp.send(b".\r\n")  # a server that took DATA with nobody to send to: end it empty
            code, text = smtp.getreply()
        self._mail(smtp, sender, mail)  # a refused MAIL FROM raises here, its replies all read
        if not delivery.accepted:
            self._reset(smtp)
            return delivery
        if code == 354:
            smtp.send(_DOT.sub(b"..", data) + b".\r\n")  # the composer ends data with CRLF
            code, text = smtp.getreply()
        return self._end(smtp, delivery, (code, text))

    def _mail(self, smtp: smtplib.SMTP, sender: str, reply: tuple[int, bytes]) -> None:
        code, text = reply
        if code >= 400 or code < 0:
            count(code if code > 0 else CONNECTION)
        if code == 421 or code < 0:
            raise _Lost(f"MAIL FROM at {self.where}: {reply_text(code, text)}")
        if code >= 400:
            self._reset(smtp)
            kind = Permanent if code >= 500 else Temporary
            raise kind(f"MAIL FROM:<{sender}>: {reply_text(code, text)}")

    def _rcpt(self, delivery: Delivery, rcpt: str, reply: tuple[int, bytes]) -> None:
        code, text = reply
        if code not in (250, 251):
            count(code if code > 0 else CONNECTION)
        if code == 421 or code < 0:
            raise _Lost(f"RCPT TO at {self.where}: {reply_text(code, text)}", started=True)
        if code in (250, 251):
            delivery.accepted.append(rcpt)
        elif code >= 500:
            delivery.refused[rcpt] = reply_text(code, text)
        else:
            delivery.deferred[rcpt] = reply_text(code, text)

    def _end(self, smtp: smtplib.SMTP, delivery: Delivery, reply: tuple[int, bytes]) -> Delivery:
        """The reply to the end of DATA: the delivery, or why not."""
        code, text = reply
        count(code if code > 0 else CONNECTION)
        if code == 421 or code < 0:
            raise _Lost(f"DATA at {self.where}: {reply_text(code, text)}", started=True)
        if code != 250:
            self._reset(smtp)
            kind = Permanent if code >= 500 else Temporary
            raise kind(f"DATA: {reply_text(code, text)}")
        delivery.reply = reply_text(code, text)
        return delivery

    def _reset(self, smtp: smtplib.SMTP) -> None:
        try:
            code, _ = smtp.rset()
        except (smtplib.SMTPException, OSError):
            code = 0
        if code != 250:
            self._drop()


class _Step:
    """Where a transaction is, for the message of a failure."""

    name: str = "MAIL FROM"


class _Lost(Exception):
    """The session broke (a 421, a drop, a timeout); ``started``: after a recipient was accepted."""

    def __init__(self, reason: str, started: bool = False) -> None:
        super().__init__(reason)
        self.started = started


def _bytes(text: bytes | str) -> bytes:
    return text if isinstance(text, bytes) else text.encode("utf-8", "replace")


def _count(exc: BaseException) -> None:
    """Count what ended a step without a reply to parse: the server's code, a timeout, or no reply."""
    if isinstance(exc, smtplib.SMTPResponseException) and exc.smtp_code > 0:
        count(exc.smtp_code)
    elif _timed_out(exc):
        count(TIMEOUT)
    else:
        count(CONNECTION)


def _timed_out(exc: BaseException) -> bool:
    return isinstance(exc, TimeoutError) or "timed out" in str(exc)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, smtplib.SMTPResponseException):
        return reply_text(exc.smtp_code, exc.smtp_error)
    if _timed_out(exc):
        return f"no answer within smtp.timeout ({exc})"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
