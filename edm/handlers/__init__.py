"""The handler API (contract §9): ``Message``, ``Reject``, ``Retry``, and the built-in ``log``.

``edm.handlers:log_message`` stays the name of the default handler.
"""

from __future__ import annotations

from edm.handlers.api import Handler, Message, Reject, Retry
from edm.handlers.log import log_message

__all__ = ["Handler", "Message", "Reject", "Retry", "log_message"]
