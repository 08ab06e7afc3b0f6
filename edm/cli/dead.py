"""``edm dead``: list, replay and purge the dead letters in ``<amqp.queue>.dead``.

The commands talk to the broker on a connection of their own, so they work whether the
daemon runs or not.

``list`` never removes anything: it takes every dead letter without acking it, then hands
them all back with one ``basic.nack(multiple, requeue)``. Reading the whole queue is what
keeps its order on a quorum queue, which puts a returned message at its end (RabbitMQ 3.x);
a classic queue puts each back where it was.

``replay`` moves one dead letter at a time: take it, publish it to ``<queue>`` and wait for
the broker's confirm, and only then ack it. A connection lost between the confirm and the
ack leaves that one message in both queues (replayed again next time): a duplicate, never a
loss. Waiting for each confirm keeps that to a single message at most.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, TextIO

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from edm.amqp.params import describe, insecure_tls_warning, parameters
from edm.amqp.properties import carried_over
from edm.config import Config
from edm.errors import BrokerError
from edm.logs import escape_body
from edm.redact import mask_url

LIST_DEFAULT = 20
BODY_CHARS = 100  # an escaped body is cut to this many characters in a listing

ATTEMPTS = "x-edm-attempts"
ERROR = "x-edm-error"
REPLAYED = "x-edm-replayed"
# Set by a quorum queue on each delivery: the .dead queue's bookkeeping, not the message's.
DELIVERY_COUNT = "x-delivery-count"


@dataclass
class DeadLetter:
    """One dead letter as ``list`` shows it."""

    attempts: int | None
    error: str | None
    body: str  # escaped as in a log line, cut to BODY_CHARS characters
    message_id: str | None
    size: int  # the body's length in bytes
    cut: bool  # the body is longer than what ``body`` shows
    replayed: int  # how often it was replayed before


@dataclass
class Listing:
    queue: str
    total: int | None  # None: the queue does not exist
    letters: list[DeadLetter]


@dataclass
class Outcome:
    """What ``replay`` or ``purge`` did; ``error`` says why it stopped early."""

    queue: str
    count: int
    exists: bool = True
    error: str | None = None


# -- the broker side ---------------------------------------------------------------------


def dead_queue(config: Config) -> str:
    return f"{config.amqp.queue}.dead"


@contextmanager
def _connected(config: Config, action: str) -> Iterator[tuple[pika.BlockingConnection, str]]:
    """A connection to the first URL that answers, and that URL masked (for messages).

    The connection is named after the command and its PID, so an operator can tell it apart
    in ``rabbitmqctl list_connections name client_properties``.
    """
    problems = []
    connection = None
    where = ""
    warning = insecure_tls_warning(config.amqp.url, config.amqp.tls)
    if warning:
        print(f"edm dead: WARNING: {warning}", file=sys.stderr)
    for url in config.amqp.url:
        where = mask_url(url)
        try:
            params = parameters(url, config.amqp.heartbeat, config.amqp.tls)
            params.client_properties = {
                "connection_name": f"edm dead {action} (pid {os.getpid()})",
                "product": "edm",
            }
            connection = pika.BlockingConnection(params)
            break
        except (pika.exceptions.AMQPError, ValueError) as exc:
            problems.append(f"{where}: {describe(exc)}")
    if connection is None:
        queue = dead_queue(config)
        raise BrokerError(f"cannot reach {queue}: cannot connect to the broker: {'; '.join(problems)}")
    try:
        yield connection, where
    finally:
        if connection.is_open:
            try:
                connection.close()
            except (pika.exceptions.AMQPError, OSError, KeyboardInterrupt):
                pass  # the broker returns whatever was not acked all the same


def _count(connection: pika.BlockingConnection, queue: str) -> tuple[BlockingChannel, int | None]:
    """An open channel and the number of ready messages in ``queue`` (None if it does not exist).

    A passive declare of a missing queue closes its channel, so a fresh one is returned then.
    """
    channel = connection.channel()
    try:
        return channel, channel.queue_declare(queue, passive=True).method.message_count
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code != 404:
            raise
        return connection.channel(), None


def list_dead(config: Config, limit: int = LIST_DEFAULT) -> Listing:
    """The oldest ``limit`` dead letters and the queue's total; nothing is removed."""
    queue = dead_queue(config)
    with _connected(config, "list") as (connection, where):
        try:
            channel, total = _count(connection, queue)
            letters: list[DeadLetter] = []
            if total and limit > 0:
                last_tag = 0
                # Every message, not only ``limit``: see the module's docstring.
                for _ in range(total):
                    method, properties, body = channel.basic_get(queue, auto_ack=False)
                    if method is None:
                        break
                    last_tag = method.delivery_tag
                    if len(letters) < limit:
                        letters.append(_letter(properties, body))
                if last_tag:
                    channel.basic_nack(last_tag, multiple=True, requeue=True)
            channel.close()
        except pika.exceptions.AMQPError as exc:
            raise BrokerError(f"cannot list {queue} on {where}: {describe(exc)}") from None
    return Listing(queue, total, letters)


