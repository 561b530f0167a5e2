"""Canonical JSON: the one byte encoding every signed or hashed drm structure uses.

Sorted keys, no insignificant white space, UTF-8, integers only (no floats), binary as
unpadded base64url. Parsing is strict and bounded (size, depth, duplicate keys rejected)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any

from drm.errors import UsageError


class FormatError(UsageError):
    """A structure is malformed (wrong type, size or encoding)."""

    code = "malformed"


def _check_value(value: Any, depth: int = 0) -> None:
    if depth > 16:
        raise FormatError("structure nested too deeply")
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, int):
        if abs(value) > 2**63 - 1:
            raise FormatError("integer out of range")
        return
    if isinstance(value, float):
        raise FormatError("floats are not allowed in canonical JSON")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise FormatError("object keys must be strings")
            _check_value(v, depth + 1)
        return
    if isinstance(value, (list, tuple)):
        for v in value:
            _check_value(v, depth + 1)
        return
    raise FormatError(f"type {type(value).__name__} is not allowed in canonical JSON")


def dumps(value: Any) -> bytes:
    """Canonical bytes of a JSON-able value."""
    _check_value(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise FormatError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise FormatError(f"non-standard JSON constant {name}")


def loads(data: bytes, *, max_size: int, what: str, require_canonical: bool = True) -> Any:
    """Parse canonical JSON bytes, bounded by ``max_size``; reject anything non-canonical."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise FormatError(f"{what}: expected bytes")
    if len(data) > max_size:
        raise FormatError(f"{what}: {len(data)} bytes exceeds the limit of {max_size}")
    try:
        text = bytes(data).decode("utf-8")
        value = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_float=lambda s: _reject_constant("float " + s),
            parse_constant=_reject_constant,
        )
    except FormatError as exc:
        raise FormatError(f"{what}: {exc.message}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"{what}: not valid JSON ({exc.__class__.__name__})") from None
    _check_value(value)
    if require_canonical and dumps(value) != bytes(data):
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
