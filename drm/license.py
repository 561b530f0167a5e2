"""License tokens: signed claims binding a build to a device (or fleet key), a time window,
a run cap and the build's content key wrapped to the device with HPKE (RFC 9180)."""

from __future__ import annotations

import math
import re
import secrets
from dataclasses import asdict, dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import x25519

from drm._canonical import FormatError, b64d, b64e, dumps, exact_keys, field
from drm.envelope import sign_envelope, verify_envelope
from drm.keys import EKU_LICENSE_ISSUER, DeviceKeys, Issuer, KemKeys, key_id, mlkem768_public_key
from edgemart.core.errors import LicenseRefused, UsageError

LICENSE_TYP = "edgemart-license/1"
KINDS = ("eval", "production")
SUITE_X25519 = "DHKEM-X25519-HKDF-SHA256/HKDF-SHA256/AES-256-GCM"
SUITE_HYBRID = "MLKEM768-X25519/HKDF-SHA256/AES-256-GCM"
_SUITES = {
    SUITE_X25519: hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
    SUITE_HYBRID: hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
}
# Length of the HPKE single-shot output (enc || AES-256-GCM(cek) || tag) per suite.
_WRAPPED_LEN = {SUITE_X25519: 32 + 32 + 16, SUITE_HYBRID: 1088 + 32 + 32 + 16}
_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}\Z")
_KEY_ID = re.compile(r"^[0-9a-f]{32}\Z")
_HASH = re.compile(r"^sha256:[0-9a-f]{64}\Z")
# Claims a license may leave out: absent from licenses issued before they existed (those still verify), and
# then absent from the canonical bytes too. docs/FORMAT.md §7.
OPTIONAL_CLAIMS = ("version", "offline", "seats")
MAX_VERSION = 2**31 - 1
MAX_OFFLINE_RUNS = 10_000_000
MAX_OFFLINE_HOURS = 24 * 366
MAX_SEATS = 10_000_000


@dataclass(frozen=True)
class LicenseClaims:
    license_id: str
    kind: str
    listing: str
    build_hash: str
    target: str
    device_id: str | None
    fleet_key_id: str | None
    not_before: int
    not_after: int | None
    max_runs: int | None
    issued_at: int
    issuer_kid: str
    wrapped_cek: dict[str, str]
    # The listing version the build belongs to (absent from licenses issued before listings had versions).
    version: int | None = None
    # Eval licenses from a store: the offline budget {"runs": n, "hours": h}. Past it the device must check in
    # (upload its usage log) and run on the budget grant the store signs back (drm.metering).
    offline: dict[str, int] | None = None
    # Fleet-key production licenses: how many devices may activate a seat (drm.metering activations).
    seats: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in OPTIONAL_CLAIMS:
            if d[name] is None:
                del d[name]
        d["v"] = 1
        return d

    @classmethod
    def from_dict(cls, obj: Any) -> LicenseClaims:
        what = "license claims"
        allowed = set(cls.__dataclass_fields__) | {"v"}
        exact_keys(obj, allowed, what=what, required=allowed - set(OPTIONAL_CLAIMS))
        if field(obj, "v", int, what=what) != 1:
            raise FormatError("license claims: unsupported version")
        for name in ("license_id", "listing", "issuer_kid", "target"):
            if not _ID.match(field(obj, name, str, what=what)):
                raise FormatError(f"license claims: {name} has invalid characters or length")
        if field(obj, "kind", str, what=what) not in KINDS:
            raise FormatError("license claims: kind must be eval or production")
        if not _HASH.match(field(obj, "build_hash", str, what=what)):
            raise FormatError("license claims: build_hash must be sha256:<hex>")
        dev = field(obj, "device_id", (str, type(None)), what=what)
        fleet = field(obj, "fleet_key_id", (str, type(None)), what=what)
        if (dev is None) == (fleet is None):
            raise FormatError("license claims: exactly one of device_id and fleet_key_id")
        if not _KEY_ID.match(dev if dev is not None else fleet):
            raise FormatError("license claims: device_id / fleet_key_id must be a 32-hex key id")
        for name in ("not_before", "issued_at"):
            if field(obj, name, int, what=what) < 0:
                raise FormatError(f"license claims: {name} negative")
        na = field(obj, "not_after", (int, type(None)), what=what)
        if na is not None and na <= obj["not_before"]:
            raise FormatError("license claims: empty validity window")
        if na is None and obj["kind"] == "eval":
            raise FormatError("license claims: an eval license must expire")
        mr = field(obj, "max_runs", (int, type(None)), what=what)
        if mr is not None and mr < 0:
            raise FormatError("license claims: max_runs negative")
        wrapped = exact_keys(field(obj, "wrapped_cek", dict, what=what), {"enc", "suite"}, what="wrapped_cek")
        suite = field(wrapped, "suite", str, what="wrapped_cek")
        if suite not in _SUITES:
            raise FormatError("license claims: key-wrapping suite not allowed")
        enc = b64d(field(wrapped, "enc", str, what="wrapped_cek"), what="wrapped_cek.enc", max_len=2048)
        if len(enc) != _WRAPPED_LEN[suite]:
            raise FormatError("license claims: wrapped_cek.enc has the wrong length for its suite")
        if "version" in obj and not 1 <= field(obj, "version", int, what=what) <= MAX_VERSION:
            raise FormatError(f"license claims: version must be between 1 and {MAX_VERSION}")
        if "offline" in obj:
            if obj["kind"] != "eval":
                raise FormatError("license claims: only an eval license carries an offline budget")
            budget = exact_keys(field(obj, "offline", dict, what=what), {"hours", "runs"}, what="offline")
            if not 1 <= field(budget, "runs", int, what="offline") <= MAX_OFFLINE_RUNS:
                raise FormatError(f"license claims: offline.runs must be between 1 and {MAX_OFFLINE_RUNS}")
            if not 1 <= field(budget, "hours", int, what="offline") <= MAX_OFFLINE_HOURS:
                raise FormatError(f"license claims: offline.hours must be between 1 and {MAX_OFFLINE_HOURS}")
        if "seats" in obj:
            if obj["kind"] != "production" or fleet is None:
                raise FormatError("license claims: only a fleet-key production license carries seats")
            if not 1 <= field(obj, "seats", int, what=what) <= MAX_SEATS:
                raise FormatError(f"license claims: seats must be between 1 and {MAX_SEATS}")
        return cls(**{k: obj[k] for k in cls.__dataclass_fields__ if k in obj})

    @property
    def binding_id(self) -> str:
        return self.device_id or self.fleet_key_id or ""


