"""``smtp.rate``: a token bucket shared by the handler threads of one consumer process."""

from __future__ import annotations

import threading
import time


class TokenBucket:
    """At most ``rate`` takes per second, in bursts of at most ``burst`` (one: evenly spaced)."""

    def __init__(self, rate: float, burst: float = 1.0) -> None:
        self.rate = rate
        self.burst = max(1.0, burst)
        self._tokens = self.burst
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def take(self) -> None:
        """Wait for a token (no wait when the bucket has one)."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= 1.0
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)  # the token is ours already: later takers queue behind it


_lock = threading.Lock()
_buckets: dict[float, TokenBucket] = {}  # per process, by rate: every handler thread shares one


def shared(rate: float) -> TokenBucket | None:
    """The process's bucket for ``rate`` (None for 0, no limit)."""
    if rate <= 0:
        return None
    with _lock:
        bucket = _buckets.get(rate)
        if bucket is None:
            bucket = _buckets[rate] = TokenBucket(rate)
        return bucket
