"""The bench's verdicts (targets from the performance issue) and its printed tables."""

from __future__ import annotations

from typing import Any

MIB = 1024 * 1024
RSS_LIMIT_MIB = 40
BUSY_CORES = 0.25
SOAK_GROWTH_MIB = 2  # allocator noise; a leak of even 2 bytes a message shows over 1M messages


def _rate(results: dict[str, Any], key: str) -> float | None:
    value = results.get("throughput", {}).get(key, {}).get("median", {}).get("msgs_per_s")
    return float(value) if value else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _target(
    name: str, value: float | None, op: str, limit: float, unit: str, why: str = ""
) -> dict[str, Any]:
    if value is None:
        status = f"not measured{f' ({why})' if why else ''}"
    elif (value >= limit) if op == ">=" else (value <= limit):
        status = "PASS"
    else:
        status = "MISS"
    return {"name": name, "value": value, "op": op, "limit": limit, "unit": unit, "status": status}


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue with its measured value and PASS / MISS / not measured."""
    edm1, edm50 = _rate(results, "edm-p1"), _rate(results, "edm-p50")
    php_why = "php-amqp not installed" if not results.get("php") else ""
    targets = [
        _target(
            "edm p1 / pika BlockingConnection p1", _ratio(edm1, _rate(results, "blocking-p1")), ">=", 1.0, "×"
        ),
        _target(
            "edm p1 / php-amqp p1 (goal)", _ratio(edm1, _rate(results, "php-p1")), ">=", 1.0, "×", php_why
        ),
        _target(
            "edm p50 / pika BlockingConnection p50",
            _ratio(edm50, _rate(results, "blocking-p50")),
            ">=",
            1.0,
            "×",
        ),
    ]
    for prefetch in (1, 50):  # the metrics issue: the cost of metrics.listen, same run
        targets.append(
            _target(
                f"edm p{prefetch} with metrics / without",
                _ratio(_rate(results, f"metrics-p{prefetch}"), _rate(results, f"edm-p{prefetch}")),
                ">=",
                0.97,
                "×",
            )
        )
    fee = results.get("fee", {})
    targets.append(
        _target(
            "fee: edm durable replies/s / PHP design rows/s",
            _ratio(fee.get("edm_replies_per_s"), fee.get("reference_rows_per_s")),
            ">=",
            2.0,
            "×",
        )
    )
    targets.append(  # the fee issue's own target: durable replies as fast as answer-first ones
        _target(
            "fee: edm durable replies/s / PHP design replies/s",
            _ratio(fee.get("edm_replies_per_s"), fee.get("reference_replies_per_s")),
            ">=",
            1.0,
            "×",
        )
    )
    rss = results.get("rss", {})
    after = rss.get("after")
    targets.append(
        _target(
            f"largest edm process RSS after {rss.get('messages', 0):,} messages",
            max(after.values()) / MIB if after else None,
            "<=",
            RSS_LIMIT_MIB,
            "MiB",
        )
    )
    growth = results.get("soak", {}).get("growth")
    targets.append(
        _target(
            f"RSS growth over the soak ({results.get('soak', {}).get('messages', 0):,} messages)",
            max(growth.values()) / MIB if growth else None,
            "<=",
            SOAK_GROWTH_MIB,
            "MiB",
            "" if growth else "--soak N",
        )
    )
    return targets


def _num(value: float | None, fmt: str = ",.0f") -> str:
    return "-" if value is None else format(value, fmt)


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)

    return [line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def render(results: dict[str, Any]) -> str:
    m, o = results["machine"], results["options"]
    out = [
        f"edm bench — {m['nproc']} CPUs ({m['cpu']}), RabbitMQ {m['rabbitmq']} on {m['erlang']}, "
        f"Python {m['python']}, pika {m['pika']}, "
        f"commit {m['git_commit'][:10]}{' (dirty)' if m['git_dirty'] else ''}",
        f"php-amqp: {results.get('php') or 'not measured (php-amqp not installed)'}",
        "",
        f"Throughput: {o['messages']:,} persistent {o['size']} B messages pre-filled, manual ack, "
        f"write+flush before ack; median of {o['reps']}",
    ]
    thr = results.get("throughput", {})
    rows = []
    for c in thr.values():
        med = c["median"]
        base = _rate(results, f"blocking-p{c['prefetch']}")
        php = _rate(results, "php-p1") if c["prefetch"] == 1 else None
        rows.append(
            [
                c["name"] + ("" if c["ok"] else " (FAILED)"),
                _num(med["msgs_per_s"]),
                _num(med["client_us_per_msg"]),
                _num(med["broker_us_per_msg"]),
                _num(med["other_cores"], ".2f"),
                _num(_ratio(med["msgs_per_s"], base), ".2f"),
                _num(_ratio(med["msgs_per_s"], php), ".2f"),
            ]
        )
    out += _table(
        ["consumer", "msg/s", "client µs/msg", "broker µs/msg", "other load", "× Blocking", "× php-amqp"],
        rows,
    )
    if not results.get("php"):
        out.append("php-amqp consume(), prefetch 1: not measured (php-amqp not installed)")
    out.append("other load: CPU cores used meanwhile by everything else on the machine (noise)")
    busy = [c["median"]["other_cores"] for c in thr.values() if c["median"].get("other_cores") is not None]
    if busy and max(busy) > BUSY_CORES:
        out.append(
            f"WARNING: other programs used up to {max(busy):.2f} cores during these runs; "
            "on a 2-core machine that skews the ratios — run again on a quiet machine"
        )
    for note in results.get("disturbances", []):
        out.append(f"note: {note}")

    lat = results.get("latency", {})
    if lat:
        out += [
            "",
            f"Latency publish → logged at a steady {o['rate']:,.0f} msg/s "
            f"for {o['latency_seconds']:g} s (±0.5 ms)",
        ]
        rows = []
        for kind, r in lat.items():
            if r.get("ok"):
                rows.append(
                    [
                        kind,
                        _num(r["rate_achieved"]),
                        *(_num(r[k], ".2f") for k in ("p50_ms", "p99_ms", "max_ms")),
                    ]
                )
        out += _table(["consumer", "msg/s sent", "p50 ms", "p99 ms", "max ms"], rows)

    for label in ("rss", "soak"):
        r = results.get(label, {})
        if r.get("ok"):
            title = "RSS" if label == "rss" else "Soak"
            out += [
                "",
                f"{title}: each edm process, idle after start and after {r['messages']:,} messages (MiB)",
            ]
            rows = [
                [proc, _num(r["idle"].get(proc, 0) / MIB, ".1f"), _num(r["after"][proc] / MIB, ".1f")]
                for proc in r["after"]
            ]
            out += _table(["process", "idle", "after"], rows)

    pub = results.get("publish", {})
    if pub.get("ok"):
        out += [
            "",
            f"edm publish: {pub['messages']:,} messages from a file, {pub['msgs_per_s']:,.0f} msg/s "
            f"({pub['seconds']:.2f} s with interpreter start, {pub['client_us_per_msg']:.0f} µs CPU/msg)",
        ]

    fee = results.get("fee", {})
    if fee.get("ok"):
        out += [
            "",
            f"Fee path: {fee['clients']} REQ clients, {fee['requests']:,} requests per run",
            f"  edm durable replies/s       {fee['edm_replies_per_s']:>10,.0f}",
            f"  PHP design replies/s        {fee['reference_replies_per_s']:>10,.0f}"
            "   (TRUE before the insert)",
            f"  PHP design rows/s           {fee['reference_rows_per_s']:>10,.0f}",
        ]

    out += ["", "Targets"]
    rows = []
    for t in results["targets"]:
        unit = t["unit"]
        value = (
            "-"
            if t["value"] is None
            else f"{t['value']:.2f}{unit}"
            if unit == "×"
            else f"{t['value']:.1f} {unit}"
        )
        limit = f"{'≥' if t['op'] == '>=' else '≤'} {t['limit']:g}{unit if unit == '×' else ' ' + unit}"
        rows.append([t["name"], value, limit, t["status"]])
    out += _table(["target", "value", "target", "result"], rows)
    out += [
        "",
        "Correctness: "
        + (
            "every message logged exactly once, every queue left empty"
            if results["correct"]
            else "FAILED — " + "; ".join(results["failures"])
        ),
    ]
    return "\n".join(out)