def replay(config: Config, limit: int | None) -> Outcome:
    """Move up to ``limit`` dead letters (all of those there at the start when None) back to
    ``amqp.queue``, oldest first. Never raises for broker trouble once connected: the outcome
    says how many were moved and why it stopped."""
    queue = dead_queue(config)
    target = config.amqp.queue
    with _connected(config, "replay") as (connection, where):
        outcome = Outcome(queue, 0)
        try:
            channel, total = _count(connection, queue)
            if total is None:
                outcome.exists = False
                return outcome
            probe, target_count = _count(connection, target)
            probe.close()
            if target_count is None:
                outcome.error = (
                    f"queue {target!r} does not exist on {where}; nothing replayed "
                    "(edm declares it when it starts)"
                )
                return outcome
            # --all stops at the count seen now: a handler still failing would otherwise put
            # each replayed message back into .dead and the replay would never end.
            todo = total if limit is None else limit
            channel.confirm_delivery()
            while outcome.count < todo:
                method, properties, body = channel.basic_get(queue, auto_ack=False)
                if method is None:
                    break
                channel.basic_publish("", target, body, replay_properties(properties), mandatory=True)
                channel.basic_ack(method.delivery_tag)
                outcome.count += 1
        except pika.exceptions.UnroutableError:
            outcome.error = (
                f"queue {target!r} no longer exists on {where}; the dead letter in hand stays in {queue}"
            )
        except pika.exceptions.NackError:
            outcome.error = f"the broker refused to take a dead letter back into {target!r} on {where}"
        except pika.exceptions.AMQPError as exc:
            outcome.error = f"replaying {queue} on {where} stopped: {describe(exc)}"
        except KeyboardInterrupt:
            # The dead letter in hand, unacked, goes back to .dead when the connection closes.
            outcome.error = f"replaying {queue} interrupted"
        return outcome


def purge(config: Config) -> Outcome:
    """Delete every dead letter."""
    queue = dead_queue(config)
    with _connected(config, "purge") as (connection, where):
        try:
            channel, total = _count(connection, queue)
            if total is None:
                return Outcome(queue, 0, exists=False)
            return Outcome(queue, channel.queue_purge(queue).method.message_count)
        except pika.exceptions.AMQPError as exc:
            raise BrokerError(f"cannot purge {queue} on {where}: {describe(exc)}") from None


# -- messages ----------------------------------------------------------------------------


def replay_properties(old: pika.BasicProperties) -> pika.BasicProperties:
    """The dead letter's properties for its way back: ``message_id`` and the rest kept,
    ``x-edm-replayed`` counted up, the attempts and the last error dropped (a replayed message
    starts its retries afresh; a new failure writes a new error)."""
    headers = dict(old.headers or {})
    previous = _int(headers.get(REPLAYED)) or 0
    for name in (ATTEMPTS, ERROR, DELIVERY_COUNT):
        headers.pop(name, None)
    headers[REPLAYED] = previous + 1
    mode = old.delivery_mode or pika.DeliveryMode.Persistent.value
    return carried_over(old, headers, delivery_mode=mode, expiration=old.expiration)


