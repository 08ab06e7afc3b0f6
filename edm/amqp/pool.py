"""Handler threads, for ``amqp.threads`` > 1: many handlers at once in one consumer process.

Each thread holds its own handler (``HandlerFactory.build()``: one instance of a handler
class per thread, closed when the thread stops) and takes one message at a time from a
shared queue. What a handler's ending means is decided in the thread (``judge`` is pure); the
outcome goes back to the I/O loop's thread through its thread-safe callback, which acks or
republishes: pika is only ever touched from that one thread. With ``threads: 1`` no pool is
made and a message takes the inline path of ``edm.amqp.consumer``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from functools import partial

from pika.adapters.select_connection import IOLoop

from edm.amqp.outcomes import OK, Outcome, judge
from edm.config import AmqpConfig
from edm.errors import LogWriteError
from edm.handlers.api import Message
from edm.handlers.loader import Bound

log = logging.getLogger(__name__)

# (generation, delivery tag, message)
Job = tuple[int, int, Message]
# (generation, delivery tag, message, outcome, seconds the handler ran or None if not timed)
Done = Callable[[int, int, Message, Outcome, float | None], None]

JOIN_TIMEOUT = 5.0  # seconds to wait for each thread at stop (they finished their message already)


def call(
    handler: Callable[[Message], object], message: Message, amqp: AmqpConfig
) -> tuple[Outcome, float | None]:
    """Run one handler call: its outcome, and how long it ran (None: the log's fault, not timed)."""
    started = time.perf_counter()
    try:
        handler(message)
    except LogWriteError as exc:
        return judge(message, exc, amqp), None
    except BaseException as exc:  # noqa: BLE001 - even SystemExit: the thread must report its message
        return judge(message, exc, amqp), time.perf_counter() - started
    return OK, time.perf_counter() - started


class Pool:
    """``submit`` from the I/O thread; ``done`` is called back on it for each message."""

    def __init__(self, bounds: list[Bound], amqp: AmqpConfig, ioloop: IOLoop, done: Done) -> None:
        self.amqp = amqp
        self.ioloop = ioloop
        self.done = done
        self.in_hand = 0  # submitted and not yet done; read and written on the I/O thread only
        self._since: dict[str, float] = {}  # thread name -> wall time its handler call began
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, args=(bound,), name=f"edm-handler-{i + 1}", daemon=True)
            for i, bound in enumerate(bounds)
        ]

    @property
    def size(self) -> int:
        return len(self._threads)

    @property
    def busy(self) -> int:
        """How many threads run a handler now."""
        return len(self._since)

    def handling(self) -> list[tuple[str, float]]:
        """(thread name, wall time its handler call began) for each thread running one, by name."""
        with self._lock:
            found = list(self._since.items())
        return sorted(found, key=lambda item: (len(item[0]), item[0]))

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, job: Job) -> None:
        self.in_hand += 1
        self._jobs.put(job)

    def _finish(
        self, generation: int, tag: int, message: Message, outcome: Outcome, seconds: float | None
    ) -> None:
        """On the I/O thread: this pool's message is out of hand, even if a reload replaced the pool."""
        self.in_hand -= 1
        self.done(generation, tag, message, outcome, seconds)

    def take_back(self) -> list[Job]:
        """The messages no thread has started: they are not in hand any more."""
        taken: list[Job] = []
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                taken.append(job)
        self.in_hand -= len(taken)
        return taken

    def stop(self) -> None:
        """End every thread once it finished its message; each closes its own handler."""
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            if thread.is_alive():
                thread.join(JOIN_TIMEOUT)
                if thread.is_alive():
                    log.warning(
                        "The handler thread %s did not stop within %.0f s.", thread.name, JOIN_TIMEOUT
                    )

    def _work(self, bound: Bound) -> None:
        name = threading.current_thread().name
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                generation, tag, message = job
                with self._lock:
                    self._since[name] = time.time()
                try:
                    outcome, seconds = call(bound.call, message, self.amqp)
                finally:
                    with self._lock:
                        del self._since[name]
                self.ioloop.add_callback_threadsafe(
                    partial(self._finish, generation, tag, message, outcome, seconds)
                )
        finally:
            bound.release()
