"""The inline path (``threads: 1``) against a checkout of the code before, in CPU instructions.

    PYTHONPATH=. python bench/inline_cost.py --before /path/to/old/checkout [--messages 1000] [--prefetch 1]

Messages a second move with the broker's mode and the machine's other work (bench/README.md,
"Many handlers at once"); instructions do not. Each tree's daemon (``edm run``: the main
process and one consumer worker, the log handler, metrics off) runs under valgrind's callgrind
twice, with N and with 2N messages of 100 B published once it consumes; the difference is what
N messages cost, start and stop cancelled out. Under valgrind a message takes ~50 times as
long, so what the daemon does each second anyway (status reports, the depth poll, timers)
would weigh ~50 times as much on a message as it does at full speed: each tree also runs
idle for ``--idle`` and 3 × ``--idle`` seconds, and that cost a second, times the seconds the
N more messages took, is taken off. Printed: the consumer worker's and the main process's
instructions per message for each tree, raw and without the per-second cost, and the ratio.
``--before`` needs its own ``.venv`` (``scripts/setup`` there).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from harness import ROOT, Broker
from metrics_cost import AMQP_URL, marginal, one_run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="checkout of the code before")
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of the shorter idle run")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("inline_cost: needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    broker = Broker(AMQP_URL)
    n = args.messages
    trees = {"before": args.before.resolve(), "now": ROOT}
    found: dict[str, list[dict[str, float]]] = {which: [] for which in trees}
    with tempfile.TemporaryDirectory(prefix="edm-bench-cg-") as tmp:
        base = Path(tmp)
        for _ in range(args.reps):
            for which, root in trees.items():
                small = one_run(broker, base, n, args.prefetch, False, root=root)
                large = one_run(broker, base, 2 * n, args.prefetch, False, root=root)
                short = one_run(broker, base, 0, args.prefetch, False, root=root, idle=args.idle)
                long = one_run(broker, base, 0, args.prefetch, False, root=root, idle=3 * args.idle)
                raw = marginal(small, large, n)
                took = large["seconds"] - small["seconds"]
                per_second = {k: (long[k] - short[k]) / (long["seconds"] - short["seconds"]) for k in raw}
                found[which].append(
                    {
                        **{f"{k} raw": raw[k] for k in raw},
                        **{k: raw[k] - per_second[k] * took / n for k in raw},
                        **{f"{k} a second": per_second[k] for k in raw},
                    }
                )
    print(
        f"callgrind, instructions (Ir) a message; {n} vs {2 * n} messages of 100 B, prefetch {args.prefetch}"
    )
    keys = ("worker raw", "worker", "main raw", "main", "worker a second", "main a second")
    print("| | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    medians = {}
    for which, runs in found.items():
        medians[which] = {key: statistics.median(r[key] for r in runs) for key in keys}
        print(f"| {which} | " + " | ".join(f"{medians[which][k]:,.0f}" for k in keys) + " |")
    for key in ("worker raw", "worker"):
        print(f"consumer worker now/before ({key}): {medians['now'][key] / medians['before'][key]:.4f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
