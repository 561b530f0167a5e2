"""Signed, versioned revocation lists. A verifier never accepts a version older than the one it holds."""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryptography import x509

from drm._canonical import FormatError, exact_keys, field
from drm.envelope import sign_envelope, verify_envelope
from drm.keys import EKU_LICENSE_ISSUER, Issuer
from edgemart.core.errors import LicenseRefused, UsageError

REVOCATION_TYP = "edgemart-revocation/1"
MAX_REVOKED = 25_000  # the store drops licenses from the list once they have expired
MAX_REVOCATION_BYTES = 2 * 1024 * 1024
CLOCK_SKEW = 300
_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}\Z")


@dataclass(frozen=True)
class RevocationList:
    version: int
    issued_at: int
    revoked: frozenset[str]


def sign_revocation_list(issuer: Issuer, *, version: int, issued_at: int, revoked: list[str]) -> bytes:
    """A signed list of revoked license ids (sorted, unique); ``version`` must grow with every list."""
    if len(set(revoked)) > MAX_REVOKED:
        raise UsageError(f"revocation list: more than {MAX_REVOKED} entries")
    return sign_envelope(
        REVOCATION_TYP,
        {"issued_at": issued_at, "revoked": sorted(set(revoked)), "v": 1, "version": version},
        issuer,
    )


def _parse(payload: dict[str, object]) -> RevocationList:
    what = "revocation list"
    obj = exact_keys(payload, {"issued_at", "revoked", "v", "version"}, what=what)
    if field(obj, "v", int, what=what) != 1:
        raise FormatError("revocation list: unsupported version")
    version = field(obj, "version", int, what=what)
    issued = field(obj, "issued_at", int, what=what)
    if version < 0 or issued < 0:
        raise FormatError("revocation list: version and issued_at must be non-negative")
    revoked = field(obj, "revoked", list, what=what)
    if len(revoked) > MAX_REVOKED:
        raise FormatError(f"revocation list: more than {MAX_REVOKED} entries")
    if not all(isinstance(r, str) and _ID.match(r) for r in revoked):
        raise FormatError("revocation list: entries must be license ids")
    if any(a >= b for a, b in zip(revoked, revoked[1:], strict=False)):
        raise FormatError("revocation list: entries must be sorted and unique")
    return RevocationList(version, issued, frozenset(revoked))


def verify_revocation_list(
    token: bytes, *, root: x509.Certificate, now: int, current_version: int = 0, max_age: int | None = None
) -> RevocationList:
    """Verify and parse; refuse a list older than ``current_version`` (a downgrade), or one issued
    more than ``max_age`` seconds before ``now`` when the caller sets a freshness bound."""
    v = verify_envelope(
        token, REVOCATION_TYP, root=root, now=now, purpose=EKU_LICENSE_ISSUER, max_bytes=MAX_REVOCATION_BYTES
    )
    try:
        rl = _parse(v.payload)
    except FormatError as exc:
        raise LicenseRefused(reason=exc.message) from None
    if rl.version < current_version:
        raise LicenseRefused(
            reason=f"revocation list version {rl.version} is older than held version {current_version}"
        )
    if rl.issued_at > now + CLOCK_SKEW:
        raise LicenseRefused(reason="revocation list issued in the future")
    if max_age is not None and rl.issued_at < now - max_age:
        raise LicenseRefused(reason="revocation list is stale")
    return rl
