"""The SMTP server of bench/smtp.py: aiosmtpd in a process of its own, each message answered after a delay.

    python bench/smtp_sink.py --port 2525 --delay 0.02 --out received.txt [--processes N]

Many sessions at once on one asyncio loop (or ``--processes`` loops in as many processes,
sharing the port with SO_REUSEPORT); each reply to the end of DATA waits ``--delay``
seconds (``asyncio.sleep``: the sessions wait side by side). Offers PIPELINING, as Postfix
does. Writes one line per message accepted, ``<unix time> <Message-ID>``, flushed, so the
bench counts what arrived and checks that each job arrived exactly once. Prints ``ready``
once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import sys
import time
from typing import IO, Any

from aiosmtpd.smtp import SMTP

MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*(\S+)", re.MULTILINE | re.IGNORECASE)


class Sink:
    def __init__(self, delay: float, out: IO[str]) -> None:
        self.delay = delay
        self.out = out

    async def handle_EHLO(
        self, server: SMTP, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        responses.insert(len(responses) - 1, "250-PIPELINING")
        return responses

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        await asyncio.sleep(self.delay)
        head = envelope.original_content[:4096]
        found = MESSAGE_ID.search(head)
        msgid = found.group(1).decode("ascii", "replace") if found else "-"
        self.out.write(f"{time.time():.6f} {msgid}\n")
        self.out.flush()
        return "250 2.0.0 Ok: queued"


async def serve(port: int, delay: float, out: IO[str], say_ready: bool) -> None:
    loop = asyncio.get_running_loop()
    sink = Sink(delay, out)
    server = await loop.create_server(
        lambda: SMTP(sink, hostname="sink.bench", ident="bench sink", data_size_limit=None),
        "127.0.0.1",
        port,
        backlog=256,
        reuse_port=True,  # --processes: the kernel spreads the sessions over the processes
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    if say_ready:
        print("ready", flush=True)
    await stop.wait()
    server.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.02)
    parser.add_argument("--out", required=True)
    parser.add_argument("--processes", type=int, default=1, help="server processes sharing the port")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    helpers = []
    for _ in range(args.processes - 1):
        pid = os.fork()
        if pid == 0:  # a helper: serves until SIGTERM from the first process
            with open(args.out, "a", encoding="ascii") as out:
                asyncio.run(serve(args.port, args.delay, out, say_ready=False))
            os._exit(0)
        helpers.append(pid)
    try:
        with open(args.out, "a", encoding="ascii") as out:  # O_APPEND: whole lines, never mixed
            asyncio.run(serve(args.port, args.delay, out, say_ready=True))
    finally:
        for pid in helpers:
            os.kill(pid, signal.SIGTERM)
        for pid in helpers:
            os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
