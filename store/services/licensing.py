# Why this is one module: eval and production license issuance share the seat locks, the version choice and the revocation list.
"""Device enrollment, evaluation and production licenses, build downloads, the signed revocation list.

Content keys are unwrapped from the KEK only to be HPKE-wrapped to a device inside a signed license."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlalchemy.orm import Session

import drm
from edgemart.core.errors import (
    ConflictError,
    ForbiddenError,
    LicenseRefused,
    NotFoundError,
    Refusal,
    UsageError,
)
from store.context import StoreContext
from store.db import lock_row
from store.models import Build, Device, License, Listing, Revocation, SeatActivation, User
from store.services.listings import get_version, get_visible
from store.services.metering import offline_budget

_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")
_DEVICE_ID = re.compile(r"^[0-9a-f]{32}\Z")
MAX_DEVICE_CERTS = 1000
LICENSE_BUYERS = ("buyer", "builder", "admin")
PRODUCTION_BUYERS = ("builder", "admin")
MAX_FLEET_SEATS = 10_000_000


def _pem_text(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{what} must be a PEM string")
    if len(value) > 32 * 1024:
        raise UsageError(f"{what} is too large")
    return value.encode("ascii", "replace")


# ------------------------------------------------------------------------------------------ devices


def enroll(
    ctx: StoreContext, session: Session, user: User, csr: Any, name: Any = None
) -> tuple[Device, bool]:
    """Certify a device from its CSR; it belongs to ``user``. Re-enrolling your own device renews its cert."""
    csr_pem = _pem_text(csr, "csr")
    if name is not None and (not isinstance(name, str) or len(name) > 128):
        raise UsageError("name must be a string of at most 128 characters")
    cert = ctx.vault.authority().issue_device_cert(csr_pem, now=ctx.now())
    device_id = drm.cert_device_id(cert)
    pem = drm.cert_to_pem(cert).decode()
    device = session.get(Device, device_id)
    if device is not None and device.owner_id != user.id:
        raise ConflictError("this device is enrolled by another account")
    created = device is None
    if device is None:
        device = Device(
            device_id=device_id, owner_id=user.id, name=name or "", cert_pem=pem, enrolled_at=ctx.now()
        )
        session.add(device)
    else:
        device.cert_pem = pem
        device.name = name or device.name
    session.commit()
    return device, created


def get_own_device(session: Session, user: User, device_id: Any) -> Device:
    if not isinstance(device_id, str) or not _DEVICE_ID.match(device_id):
        raise UsageError("device_id must be 32 lowercase hex characters (from `edgemart device init`)")
    device = session.get(Device, device_id)
    if device is None or device.owner_id != user.id:
        raise NotFoundError(f"no enrolled device {device_id} on your account (run `edgemart device enroll`)")
    return device


def device_to_dict(device: Device) -> dict[str, Any]:
    return {"device_id": device.device_id, "name": device.name, "enrolled_at": device.enrolled_at}


# ------------------------------------------------------------------------------------------ licenses


def _licensable_build(listing: Listing, target: Any, version: Any = None) -> Build:
    """The build a license is issued for: of the pinned listed ``version``, or else of the newest listed
    version that has a finished build for ``target`` (older versions stay licensable when pinned)."""
    if not isinstance(target, str) or not target:
        raise UsageError("target is required")
    if version is not None:
        versions = [get_version(listing, version, listed_only=True)]
    else:
        versions = [v for v in reversed(listing.versions) if v.status == "listed"]
    builds = [b for v in versions for b in v.builds if b.target == target]
    for build in builds:
        if build.status == "done" and build.wrapped_cek is not None and build.build_hash is not None:
            return build
    where = f"{listing.id} version {versions[0].number}" if version is not None else listing.id
    if builds:
        raise ConflictError(f"the {target} build of {where} is {builds[0].status}, not ready")
    ready = sorted({b.target for v in versions for b in v.builds if b.status == "done"})
    raise NotFoundError(
        f"listing {where} has no {target[:40]} build; "
        + (f"its targets: {', '.join(ready)}" if ready else "it has no finished build yet")
    )


def _issue(
    ctx: StoreContext,
    build: Build,
    listing: Listing,
    *,
    buyer: User,
    kind: str,
    recipient: drm.KemKeys,
    days: float | None,
    max_runs: int | None,
    device_id: str | None = None,
    fleet_key_id: str | None = None,
    seats: int = 1,
    offline: dict[str, int] | None = None,
) -> License:
    """Sign a license and return its (unsaved) row; token and row share one clock reading."""
    assert build.build_hash is not None and build.wrapped_cek is not None
    license_id = drm.new_license_id()
    now = ctx.now()
    cek = ctx.vault.unwrap_cek(build.wrapped_cek, build.build_hash)
    token = drm.issue_license(
        issuer=ctx.vault.issuer(),
        cek=cek,
        recipient=recipient,
        kind=kind,
        listing=listing.id,
        build_hash=build.build_hash,
        target=build.target,
        version=build.version.number,
        now=now,
        days=days,
        max_runs=max_runs,
        device_id=device_id,
        fleet_key_id=fleet_key_id,
        license_id=license_id,
        offline=offline,
        seats=seats if fleet_key_id is not None else None,
    )
    return License(
        license_id=license_id,
        listing_id=listing.id,
        build_id=build.id,
        version=build.version.number,
        device_id=device_id,
        fleet_key_id=fleet_key_id,
        buyer_id=buyer.id,
        kind=kind,
        seats=seats,
        issued_at=now,
        not_after=None if days is None else now + int(days * 86400),
        max_runs=max_runs,
        token=token,
    )


def eval_license(
    ctx: StoreContext,
    session: Session,
    user: User,
    listing_id: str,
    device_id: Any,
    target: Any,
    version: Any = None,
) -> tuple[License, bool]:
    """The evaluation license for (buyer, device, build): issued once, the same one on every re-request.
    The build is the newest listed version's unless ``version`` pins one.
    A seller may take them for their own listings, to try their builds on their own boards."""
    if user.role not in (*LICENSE_BUYERS, "seller"):
        raise ForbiddenError(f"a {user.role} account cannot take evaluation licenses")
    listing = get_visible(session, listing_id, user)
    if user.role == "seller" and listing.seller_id != user.id:
        raise ForbiddenError("a seller account takes evaluation licenses only for its own listings")
    if listing.status != "listed":
        raise ConflictError(f"listing {listing.id} is {listing.status}; it cannot be licensed")
    device = get_own_device(session, user, device_id)
    build = _licensable_build(listing, target, version)
    existing = _existing_eval(session, user, device, build)
    if existing is None:
        # Serialize this buyer's eval requests: the device count below and the insert must not interleave
        # with another request's (N concurrent requests for the last seat issue exactly one license).
        lock_row(session, User, user.id)
        existing = _existing_eval(session, user, device, build)
    if existing is not None:
        session.rollback()  # release the lock before answering
        if existing.revoked_at is not None:
            raise Refusal(f"your evaluation license {existing.license_id} for this device was revoked")
        return existing, False
    devices = (
        session.scalar(
            select(func.count(func.distinct(License.device_id))).where(
                License.buyer_id == user.id,
                License.listing_id == listing.id,
                License.kind == "eval",
                License.device_id != device.device_id,
            )
        )
        or 0
    )
    if devices >= listing.eval_device_limit:
        session.rollback()
        raise Refusal(
            f"evaluation limit reached: {listing.eval_device_limit} devices already hold evaluation licenses "
            f"for {listing.id}"
        )
    cert = drm.cert_from_bytes(device.cert_pem.encode())
    row = _issue(
        ctx,
        build,
        listing,
        buyer=user,
        kind="eval",
        recipient=drm.cert_kem_keys(cert),
        days=listing.eval_days,
        max_runs=listing.eval_runs,
        device_id=device.device_id,
        offline=offline_budget(ctx, session, listing),
    )
    session.add(row)
    try:
        session.commit()
    except DBIntegrityError:
        # A concurrent request issued it first: hand out that one, never a second counter.
        session.rollback()
        existing = _existing_eval(session, user, device, build)
        if existing is None:
            raise
        return existing, False
    return row, True


def _existing_eval(session: Session, user: User, device: Device, build: Build) -> License | None:
    return session.scalar(
        select(License).where(
            License.buyer_id == user.id,
            License.device_id == device.device_id,
            License.build_id == build.id,
            License.kind == "eval",
        )
    )


def _device_cert_for_production(pem: bytes, ctx: StoreContext) -> Any:
    """A fleet device's certificate: issued by this store, or self-signed by the device key (factory floor)."""
    try:
        cert = drm.cert_from_bytes(pem)
    except UsageError as exc:
        raise UsageError(f"device_certs: {exc.message}") from None
    root = ctx.vault.authority().cert
    if cert.issuer == root.subject:
        try:
            drm.verify_cert(cert, root, now=ctx.now(), purpose=drm.EKU_DEVICE)
        except LicenseRefused as exc:
            raise UsageError(f"device_certs: certificate not valid ({exc.reason})") from None
    else:
        pub = cert.public_key()
        if not isinstance(pub, ed25519.Ed25519PublicKey) or cert.issuer != cert.subject:
            raise UsageError("device_certs: not a store-issued or self-signed edgemart device certificate")
        try:
            pub.verify(cert.signature, cert.tbs_certificate_bytes)
        except InvalidSignature:
            raise UsageError("device_certs: self-signed certificate signature is invalid") from None
    if drm.cert_kem_keys(cert).x25519 is None:
        raise UsageError("device_certs: certificate lacks the device's key-agreement key")
    return cert


