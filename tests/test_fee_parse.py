"""The fee request parser: pure, strict, and it never fails in any way but a clean rejection."""

from __future__ import annotations

import random
from decimal import Decimal

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from edm.plugins.fee.parse import (
    MAX_REQUEST,
    Fee,
    MalformedRequest,
    _parse_fields,
    _parse_plain,
    parse_request,
)


@pytest.mark.parametrize(
    ("body", "fee"),
    [
        (b"1,2,0.01", Fee(1, 2, Decimal("0.01"))),
        (b"1,2,1.5", Fee(1, 2, Decimal("1.5"))),
        (b"1,2,100", Fee(1, 2, Decimal("100"))),
        (b" 7 , 8 , 9.1234 ", Fee(7, 8, Decimal("9.1234"))),
        (b"0,0,0", Fee(0, 0, Decimal(0))),
        (b"9223372036854775807,1,9999999999999999.9999", Fee(2**63 - 1, 1, Decimal("9999999999999999.9999"))),
        (b"007,0008,0001.5", Fee(7, 8, Decimal("1.5"))),
    ],
)
def test_valid_requests_parse(body: bytes, fee: Fee) -> None:
    assert parse_request(body) == fee


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"1,2",
        b"1,2,3,4",
        b"a,2,3",
        b"1,b,3",
        b"1,2,c",
        b"-1,2,3",
        b"1,-2,3",
        b"1,2,-3",
        b"+1,2,3",
        b"1,2,+3",
        b"9223372036854775808,1,1",
        b"1,9223372036854775808,1",
        b"1,2,1e3",
        b"1,2,NaN",
        b"1,2,inf",
        b"1,2,Infinity",
        b"1,2,1.23456",
        b"1,2,12345678901234567",
        b"1,2,.5",
        b"1,2,1.",
        b"1,2,1_000",
        b"1 2,3,4",
        b"\xd9\xa1,2,3",  # ARABIC-INDIC DIGIT ONE: int() would take it
        b"1,2,3\n",
        b"\t1,2,3",
        b"\xff\xfe,1,1",
        b"1,2," + b" " * MAX_REQUEST + b"3",
    ],
)
def test_malformed_requests_are_rejected(body: bytes) -> None:
    with pytest.raises(MalformedRequest) as info:
        parse_request(body)
    assert info.value.reason


def test_reasons_name_the_problem() -> None:
    cases = {
        b"": "empty",
        b"1,2": "ticket,login,volume",
        b"x,2,3": "ticket",
        b"1,x,3": "login",
        b"1,2,x": "volume",
        b"9223372036854775808,2,3": "2^63",
        b"\xff,1,1": "UTF-8",
        b"1" * 1025: "1024",
    }
    for body, word in cases.items():
        with pytest.raises(MalformedRequest, match=r".*") as info:
            parse_request(body)
        assert word in info.value.reason, (body, info.value.reason)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=2 * MAX_REQUEST))
def test_arbitrary_bytes_parse_or_are_rejected_cleanly(body: bytes) -> None:
    try:
        fee = parse_request(body)
    except MalformedRequest as exc:
        assert exc.reason
    else:
        assert 0 <= fee.ticket < 2**63 and 0 <= fee.login < 2**63
        assert fee.volume >= 0 and fee.volume == fee.volume.quantize(Decimal("0.0001"))
        assert parse_request(fee.line().encode()) == fee


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet="0123456789,. -+eE", max_size=60))
def test_number_like_text_parses_or_is_rejected_cleanly(text: str) -> None:
    try:
        fee = parse_request(text.encode())
    except MalformedRequest:
        return
    assert parse_request(fee.line().encode()) == fee


_ids = st.integers(min_value=0, max_value=2**63 - 1)
_volumes = st.decimals(min_value=0, max_value=Decimal("9999999999999999.9999"), places=4)
_pad = st.text(alphabet=" ", max_size=3)


