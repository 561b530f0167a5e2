"""Store-signed metering objects: the offline budget grant a device runs on between check-ins, and the seat
activation that lets one device run a fleet license. Both are envelopes (docs/FORMAT.md §18) bound to one
device and one license; the device enforces them, the store counts them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from drm._canonical import FormatError, exact_keys, field
from drm.envelope import parse_envelope, sign_envelope, verify_envelope
from drm.keys import EKU_LICENSE_ISSUER, Issuer
from edgemart.core.errors import LicenseRefused

BUDGET_TYP = "edgemart-budget/1"
ACTIVATION_TYP = "edgemart-activation/1"
SEAT_ENTRY_PREFIX = "seat:"
MAX_METERING_BYTES = 16 * 1024
CLOCK_SKEW = 300
_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}\Z")
_KEY_ID = re.compile(r"^[0-9a-f]{32}\Z")
_MAX_INT = 2**53 - 1


def _int(obj: dict[str, Any], name: str, what: str, lo: int = 0) -> int:
    value = field(obj, name, int, what=what)
    if not lo <= value <= _MAX_INT:
        raise FormatError(f"{what}: {name} out of range")
    return int(value)


def _ids(obj: dict[str, Any], what: str) -> tuple[str, str]:
    device_id = field(obj, "device_id", str, what=what)
    license_id = field(obj, "license_id", str, what=what)
    if not _KEY_ID.match(device_id):
        raise FormatError(f"{what}: device_id must be a 32-hex key id")
    if not _ID.match(license_id):
        raise FormatError(f"{what}: license_id has invalid characters or length")
    return device_id, license_id


@dataclass(frozen=True)
class BudgetGrant:
    """Until ``not_after``, the device may raise the license's run counter up to ``runs_until``; granted when
    the store held ``seq`` records of the device's usage log (a log shorter than that is a restored one)."""

    device_id: str
    license_id: str
    runs_until: int
    not_after: int
    issued_at: int
    seq: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "issued_at": self.issued_at,
            "license_id": self.license_id,
            "not_after": self.not_after,
            "runs_until": self.runs_until,
            "seq": self.seq,
            "v": 1,
        }

    @classmethod
    def from_dict(cls, obj: Any) -> BudgetGrant:
        what = "budget grant"
        exact_keys(
            obj, {"device_id", "issued_at", "license_id", "not_after", "runs_until", "seq", "v"}, what=what
        )
        if field(obj, "v", int, what=what) != 1:
            raise FormatError("budget grant: unsupported version")
        device_id, license_id = _ids(obj, what)
        grant = cls(
            device_id,
            license_id,
            _int(obj, "runs_until", what),
            _int(obj, "not_after", what),
            _int(obj, "issued_at", what),
            _int(obj, "seq", what),
        )
        if grant.not_after <= grant.issued_at:
            raise FormatError("budget grant: empty validity window")
        return grant


def sign_budget_grant(issuer: Issuer, grant: BudgetGrant) -> bytes:
    BudgetGrant.from_dict(grant.to_dict())  # never sign what a verifier would refuse
    return sign_envelope(BUDGET_TYP, grant.to_dict(), issuer)


def verify_budget_grant(
    token: bytes, *, root: x509.Certificate, now: int, device_id: str, license_id: str
) -> BudgetGrant:
    """Verify a grant for this device and license. Expiry is the caller's run-time check (an expired grant
    still tells how far the counter was allowed to go); LicenseRefused (opaque, precise .reason) otherwise."""
    v = verify_envelope(
        token, BUDGET_TYP, root=root, now=now, purpose=EKU_LICENSE_ISSUER, max_bytes=MAX_METERING_BYTES
    )
    try:
        grant = BudgetGrant.from_dict(v.payload)
    except FormatError as exc:
        raise LicenseRefused(reason=f"malformed budget grant: {exc.message}") from None
    if grant.device_id != device_id:
        raise LicenseRefused(reason="budget grant is for another device")
    if grant.license_id != license_id:
        raise LicenseRefused(reason="budget grant is for another license")
    if grant.issued_at > now + CLOCK_SKEW:
        raise LicenseRefused(reason="budget grant issued in the future")
    return grant


@dataclass(frozen=True)
class Activation:
    """Seat ``seat`` (1..seats) of fleet license ``license_id`` is held by ``device_id``."""

    device_id: str
    license_id: str
    fleet_key_id: str
    seat: int
    issued_at: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "fleet_key_id": self.fleet_key_id,
            "issued_at": self.issued_at,
            "license_id": self.license_id,
            "seat": self.seat,
            "v": 1,
        }

    @classmethod
    def from_dict(cls, obj: Any) -> Activation:
        what = "activation"
        exact_keys(obj, {"device_id", "fleet_key_id", "issued_at", "license_id", "seat", "v"}, what=what)
        if field(obj, "v", int, what=what) != 1:
            raise FormatError("activation: unsupported version")
        device_id, license_id = _ids(obj, what)
        fleet = field(obj, "fleet_key_id", str, what=what)
        if not _KEY_ID.match(fleet):
            raise FormatError("activation: fleet_key_id must be a 32-hex key id")
        return cls(device_id, license_id, fleet, _int(obj, "seat", what, lo=1), _int(obj, "issued_at", what))


def sign_activation(issuer: Issuer, activation: Activation) -> bytes:
    Activation.from_dict(activation.to_dict())
    return sign_envelope(ACTIVATION_TYP, activation.to_dict(), issuer)


def verify_activation(
    token: bytes,
    *,
    root: x509.Certificate,
    now: int,
    device_id: str,
    license_id: str,
    fleet_key_id: str,
    seats: int | None,
) -> Activation:
    """Verify that this device holds a seat of this fleet license (seat ≤ the license's signed seat count)."""
    v = verify_envelope(
        token, ACTIVATION_TYP, root=root, now=now, purpose=EKU_LICENSE_ISSUER, max_bytes=MAX_METERING_BYTES
    )
    try:
        act = Activation.from_dict(v.payload)
    except FormatError as exc:
        raise LicenseRefused(reason=f"malformed activation: {exc.message}") from None
    if act.device_id != device_id:
        raise LicenseRefused(reason="activation is for another device")
    if act.license_id != license_id or act.fleet_key_id != fleet_key_id:
        raise LicenseRefused(reason="activation is for another license")
    if seats is not None and act.seat > seats:
        raise LicenseRefused(reason=f"activation names seat {act.seat} of a {seats}-seat license")
    if act.issued_at > now + CLOCK_SKEW:
        raise LicenseRefused(reason="activation issued in the future")
    return act


def seat_revocation_entry(license_id: str, device_id: str) -> str:
    """The revocation-list entry that revokes one device's seat activation of a fleet license (docs/FORMAT.md
    §18.2): ``seat:<license_id>:<device_id>``. The license stays valid for every other device."""
    entry = f"{SEAT_ENTRY_PREFIX}{license_id}:{device_id}"
    if not _KEY_ID.match(device_id) or not _ID.match(license_id) or len(entry) > 128:
        raise FormatError(
            "a seat revocation entry needs a license id and a 32-hex device id (at most 128 characters)"
        )
    return entry


def parse_activation(token: bytes) -> Activation:
    """Structural parse (no trust decision), for ids and display."""
    payload, _, _ = parse_envelope(token, ACTIVATION_TYP)
    return Activation.from_dict(payload)
