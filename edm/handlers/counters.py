"""Counters a handler keeps per process, carried to the main process in the worker's reports.

A handler package asks for a named :class:`Counts` once (``counts("smtp_replies")``) and adds
to it from any handler thread; the consumer worker adds :func:`report` to the status report
it sends each second, where the metrics ledger keeps the counts across worker restarts. This
module is light on purpose: the worker reads it whatever the handler, without importing one.
"""

from __future__ import annotations

import threading

_registry_lock = threading.Lock()
_registry: dict[str, Counts] = {}


class Counts:
    """Counts by label; one lock for the handler threads (an addition, no I/O, under it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def add(self, label: str) -> None:
        with self._lock:
            self._counts[label] = self._counts.get(label, 0) + 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


def counts(name: str) -> Counts:
    """The process's counts called ``name`` (the key of the status report), made on first use."""
    with _registry_lock:
        found = _registry.get(name)
        if found is None:
            found = _registry[name] = Counts()
        return found


def report() -> dict[str, dict[str, int]]:
    """Every named count that counted something: ``{"smtp_replies": {"250": 3}}``, or {}."""
    with _registry_lock:
        named = list(_registry.items())
    out = {}
    for name, found in named:
        snapshot = found.snapshot()
        if snapshot:
            out[name] = snapshot
    return out
