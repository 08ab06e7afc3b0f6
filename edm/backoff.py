"""One exponential back-off for every "try again later" in edm (reconnects, probes, restarts)."""

from __future__ import annotations


class Backoff:
    """``first``, then doubling, never past ``ceiling``; ``reset`` after a success."""

    __slots__ = ("ceiling", "current", "first")

    def __init__(self, first: float, ceiling: float) -> None:
        self.first = first
        self.ceiling = max(ceiling, first)
        self.current = first

    def next(self) -> float:
        """The delay to wait now; the one after it is twice as long, up to the ceiling."""
        delay = self.current
        self.current = min(self.current * 2, self.ceiling)
        return delay

    def peek(self) -> float:
        return self.current

    def reset(self) -> None:
        self.current = self.first
