"""The fee request: ``ticket,login,volume`` as UTF-8, validated without side effects."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import NamedTuple

from edm.errors import EdmError

MAX_REQUEST = 1024  # bytes
MAX_ID = 2**63  # ticket and login fit a signed BIGINT
MAX_INTEGER_DIGITS = 16  # volume is DECIMAL(20,4)

# ASCII digits only: int() and Decimal() would also take "١٢", "1_000", "1e3", "NaN".
_INTEGER = re.compile(r"[0-9]+\Z")
_VOLUME = re.compile(r"(?P<int>[0-9]+)(?:\.(?P<frac>[0-9]{1,4}))?\Z")
# The common, valid request in one match; anything else takes the field-by-field path,
# which names what is wrong. Both accept exactly the same requests (tests/test_fee_parse.py).
_FEE = re.compile(rb" *([0-9]+) *, *([0-9]+) *, *([0-9]+(?:\.[0-9]{1,4})?) *\Z")


class MalformedRequest(EdmError):
    """The request is not a valid fee; ``reason`` goes back to the client after FALSE."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class Fee(NamedTuple):  # a NamedTuple: built once per request, it costs a third of a dataclass
    ticket: int
    login: int
    volume: Decimal

    def line(self) -> str:
        """The canonical request text; parse_request(line) gives this fee back."""
        return f"{self.ticket},{self.login},{self.volume:f}"


def parse_request(body: bytes) -> Fee:
    """Validate one request body; raise MalformedRequest (and nothing else) when it is not a fee."""
    return _parse_plain(body) or _parse_fields(body)


def _parse_plain(body: bytes) -> Fee | None:
    """The fee of a request that is plainly valid, else None."""
    m = _FEE.match(body) if len(body) <= MAX_REQUEST else None
    if m is None:
        return None
    ticket, login, volume = m.groups()
    if len(ticket) > 19 or len(login) > 19 or len(volume.split(b".")[0].lstrip(b"0")) > MAX_INTEGER_DIGITS:
        return None  # maybe out of range: the careful path decides and says why
    fee = Fee(int(ticket), int(login), Decimal(volume.decode()))
    return fee if fee.ticket < MAX_ID and fee.login < MAX_ID else None


def _parse_fields(body: bytes) -> Fee:
    """Field by field, so that a malformed request learns which field is wrong."""
    if not body:
        raise MalformedRequest("empty request")
    if len(body) > MAX_REQUEST:
        raise MalformedRequest(f"request longer than {MAX_REQUEST} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedRequest("request is not valid UTF-8") from None
    fields = text.split(",")
    if len(fields) != 3:
        raise MalformedRequest(f"expected ticket,login,volume but got {len(fields)} field(s)")
    ticket_text, login_text, volume_text = (f.strip(" ") for f in fields)
    return Fee(_id("ticket", ticket_text), _id("login", login_text), _volume(volume_text))


def _id(name: str, text: str) -> int:
    if not _INTEGER.match(text):
        raise MalformedRequest(f"{name} must be a non-negative integer")
    value = int(text)
    if value >= MAX_ID:
        raise MalformedRequest(f"{name} must be less than 2^63")
    return value


def _volume(text: str) -> Decimal:
    m = _VOLUME.match(text)
    if not m:
        raise MalformedRequest("volume must be a non-negative decimal such as 0.01, 1.5 or 100")
    if len(m.group("int").lstrip("0")) > MAX_INTEGER_DIGITS:
        raise MalformedRequest(f"volume must have at most {MAX_INTEGER_DIGITS} integer digits")
    return Decimal(text)