@dataclass(frozen=True)
class ProductionOrder:
    """A checked production-seat order: the build, and either device certificates or a fleet key + seats."""

    listing: Listing
    build: Build
    device_certs: list[Any]
    fleet_key: bytes | None  # raw X25519 public key
    seats: int


def check_production_order(
    ctx: StoreContext, session: Session, user: User, listing_id: str, body: dict[str, Any]
) -> ProductionOrder:
    """Every check of a production-seat order, issuing nothing: the web review shows a price only for an
    order that would be issued as it stands (a bad fleet key is refused here, before any price)."""
    if user.role not in PRODUCTION_BUYERS:
        raise ForbiddenError("only builder accounts can take production licenses")
    listing = get_visible(session, listing_id, user)
    if listing.status != "listed":
        raise ConflictError(f"listing {listing.id} is {listing.status}; it cannot be licensed")
    build = _licensable_build(listing, body.get("target"), body.get("version"))
    certs, fleet = body.get("device_certs"), body.get("fleet_key")
    if (certs is None) == (fleet is None):
        raise UsageError(
            "give exactly one of device_certs (list of PEM) and fleet_key (PEM X25519 public key)"
        )
    if certs is not None:
        if not isinstance(certs, list) or not certs or len(certs) > MAX_DEVICE_CERTS:
            raise UsageError(f"device_certs must be a list of 1 to {MAX_DEVICE_CERTS} PEM certificates")
        parsed = [_device_cert_for_production(_pem_text(c, "device_certs item"), ctx) for c in certs]
        seen: set[str] = set()
        for cert in parsed:
            device_id = drm.cert_device_id(cert)
            if device_id in seen:
                raise UsageError(f"device_certs: device {device_id} listed twice")
            seen.add(device_id)
        return ProductionOrder(listing, build, parsed, None, len(parsed))
    seats = body.get("seats")
    if not isinstance(seats, int) or isinstance(seats, bool) or not 1 <= seats <= MAX_FLEET_SEATS:
        raise UsageError(f"seats must be an integer between 1 and {MAX_FLEET_SEATS}")
    try:
        key = serialization.load_pem_public_key(_pem_text(fleet, "fleet_key"))
    except (ValueError, TypeError):
        raise UsageError(
            "fleet_key is not a PEM public key (make one with `edgemart bundle fleet-keygen`)"
        ) from None
    if not isinstance(key, x25519.X25519PublicKey):
        raise UsageError(
            "fleet_key must be an X25519 public key (make one with `edgemart bundle fleet-keygen`)"
        )
    return ProductionOrder(listing, build, [], key.public_bytes_raw(), seats)


