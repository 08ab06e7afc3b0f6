"""A handler module whose import fails (the daemon must survive loading it as amqp.handler)."""

from __future__ import annotations

raise RuntimeError("this module refuses to be imported")