def _info(license_id: str, build_hash: str, binding_id: str) -> bytes:
    return b"edgemart-cek/1\x00" + dumps([license_id, build_hash, binding_id])


def wrap_cek(
    cek: bytes, recipient: KemKeys, *, license_id: str, build_hash: str, binding_id: str
) -> dict[str, str]:
    """HPKE-seal the content key to the recipient; the hybrid PQ suite when it has an ML-KEM key."""
    if recipient.mlkem768 is not None and recipient.x25519 is not None:
        suite_id = SUITE_HYBRID
        pub: Any = hpke.MLKEM768X25519PublicKey(
            mlkem768_public_key(recipient.mlkem768),
            x25519.X25519PublicKey.from_public_bytes(recipient.x25519),
        )
    elif recipient.x25519 is not None:
        suite_id, pub = SUITE_X25519, x25519.X25519PublicKey.from_public_bytes(recipient.x25519)
    else:
        raise UsageError("recipient has no key-agreement key")
    enc = _SUITES[suite_id].encrypt(bytes(cek), pub, info=_info(license_id, build_hash, binding_id))
    return {"enc": b64e(enc), "suite": suite_id}


def unwrap_cek(claims: LicenseClaims, keys: DeviceKeys | x25519.X25519PrivateKey) -> bytes:
    """Recover the content key with the device's (or fleet's) private key; opaque refusal on failure."""
    suite_id = claims.wrapped_cek.get("suite")
    if suite_id not in _SUITES:
        raise LicenseRefused(reason="license uses a key-wrapping suite that is not allowed")
    try:
        enc = b64d(claims.wrapped_cek.get("enc"), what="wrapped_cek", max_len=2048)
    except FormatError:
        raise LicenseRefused(reason="wrapped content key is malformed") from None
    priv: Any
    if isinstance(keys, DeviceKeys):
        if suite_id == SUITE_HYBRID:
            if keys.pq_kem is None:
                raise LicenseRefused(reason="license uses the hybrid suite but the device has no ML-KEM key")
            priv = hpke.MLKEM768X25519PrivateKey(keys.pq_kem, keys.kem)
        else:
            priv = keys.kem
    else:
        if suite_id != SUITE_X25519:
            raise LicenseRefused(reason="fleet keys use the X25519 suite")
        priv = keys
    try:
        cek = _SUITES[suite_id].decrypt(
            enc, priv, info=_info(claims.license_id, claims.build_hash, claims.binding_id)
        )
    except (InvalidTag, ValueError):
        raise LicenseRefused(
            reason="content key unwrap failed (wrong device key or tampered binding)"
        ) from None
    if len(cek) != 32:
        raise LicenseRefused(reason="unwrapped content key has the wrong length")
    return cek


def new_license_id() -> str:
    return "lic_" + secrets.token_hex(12)