def production_licenses(
    ctx: StoreContext, session: Session, user: User, listing_id: str, body: dict[str, Any]
) -> list[License]:
    """Production licenses for a firmware builder: one per device certificate, or one for a fleet key."""
    order = check_production_order(ctx, session, user, listing_id, body)
    listing, build = order.listing, order.build
    rows: list[License] = []
    lock_row(session, User, user.id)  # concurrent retries of one purchase must not issue twice
    for cert in order.device_certs:
        device_id = drm.cert_device_id(cert)
        existing = session.scalar(
            select(License).where(
                License.buyer_id == user.id,
                License.build_id == build.id,
                License.kind == "production",
                License.device_id == device_id,
                License.revoked_at.is_(None),
            )
        )
        if existing is not None:
            rows.append(existing)
            continue
        row = _issue(
            ctx,
            build,
            listing,
            buyer=user,
            kind="production",
            recipient=drm.cert_kem_keys(cert),
            days=None,
            max_runs=None,
            device_id=device_id,
        )
        session.add(row)
        rows.append(row)
    if order.fleet_key is not None:
        row = _issue(
            ctx,
            build,
            listing,
            buyer=user,
            kind="production",
            recipient=drm.KemKeys(order.fleet_key, None),
            days=None,
            max_runs=None,
            fleet_key_id=drm.key_id(order.fleet_key),
            seats=order.seats,
        )
        session.add(row)
        rows.append(row)
    session.commit()
    return rows


