"""The queues edm declares beside ``amqp.queue``: their arguments, and what to say when an
existing one was declared otherwise.

A helper queue (``<queue>.dead`` now, the delay queues ``<queue>.retry.<ms>`` later) lives
where the main queue lives: a classic queue sits on one node, so beside a quorum main queue
it would make the node that holds it a single point of failure for the whole fleet.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

REPLICATED = ("quorum", "stream")


def helper_queue_arguments(
    main_arguments: Mapping[str, Any], dead_letter_to: str | None = None
) -> dict[str, Any]:
    """The ``queue.declare`` arguments of a queue edm declares for the main queue.

    The type follows the main queue's ``x-queue-type``: none (classic) stays none, so a
    ``.dead`` queue declared by an earlier version beside a classic main queue still matches;
    ``quorum`` and ``stream`` give ``quorum`` (a stream can neither dead-letter nor be read
    with ``basic.get``, and a helper queue must do both).

    ``dead_letter_to`` names the queue this one dead-letters into through the default
    exchange (a delay queue sends its expired messages back to the main queue). For a quorum
    queue that dead-letters, ``x-dead-letter-strategy: at-least-once`` keeps each message until
    the target queue has confirmed it; RabbitMQ honours it only with ``x-overflow:
    reject-publish``. ``<queue>.dead`` itself dead-letters nowhere: edm republishes into it with
    publisher confirms and acks the original only after the confirm, which is at-least-once by
    construction, and a quorum queue confirms once a majority of its nodes hold the message.
    """
    arguments: dict[str, Any] = {}
    queue_type = main_arguments.get("x-queue-type")
    replicated = queue_type in REPLICATED
    if replicated:
        arguments["x-queue-type"] = "quorum"
    if dead_letter_to is not None:
        arguments["x-dead-letter-exchange"] = ""
        arguments["x-dead-letter-routing-key"] = dead_letter_to
        if replicated:
            arguments["x-dead-letter-strategy"] = "at-least-once"
            arguments["x-overflow"] = "reject-publish"
    return arguments


def inequivalent_helper(queue: str, vhost: str, reply_text: str, arguments: Mapping[str, Any]) -> str:
    """One line for an operator: ``queue`` exists with other arguments (406), and what to do."""
    wanted = arguments.get("x-queue-type", "classic")
    return (
        f"The queue {queue} exists with other arguments than edm declares ({reply_text}); it was "
        f"declared by an earlier version or by hand. Consuming goes on; dead letters go back to "
        f"the main queue until it is fixed: move its messages elsewhere if you keep them (a "
        f"shovel, see the README's 'Running a fleet'), then delete it with "
        f"`rabbitmqctl delete_queue --vhost {vhost} --if-empty {queue}`: edm declares it again "
        f"({wanted}) when the next message needs it."
    )
