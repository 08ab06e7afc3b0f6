"""Private RabbitMQ nodes for tests, started by ``scripts/rabbit-cluster`` beside (never in
place of) the system's broker: own ports, data, Erlang cookie and epmd in a temp dir."""

from __future__ import annotations

import json
import random
import re
import socket
import subprocess
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from conftest import ROOT, alive

SCRIPT = ROOT / "scripts" / "rabbit-cluster"


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_base(nodes: int = 3, extra: Iterable[int] = ()) -> int:
    """A base port whose whole block (see scripts/rabbit-cluster --help) is free, with the
    ports at the ``extra`` offsets from it (a TLS listener's, say)."""
    for _ in range(100):
        base = random.randrange(20000, 30000, 10)
        ports = [base + i for i in range(nodes)] + [base + 100 + i for i in range(nodes)] + [base + 200]
        ports += [base + 300 + i for i in range(40)] + [base + offset for offset in extra]
        if all(port_free(p) for p in ports):
            return base
    raise AssertionError("no free block of ports for the cluster")


@dataclass
class Cluster:
    dir: Path
    base: int
    urls: list[str] = field(default_factory=list)

    def run(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SCRIPT), "--dir", str(self.dir), *args], capture_output=True, text=True, timeout=timeout
        )

    def beam_pids(self) -> list[int]:
        pids = []
        for pidfile in sorted(self.dir.glob("node*/rabbitmq.pid")):
            text = pidfile.read_text().strip()
            if text.isdigit():
                pids.append(int(text))
        return pids

    def leader(self, queue: str, via: int) -> int:
        """The number of the node that leads ``queue``, asked of node ``via``."""
        result = self.run("ctl", str(via), "-q", "list_queues", "name", "leader", "--formatter", "json")
        assert result.returncode == 0, result.stderr
        for row in json.loads(result.stdout):
            if row["name"] == queue:
                match = re.fullmatch(rf"edm{self.base}n(\d)@localhost", row["leader"])
                assert match, row
                return int(match.group(1))
        raise AssertionError(f"{queue} not in {result.stdout}")


@contextmanager
def running_cluster(directory: Path, base: int, nodes: int, *options: str) -> Iterator[Cluster]:
    """Nodes up for the ``with`` block, down after it whatever happens (also when up failed)."""
    cluster = Cluster(directory, base)
    try:
        up = cluster.run("--base", str(base), "--nodes", str(nodes), *options, "up")
        assert up.returncode == 0, up.stderr
        cluster.urls = up.stdout.split()
        assert cluster.urls == [f"amqp://guest:guest@127.0.0.1:{base + i}/%2F" for i in range(nodes)]
        assert len(cluster.beam_pids()) == nodes
        yield cluster
    finally:
        pids = cluster.beam_pids()  # whatever up got to start, also when it failed
        down = cluster.run("down")
        assert down.returncode == 0, down.stderr
        assert not [pid for pid in pids if alive(pid)], "a node of the test cluster is left"