def issue_license(
    *,
    issuer: Issuer,
    cek: bytes,
    recipient: KemKeys,
    kind: str,
    listing: str,
    build_hash: str,
    target: str,
    now: int,
    days: float | None,
    max_runs: int | None,
    device_id: str | None = None,
    fleet_key_id: str | None = None,
    license_id: str | None = None,
    version: int | None = None,
    offline: dict[str, int] | None = None,
    seats: int | None = None,
) -> bytes:
    """Issue a signed license token (bytes of canonical JSON); ``version`` names the listing version,
    ``offline`` ({"runs", "hours"}) makes an eval license metered at the store, ``seats`` counts a fleet
    license's activations."""
    lid = license_id or new_license_id()
    binding = device_id or fleet_key_id or ""
    claims = LicenseClaims(
        license_id=lid,
        kind=kind,
        listing=listing,
        build_hash=build_hash,
        target=target,
        device_id=device_id,
        fleet_key_id=fleet_key_id,
        not_before=now - 60,
        not_after=None if days is None else now + int(days * 86400),
        max_runs=max_runs,
        issued_at=now,
        issuer_kid=issuer.kid,
        wrapped_cek=wrap_cek(cek, recipient, license_id=lid, build_hash=build_hash, binding_id=binding),
        version=version,
        offline=offline,
        seats=seats,
    )
    LicenseClaims.from_dict(claims.to_dict())  # the issuer refuses to sign what a verifier would reject
    return sign_envelope(LICENSE_TYP, claims.to_dict(), issuer)


@dataclass(frozen=True)
class VerifiedLicense:
    claims: LicenseClaims
    issuer_cert: x509.Certificate
    pq_verified: bool


def verify_license(
    token: bytes,
    *,
    root: x509.Certificate,
    now: int,
    device_id: str | None = None,
    fleet_key_ids: frozenset[str] = frozenset(),
    build_hash: str | None = None,
    revoked: frozenset[str] = frozenset(),
    require_pq: bool = False,
    target: str | None = None,
) -> VerifiedLicense:
    """Verify signature chain and claims at ``now``. Raises LicenseRefused (opaque message, precise .reason).

    ``build_hash`` and ``target`` are the container header's, when the verifier has the container."""
    verified = verify_envelope(
        token, LICENSE_TYP, root=root, now=now, purpose=EKU_LICENSE_ISSUER, require_pq=require_pq
    )
    try:
        claims = LicenseClaims.from_dict(verified.payload)
    except FormatError as exc:
        raise LicenseRefused(reason=f"malformed claims: {exc.message}") from None
    if claims.issuer_kid != key_id(verified.issuer_cert.public_key()):  # type: ignore[arg-type]
        raise LicenseRefused(reason="issuer_kid does not match the signing certificate")
    check_claims(
        claims,
        now=now,
        device_id=device_id,
        fleet_key_ids=fleet_key_ids,
        build_hash=build_hash,
        target=target,
        revoked=revoked,
    )
    return VerifiedLicense(claims, verified.issuer_cert, verified.pq_verified)


def check_claims(
    claims: LicenseClaims,
    *,
    now: int,
    device_id: str | None = None,
    fleet_key_ids: frozenset[str] = frozenset(),
    build_hash: str | None = None,
    target: str | None = None,
    revoked: frozenset[str] = frozenset(),
) -> None:
    """The checks of verify_license that depend on the use rather than on the token: revocation, binding,
    build, target and validity window. A verifier that cached a token's verification (see chain_window) runs these
    on every use. Raises LicenseRefused (opaque message, precise .reason)."""
    if claims.license_id in revoked:
        raise LicenseRefused(reason=f"license {claims.license_id} is revoked")
    if claims.device_id is not None and claims.device_id != device_id:
        raise LicenseRefused(reason="license is bound to another device")
    if claims.fleet_key_id is not None and claims.fleet_key_id not in fleet_key_ids:
        raise LicenseRefused(reason="license is bound to a fleet key this device does not hold")
    if build_hash is not None and claims.build_hash != build_hash:
        raise LicenseRefused(reason="license is for another build")
    if target is not None and claims.target != target:
        raise LicenseRefused(reason=f"license is for target {claims.target}, the container for {target}")
    if now < claims.not_before:
        raise LicenseRefused(reason="license is not yet valid")
    if claims.not_after is not None and now >= claims.not_after:
        raise LicenseRefused(reason="license has expired")


def chain_window(verified: VerifiedLicense, root: x509.Certificate) -> tuple[int, int]:
    """The whole seconds [first, last] at which the time-dependent part of verifying the token's signatures
    (the validity periods of its certificate and of the root) holds. Everything else verify_license checked
    about the token's signatures depends only on the token bytes and the root, so a verifier may keep the
    result for (token hash, root) and, on a later use at ``now``, require first <= now <= last and run
    check_claims instead of verifying again."""
    certs = (verified.issuer_cert, root)
    first = max(math.ceil(c.not_valid_before_utc.timestamp()) for c in certs)
    last = min(math.floor(c.not_valid_after_utc.timestamp()) for c in certs)
    return first, last
