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
"""

from __future__ import annotations

import logging
import re
import socket
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from edm import __version__
from edm.config import split_listen
from edm.daemon.lifecycle import is_consumer

log = logging.getLogger(__name__)

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
PLAIN = "text/plain; charset=utf-8"


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
        if _is_number(info.get(key)):
            found[key] = info[key]
    latency = info.get("latency")
    if isinstance(latency, dict) and isinstance(latency.get("counts"), list):
        for i, count in enumerate(latency["counts"][: len(BUCKETS) + 1]):
            if _is_number(count):
                found[f"latency.{i}"] = count
        if _is_number(latency.get("sum")):
            found["latency.sum"] = latency["sum"]
    fee = (info.get("plugins") or {}).get("fee") if isinstance(info.get("plugins"), dict) else None
    if isinstance(fee, dict):
        for result in FEE_RESULTS:
            if _is_number(fee.get(result)):
                found[f"fee.{result}"] = fee[result]
    replies = info.get(SMTP_REPLIES)
    if isinstance(replies, dict):
        for code, count in replies.items():
            if isinstance(code, str) and SMTP_REPLY_LABEL.match(code) and _is_number(count):
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


class EdmCollector(Collector):
    """Builds every edm metric from the current :class:`View` at scrape time."""

    def __init__(self, view: Callable[[], View]) -> None:
        self.view = view

    def collect(self) -> Iterator[Metric]:
        view = self.view()
        totals = view.totals
        workers: dict[str, Any] = view.snapshot.get("workers") or {}
        yield _gauge("edm_build_info", "edm's version (the value is always 1).", {"version": __version__}, 1)

        messages = CounterMetricFamily(
            "edm_messages",
            "Messages by outcome (ok, each retry, dead-lettered, rejected).",
            labels=["outcome"],
        )
        values = {outcome: totals.get(OUTCOME_KEYS[outcome], 0) for outcome in OUTCOMES}
        values["dead_lettered"] -= values["rejected"]
        for outcome in OUTCOMES:
            messages.add_metric([outcome], values[outcome])
        yield messages

        counts = [totals.get(f"latency.{i}", 0) for i in range(len(BUCKETS) + 1)]
        buckets, running = [], 0.0
        for bound, count in zip((*(repr(b) for b in BUCKETS), "+Inf"), counts, strict=True):
            running += count
            buckets.append((bound, running))
        yield HistogramMetricFamily(
            "edm_handler_seconds",
            "Time the message handler took for one call.",
            buckets=buckets,
            sum_value=totals.get("latency.sum", 0),
        )

        restarts = CounterMetricFamily(
            "edm_worker_restarts", "Times the supervisor restarted a worker.", labels=["worker"]
        )
        state = GaugeMetricFamily(
            "edm_worker_state", "1 for the state a worker is in, else 0.", labels=["worker", "state"]
        )
        connected = GaugeMetricFamily(
            "edm_consumer_connected", "1 while the consumer holds a broker connection.", labels=["worker"]
        )
        depth: float | None = None
        for name, worker in sorted(workers.items()):
            restarts.add_metric([name], worker.get("restarts") or 0)
            for word in STATES:
                state.add_metric([name, word], 1 if worker.get("state") == word else 0)
            if is_consumer(name):
                connected.add_metric([name], 1 if _connected(worker) else 0)
                if worker.get("pid") and _is_number(worker.get("queue_depth")):
                    # every consumer process polls the same queue: one depth, the latest seen
                    depth = max(depth or 0, worker["queue_depth"])
        yield restarts
        yield state
        yield connected
        if depth is not None:
            yield GaugeMetricFamily(
                "edm_queue_messages_ready", "Messages ready in the consumed queue (polled).", value=depth
            )

        codes = sorted(key[len("smtp.") :] for key in totals if key.startswith("smtp."))
        if codes:
            replies = CounterMetricFamily(
                "edm_smtp_replies",
                "SMTP replies that decided a message or recipient, by code (or timeout, connection).",
                labels=["code"],
            )
            for code in codes:
                replies.add_metric([code], totals[f"smtp.{code}"])
            yield replies

        fee = _fee_status(workers)
        if fee is not None or any(key.startswith("fee.") for key in totals):
            requests = CounterMetricFamily(
                "edm_fee_requests", "Fee requests by what became of them.", labels=["result"]
            )
            for result in FEE_RESULTS:
                requests.add_metric([result], totals.get(f"fee.{result}", 0))
            yield requests
            if fee is not None and _is_number(fee.get("spool_pending")):
                yield GaugeMetricFamily(
                    "edm_fee_spool_pending",
                    "Fees waiting in the spool for the database.",
                    value=fee["spool_pending"],
                )


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
        elif is_consumer(name) and not _connected(worker):
            activity = worker.get("activity") or "not running"
            reasons.append(f"the {name} is not connected to the broker ({activity})")
    return (False, "; ".join(reasons)) if reasons else (True, "ok")


class Exporter:
    """Serves ``GET /metrics`` and ``GET /healthz`` on ``metrics.listen`` from a thread of its own.

    The supervisor calls ``publish`` from its loop; the HTTP thread reads the published view.
    """

    def __init__(self) -> None:
        self.ledger = Ledger()
        self.view = View()
        self.listen: str | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(EdmCollector(lambda: self.view))
        self._metrics_app = make_wsgi_app(self.registry)

    def publish(self, snapshot: dict[str, Any]) -> None:
        self.view = View(snapshot, self.ledger.totals())

    def start(self, listen: str | None) -> None:
        """Serve on ``listen`` (None: stop serving); raise OSError naming metrics.listen on failure."""
        if listen == self.listen:
            return
        server = None
        if listen is not None:
            host, port = split_listen(listen)
            try:
                server = make_server(host, port, self._app, _server_class(host), _QuietHandler)
            except OSError as exc:
                reason = exc.strerror or str(exc)
                raise OSError(f"metrics.listen: cannot listen on {listen}: {reason}") from None
        self.stop()
        if server is not None:
            self._server = server
            self._thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.5}, name="edm-metrics", daemon=True
            )
            self._thread.start()
            log.info("Serving /metrics and /healthz on %s.", listen)
        self.listen = listen

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
        self._server, self._thread, self.listen = None, None, None

    def close_in_child(self) -> None:
        """In a forked worker: let go of the listening socket (the thread did not follow)."""
        if self._server is not None:
            self._server.socket.close()

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            body: Iterable[bytes] = self._metrics_app(environ, start_response)
            return body
        if path == "/healthz":
            healthy, text = health(self.view)
            status = "200 OK" if healthy else "503 Service Unavailable"
            data = (text + "\n").encode()
            start_response(status, [("Content-Type", PLAIN), ("Content-Length", str(len(data)))])
            return [data]
        start_response("404 Not Found", [("Content-Type", PLAIN)])
        return [b"not found: try /metrics or /healthz\n"]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


def _server_class(host: str) -> type[_Server]:
    return _Server6 if ":" in host else _Server


class _QuietHandler(WSGIRequestHandler):
    timeout = 10  # a client that sends nothing does not hold a thread for ever

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics: " + format, *args)


def _gauge(name: str, documentation: str, labels: dict[str, str], value: float) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, documentation, labels=list(labels))
    gauge.add_metric(list(labels.values()), value)
    return gauge


def _connected(worker: dict[str, Any]) -> bool:
    return bool(worker.get("pid")) and worker.get("connected") is True


def _fee_status(workers: dict[str, Any]) -> dict[str, Any] | None:
    plugins = (workers.get("plugins") or {}).get("plugins")
    fee = plugins.get("fee") if isinstance(plugins, dict) else None
    return fee if isinstance(fee, dict) else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
