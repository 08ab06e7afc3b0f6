"""``edm publish``: fast, publisher-confirmed publishing of persistent messages.

One asynchronous pika connection publishes while a reader thread feeds it bodies, so a slow
stdin never stalls the connection's I/O (heartbeats, confirms). Confirms arrive
asynchronously; at most ``window`` messages are unconfirmed at any time and at most
``window`` read bodies wait to be sent, so memory stays bounded however large the input is.

A broker that blocks publishing (a memory or disk alarm: AMQP ``connection.blocked``) stops
reading the connection, confirms included. The run says so at once, waits up to
``blocked_timeout`` seconds for ``connection.unblocked``, and past it gives up: pika drops
the connection without the closing handshake, which a blocked broker would never answer.
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import pika
import pika.exceptions
from pika.adapters.select_connection import IOLoop

from edm.amqp.params import describe, insecure_tls_warning, parameters
from edm.config import AmqpTlsConfig, Config
from edm.errors import BrokerError, EdmError
from edm.redact import mask_text, mask_url

WINDOW = 5000
BLOCKED_TIMEOUT = 30.0  # seconds a run waits for a broker that blocks publishing
PROGRESS_INTERVAL = 0.5
# A run shorter than this shows no progress line at all: it would only flicker.
PROGRESS_DELAY = 1.0
_END = object()
_LOG = logging.getLogger(__name__)


@dataclass
class PublishReport:
    """What the broker made of the messages we handed it."""

    published: int = 0
    acked: int = 0
    nacked: int = 0
    unroutable: int = 0
    error: str | None = None

    @property
    def confirmed(self) -> int:
        # A returned (unroutable) message is acked too, after its Basic.Return.
        return max(0, self.acked - self.unroutable)

    @property
    def not_confirmed(self) -> int:
        return self.published - self.confirmed

    @property
    def unanswered(self) -> int:
        return max(0, self.published - self.acked - self.nacked)


def run_publish(
    config: Config,
    bodies: Iterable[bytes],
    *,
    routing_key: str | None = None,
    exchange: str | None = None,
    progress: TextIO | None = None,
    blocked_timeout: float = BLOCKED_TIMEOUT,
) -> int:
    """Publish every body; 0 when the broker confirmed them all, else 1 with the reason on stderr."""
    warning = insecure_tls_warning(config.amqp.url, config.amqp.tls)
    if warning:
        print(f"edm publish: WARNING: {warning}", file=sys.stderr)
    report = publish_bodies(
        config.amqp.url,
        config.amqp.exchange if exchange is None else exchange,
        config.amqp.routing_key if routing_key is None else routing_key,
        bodies,
        progress=progress,
        blocked_timeout=blocked_timeout,
        notices=sys.stderr,
        tls=config.amqp.tls,
    )
    if report.error:
        print(f"edm publish: {report.error}", file=sys.stderr)
    if report.not_confirmed:
        reasons = [
            f"{count} {label}"
            for count, label in (
                (report.unroutable, "unroutable"),
                (report.nacked, "nacked"),
                (report.unanswered, "unanswered"),
            )
            if count
        ]
        detail = f" ({', '.join(reasons)})" if reasons else ""
        print(
            f"edm publish: {report.not_confirmed} of {report.published} messages not confirmed{detail}",
            file=sys.stderr,
        )
    return 1 if report.error or report.not_confirmed else 0


def publish_bodies(
    urls: Sequence[str],
    exchange: str,
    routing_key: str,
    bodies: Iterable[bytes],
    *,
    window: int = WINDOW,
    progress: TextIO | None = None,
    blocked_timeout: float = BLOCKED_TIMEOUT,
    notices: TextIO | None = None,
    tls: AmqpTlsConfig | None = None,
) -> PublishReport:
    """Publish persistent, mandatory messages with confirms; never raises for broker trouble.

    ``notices`` gets a line when the broker blocks publishing and when it lifts the block.
    ``tls`` applies to ``amqps://`` URLs (default: verify the broker with the system's CAs).
    """
    return _Publisher(
        urls, exchange, routing_key, bodies, window, progress, blocked_timeout, notices, tls
    ).run()


class _Publisher:
    """The state of one publish run; every method but ``_read`` runs on the I/O loop."""

    def __init__(
        self,
        urls: Sequence[str],
        exchange: str,
        routing_key: str,
        bodies: Iterable[bytes],
        window: int,
        progress: TextIO | None,
        blocked_timeout: float = BLOCKED_TIMEOUT,
        notices: TextIO | None = None,
        tls: AmqpTlsConfig | None = None,
    ) -> None:
        self.urls = list(urls)
        self.exchange = exchange
        self.routing_key = routing_key
        self.bodies = bodies
        self.window = max(1, window)
        self.progress = progress
        self.report = PublishReport()
        self.properties = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)
        self.ioloop = IOLoop()
        self.connection: pika.SelectConnection | None = None
        self.channel: Any = None
        self.connect_errors: list[str] = []
        self.closing = False
        # Delivery tags published but not yet confirmed. Tags are 1, 2, 3...; ``floor`` is
        # the lowest tag a multiple=True confirm may still have to settle.
        self.pending: set[int] = set()
        self.next_tag = 1
        self.floor = 1
        # Hand-over from the reader thread: deque operations are atomic, so no lock.
        self.queue: collections.deque[object] = collections.deque()
        self.space = threading.Event()
        self.wake_pending = True  # set until the channel is ready: nothing to pump yet
        self.cancelled = False
        self.input_done = False
        self.read_error: BaseException | None = None
        self.started = 0.0
        self.progress_shown = False
        self.blocked_timeout = blocked_timeout
        self.notices = notices
        self.blocked_reason: str | None = None  # the broker's reason while it blocks us
        self.tls = tls

    # -- the run -------------------------------------------------------------------------
    def run(self) -> PublishReport:
        self._connect(0)
        try:
            self.ioloop.start()
        except KeyboardInterrupt:
            self.report.error = self.report.error or "interrupted"
        except Exception as exc:  # noqa: BLE001 - one line on stderr, not a traceback
            _LOG.debug("Publishing failed unexpectedly.", exc_info=True)
            self.report.error = f"publishing failed: {describe(exc)}"
        finally:
            self.cancelled = True
            self.space.set()
            self._show_progress(final=True)
            self.ioloop.close()
        if self.read_error is not None and not self.report.error:
            self.report.error = f"cannot read the messages: {_describe_read_error(self.read_error)}"
        return self.report

    def _connect(self, index: int) -> None:
        if index >= len(self.urls):
            self.report.error = "cannot connect to the broker: " + "; ".join(self.connect_errors)
            self.ioloop.stop()
            return
        url = self.urls[index]
        try:
            params = parameters(url, tls=self.tls)
        except BrokerError as exc:
            self.connect_errors.append(f"{mask_url(url)}: {exc}")
            self._connect(index + 1)
            return
        except (ValueError, pika.exceptions.AMQPError) as exc:
            self.connect_errors.append(f"{mask_url(url)}: {mask_text(str(exc))}")
            self._connect(index + 1)
            return
        params.client_properties = {"connection_name": "edm publish", "product": "edm"}
        # pika's timer, started by connection.blocked and stopped by connection.unblocked,
        # tears the connection down without a handshake when it fires.
        params.blocked_connection_timeout = self.blocked_timeout

        def on_open_error(_connection: object, exc: BaseException | str) -> None:
            reason = describe(exc)
            self.connect_errors.append(f"{mask_url(url)}: {reason}")
            self._connect(index + 1)

        self.connection = pika.SelectConnection(
            params,
            on_open_callback=self._on_connection_open,
            on_open_error_callback=on_open_error,
            on_close_callback=self._on_connection_closed,
            custom_ioloop=self.ioloop,
        )
        self.connection.add_on_connection_blocked_callback(self._on_blocked)
        self.connection.add_on_connection_unblocked_callback(self._on_unblocked)

    def _on_connection_open(self, connection: pika.SelectConnection) -> None:
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_connection_closed(self, _connection: object, reason: BaseException) -> None:
        if isinstance(reason, pika.exceptions.ConnectionBlockedTimeout):
            report = self.report
            report.error = (
                f"the broker still blocks publishing after {self.blocked_timeout:g} s: "
                f"{self.blocked_reason or 'no reason given'}; "
                f"{report.confirmed} of {report.published} messages confirmed"
            )
        elif not self.closing and not self.report.error:
            self.report.error = f"connection lost: {describe(reason)}"
        self.ioloop.stop()

    def _on_blocked(self, _connection: object, frame: Any) -> None:
        reason = str(getattr(frame.method, "reason", "") or "") or "no reason given"
        self.blocked_reason = reason
        self._notice(f"the broker blocks publishing: {reason}; waiting up to {self.blocked_timeout:g} s")
        if self.closing:
            self.ioloop.stop()  # the close just sent would never be answered

    def _on_unblocked(self, _connection: object, _frame: object) -> None:
        if self.blocked_reason is not None:
            self.blocked_reason = None
            self._notice("the broker no longer blocks publishing; going on")

    def _notice(self, text: str) -> None:
        stream = self.notices
        if stream is None:
            return
        # A progress line on the same terminal ends with \r, not a newline: end it first.
        head = "\n" if self.progress_shown and stream is self.progress else ""
        try:
            stream.write(f"{head}edm publish: {text}\n")
            stream.flush()
        except (OSError, ValueError):
            self.notices = None

    def _on_channel_open(self, channel: Any) -> None:
        self.channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        if self.exchange:
            # A missing exchange would close the channel at the first publish; a passive
            # declare says so plainly instead.
            channel.exchange_declare(self.exchange, passive=True, callback=self._on_exchange_ok)
        else:
            self._on_exchange_ok(None)

    def _on_exchange_ok(self, _frame: object) -> None:
        self.channel.confirm_delivery(self._on_confirm, callback=self._on_confirm_mode)

    def _on_channel_closed(self, _channel: object, reason: BaseException) -> None:
        if not self.closing and not self.report.error:
            code = getattr(reason, "reply_code", None)
            if code == 404 and self.report.published == 0 and self.exchange:
                self.report.error = f"exchange {self.exchange!r} does not exist"
            else:
                self.report.error = f"the broker closed the channel: {describe(reason)}"
        self._finish()

    def _on_confirm_mode(self, _frame: object) -> None:
        self.started = time.monotonic()
        reader = threading.Thread(target=self._read, name="edm-publish-reader", daemon=True)
        reader.start()
        self.wake_pending = False
        if self.progress is not None:
            self.ioloop.call_later(PROGRESS_DELAY, self._tick)
        self._pump()

    # -- the reader thread ---------------------------------------------------------------
    def _read(self) -> None:
        limit = self.window
        try:
            for body in self.bodies:
                if self.cancelled:
                    return
                self.queue.append(body)
                if len(self.queue) >= limit:
                    self._wake()
                    self.space.clear()
                    while len(self.queue) >= limit and not self.cancelled:
                        self.space.wait()
                        self.space.clear()
                elif not self.wake_pending:
                    self._wake()
        except BaseException as exc:  # noqa: BLE001 - reported by the loop, never lost
            self.read_error = exc
        finally:
            self.queue.append(_END)
            self._wake()

    def _wake(self) -> None:
        """Make sure the loop drains the queue soon (called from the reader thread)."""
        if self.wake_pending or self.cancelled:
            return
        self.wake_pending = True
        try:
            self.ioloop.add_callback_threadsafe(self._pump)
        except (OSError, RuntimeError, ValueError):
            pass  # the loop is already closed: the run is over

    # -- the I/O loop side ---------------------------------------------------------------
    def _pump(self) -> None:
        """Publish queued bodies while the window allows; runs on the loop only."""
        if self.closing or self.channel is None:
            return
        queue = self.queue
        pending = self.pending
        publish = self.channel.basic_publish
        exchange, routing_key, properties = self.exchange, self.routing_key, self.properties
        while len(pending) < self.window:
            try:
                body = queue.popleft()
            except IndexError:
                # Clear the flag, then look again: a body appended in between is either
                # seen here or its append sees the cleared flag and wakes us.
                self.wake_pending = False
                if not queue:
                    break
                self.wake_pending = True
                continue
            if body is _END:
                self.input_done = True
                break
            try:
                publish(exchange, routing_key, body, properties, mandatory=True)
            except (pika.exceptions.AMQPError, TypeError, ValueError) as exc:
                self.report.error = f"cannot publish: {describe(exc)}"
                self._finish()
                return
            pending.add(self.next_tag)
            self.next_tag += 1
            self.report.published += 1
        if len(queue) < self.window // 2 + 1:
            self.space.set()
        self._maybe_done()

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tag = method.delivery_tag
        if method.multiple:
            settled = 0
            for t in range(self.floor, tag + 1):
                if t in self.pending:
                    self.pending.discard(t)
                    settled += 1
            self.floor = max(self.floor, tag + 1)
        else:
            settled = 1 if tag in self.pending else 0
            self.pending.discard(tag)
        if isinstance(method, pika.spec.Basic.Nack):
            self.report.nacked += settled
        else:
            self.report.acked += settled
        if not self.input_done:
            # Even with nothing queued: a pump that stopped at a full window left its wake
            # flag set, and only a pump that finds the queue empty clears it so that the
            # reader's next body wakes the loop (else both would wait for each other).
            self._pump()
        else:
            self._maybe_done()

    def _on_return(self, _channel: object, _method: object, _properties: object, _body: bytes) -> None:
        self.report.unroutable += 1

    def _maybe_done(self) -> None:
        if self.input_done and not self.pending:
            self._finish()

    def _finish(self) -> None:
        if self.closing:
            return
        self.closing = True
        self.cancelled = True
        self.space.set()
        connection = self.connection
        if connection is not None and connection.is_open and self.blocked_reason is None:
            connection.close()  # _on_connection_closed stops the loop
        else:
            # A blocked broker reads nothing, a close included: with every answer in (an empty
            # body is whole at its header frame, so the broker confirms it and then blocks),
            # the run ends here and the connection is dropped without the handshake.
            self.ioloop.stop()

    def _tick(self) -> None:
        if self.closing:
            return
        self._show_progress()
        self.ioloop.call_later(PROGRESS_INTERVAL, self._tick)

    def _show_progress(self, final: bool = False) -> None:
        if self.progress is None or not self.started or (final and not self.progress_shown):
            return
        self.progress_shown = True
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = self.report.published / elapsed
        line = f"\r{self.report.published} published, {self.report.confirmed} confirmed, {rate:,.0f} msg/s"
        try:
            self.progress.write(line + ("\n" if final else ""))
            self.progress.flush()
        except (OSError, ValueError):
            self.progress = None


def _describe_read_error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__


# -- where the bodies come from --------------------------------------------------------------
def bodies_from_args(args: Sequence[str]) -> Iterator[bytes]:
    """Command-line arguments as UTF-8 (undecodable argv bytes come back as they were)."""
    for arg in args:
        yield arg.encode("utf-8", "surrogateescape")


def bodies_from_lines(stream: BinaryIO) -> Iterator[bytes]:
    """One body per line, the newline stripped; streamed, so huge inputs use little memory.

    Only ``\\n`` ends a line: a ``\\r`` or any other byte is part of the body.
    """
    for line in stream:
        yield line[:-1] if line.endswith(b"\n") else line


def bodies_from_file(path: str | os.PathLike[str]) -> Iterator[bytes]:
    """The lines of a file, one body each; the file is opened now so a bad path fails early."""
    try:
        stream = Path(path).open("rb")  # closed by _closing_lines
    except OSError as exc:
        raise EdmError(f"cannot read {os.fspath(path)}: {exc.strerror}") from None
    return _closing_lines(stream)


def _closing_lines(stream: BinaryIO) -> Iterator[bytes]:
    with stream:
        yield from bodies_from_lines(stream)


def read_bodies(
    args: Sequence[str] = (),
    file: str | None = None,
    stdin: BinaryIO | None = None,
) -> Iterable[bytes]:
    """The bodies for ``edm publish``: BODY arguments, else ``--file PATH`` ('-' is stdin), else stdin."""
    if args:
        return bodies_from_args(args)
    if file is not None and file != "-":
        return bodies_from_file(file)
    return bodies_from_lines(stdin if stdin is not None else sys.stdin.buffer)
