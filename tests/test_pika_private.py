"""The check of pika's internals: a pika that lacks one switches the fast lane off, loudly.

Each case changes pika in a fresh interpreter the way a release could (an attribute gone, or
renamed where pika reads it) before edm is imported, and looks at what edm then does.
"""

from __future__ import annotations

import dis
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import delete_topology, helper_queues, unique
from pika.adapters.select_connection import IOLoop, SelectConnection

from edm.amqp import _pika_private
from edm.amqp.fastlane import FastLaneConnection, LaneConnection, connection_class
from edm.amqp.ioloop import FlushingIOLoop, io_loop
from edm.internals import _LOADS, _STORES, Private, _codes, _uses, missing

ROOT = Path(__file__).resolve().parent.parent

# pika's transport reads its recv size under a new name; the old one is still a class attribute
# (a release that renamed it), so edm's assignment would create an attribute nobody reads.
RENAMED_READ = """
import inspect, textwrap
from pika.adapters.utils import io_services_utils as m
source = textwrap.dedent(inspect.getsource(m._AsyncTransportBase._consume))
namespace = dict(vars(m))
exec(source.replace("_MAX_RECV_BYTES", "_MAX_RECV_SIZE"), namespace)
m._AsyncTransportBase._consume = namespace["_consume"]
m._AsyncTransportBase._MAX_RECV_SIZE = 4096
"""

GONE = """
from pika.connection import Connection
del Connection._output_marshaled_frames
"""

CHECK = """
import logging, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(levelname)s %(name)s %(message)s")
from pika.adapters.select_connection import IOLoop, SelectConnection
from edm.amqp.fastlane import LaneConnection, connection_class
from edm.amqp.ioloop import io_loop
assert connection_class(True) is LaneConnection
assert type(io_loop(True)) is IOLoop
assert connection_class(True) is LaneConnection  # asked again: no second warning
print("PLAIN")
"""


def run(*parts: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    script = "\n".join(textwrap.dedent(part) for part in parts)
    env = {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )


def test_this_pika_has_every_internal_the_fast_lane_uses() -> None:
    assert _pika_private.MISSING == ()
    assert connection_class(True) is FastLaneConnection
    assert type(io_loop(True)) is FlushingIOLoop


def test_the_switch_off_takes_pikas_plain_classes() -> None:
    assert connection_class(False) is LaneConnection
    assert type(io_loop(False)) is IOLoop


@pytest.mark.parametrize(
    ("patch", "named"),
    [
        pytest.param(GONE, "pika.connection.Connection._output_marshaled_frames (gone)", id="a method gone"),
        pytest.param(
            RENAMED_READ,
            "pika.adapters.utils.io_services_utils._AsyncTransportBase._MAX_RECV_BYTES "
            "(no longer used by pika.adapters.utils.io_services_utils._AsyncTransportBase)",
            id="an attribute edm sets, no longer read",
        ),
    ],
)
def test_a_missing_internal_switches_the_fast_lane_off_with_one_warning(patch: str, named: str) -> None:
    result = run(patch, CHECK)

    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("PLAIN\n")
    warnings = [line for line in result.stdout.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, result.stdout
    assert "edm.amqp._pika_private" in warnings[0] and named in warnings[0]
    assert "plain SelectConnection and IOLoop" in warnings[0]


@pytest.fixture
def names() -> Iterator[str]:
    name = unique("pikaprivate")
    yield name
    delete_topology({name} | helper_queues(name), {name})


def test_the_consumer_works_on_the_plain_path_when_an_internal_is_missing(names: str) -> None:
    # Given a pika whose transport reads its recv size under another name
    # When edm's consumer runs with amqp.fast_lane on and takes three messages
    result = run(
        RENAMED_READ,
        f"""
        import logging, sys
        logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(levelname)s %(message)s")
        from conftest import amqp_channel
        from test_fastlane import consume
        name = {names!r}

        def publish():
            connection, channel = amqp_channel()
            for body in (b"one", b"two", b"three"):
                channel.basic_publish(name, name, body)
            connection.close()

        seen = consume(name, 3, publish, fast_lane=True)
        print("BODIES", [m.body for m in seen])
        print("DECODED BY PIKA", [not isinstance(m._properties, bytes) for m in seen])
        """,
    )

    # Then every message arrives, through pika's own decoder, after one warning
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BODIES [b'one', b'two', b'three']" in result.stdout
    assert "DECODED BY PIKA [True, True, True]" in result.stdout
    assert sum(line.startswith("WARNING") for line in result.stdout.splitlines()) == 1


# -- the checker itself --------------------------------------------------------------------------


class Library:
    _limit = 10  # read by fill()
    _unused = 1  # read by nothing

    def __init__(self) -> None:
        self._buffer = b""

    def fill(self) -> int:
        return self._limit


class Reader:
    def read(self, library: Library) -> bytes:
        return library._buffer


def test_an_instance_attribute_is_found_by_its_assignment() -> None:
    assert missing([Private(Library, "_buffer"), Private(Library, "_limit")]) == []
    assert missing([Private(Library, "_buffer", read_by=(Reader,))]) == []


def test_a_renamed_attribute_is_reported_gone() -> None:
    assert missing([Private(Library, "_buf")]) == [f"{__name__}.Library._buf (gone)"]


def test_an_attribute_edm_would_set_is_reported_when_nobody_reads_it() -> None:
    assert missing([Private(Library, "_limit", read_by=(Library,))]) == []
    assert missing([Private(Library, "_unused", read_by=(Library,))]) == [
        f"{__name__}.Library._unused (no longer used by {__name__}.Library)"
    ]


# -- edm's own attributes on pika's classes --------------------------------------------------------


def own_names(cls: type) -> set[str]:
    """The attributes a class of edm defines or assigns in its own code (not its bases')."""
    names = {name for name in vars(cls) if not name.startswith(("__", "_abc_"))}
    for value in vars(cls).values():
        for code in _codes(value):
            names |= {i.argval for i in dis.get_instructions(code) if i.opname == "STORE_ATTR"}
    return names


@pytest.mark.parametrize(
    ("ours", "theirs", "overrides"),
    [
        (LaneConnection, SelectConnection, {"channel"}),
        (
            FastLaneConnection,
            SelectConnection,
            {"on_data", "bytes_sent", "frames_sent", "bytes_received", "frames_received"},  # pika's counters
        ),
        (_pika_private.ConnectionHooks, SelectConnection, {"_on_data_available", "_frame_buffer"}),
        (FlushingIOLoop, IOLoop, {"add_handler", "update_handler", "remove_handler", "poll"}),
        (_pika_private.IOLoopHooks, IOLoop, set()),
    ],
)
def test_edm_gives_no_attribute_of_its_own_a_name_pika_uses(
    ours: type, theirs: type, overrides: set[str]
) -> None:
    # (an attribute named like one of pika's would silently replace it: LaneConnection's
    # map of channels was once called _opened, which pika's Connection uses for a flag)
    clashes = {
        name
        for name in own_names(ours) - overrides
        if hasattr(theirs, name) or _uses(theirs, name, _STORES | _LOADS)
    }
    assert clashes == set()
