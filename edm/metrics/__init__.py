"""Prometheus metrics and the health check, served by the main process (``metrics.listen``).

The workers count; the main process exports. Each worker already sends the supervisor a
status report every second (``state`` events: the consumer's ``handled``, ``retried``,
``dead_lettered`` and handler latency buckets, the plugins' fee counters); a custom
collector turns the latest reports into metrics at scrape time, so nothing is counted twice
and the endpoint answers while a worker is down.

Counters never go back when a worker restarts: the :class:`Ledger` keeps each worker's last
report, and when the worker dies the supervisor *banks* it (adds those counts to what the
worker's earlier lives counted) before its successor starts again from zero. An exported
counter is the bank plus the live worker's last report. A worker killed with SIGKILL loses
what it counted after its last report (at most one report interval): the counter then
under-counts by that much, it never goes back. A graceful stop sends a last report.

Why the status reports and not prometheus_client's multiprocess mode: that mode puts a lock
and an mmap write on every increment of every metric (the consumer's per-message path), needs
a directory shared by the main process and the workers that must be wiped at the right
moments, and cannot serve a custom collector's snapshot. The reports already exist, cost
nothing per message (the consumer adds to plain integers and a list in its own thread), and
carry their counters over the worker's channel once a second.

This package's top holds the counting side (the ledger, the view, health): the supervisor
keeps counting with metrics off, so that a reload that turns them on exports every count
since the start. The HTTP server and prometheus_client (``edm.metrics.http``; with what they
pull in, about 3 MiB of RSS in the main process and in every worker forked from it) are
loaded when ``metrics.listen`` is first set.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edm.daemon.lifecycle import is_consumer

if TYPE_CHECKING:
    from edm.metrics.http import Served

# Upper bounds, seconds: from a log line (tens of µs) to an SMTP send to a slow server (s).
BUCKETS = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
OUTCOMES = ("ok", "retried", "dead_lettered", "rejected")
# The consumer's report keys, by outcome. Its "dead_lettered" counts every dead letter, those
# of a Reject included: the metric's dead_lettered is what remains (out of retries).
OUTCOME_KEYS = {
    "ok": "handled",
    "retried": "retried",
    "dead_lettered": "dead_lettered",
    "rejected": "rejected",
}
# What became of a fee request (the fee plugin's counters). "requests" is their sum and
# "replayed" counts spooled fees stored later: neither is a result.
FEE_RESULTS = ("stored", "spooled", "duplicates", "malformed", "busy")
# The smtp handler's replies by code, in a consumer's report: {"smtp_replies": {"250": 3}}.
# The labels are bounded by the handler (3-digit codes, "timeout", "connection", "other").
SMTP_REPLIES = "smtp_replies"
SMTP_REPLY_LABEL = re.compile(r"^(?:[2-5][0-9][0-9]|timeout|connection|other)$")
STATES = ("STARTING", "RUNNING", "BACKOFF", "FATAL", "STOPPING", "STOPPED")


class Latency:
    """Handler durations as histogram bucket counts, kept in the consumer's own thread.

    ``observe`` is a bisect and two additions: no lock, no system call on the message path.
    """

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last one: above the largest bound
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds

    def report(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "sum": self.total}


def counters_of(info: dict[str, Any]) -> dict[str, float]:
    """The monotonic counters in a worker's status report, flat: ``{"handled": 3, ...}``."""
    found: dict[str, float] = {}
    for key in OUTCOME_KEYS.values():
        if is_number(info.get(key)):
            found[key] = info[key]
    latency = info.get("latency")
    if isinstance(latency, dict) and isinstance(latency.get("counts"), list):
        for i, count in enumerate(latency["counts"][: len(BUCKETS) + 1]):
            if is_number(count):
                found[f"latency.{i}"] = count
        if is_number(latency.get("sum")):
            found["latency.sum"] = latency["sum"]
    fee = (info.get("plugins") or {}).get("fee") if isinstance(info.get("plugins"), dict) else None
    if isinstance(fee, dict):
        for result in FEE_RESULTS:
            if is_number(fee.get(result)):
                found[f"fee.{result}"] = fee[result]
    replies = info.get(SMTP_REPLIES)
    if isinstance(replies, dict):
        for code, count in replies.items():
            if isinstance(code, str) and SMTP_REPLY_LABEL.match(code) and is_number(count):
                found[f"smtp.{code}"] = count
    return found