@settings(max_examples=1000, deadline=None)
@given(_ids, _ids, _volumes, _pad, _pad)
def test_valid_fees_round_trip(ticket: int, login: int, volume: Decimal, left: str, right: str) -> None:
    fee = Fee(ticket, login, volume)
    body = f"{left}{ticket}{right},{login}{right},{left}{volume:f}{right}".encode()
    assert parse_request(body) == fee
    assert parse_request(fee.line().encode()) == fee


def _plain_agrees_with_fields(body: bytes) -> None:
    """The one-match path accepts nothing the field-by-field path refuses, and parses alike;
    what it leaves (None) the careful path decides. Both outcomes are checked on every input."""
    fee = _parse_plain(body)
    try:
        careful: Fee | None = _parse_fields(body)
    except MalformedRequest as exc:
        assert exc.reason
        careful = None
    if fee is not None:
        assert careful == fee
        assert type(fee.ticket) is int and type(fee.login) is int and isinstance(fee.volume, Decimal)
    assert parse_request_outcome(body) == careful


def parse_request_outcome(body: bytes) -> Fee | None:
    try:
        return parse_request(body)
    except MalformedRequest:
        return None


# Requests near the valid ones, so that both paths are taken often: number-like fields (some
# too long, some with too many decimals), junk fields, odd separators, padding, and now and
# then one random byte spliced in anywhere.
def _near_field(rng: random.Random, decimals_likely: bool) -> bytes:
    kind = rng.randrange(8)
    if kind <= 5:  # a number, valid more often than not; kind 5 may be too long or too fine
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 21 if kind == 5 else 17)))
        if rng.random() < (0.5 if decimals_likely else 0.1):
            decimals = rng.randint(0 if kind == 5 else 1, 6 if kind == 5 else 4)
            digits += "." + "".join(rng.choice("0123456789") for _ in range(decimals))
        return (" " * rng.randint(0, 2) + digits + " " * rng.randint(0, 2)).encode()
    if kind == 6:
        return "".join(rng.choice("0123456789 .,+-eE_") for _ in range(rng.randint(0, 8))).encode()
    return rng.randbytes(rng.randint(0, 4))


def _near_request(rng: random.Random) -> bytes:
    separators = [b",", b",", b",", b",", b",", b" , ", b",,", b";"]
    body = b"".join(
        [
            _near_field(rng, False),
            rng.choice(separators),
            _near_field(rng, False),
            rng.choice(separators),
            _near_field(rng, True),
        ]
    )
    if rng.random() < 0.2:
        at = rng.randint(0, len(body))
        body = body[:at] + rng.randbytes(1) + body[at:]
    return body


@settings(max_examples=3000, deadline=None)
@given(st.randoms(use_true_random=False))
def test_the_plain_path_agrees_with_the_careful_one_near_valid_requests(rng: random.Random) -> None:
    body = _near_request(rng)
    _plain_agrees_with_fields(body)
    event("plain path took it" if _parse_plain(body) is not None else "left to the careful path")


def test_near_valid_requests_take_both_paths_often() -> None:
    """The generator above is worth its name: in a fixed sample, the plain path takes a good
    share of the requests, the careful path refuses a good share, and they always agree."""
    rng = random.Random(20261130)
    sample = [_near_request(rng) for _ in range(2000)]
    for body in sample:
        _plain_agrees_with_fields(body)
    taken = sum(_parse_plain(body) is not None for body in sample)
    refused = sum(parse_request_outcome(body) is None for body in sample)
    assert taken >= 200 and refused >= 200, (taken, refused)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=2 * MAX_REQUEST))
def test_the_plain_path_agrees_with_the_careful_one_on_arbitrary_bytes(body: bytes) -> None:
    _plain_agrees_with_fields(body)


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet="0123456789,. ", max_size=60))
def test_the_plain_path_agrees_with_the_careful_one_on_number_like_text(text: str) -> None:
    _plain_agrees_with_fields(text.encode())
