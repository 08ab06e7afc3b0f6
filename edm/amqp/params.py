"""Broker URLs: pika connection parameters (TLS included) and broker errors in words."""

from __future__ import annotations

import re
import ssl
from collections.abc import Sequence
from urllib.parse import urlsplit

import pika
import pika.credentials
import pika.exceptions

from edm.config import AmqpTlsConfig
from edm.errors import BrokerError
from edm.redact import mask_text

_NO_TLS = AmqpTlsConfig()


def parameters(
    url: str, heartbeat: int | None = None, tls: AmqpTlsConfig | None = None
) -> pika.URLParameters:
    """pika parameters for one URL, with our heartbeat and a short connect timeout.

    An ``amqps://`` URL gets a TLS context from ``tls`` (verifying the broker's certificate
    and host name unless ``tls.verify`` is false); with a client certificate and no password
    in the URL, the login is RabbitMQ's ``EXTERNAL`` (the certificate names the user).
    Raises BrokerError when the certificate files cannot be loaded any more.
    """
    params = pika.URLParameters(url)
    if heartbeat is not None:
        params.heartbeat = heartbeat
    params.connection_attempts = 1
    params.socket_timeout = 5
    params.blocked_connection_timeout = 60
    params.client_properties = {"connection_name": "edm", "product": "edm"}
    if params.ssl_options is not None:
        tls = tls or _NO_TLS
        # Our own context rather than pika's default one: verification must not depend on its version.
        params.ssl_options = pika.SSLOptions(tls_context(tls), server_hostname=params.host)
        if tls.cert_file is not None and urlsplit(url).password is None:
            params.credentials = pika.credentials.ExternalCredentials()
    return params


def tls_context(tls: AmqpTlsConfig) -> ssl.SSLContext:
    """The client TLS context ``amqp.tls`` asks for; BrokerError names the file that failed."""
    if tls.verify:
        try:
            # The system's CAs, or only the private CA when one is named.
            context = ssl.create_default_context(cafile=None if tls.ca_file is None else str(tls.ca_file))
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise BrokerError(f"amqp.tls.ca_file: cannot load {tls.ca_file}: {describe(exc)}") from None
        context.verify_mode = ssl.CERT_REQUIRED
        context.check_hostname = True
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.cert_file is not None:
        key = None if tls.key_file is None else str(tls.key_file)
        try:
            context.load_cert_chain(str(tls.cert_file), key, _no_password)
        except (OSError, ValueError) as exc:
            files = str(tls.cert_file) if key is None else f"{tls.cert_file} and {key}"
            raise BrokerError(f"amqp.tls.cert_file: cannot load {files}: {describe(exc)}") from None
    return context


def _no_password() -> str:
    raise ValueError("the key is encrypted")


def insecure_tls_warning(urls: Sequence[str], tls: AmqpTlsConfig) -> str | None:
    """The warning due while ``amqps://`` URLs are used without verifying the broker."""
    if tls.verify or not any(url.lower().startswith("amqps:") for url in urls):
        return None
    return (
        "amqp.tls.verify is false: the broker's certificate and host name are not checked, "
        "so anyone between edm and the broker can read and change the messages"
    )


def describe(exc: BaseException | str) -> str:
    """The innermost cause of a broker error, in words, without a password."""
    exc = _innermost(exc)
    if isinstance(exc, ssl.SSLError):
        return _describe_tls(exc)
    if isinstance(exc, pika.exceptions.StreamLostError):
        # An alert after the handshake (TLS 1.3: the broker refused our certificate) reaches
        # pika as a lost stream whose text holds the SSLError.
        alert = _SSL_IN_TEXT.search(str(exc))
        if alert:
            return f"TLS handshake failed: {alert.group(1)}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, pika.exceptions.ProbableAuthenticationError):
        return "authentication failed (check the user name and password)"
    if isinstance(exc, pika.exceptions.ProbableAccessDeniedError):
        return "access denied (check the virtual host and the user's permissions)"
    return mask_text(str(exc) or type(exc).__name__)


def _innermost(exc: BaseException | str) -> BaseException | str:
    seen = 0
    while isinstance(exc, BaseException) and seen < 10:
        seen += 1
        nested = [e for e in getattr(exc, "exceptions", None) or () if isinstance(e, BaseException)]
        if nested:
            # One error per address tried: a TLS refusal says more than a refused port.
            inner = [_innermost(e) for e in nested]
            tls = [e for e in inner if isinstance(e, ssl.SSLError)]
            exc = tls[-1] if tls else nested[-1]
        elif isinstance(getattr(exc, "exception", None), BaseException):
            exc = exc.exception  # type: ignore[attr-defined]  # pika's connector errors
        elif exc.args and isinstance(exc.args[0], BaseException):
            exc = exc.args[0]
        else:
            break
    return exc


def _describe_tls(exc: ssl.SSLError) -> str:
    """``certificate verify failed: IP address mismatch, ...`` rather than OpenSSL's raw line."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = (exc.verify_message or "").strip().rstrip(".")
        if detail[1:2].islower():  # "Hostname mismatch" reads on after the colon; "IP" stays
            detail = detail[:1].lower() + detail[1:]
        if exc.verify_code in _UNKNOWN_CA_CODES:
            detail += " (is amqp.tls.ca_file the CA that signed the broker's certificate?)"
        return f"certificate verify failed: {detail or 'no reason given'}"
    text = exc.strerror or str(exc)
    # "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)" -> "wrong version number"
    text = re.sub(r"^\[[A-Z0-9_]+: [A-Z0-9_]+\] ", "", text)
    text = re.sub(r" \(_ssl\.c:\d+\)$", "", text)
    return f"TLS handshake failed: {mask_text(text)}"


_SSL_IN_TEXT = re.compile(r"\[SSL: [A-Z0-9_]+\] ([^'\"()]+?)(?: \(_ssl\.c:\d+\))?['\"]")
# OpenSSL's X509_V_ERR_: unable to get issuer (2, 20), self-signed (18, 19), untrusted (27).
_UNKNOWN_CA_CODES = frozenset({2, 18, 19, 20, 27})
