"""Signed envelopes: canonical-JSON payloads signed by the store's issuer key.

One envelope format serves licenses, revocation lists and bundle manifests. The algorithms
are pinned by the verifier (Ed25519, plus ML-DSA-65 when present or required); the token
never chooses them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from drm._canonical import FormatError, b64d, b64e, dumps, exact_keys, field, loads
from drm.errors import LicenseRefused
from drm.keys import Issuer, cert_from_bytes, cert_mldsa_key, verify_cert

MAX_ENVELOPE_BYTES = 64 * 1024
SIG_ED25519 = "Ed25519"
SIG_MLDSA65 = "ML-DSA-65"


def _message(typ: str, payload: bytes) -> bytes:
    return b"edgemart-envelope/1\x00" + typ.encode("ascii") + b"\x00" + payload


def sign_envelope(typ: str, payload: dict[str, Any], issuer: Issuer) -> bytes:
    body = dumps(payload)
    msg = _message(typ, body)
    sigs = {SIG_ED25519: b64e(issuer.key.sign(msg))}
    if issuer.pq_key is not None:
        sigs[SIG_MLDSA65] = b64e(issuer.pq_key.sign(msg))
    from cryptography.hazmat.primitives import serialization

    der = issuer.cert.public_bytes(serialization.Encoding.DER)
    return dumps({"payload": b64e(body), "sig": sigs, "typ": typ, "x5c": [b64e(der)]})


@dataclass(frozen=True)
class Verified:
    payload: dict[str, Any]
    issuer_cert: x509.Certificate
    pq_verified: bool


def parse_envelope(token: bytes, typ: str) -> tuple[dict[str, Any], bytes, x509.Certificate]:
    """Structural parse (no trust decision): payload dict, payload bytes, issuer certificate."""
    obj = loads(token, max_size=MAX_ENVELOPE_BYTES, what=typ)
    exact_keys(obj, {"payload", "sig", "typ", "x5c"}, what=typ)
    if field(obj, "typ", str, what=typ) != typ:
        raise FormatError(f"{typ}: wrong token type")
    x5c = field(obj, "x5c", list, what=typ)
    if len(x5c) != 1:
        raise FormatError(f"{typ}: x5c must hold exactly the issuer certificate")
    cert = cert_from_bytes(b64d(x5c[0], what="x5c", max_len=16 * 1024))
    body = b64d(field(obj, "payload", str, what=typ), what="payload", max_len=MAX_ENVELOPE_BYTES)
    payload = loads(body, max_size=MAX_ENVELOPE_BYTES, what=f"{typ} payload")
    if not isinstance(payload, dict):
        raise FormatError(f"{typ}: payload must be an object")
    return payload, body, cert


def verify_envelope(
    token: bytes, typ: str, *, root: x509.Certificate, now: int, purpose: Any, require_pq: bool = False
) -> Verified:
    """Verify an envelope against the pinned root; any failure is LicenseRefused with a reason."""
    try:
        payload, body, cert = parse_envelope(token, typ)
        obj = loads(token, max_size=MAX_ENVELOPE_BYTES, what=typ)
        sigs = exact_keys(field(obj, "sig", dict, what=typ), {SIG_ED25519, SIG_MLDSA65}, what="sig", required={SIG_ED25519})
        ed_sig = b64d(sigs[SIG_ED25519], what="Ed25519 signature", max_len=64)
        pq_sig = b64d(sigs[SIG_MLDSA65], what="ML-DSA signature", max_len=4096) if SIG_MLDSA65 in sigs else None
    except FormatError as exc:
        raise LicenseRefused(reason=f"malformed {typ}: {exc.message}") from None
    verify_cert(cert, root, now=now, purpose=purpose)
    pub = cert.public_key()
    if not isinstance(pub, ed25519.Ed25519PublicKey):
        raise LicenseRefused(reason="issuer key is not Ed25519")
    msg = _message(typ, body)
    try:
        pub.verify(ed_sig, msg)
    except InvalidSignature:
        raise LicenseRefused(reason=f"{typ}: Ed25519 signature invalid") from None
    pq_key = cert_mldsa_key(cert)
    pq_ok = False
    if pq_sig is not None or require_pq:
        if pq_sig is None or pq_key is None:
            raise LicenseRefused(reason=f"{typ}: ML-DSA-65 co-signature required but absent")
        try:
            pq_key.verify(pq_sig, msg)
        except InvalidSignature:
            raise LicenseRefused(reason=f"{typ}: ML-DSA-65 co-signature invalid") from None
        pq_ok = True
    elif pq_key is not None:
        # The issuer has a PQ key, so a token without its co-signature was stripped.
        raise LicenseRefused(reason=f"{typ}: ML-DSA-65 co-signature stripped")
    return Verified(payload, cert, pq_ok)
