"""A real SMTP server for the tests (aiosmtpd on a free port), scripted per recipient.

``replies["c@example.com"] = ["550 5.1.1 no such user"]`` answers that recipient's next RCPT
with it (then 250 again once the list is used up); ``data_replies`` does the same for the end
of DATA, where ``"DROP"`` closes the connection instead of answering. ``delay`` holds every
reply to the end of DATA that long, and ``on_data`` is called before that reply goes out.
What the server accepted is in ``received``.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes

    @property
    def message(self) -> EmailMessage:
        parsed = message_from_bytes(self.data, policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


@dataclass
class Script:
    """The aiosmtpd handler: replies scripted per recipient, and what was received."""

    replies: dict[str, list[str]] = field(default_factory=dict)
    data_replies: list[str] = field(default_factory=list)
    delay: float = 0.0
    received: list[Received] = field(default_factory=list)
    rcpt_seen: list[str] = field(default_factory=list)
    sessions: int = 0
    helos: list[str] = field(default_factory=list)
    logins: list[tuple[str, str]] = field(default_factory=list)
    pipelining: bool = False  # offer PIPELINING (RFC 2920): aiosmtpd reads commands in turn anyway
    on_data: Callable[[], None] | None = None  # called before the reply to DATA (it may block)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_EHLO(
        self, server: SMTP, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        with self.lock:
            self.sessions += 1
            self.helos.append(hostname)
        if self.pipelining:
            responses.insert(len(responses) - 1, "250-PIPELINING")
        return responses

    async def handle_RCPT(
        self, server: SMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        with self.lock:
            self.rcpt_seen.append(address)
            queue = self.replies.get(address)
            reply = queue.pop(0) if queue else "250 2.1.5 OK"
        if reply.startswith("2"):
            envelope.rcpt_tos.append(address)
        return reply

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        with self.lock:
            reply = self.data_replies.pop(0) if self.data_replies else "250 2.0.0 Ok: queued"
        if reply == "DROP":
            server.transport.abort()
            return "421 dropped"  # never reaches the client: the connection is gone
        if reply.startswith("2"):
            with self.lock:
                self.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        if self.on_data is not None:
            self.on_data()
        return reply

    def message_ids(self) -> list[str]:
        return [r.message["Message-ID"] for r in self.received]


class Authenticator:
    """Accepts one user and password, by any mechanism; remembers the mechanisms used."""

    def __init__(self, user: str, password: str, script: Script) -> None:
        self.user, self.password, self.script = user, password, script

    def __call__(self, server: SMTP, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        if isinstance(data, LoginPassword):
            user, password = data.login.decode(), data.password.decode()
            ok = (user, password) == (self.user, self.password)
            if ok:
                with self.script.lock:
                    self.script.logins.append((mechanism, user))
            return AuthResult(success=ok, handled=False)
        return AuthResult(success=False, handled=False)


class SmtpServer:
    """Start with ``start()``, stop with ``stop()``; ``port`` is where it listens."""

    def __init__(
        self,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,  # offered with STARTTLS
        implicit_tls: ssl.SSLContext | None = None,  # smtps: TLS at connect
        auth: tuple[str, str] | None = None,
        auth_exclude: list[str] | None = None,
        pipelining: bool = False,
    ) -> None:
        self.script = Script(pipelining=pipelining)
        kwargs: dict[str, Any] = {}
        if tls is not None:
            kwargs["tls_context"] = tls
        if auth is not None:
            kwargs["authenticator"] = Authenticator(auth[0], auth[1], self.script)
            kwargs["auth_require_tls"] = False
            if auth_exclude:
                kwargs["auth_exclude_mechanism"] = auth_exclude
        self.port = port
        self.controller = Controller(
            self.script, hostname="127.0.0.1", port=port, ssl_context=implicit_tls, ready_timeout=10, **kwargs
        )

    def start(self) -> SmtpServer:
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller.loop.is_running():
            self.controller.stop(no_assert=True)
