"""A handler the broker-alarm tests configure: it holds a message until the test opens a gate."""

from __future__ import annotations

import time
from pathlib import Path

from edm_test_handlers import fail_poison

from edm.handlers import Message

GATE_WAIT = 120.0  # seconds; a test that never opens its gate still ends


def gated(message: Message) -> None:
    """For a body ``gate=PATH REST``: create ``PATH.held``, wait until PATH exists, then treat REST
    as ``fail_poison`` does (raise for ``poison...``, log the others). Other bodies: ``fail_poison``."""
    body = message.body
    if body.startswith(b"gate="):
        path, _, rest = body[5:].partition(b" ")
        gate = Path(path.decode())
        gate.with_name(gate.name + ".held").touch()
        deadline = time.monotonic() + GATE_WAIT
        while not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        message.body = rest
    fail_poison(message)
