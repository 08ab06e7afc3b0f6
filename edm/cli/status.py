"""What `edm status` shows: the pidfile's verdict plus the daemon's own status file.

``document`` builds the stable JSON document of ``status --json`` (every key always present,
null when unknown); ``describe`` renders the same document for people. Nothing here guesses:
beyond the pidfile's lock, every value comes from the status file the daemon rewrites.
"""

from __future__ import annotations

import time
from typing import Any

from edm.daemon.lifecycle import name_order

# The status words of the JSON document, by the pidfile's state.
STATUS_WORDS = {"running": "running", "stale": "dead", "absent": "stopped"}
WORKER_KEYS = (
    "pid",
    "state",
    "activity",
    "since",
    "restarts",
    "last_error",
    "handled",
    "dead_lettered",
    "broker",
    "queue",
    "queue_depth",
    "threads",  # a consumer's handler threads (amqp.threads); null for the plugins worker
    "busy",  # how many of them run a handler now
)
PLUGIN_ORDER = (
    "requests",
    "stored",
    "spooled",
    "replayed",
    "duplicates",
    "malformed",
    "busy",
    "queue",
    "spool_pending",
)
STALE_AFTER = 10.0  # seconds without a rewrite of the status file before status warns


def document(
    pid_state: str, pid: int | None, exit_code: int, state: dict[str, Any] | None, now: float | None = None
) -> dict[str, Any]:
    """The ``status --json`` document; ``state`` is the status file (None when not running)."""
    now = time.time() if now is None else now
    state = state or {}
    started = _number(state.get("started"))
    workers: dict[str, dict[str, Any]] = {}
    plugins: dict[str, Any] = {}
    for name, raw in sorted((state.get("workers") or {}).items(), key=lambda item: name_order(item[0])):
        if not isinstance(raw, dict):
            continue
        workers[name] = {key: raw.get(key) for key in WORKER_KEYS}
        found = raw.get("plugins")
        if isinstance(found, dict):
            plugins.update(found)
    return {
        "status": STATUS_WORDS.get(pid_state, pid_state),
        "exit_code": exit_code,
        "pid": pid,
        "version": state.get("version"),
        "config": state.get("config"),
        "started": started,
        "uptime": round(now - started, 3) if started is not None else None,
        "updated": _number(state.get("updated")),
        "workers": workers,
        "plugins": plugins,
        "error": None,
    }


def describe(doc: dict[str, Any], now: float | None = None) -> list[str]:
    """The lines after ``edm is running (pid N)``: uptime, one line per worker, one per plugin."""
    now = time.time() if now is None else now
    lines = []
    if doc["uptime"] is not None:
        lines.append(f"  uptime: {duration(doc['uptime'])}")
    updated = doc["updated"]
    if doc["status"] == "running" and updated is not None and now - updated > STALE_AFTER:
        lines.append(
            f"  warning: the status file was last written {duration(now - updated)} ago; "
            "the main process may be stuck"
        )
    for name, w in doc["workers"].items():
        parts = [f"  {name}: {w['state'] or '?'}"]
        if w["pid"]:
            parts.append(f"pid {w['pid']}")
        if w["activity"]:
            parts.append(str(w["activity"]))
        if w["threads"] is not None and w["pid"]:
            threads = w["threads"]
            parts.append(f"{w['busy'] or 0} of {threads} thread{'' if threads == 1 else 's'} busy")
        for key in ("handled", "dead_lettered", "restarts"):
            if w[key] is not None:
                parts.append(f"{key.replace('_', ' ')} {w[key]}")
        if w["broker"]:
            parts.append(f"broker {w['broker']}")
        if w["queue"]:
            depth = w["queue_depth"]
            parts.append(f"queue {w['queue']}" + (f" ({depth} ready)" if depth is not None else ""))
        if w["last_error"]:
            parts.append(f"last error: {w['last_error']}")
        lines.append(", ".join(parts))
        if name == "plugins":
            lines.extend(_plugin_line(p, s) for p, s in sorted(doc["plugins"].items()))
    return lines


def _plugin_line(name: str, status: Any) -> str:
    if not isinstance(status, dict):
        return f"    {name}: {status}"
    parts = [f"    {name}: {status.get('state', '?')}"]
    if status.get("listen"):
        parts.append(f"listen {status['listen']}")
    # The status file sorts keys; show the counters in the order a request moves through them.
    rest = [k for k in status if k not in ("state", "listen")]
    rest.sort(key=lambda k: (PLUGIN_ORDER.index(k) if k in PLUGIN_ORDER else len(PLUGIN_ORDER), k))
    parts.extend(f"{key.replace('_', ' ')} {status[key]}" for key in rest)
    return ", ".join(parts)


def duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{days}d " if days else "") + f"{hours:02d}:{minutes:02d}:{secs:02d}"


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