def _letter(properties: pika.BasicProperties, body: bytes) -> DeadLetter:
    headers: Mapping[str, Any] = properties.headers or {}
    shown, cut = cut_body(body)
    error = headers.get(ERROR)
    if isinstance(error, bytes):
        error = error.decode("utf-8", "replace")
    return DeadLetter(
        attempts=_int(headers.get(ATTEMPTS)),
        error=None if error is None else str(error),
        body=shown,
        message_id=properties.message_id,
        size=len(body),
        cut=cut,
        replayed=_int(headers.get(REPLAYED)) or 0,
    )


def cut_body(body: bytes, limit: int = BODY_CHARS) -> tuple[str, bool]:
    """The body escaped as in a log line, cut to ``limit`` characters (never inside an escape),
    and whether it was cut."""
    # A character takes at most 4 bytes; a few more keep a split sequence at the end whole.
    head = body[: 4 * limit + 4]
    escaped = escape_body(head)
    if len(escaped) <= limit and len(head) == len(body):
        return escaped, False
    out: list[str] = []
    used = 0
    for char in head.decode("utf-8", "surrogateescape"):
        piece = escape_body(char.encode("utf-8", "surrogateescape"))
        if used + len(piece) > limit:
            break
        out.append(piece)
        used += len(piece)
    return "".join(out), True


def _int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        return int(str(value.decode() if isinstance(value, bytes) else value))
    except (TypeError, ValueError):
        return None


# -- the commands ------------------------------------------------------------------------


def _say(text: str) -> None:
    print(f"edm dead: {text}", file=sys.stderr)


def run_list(config: Config, limit: int, as_json: bool, out: TextIO = sys.stdout) -> int:
    """``edm dead list``: 0, or 1 on a broker error."""
    try:
        listing = list_dead(config, limit)
    except BrokerError as exc:
        _say(str(exc))
        return 1
    if as_json:
        out.write(json.dumps([asdict(letter) for letter in listing.letters], ensure_ascii=False) + "\n")
        if listing.total is None:
            _say(f"{listing.queue} does not exist: no dead letters")
        return 0
    for letter in listing.letters:
        out.write(describe_letter(letter) + "\n")
    if listing.total is None:
        out.write(f"0 dead letters in {listing.queue} (the queue does not exist)\n")
    else:
        out.write(f"{listing.total} dead letters in {listing.queue}\n")
    return 0


def describe_letter(letter: DeadLetter) -> str:
    """One dead letter on one line, its body last as in a log line: ``... (+) <body>``."""
    attempts = "?" if letter.attempts is None else str(letter.attempts)
    parts = [f"attempts {attempts}"]
    if letter.replayed:
        parts.append(f"replayed {letter.replayed}")
    error = "no error recorded"
    if letter.error is not None:
        error = escape_body(letter.error.encode("utf-8", "replace"))
    cut = f" …[cut: {letter.size} bytes]" if letter.cut else ""
    return f"{', '.join(parts)}: {error} (+) {letter.body}{cut}"


def run_replay(config: Config, limit: int | None, out: TextIO = sys.stdout) -> int:
    """``edm dead replay``: prints ``replayed N``; 0, or 1 when the broker stopped it."""
    try:
        outcome = replay(config, limit)
    except BrokerError as exc:
        _say(str(exc))
        out.write("replayed 0\n")
        return 1
    out.write(f"replayed {outcome.count}\n")
    if not outcome.exists:
        _say(f"{outcome.queue} does not exist: no dead letters")
    if outcome.error:
        _say(outcome.error)
        return 1
    return 0


def run_purge(config: Config, out: TextIO = sys.stdout) -> int:
    """``edm dead purge --yes``: prints how many dead letters were deleted; 0, or 1."""
    try:
        outcome = purge(config)
    except BrokerError as exc:
        _say(str(exc))
        return 1
    suffix = "" if outcome.exists else " (the queue does not exist)"
    out.write(f"purged {outcome.count} dead letters from {outcome.queue}{suffix}\n")
    return 0
