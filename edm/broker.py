"""Broker URLs: pika connection parameters, errors in words, and publishing with confirms."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pika
import pika.exceptions

from edm.errors import BrokerError
from edm.redact import mask_text, mask_url


def parameters(url: str, heartbeat: int | None = None) -> pika.URLParameters:
    """pika parameters for one URL, with our heartbeat and a short connect timeout."""
    params = pika.URLParameters(url)
    if heartbeat is not None:
        params.heartbeat = heartbeat
    params.connection_attempts = 1
    params.socket_timeout = 5
    params.blocked_connection_timeout = 60
    params.client_properties = {"connection_name": "edm", "product": "edm"}
    return params


@dataclass
class PublishResult:
    confirmed: int
    failed: int


def publish(
    urls: Sequence[str],
    exchange: str,
    routing_key: str,
    bodies: Iterable[bytes],
) -> PublishResult:
    """Publish persistent, mandatory messages with publisher confirms; count what was confirmed.

    Raises BrokerError when no URL connects or the connection fails before any confirm.
    Unroutable and nacked messages count as failed. See ``edm.publish`` for the details.
    """
    from edm.publish import publish_bodies  # edm.publish builds on this module

    report = publish_bodies(urls, exchange, routing_key, bodies)
    if report.error and report.published == 0:
        raise BrokerError(report.error)
    return PublishResult(report.confirmed, report.not_confirmed)


def connect_blocking(urls: Sequence[str], heartbeat: int | None = None) -> pika.BlockingConnection:
    """Connect to the first URL that answers; the error names each masked URL that failed."""
    problems = []
    for url in urls:
        try:
            return pika.BlockingConnection(parameters(url, heartbeat))
        except pika.exceptions.AMQPError as exc:
            problems.append(f"{mask_url(url)}: {describe(exc)}")
    raise BrokerError("cannot connect to the broker: " + "; ".join(problems))


def describe(exc: BaseException | str) -> str:
    """The innermost cause of a broker error, in words, without a password."""
    seen = 0
    while isinstance(exc, BaseException) and seen < 10:
        seen += 1
        nested = [e for e in getattr(exc, "exceptions", None) or () if isinstance(e, BaseException)]
        if nested:
            exc = nested[-1]
        elif isinstance(getattr(exc, "exception", None), BaseException):
            exc = exc.exception  # type: ignore[attr-defined]  # pika's connector errors
        elif exc.args and isinstance(exc.args[0], BaseException):
            exc = exc.args[0]
        else:
            break
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, pika.exceptions.ProbableAuthenticationError):
        return "authentication failed (check the user name and password)"
    if isinstance(exc, pika.exceptions.ProbableAccessDeniedError):
        return "access denied (check the virtual host and the user's permissions)"
    return mask_text(str(exc) or type(exc).__name__)