def license_to_dict(lic: License, *, with_token: bool) -> dict[str, Any]:
    build_hash = lic.build.build_hash or ""
    out: dict[str, Any] = {
        "license_id": lic.license_id,
        "kind": lic.kind,
        "listing": lic.listing_id,
        "version": lic.version,
        "target": lic.build.target,
        "build_hash": build_hash,
        "build_url": f"/api/v1/builds/{build_hash.split(':', 1)[-1]}",
        "device_id": lic.device_id,
        "fleet_key_id": lic.fleet_key_id,
        "seats": lic.seats,
        "issued_at": lic.issued_at,
        "not_after": lic.not_after,
        "max_runs": lic.max_runs,
        "revoked": lic.revoked_at is not None,
    }
    if with_token:
        out["license"] = lic.token.decode()
    return out


def visible_licenses(session: Session, user: User) -> list[License]:
    """A buyer's own licenses; a seller's licenses on their listings (no tokens); everything for an admin."""
    stmt = select(License).order_by(License.issued_at.desc())
    if user.role == "seller":
        stmt = stmt.join(Listing, Listing.id == License.listing_id).where(Listing.seller_id == user.id)
    elif user.role != "admin":
        stmt = stmt.where(License.buyer_id == user.id)
    return list(session.scalars(stmt.limit(1000)))


def get_license(session: Session, user: User, license_id: str) -> License:
    lic = session.get(License, license_id) if isinstance(license_id, str) and len(license_id) <= 64 else None
    if lic is None or not (
        user.role == "admin" or lic.buyer_id == user.id or lic.listing.seller_id == user.id
    ):
        raise NotFoundError(f"no license {str(license_id)[:64]!r}")
    return lic


# ------------------------------------------------------------------------------------------ builds


def build_for_download(session: Session, user: User, hex_digest: str) -> Build:
    """The sealed build, for the seller, an admin, or a holder of an unrevoked license for it."""
    if not _HEX64.match(hex_digest or ""):
        raise UsageError("build id must be the 64 hex characters of the build hash")
    build = session.scalar(
        select(Build).where(Build.build_hash == "sha256:" + hex_digest, Build.status == "done")
    )
    if build is None or build.blob_key is None:
        raise NotFoundError(f"no build {hex_digest}")
    if user.role == "admin" or build.listing.seller_id == user.id:
        return build
    held = session.scalar(
        select(func.count())
        .select_from(License)
        .where(License.build_id == build.id, License.buyer_id == user.id, License.revoked_at.is_(None))
    )
    if not held:
        raise ForbiddenError("you hold no license for this build (request an evaluation license first)")
    return build


# ------------------------------------------------------------------------------------------ revocation


def current_revocations(ctx: StoreContext, session: Session) -> Revocation:
    latest = session.scalar(select(Revocation).order_by(Revocation.version.desc()).limit(1))
    if latest is not None:
        return latest
    now = ctx.now()
    first = Revocation(
        version=1,
        issued_at=now,
        revoked=[],
        token=drm.sign_revocation_list(ctx.vault.issuer(), version=1, issued_at=now, revoked=[]),
    )
    session.add(first)
    try:
        session.commit()
    except DBIntegrityError:
        session.rollback()
        return current_revocations(ctx, session)
    return first


