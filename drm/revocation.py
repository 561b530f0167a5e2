"""Signed, versioned revocation lists. A verifier never accepts a version older than the one it holds."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509

from drm._canonical import FormatError, exact_keys, field
from drm.envelope import sign_envelope, verify_envelope
from drm.errors import LicenseRefused
from drm.keys import EKU_LICENSE_ISSUER, Issuer

REVOCATION_TYP = "edgemart-revocation/1"
MAX_REVOKED = 100_000


@dataclass(frozen=True)
class RevocationList:
    version: int
    issued_at: int
    revoked: frozenset[str]


def sign_revocation_list(issuer: Issuer, *, version: int, issued_at: int, revoked: list[str]) -> bytes:
    return sign_envelope(
        REVOCATION_TYP, {"issued_at": issued_at, "revoked": sorted(set(revoked)), "v": 1, "version": version}, issuer
    )


def verify_revocation_list(
    token: bytes, *, root: x509.Certificate, now: int, current_version: int = 0
) -> RevocationList:
    """Verify and parse; refuse a list older than ``current_version`` (a downgrade)."""
    v = verify_envelope(token, REVOCATION_TYP, root=root, now=now, purpose=EKU_LICENSE_ISSUER)
    try:
        obj = exact_keys(v.payload, {"issued_at", "revoked", "v", "version"}, what="revocation list")
        if field(obj, "v", int, what="revocation list") != 1:
            raise FormatError("revocation list: unsupported version")
        version = field(obj, "version", int, what="revocation list")
        issued = field(obj, "issued_at", int, what="revocation list")
        revoked = field(obj, "revoked", list, what="revocation list")
        if len(revoked) > MAX_REVOKED or not all(isinstance(r, str) and len(r) <= 128 for r in revoked):
            raise FormatError("revocation list: bad entries")
    except FormatError as exc:
        raise LicenseRefused(reason=exc.message) from None
    if version < current_version:
        raise LicenseRefused(reason=f"revocation list version {version} is older than held version {current_version}")
    if issued > now + 300:
        raise LicenseRefused(reason="revocation list issued in the future")
    return RevocationList(version, issued, frozenset(revoked))
