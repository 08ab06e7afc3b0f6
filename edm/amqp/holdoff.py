"""A log that cannot be written holds the consumer's deliveries off until it can (contract §16).

A failed log write is the disk's fault, never the message's: the message goes back to the
queue uncounted, the consumer stops taking deliveries, and ``HoldOff`` probes the log with a
doubling delay (up to ``amqp.retry_max``) until a probe line is written; then the consumer
resumes by itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from pika.adapters.select_connection import IOLoop

from edm.backoff import Backoff
from edm.errors import LogWriteError

PROBE_DELAY = 0.25  # seconds before the first probe of a failing log; doubles up to amqp.retry_max


@dataclass
class LogFailure:
    error: LogWriteError
    since: float  # time.monotonic() of the first failure
    delay: float  # before the next probe

    @property
    def activity(self) -> str:
        return f"log write failing: {self.error}"


class HoldOff:
    """``begin`` at a failed write; ``on_works`` is called once a probe line was written."""

    def __init__(
        self,
        ioloop: IOLoop,
        retry_max: float,
        on_works: Callable[[], None],
        on_change: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ioloop = ioloop
        self.on_works = on_works
        self.on_change = on_change  # the reason shown may have changed
        self.clock = clock
        self.failure: LogFailure | None = None
        self.handled_at_resume = -1  # the consumer's count when it last resumed
        # not reset at a resume: a relapse goes on where the last failure's probes were
        self._backoff = Backoff(PROBE_DELAY, retry_max)
        self._cancelled = False

    def begin(self, error: LogWriteError, relapse: bool) -> None:
        """A write failed. A relapse (no message got through since the last resume: a probe
        line fits, a message does not) goes on with the back-off where it was."""
        failure = self.failure
        if failure is None:
            if not relapse:
                self._backoff.reset()
            delay = self._backoff.next()
            failure = self.failure = LogFailure(error, self.clock(), delay)
            self.ioloop.call_later(delay, self._probe)
        failure.error = error

    def cancel(self) -> None:
        """Stopping: no more probes."""
        self._cancelled = True

    def _probe(self) -> None:
        """Try to write the line that says the log works again."""
        failure = self.failure
        if failure is None or self._cancelled:
            return
        seconds = self.clock() - failure.since
        try:
            failure.error.write(
                "WARNING",
                f"Writing the log works again after {seconds:.1f} s of failure ({failure.error}); "
                "the messages held off meanwhile waited in the queue.",
            )
        except LogWriteError as exc:
            failure.error = exc
            failure.delay = self._backoff.next()
            self.ioloop.call_later(failure.delay, self._probe)
            self.on_change()
            return
        self.failure = None
        self.on_works()
