"""The device usage log: append-only records, each linked to the previous by hash, signed by the device key.

One record per line: canonical JSON {"rec": {...}, "sig": b64url(Ed25519)}. Record fields: v, seq,
prev (sha256 tag of the previous line, or of the genesis string for seq 0), t, device_id, event,
license_id, build_hash, runs (the license counter after this event)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from drm._canonical import FormatError, b64d, b64e, dumps, exact_keys, field, loads, sha256_tag

MAX_RECORD_BYTES = 4096
MAX_LOG_BYTES = 64 * 1024 * 1024
MAX_DETAIL = 256
_TAG = re.compile(r"^sha256:[0-9a-f]{64}\Z")
_FIELDS = {"v", "seq", "prev", "t", "device_id", "event", "license_id", "build_hash", "runs", "detail"}
EVENTS = ("run", "refused", "sync")


def genesis(device_id: str) -> str:
    return sha256_tag(b"edgemart-usage-genesis/1\x00" + device_id.encode())


def _msg(rec: dict[str, Any]) -> bytes:
    return b"edgemart-usage/1\x00" + dumps(rec)


def make_record(
    key: ed25519.Ed25519PrivateKey,
    *,
    prev_line: bytes | None,
    seq: int,
    device_id: str,
    t: int,
    event: str,
    license_id: str,
    build_hash: str,
    runs: int,
    detail: str = "",
) -> bytes:
    """One signed log line (no trailing newline)."""
    if event not in EVENTS:
        raise FormatError(f"usage record: unknown event {event!r}")
    if min(seq, t, runs) < 0:
        raise FormatError("usage record: seq, t and runs must be non-negative")
    rec = {
        "build_hash": build_hash,
        "detail": detail[:MAX_DETAIL],
        "device_id": device_id,
        "event": event,
        "license_id": license_id,
        "prev": genesis(device_id) if prev_line is None else sha256_tag(prev_line),
        "runs": runs,
        "seq": seq,
        "t": t,
        "v": 1,
    }
    return dumps({"rec": rec, "sig": b64e(key.sign(_msg(rec)))})


@dataclass(frozen=True)
class LogReport:
    ok: bool
    records: tuple[dict[str, Any], ...]  # the valid prefix
    first_bad: int | None  # 0-based line index of the first bad record
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records": len(self.records),
            "first_bad": self.first_bad,
            "reason": self.reason,
        }


def parse_record(line: bytes) -> dict[str, Any]:
    """Structural check of one log line: exact fields, types and bounds (not the chain or signature)."""
    what = "usage record"
    obj = loads(line, max_size=MAX_RECORD_BYTES, what=what)
    exact_keys(obj, {"rec", "sig"}, what=what)
    rec = exact_keys(field(obj, "rec", dict, what=what), _FIELDS, what=what)
    for name in ("seq", "t", "runs", "v"):
        if field(rec, name, int, what=what) < 0:
            raise FormatError(f"usage record: {name} negative")
    for name in ("prev", "device_id", "event", "license_id", "build_hash", "detail"):
        field(rec, name, str, what=what)
    if rec["v"] != 1:
        raise FormatError("usage record: unsupported version")
    if rec["event"] not in EVENTS:
        raise FormatError("usage record: unknown event")
    if not _TAG.match(rec["prev"]):
        raise FormatError("usage record: prev must be sha256:<hex>")
    if len(rec["detail"]) > MAX_DETAIL or len(rec["license_id"]) > 128 or len(rec["build_hash"]) > 128:
        raise FormatError("usage record: field too long")
    sig = b64d(field(obj, "sig", str, what=what), what="usage record sig", max_len=64)
    if len(sig) != 64:
        raise FormatError("usage record: signature must be 64 bytes")
    return obj


def verify_log(
    data: bytes,
    public_key: ed25519.Ed25519PublicKey,
    *,
    device_id: str,
    start_seq: int = 0,
    start_prev: str | None = None,
    min_records: int = 0,
    max_bytes: int = MAX_LOG_BYTES,
) -> LogReport:
    """Verify a whole log (or a continuation from ``start_seq``/``start_prev``); report the first bad record.

    ``min_records`` is how many records the verifier knows must be there (e.g. the store saw them
    before): fewer is reported as truncation at index ``len(lines)``. Edits, removals, reorders and
    insertions break the seq/hash chain or a signature at the first affected line."""
    if not isinstance(data, (bytes, bytearray)):
        raise FormatError("usage log: expected bytes")
    if len(data) > max_bytes:
        raise FormatError(f"usage log: {len(data)} bytes exceeds the limit of {max_bytes}")
    lines = bytes(data).split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    good: list[dict[str, Any]] = []
    prev = start_prev or genesis(device_id)
    for i, line in enumerate(lines):
        try:
            obj = parse_record(line)
        except FormatError as exc:
            return LogReport(False, tuple(good), i, exc.message)
        rec = obj["rec"]
        if rec["device_id"] != device_id:
            return LogReport(False, tuple(good), i, "record names another device")
        if rec["seq"] != start_seq + i:
            return LogReport(
                False, tuple(good), i, f"sequence gap: expected {start_seq + i}, found {rec['seq']}"
            )
        if rec["prev"] != prev:
            return LogReport(
                False, tuple(good), i, "hash chain broken (a record was edited, removed or reordered)"
            )
        try:
            public_key.verify(b64d(obj["sig"], what="sig", max_len=64), _msg(rec))
        except InvalidSignature:
            return LogReport(False, tuple(good), i, "signature invalid")
        good.append(rec)
        prev = sha256_tag(line)
    if len(lines) < min_records:
        return LogReport(
            False, tuple(good), len(lines), f"log truncated: {len(lines)} of at least {min_records} records"
        )
    return LogReport(True, tuple(good), None, "")
