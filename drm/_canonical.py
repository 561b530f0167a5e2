"""Canonical JSON: the one byte encoding every signed or hashed drm structure uses.

RFC 8785 (JCS) restricted to integers |n| < 2**53 and no floats: members sorted by UTF-16 code
units, no insignificant white space, UTF-8; binary as unpadded base64url. Parsing is strict and
bounded (size, depth, integer digits, duplicate keys and any non-canonical byte rejected)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any

from edgemart.core.errors import UsageError


class FormatError(UsageError):
    """A structure is malformed (wrong type, size or encoding)."""

    code = "malformed"


# JCS (RFC 8785) serializes numbers as IEEE doubles; integers within +-(2**53 - 1) print exactly.
MAX_INT = 2**53 - 1
MAX_DEPTH = 16


def _utf16_key(key: str) -> bytes:
    return key.encode("utf-16-be", "surrogatepass")


def _normalize(value: Any, depth: int = 0) -> Any:
    """Validate ``value`` and return it with object members in RFC 8785 order (UTF-16 code units)."""
    if depth > MAX_DEPTH:
        raise FormatError("structure nested too deeply")
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        if abs(value) > MAX_INT:
            raise FormatError("integer out of range")
        return value
    if isinstance(value, float):
        raise FormatError("floats are not allowed in canonical JSON")
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str):
                raise FormatError("object keys must be strings")
        return {k: _normalize(value[k], depth + 1) for k in sorted(value, key=_utf16_key)}
    if isinstance(value, (list, tuple)):
        return [_normalize(v, depth + 1) for v in value]
    raise FormatError(f"type {type(value).__name__} is not allowed in canonical JSON")


def dumps(value: Any) -> bytes:
    """Canonical bytes of a JSON-able value (RFC 8785 for this subset: no floats, |int| < 2**53)."""
    try:
        text = json.dumps(_normalize(value), separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError("string is not valid Unicode (lone surrogate)") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise FormatError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise FormatError(f"non-standard JSON constant {name}")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 16:  # 2**53 has 16 digits; stops the 4300-digit int() DoS early
        raise FormatError("integer out of range")
    return int(text)


def loads(
    data: bytes | bytearray | memoryview, *, max_size: int, what: str, require_canonical: bool = True
) -> Any:
    """Parse canonical JSON bytes, bounded by ``max_size``; reject anything non-canonical."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise FormatError(f"{what}: expected bytes")
    if len(data) > max_size:
        raise FormatError(f"{what}: {len(data)} bytes exceeds the limit of {max_size}")
    raw = bytes(data)
    try:
        value = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_float=lambda s: _reject_constant("float " + s[:20]),
            parse_int=_bounded_int,
            parse_constant=_reject_constant,
        )
        canonical = dumps(value)
    except FormatError as exc:
        raise FormatError(f"{what}: {exc.message}") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise FormatError(f"{what}: not valid JSON ({exc.__class__.__name__})") from None
    if require_canonical and canonical != raw:
        raise FormatError(f"{what}: not in canonical form")
    return value


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(bytes(data)).rstrip(b"=").decode("ascii")


def b64d(text: Any, *, what: str, max_len: int = 1 << 20) -> bytes:
    if not isinstance(text, str) or len(text) > max_len * 4 // 3 + 4:
        raise FormatError(f"{what}: expected a base64url string")
    if "=" in text or "+" in text or "/" in text:
        raise FormatError(f"{what}: not unpadded base64url")
    try:
        out = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise FormatError(f"{what}: not base64url") from None
    if b64e(out) != text:
        raise FormatError(f"{what}: non-canonical base64url")
    return out


def sha256_tag(data: bytes | bytearray | memoryview) -> str:
    """The ``sha256:<hex>`` content address used for build hashes and record links."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def field(obj: dict[str, Any], name: str, kind: type | tuple[type, ...], *, what: str) -> Any:
    """Fetch a required field with an exact type check (bool is not an int here)."""
    if name not in obj:
        raise FormatError(f"{what}: missing field {name!r}")
    value = obj[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise FormatError(f"{what}: field {name!r} has the wrong type")
    if not isinstance(value, kinds):
        raise FormatError(f"{what}: field {name!r} has the wrong type")
    return value


def exact_keys(obj: Any, allowed: set[str], *, what: str, required: set[str] | None = None) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise FormatError(f"{what}: expected an object")
    extra = set(obj) - allowed
    if extra:
        raise FormatError(f"{what}: unknown field(s) {sorted(extra)}")
    missing = (required if required is not None else allowed) - set(obj)
    if missing:
        raise FormatError(f"{what}: missing field(s) {sorted(missing)}")
    return obj
