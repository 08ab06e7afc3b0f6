"""A small flood of the real daemon's fee receiver: every request is answered, every TRUE is a
row, the plugin worker's memory stays under the bound the full benchmark asserts, and the
daemon still serves. Speed is measured by bench/fee_flood.py, never asserted here."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import fee_flood

MAX_RSS_MIB = 120  # the bound of `python bench/fee_flood.py` (100k requests, 64 clients: ~61 MiB)


def test_a_flood_from_sixteen_clients_is_answered_and_stored_within_the_memory_bound() -> None:
    result = fee_flood.flood(requests=5000, clients=16, sockets=2, burst=150, timeout=120)

    replies = result["replies"]
    assert replies["sent"] == 5000
    assert replies["unanswered"] == 0 and not replies["unexpected"], replies
    assert replies["TRUE"] + replies["FALSE busy"] + replies["FALSE malformed"] == 5000
    assert replies["TRUE"] > 0 and replies["FALSE malformed"] > 0
    assert result["rows"] == replies["TRUE"] and result["rows_not_Y"] == 0
    assert result["rss_mib"]["peak"] < MAX_RSS_MIB, result["rss_mib"]
    assert result["still_serving"]
    assert result["tracebacks_in_log"] == 0
    assert fee_flood.verdict(result, MAX_RSS_MIB) == []
