"""The keeper: serves the I/O loop while a handler is slow, so that the connection lives.

A fast handler runs inline, in the thread that drives the I/O loop: no thread hand-off per
message. A slow one would starve the loop (no heartbeats, no broker frames), so once a handler
has run for ``slow_after`` seconds (well under the heartbeat interval) the keeper thread takes
the loop over until it returns. The two threads never run the loop at once: it belongs to
whoever holds ``io``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from pika.adapters.select_connection import IOLoop


def slow_after(heartbeat: int) -> float:
    """Seconds a handler may run before the keeper serves the loop for it."""
    return min(1.0, heartbeat / 4) if heartbeat > 0 else 1.0


class Keeper:
    """The main thread sets ``busy_since`` while a handler runs (and calls ``wake`` after it if
    the keeper is ``active``); ``start``/``stop`` run the keeper's thread."""

    def __init__(
        self,
        ioloop: IOLoop,
        io: threading.Lock,
        slow_after: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ioloop = ioloop
        self.io = io
        self.slow_after = slow_after
        self.clock = clock
        self.busy_since: float | None = None
        self.active = False  # serving the loop now
        self._running = False
        self._tick = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._run, name="edm-keeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._running = False
        self._tick.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def wake(self) -> None:
        """The handler returned: end the keeper's poll now, the loop is the main thread's again."""
        self.ioloop.add_callback_threadsafe(_noop)

    def _run(self) -> None:
        tick = self.slow_after / 2
        while self._running:
            since = self.busy_since
            if since is None or self.clock() - since < self.slow_after:
                self._tick.wait(tick)
                continue
            self.active = True
            try:
                while self._handler_busy():
                    with self.io:
                        if not self._handler_busy():
                            break
                        self.ioloop.poll()
                        self.ioloop.process_timeouts()
            finally:
                self.active = False

    def _handler_busy(self) -> bool:
        """Read afresh each time: the main thread clears it when the handler returns."""
        return self.busy_since is not None and self._running


def _noop() -> None:
    """Wakes the I/O loop's poll."""