@dataclass
class Ledger:
    """Each worker's counters: its dead lives' sum (banked) and its live one's last report."""

    banked: dict[str, dict[str, float]] = field(default_factory=dict)
    live: dict[str, dict[str, float]] = field(default_factory=dict)

    def report(self, worker: str, info: dict[str, Any]) -> None:
        self.live[worker] = counters_of(info)

    def bank(self, worker: str) -> None:
        """The worker died: what it counted stays counted; its successor starts from zero."""
        bank = self.banked.setdefault(worker, {})
        for key, value in self.live.pop(worker, {}).items():
            bank[key] = bank.get(key, 0) + value

    def totals(self) -> dict[str, float]:
        """Every counter summed over workers and lives."""
        out: dict[str, float] = {}
        for source in (*self.banked.values(), *self.live.values()):
            for key, value in source.items():
                out[key] = out.get(key, 0) + value
        return out


@dataclass(frozen=True)
class View:
    """What a scrape reads: the supervisor's status snapshot and the counter totals.

    The supervisor replaces it whole from its loop; the HTTP thread only reads the reference.
    """

    snapshot: dict[str, Any] = field(default_factory=dict)
    totals: dict[str, float] = field(default_factory=dict)


def health(view: View) -> tuple[bool, str]:
    """(healthy, text): every worker RUNNING and every consumer connected, or the reasons why not."""
    snapshot = view.snapshot
    if not snapshot:
        return False, "edm is starting"
    if snapshot.get("stopping"):
        return False, "edm is stopping"
    reasons = []
    for name, worker in sorted((snapshot.get("workers") or {}).items()):
        state = worker.get("state")
        if state != "RUNNING":
            error = worker.get("last_error")
            reasons.append(f"the {name} worker is {state}" + (f": {error}" if error else ""))
        elif is_consumer(name) and not is_connected(worker):
            activity = worker.get("activity") or "not running"
            reasons.append(f"the {name} is not connected to the broker ({activity})")
    return (False, "; ".join(reasons)) if reasons else (True, "ok")


def is_connected(worker: dict[str, Any]) -> bool:
    return bool(worker.get("pid")) and worker.get("connected") is True


def fee_status(workers: dict[str, Any]) -> dict[str, Any] | None:
    plugins = (workers.get("plugins") or {}).get("plugins")
    fee = plugins.get("fee") if isinstance(plugins, dict) else None
    return fee if isinstance(fee, dict) else None


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Exporter:
    """The supervisor's metrics: the ledger and the view it publishes, always; the server on
    ``metrics.listen`` when one is set (``GET /metrics`` and ``GET /healthz``, from a thread of
    its own that reads the published view)."""

    def __init__(self) -> None:
        self.ledger = Ledger()
        self.view = View()
        self._served: Served | None = None

    @property
    def listen(self) -> str | None:
        return self._served.listen if self._served is not None else None

    def publish(self, snapshot: dict[str, Any]) -> None:
        self.view = View(snapshot, self.ledger.totals())

    def start(self, listen: str | None) -> None:
        """Serve on ``listen`` (None: stop serving); raise OSError naming metrics.listen on failure."""
        if listen == self.listen:
            return
        served = None
        if listen is not None:
            from edm.metrics.http import Served  # loaded only once metrics are turned on

            served = Served(listen, self._current)  # bound: the old one closes only now
        self.stop()
        if served is not None:
            served.start()
        self._served = served

    def stop(self) -> None:
        if self._served is not None:
            self._served.stop()
        self._served = None

    def close_in_child(self) -> None:
        """In a forked worker: let go of the listening socket (the thread did not follow)."""
        if self._served is not None:
            self._served.close_in_child()

    def _current(self) -> View:
        return self.view
