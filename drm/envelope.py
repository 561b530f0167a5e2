"""Signed envelopes: canonical-JSON payloads signed by the store's issuer key.

One envelope format serves licenses, revocation lists and bundle manifests. The algorithms
are pinned by the verifier (Ed25519, plus ML-DSA-65 when present or required); the token
never chooses them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from drm._canonical import FormatError, b64d, b64e, dumps, exact_keys, field, loads
from drm.keys import MAX_CERT_BYTES, Issuer, cert_from_bytes, cert_mldsa_key, verify_cert
from edgemart.core.errors import LicenseRefused

MAX_ENVELOPE_BYTES = 64 * 1024
SIG_ED25519 = "Ed25519"
SIG_MLDSA65 = "ML-DSA-65"
MLDSA65_SIG_LEN = 3309


def signed_message(typ: str, payload: bytes) -> bytes:
    """The exact bytes an envelope's signatures cover (docs/FORMAT.md §6): domain, type, payload."""
    return b"edgemart-envelope/1\x00" + typ.encode("ascii") + b"\x00" + payload


def sign_envelope(typ: str, payload: dict[str, Any], issuer: Issuer) -> bytes:
    """Sign ``payload`` as a ``typ`` envelope: Ed25519 always, ML-DSA-65 too when the issuer has the key."""
    body = dumps(payload)
    msg = signed_message(typ, body)
    sigs = {SIG_ED25519: b64e(issuer.key.sign(msg))}
    if issuer.pq_key is not None:
        sigs[SIG_MLDSA65] = b64e(issuer.pq_key.sign(msg))
    der = issuer.cert.public_bytes(serialization.Encoding.DER)
    return dumps({"payload": b64e(body), "sig": sigs, "typ": typ, "x5c": [b64e(der)]})


@dataclass(frozen=True)
class Verified:
    payload: dict[str, Any]
    issuer_cert: x509.Certificate
    pq_verified: bool


@dataclass(frozen=True)
class _Parsed:
    payload: dict[str, Any]
    body: bytes
    cert: x509.Certificate
    ed_sig: bytes
    pq_sig: bytes | None


def _parse(token: bytes, typ: str, max_bytes: int = MAX_ENVELOPE_BYTES) -> _Parsed:
    obj = loads(token, max_size=max_bytes, what=typ)
    exact_keys(obj, {"payload", "sig", "typ", "x5c"}, what=typ)
    if field(obj, "typ", str, what=typ) != typ:
        raise FormatError(f"{typ}: wrong token type")
    x5c = field(obj, "x5c", list, what=typ)
    if len(x5c) != 1:
        raise FormatError(f"{typ}: x5c must hold exactly the issuer certificate")
    der = b64d(x5c[0], what="x5c", max_len=MAX_CERT_BYTES)
    cert = cert_from_bytes(der)
    if (
        cert.public_bytes(serialization.Encoding.DER) != der
    ):  # PEM (or any other text) here is a second encoding
        raise FormatError(f"{typ}: x5c must hold the certificate's DER bytes")
    # The algorithm set is pinned here, never read from the token: unknown names are refused.
    sigs = exact_keys(
        field(obj, "sig", dict, what=typ), {SIG_ED25519, SIG_MLDSA65}, what="sig", required={SIG_ED25519}
    )
    ed_sig = b64d(sigs[SIG_ED25519], what="Ed25519 signature", max_len=64)
    if len(ed_sig) != 64:
        raise FormatError(f"{typ}: Ed25519 signature must be 64 bytes")
    pq_sig = None
    if SIG_MLDSA65 in sigs:
        pq_sig = b64d(sigs[SIG_MLDSA65], what="ML-DSA signature", max_len=MLDSA65_SIG_LEN)
        if len(pq_sig) != MLDSA65_SIG_LEN:
            raise FormatError(f"{typ}: ML-DSA-65 signature must be {MLDSA65_SIG_LEN} bytes")
    body = b64d(field(obj, "payload", str, what=typ), what="payload", max_len=max_bytes)
    payload = loads(body, max_size=max_bytes, what=f"{typ} payload")
    if not isinstance(payload, dict):
        raise FormatError(f"{typ}: payload must be an object")
    return _Parsed(payload, body, cert, ed_sig, pq_sig)


def parse_envelope(
    token: bytes, typ: str, *, max_bytes: int = MAX_ENVELOPE_BYTES
) -> tuple[dict[str, Any], bytes, x509.Certificate]:
    """Structural parse (no trust decision): payload dict, payload bytes, issuer certificate."""
    parsed = _parse(token, typ, max_bytes)
    return parsed.payload, parsed.body, parsed.cert


def verify_envelope(
    token: bytes,
    typ: str,
    *,
    root: x509.Certificate,
    now: int,
    purpose: Any,
    require_pq: bool = False,
    max_bytes: int = MAX_ENVELOPE_BYTES,
) -> Verified:
    """Verify an envelope against the pinned root; any failure is LicenseRefused with a reason."""
    try:
        parsed = _parse(token, typ, max_bytes)
    except FormatError as exc:
        raise LicenseRefused(reason=f"malformed {typ}: {exc.message}") from None
    cert = parsed.cert
    verify_cert(cert, root, now=now, purpose=purpose)
    pub = cert.public_key()
    if not isinstance(pub, ed25519.Ed25519PublicKey):
        raise LicenseRefused(reason="issuer key is not Ed25519")
    msg = signed_message(typ, parsed.body)
    try:
        pub.verify(parsed.ed_sig, msg)
    except InvalidSignature:
        raise LicenseRefused(reason=f"{typ}: Ed25519 signature invalid") from None
    try:
        pq_key = cert_mldsa_key(cert)
    except FormatError as exc:
        raise LicenseRefused(reason=f"{typ}: issuer certificate: {exc.message}") from None
    if pq_key is None:
        if parsed.pq_sig is not None or require_pq:
            raise LicenseRefused(
                reason=f"{typ}: ML-DSA-65 co-signature present or required but the issuer has no ML-DSA key"
            )
        return Verified(parsed.payload, cert, False)
    # The issuer has a PQ key, so a token without its co-signature was stripped.
    if parsed.pq_sig is None:
        raise LicenseRefused(reason=f"{typ}: ML-DSA-65 co-signature stripped")
    try:
        pq_key.verify(parsed.pq_sig, msg)
    except InvalidSignature:
        raise LicenseRefused(reason=f"{typ}: ML-DSA-65 co-signature invalid") from None
    return Verified(parsed.payload, cert, True)
