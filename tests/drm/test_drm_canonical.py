"""Canonical JSON: the exact bytes every signature and hash covers (RFC 8785 subset)."""

from __future__ import annotations

import pytest

import drm
from drm._canonical import MAX_INT, b64d, b64e, dumps, loads


def test_known_encodings() -> None:
    assert dumps({"b": 1, "a": [True, None, "x"]}) == b'{"a":[true,null,"x"],"b":1}'
    assert dumps('é\u2028\x7f\x1f\n"\\/') == '"é\u2028\x7f\\u001f\\n\\"\\\\/"'.encode()
    # RFC 8785 orders members by UTF-16 code units: U+1F600 (D83D DE00) sorts before U+FB33.
    assert dumps({"\ufb33": 1, "\U0001f600": 2}) == '{"\U0001f600":2,"\ufb33":1}'.encode()
    assert dumps(MAX_INT) == b"9007199254740991"


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a":1,"a":2}',  # duplicate key
        b'{"b":1,"a":2}',  # order
        b'{"a": 1}',  # white space
        b"1.0",
        b"1e3",
        b"NaN",
        b"-0",
        b"01",
        b"9007199254740992",  # beyond 2**53 - 1
        b"9" * 5000,
        b"[" * 100 + b"]" * 100,  # deeper than MAX_DEPTH
        b"[" * 100_000,  # RecursionError territory
        b'"\\ud800"',  # lone surrogate
        b'"\\u0041"',  # escaped where the canonical form is literal
        b"\xef\xbb\xbf{}",  # BOM
        b"\xff",
        b'"\\u001F"',  # upper-case hex escape
    ],
)
def test_non_canonical_or_dangerous_input_is_a_format_error(raw: bytes) -> None:
    with pytest.raises(drm.FormatError):
        loads(raw, max_size=1 << 20, what="t")


def test_size_limit_is_checked_before_parsing() -> None:
    with pytest.raises(drm.FormatError, match="exceeds"):
        loads(b"[" + b"1," * 10_000 + b"1]", max_size=100, what="t")


def test_dumps_refuses_what_loads_would() -> None:
    for bad in (1.5, 2**53, {1: 2}, b"bytes", "\ud800", {"a": object()}):
        with pytest.raises(drm.FormatError):
            dumps(bad)


def test_base64url_is_strict() -> None:
    assert b64d(b64e(b"\xfb\xff"), what="t") == b"\xfb\xff"
    for bad in ("+/8", "-_8=", "-_9", "é", 5, "A" * 10):
        with pytest.raises(drm.FormatError):
            b64d(bad, what="t", max_len=4)
