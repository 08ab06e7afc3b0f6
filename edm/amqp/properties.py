"""A message's AMQP properties carried over to the copy edm publishes of it (a retry, a dead
letter, a replay): everything the publisher set, with the headers edm gives the copy."""

from __future__ import annotations

from typing import Any

import pika


def carried_over(
    old: pika.BasicProperties,
    headers: dict[str, Any],
    *,
    delivery_mode: int = pika.DeliveryMode.Persistent.value,
    expiration: str | None = None,
) -> pika.BasicProperties:
    """``old`` with ``headers``; ``user_id`` is left out: the broker checks it against the user
    who publishes, and edm's user need not be the one who first published the message."""
    return pika.BasicProperties(
        content_type=old.content_type,
        content_encoding=old.content_encoding,
        headers=headers,
        delivery_mode=delivery_mode,
        priority=old.priority,
        correlation_id=old.correlation_id,
        reply_to=old.reply_to,
        expiration=expiration,
        message_id=old.message_id,
        timestamp=old.timestamp,
        type=old.type,
        app_id=old.app_id,
        cluster_id=old.cluster_id,
    )
