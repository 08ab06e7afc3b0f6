"""The consumed queue's depth for ``edm status``: one passive declare every few seconds."""

from __future__ import annotations

from collections.abc import Callable

import pika.channel
import pika.frame
from pika.adapters.select_connection import IOLoop

# the channel to ask on and the queue to ask about, or None when there is nothing worth asking
Target = Callable[[], "tuple[pika.channel.Channel, str] | None"]

DEPTH_INTERVAL = 5.0  # seconds between passive declares that read the queue's depth for status


class QueueDepth:
    """Every DEPTH_INTERVAL, one passive declare of the queue (never two in flight).

    It runs on the I/O loop between deliveries, so the message path never waits for it.
    """

    def __init__(self, ioloop: IOLoop, target: Target) -> None:
        self.ioloop = ioloop
        self._target = target
        self.value: int | None = None  # messages ready in the queue; None while unknown
        self._asked = False
        self._stopped = False

    def start(self) -> None:
        self.ioloop.call_later(DEPTH_INTERVAL, self._poll)

    def stop(self) -> None:
        self._stopped = True

    def new_channel(self) -> None:
        """A question asked on the channel before this one is never answered."""
        self._asked = False

    def lost(self) -> None:
        self.value = None

    def on_declared(self, frame: pika.frame.Method) -> None:
        """A declare-ok of the queue (ours, or the consumer's own declaration)."""
        self._asked = False
        count = getattr(frame.method, "message_count", None)
        if isinstance(count, int):
            self.value = count

    def _poll(self) -> None:
        if self._stopped:
            return
        self.ioloop.call_later(DEPTH_INTERVAL, self._poll)
        if self._asked:
            return
        target = self._target()
        if target is None:
            return
        channel, queue = target
        self._asked = True
        channel.queue_declare(queue, passive=True, callback=self.on_declared)
