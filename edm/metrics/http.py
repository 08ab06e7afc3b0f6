"""The HTTP side of the metrics: prometheus_client's registry and exposition, and the server.

Loaded by the supervisor's :class:`edm.metrics.Exporter` once ``metrics.listen`` is set, never
before (see the package's docstring).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
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
from edm.metrics import (
    BUCKETS,
    FEE_RESULTS,
    OUTCOME_KEYS,
    OUTCOMES,
    STATES,
    View,
    fee_status,
    health,
    is_connected,
    is_number,
)

log = logging.getLogger(__name__)

PLAIN = "text/plain; charset=utf-8"


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
                connected.add_metric([name], 1 if is_connected(worker) else 0)
                if worker.get("pid") and is_number(worker.get("queue_depth")):
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

        fee = fee_status(workers)
        if fee is not None or any(key.startswith("fee.") for key in totals):
            requests = CounterMetricFamily(
                "edm_fee_requests", "Fee requests by what became of them.", labels=["result"]
            )
            for result in FEE_RESULTS:
                requests.add_metric([result], totals.get(f"fee.{result}", 0))
            yield requests
            if fee is not None and is_number(fee.get("spool_pending")):
                yield GaugeMetricFamily(
                    "edm_fee_spool_pending",
                    "Fees waiting in the spool for the database.",
                    value=fee["spool_pending"],
                )


def registry(view: Callable[[], View]) -> CollectorRegistry:
    """A registry whose one collector builds edm's metrics from ``view()`` at scrape time."""
    found = CollectorRegistry(auto_describe=False)
    found.register(EdmCollector(view))
    return found


class Served:
    """``GET /metrics`` and ``GET /healthz`` on ``listen``, from a thread of its own.

    Built, it holds the bound socket (OSError naming metrics.listen if it cannot bind);
    ``start`` serves.
    """

    def __init__(self, listen: str, view: Callable[[], View]) -> None:
        host, port = split_listen(listen)
        self.listen = listen
        self.view = view
        self._metrics_app = make_wsgi_app(registry(view))
        try:
            self._server = make_server(host, port, self._app, _server_class(host), _QuietHandler)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise OSError(f"metrics.listen: cannot listen on {listen}: {reason}") from None
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.5}, name="edm-metrics", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        log.info("Serving /metrics and /healthz on %s.", self.listen)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def close_in_child(self) -> None:
        self._server.socket.close()

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            body: Iterable[bytes] = self._metrics_app(environ, start_response)
            return body
        if path == "/healthz":
            healthy, text = health(self.view())
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
