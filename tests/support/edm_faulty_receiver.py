"""``python -m edm_faulty_receiver [edm arguments]``: edm itself, whose fee receiver loop
breaks on the request of ticket DIE_TICKET, as an unexpected exception (a bug) would break it.

Every process of the daemon forks from this one, so every fee receiver it runs has the fault.
"""

from __future__ import annotations

import sys
from typing import Any

from edm.cli.main import main
from edm.plugins.fee.receiver import FeePlugin

DIE_TICKET = 666

_receive = FeePlugin._receive


def _receive_or_die(self: FeePlugin) -> list[Any]:
    batch = _receive(self)
    if any(request.fee.ticket == DIE_TICKET for request in batch):
        raise RuntimeError(f"ticket {DIE_TICKET} broke the receiver")
    return batch


FeePlugin._receive = _receive_or_die  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main())