def revoke(ctx: StoreContext, session: Session, admin: User, license_id: str) -> Revocation:
    """Revoke a license and publish a new, higher revocation-list version that names it."""
    if admin.role != "admin":
        raise ForbiddenError("only admins revoke licenses")
    lic = session.get(License, license_id) if isinstance(license_id, str) and len(license_id) <= 64 else None
    if lic is None:
        raise NotFoundError(f"no license {str(license_id)[:64]!r}")
    current = current_revocations(ctx, session)
    if lic.revoked_at is not None and lic.license_id in current.revoked:
        return current
    row = revoke_licenses(ctx, session, [lic], current=current)
    session.commit()
    return row


def revoke_licenses(
    ctx: StoreContext,
    session: Session,
    licenses: list[License],
    *,
    current: Revocation | None = None,
    activations: list[SeatActivation] | None = None,
) -> Revocation:
    """Mark ``licenses`` and seat ``activations`` revoked and add the next revocation-list version naming them
    (an activation as drm.seat_revocation_entry: its license stays valid for the other seats); the caller
    commits."""
    current = current or current_revocations(ctx, session)
    now = ctx.now()
    for lic in licenses:
        lic.revoked_at = now
    activations = activations or []
    for act in activations:
        act.revoked_at = now
    revoked = sorted(
        set(current.revoked)
        | {lic.license_id for lic in licenses}
        | {drm.seat_revocation_entry(a.license_id, a.device_id) for a in activations}
    )
    version = current.version + 1
    row = Revocation(
        version=version,
        issued_at=now,
        revoked=revoked,
        token=drm.sign_revocation_list(ctx.vault.issuer(), version=version, issued_at=now, revoked=revoked),
    )
    session.add(row)
    return row


def activate_seat(
    ctx: StoreContext, session: Session, user: User, license_id: str, device_id: Any
) -> tuple[SeatActivation, bool]:
    """Give ``device_id`` the next seat of fleet license ``license_id`` (its holder asks): the license row is
    locked, so concurrent requests count one at a time; a device keeps its seat (idempotent); past the signed
    ``seats`` the answer is 409. A revoked activation keeps its seat number used (a fork does not free it)."""
    if not isinstance(device_id, str) or not re.match(r"^[0-9a-f]{32}\Z", device_id):
        raise UsageError("device_id must be a device key id (32 hex digits)")
    lic = session.get(License, license_id)
    if lic is None or (lic.buyer_id != user.id and user.role != "admin"):
        raise NotFoundError(f"no license {license_id}")
    if lic.kind != "production" or lic.fleet_key_id is None:
        raise UsageError(f"license {license_id} is not a fleet license: it is bound to one device already")
    lock_row(session, License, license_id)
    held = session.scalar(
        select(SeatActivation).where(
            SeatActivation.license_id == license_id, SeatActivation.device_id == device_id
        )
    )
    if held is not None:
        if held.revoked_at is not None:
            raise ForbiddenError(f"the activation of device {device_id} on license {license_id} was revoked")
        return held, False
    used = session.scalar(
        select(func.max(SeatActivation.seat)).where(SeatActivation.license_id == license_id)
    )
    seat = int(used or 0) + 1
    if seat > lic.seats:
        raise ConflictError(f"all {lic.seats} seats of license {license_id} are activated")
    now = ctx.now()
    token = drm.sign_activation(
        ctx.vault.issuer(), drm.Activation(device_id, license_id, lic.fleet_key_id, seat, now)
    )
    row = SeatActivation(license_id=license_id, seat=seat, device_id=device_id, token=token, activated_at=now)
    session.add(row)
    session.flush()
    return row, True


def activation_to_dict(row: SeatActivation) -> dict[str, Any]:
    return {
        "license_id": row.license_id,
        "device_id": row.device_id,
        "seat": row.seat,
        "activated_at": row.activated_at,
        "revoked": row.revoked_at is not None,
        "activation": row.token.decode(),
    }
