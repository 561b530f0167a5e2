"""Metering anchored at the store: per-listing offline budgets, budget grants renewed at check-in, forks of a
device's usage-log chain (a restored or cloned device state) and the revocations they trigger, fleet seats.

The store's count of a license's runs on a device is the counter its synced usage log carries (store.services.
usage); a device runs past its offline budget only on a grant signed here."""

from __future__ import annotations

from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

import drm
from drm.license import LICENSE_TYP, MAX_OFFLINE_HOURS, MAX_OFFLINE_RUNS
from edgemart.core.errors import ConflictError, ForbiddenError, UsageError
from store.context import StoreContext
from store.models import (
    Device,
    License,
    Listing,
    ListingMetering,
    SeatActivation,
    UsageFork,
    UsageRecord,
    User,
)
from store.services.listings import get_visible

DEFAULT_OFFLINE_RUNS = 200
DEFAULT_OFFLINE_HOURS = 72


def _claims(lic: License) -> drm.LicenseClaims:
    payload, _, _ = drm.parse_envelope(lic.token, LICENSE_TYP)
    return drm.LicenseClaims.from_dict(payload)


# ------------------------------------------------------------------------------------------ offline budgets


def offline_budget(ctx: StoreContext, session: Session, listing: Listing) -> dict[str, int]:
    """The offline budget an eval license of ``listing`` carries: the listing's own, else the store's
    defaults (EVAL_OFFLINE_RUNS, EVAL_OFFLINE_HOURS)."""
    row = session.get(ListingMetering, listing.id)
    if row is not None:
        return {"hours": row.offline_hours, "runs": row.offline_runs}
    return {
        "hours": int(ctx.config.get("EVAL_OFFLINE_HOURS") or DEFAULT_OFFLINE_HOURS),
        "runs": int(ctx.config.get("EVAL_OFFLINE_RUNS") or DEFAULT_OFFLINE_RUNS),
    }


def _bounded_int(body: dict[str, Any], name: str, hi: int) -> int:
    value = body.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= hi:
        raise UsageError(f"{name} must be an integer between 1 and {hi}")
    return value


def set_offline_budget(
    ctx: StoreContext, session: Session, user: User, listing_id: str, body: dict[str, Any]
) -> dict[str, Any]:
    """The seller (or an admin) sets the offline budget of the listing's future eval licenses."""
    listing = get_visible(session, listing_id, user)
    if not (user.role == "admin" or listing.seller_id == user.id):
        raise ForbiddenError("only the listing's seller or an admin sets its offline budget")
    runs = _bounded_int(body, "offline_runs", MAX_OFFLINE_RUNS)
    hours = _bounded_int(body, "offline_hours", MAX_OFFLINE_HOURS)
    row = session.get(ListingMetering, listing.id)
    if row is None:
        session.add(ListingMetering(listing_id=listing.id, offline_runs=runs, offline_hours=hours))
    else:
        row.offline_runs, row.offline_hours = runs, hours
    session.commit()
    return {"listing": listing.id, **offline_budget(ctx, session, listing)}


def budget_grants(ctx: StoreContext, session: Session, device: Device, held: int) -> list[str]:
    """After a check-in that left the store holding ``held`` records of the device's log: a fresh grant for
    every unrevoked metered license of the device, up to the runs the store counted plus one budget."""
    from store.services.usage import device_license_runs

    rows = list(
        session.scalars(
            select(License).where(
                License.device_id == device.device_id,
                License.kind == "eval",
                License.revoked_at.is_(None),
            )
        )
    )
    metered = [(lic, _claims(lic)) for lic in rows]
    metered = [(lic, c) for lic, c in metered if c.offline is not None]
    if not metered:
        return []
    used = device_license_runs(session, device.device_id, [lic.license_id for lic, _ in metered])
    now = ctx.now()
    out = []
    for lic, claims in metered:
        assert claims.offline is not None
        runs_until = used.get(lic.license_id, 0) + claims.offline["runs"]
        if claims.max_runs is not None:
            runs_until = min(runs_until, claims.max_runs)
        not_after = now + claims.offline["hours"] * 3600
        if claims.not_after is not None:
            not_after = min(not_after, claims.not_after)
        if not_after <= now:
            continue
        grant = drm.BudgetGrant(device.device_id, lic.license_id, runs_until, not_after, now, held)
        out.append(drm.sign_budget_grant(ctx.vault.issuer(), grant).decode())
    return out


# ------------------------------------------------------------------------------------------ forks


def refuse_if_forked(session: Session, device: Device) -> None:
    fork = session.scalar(select(UsageFork).where(UsageFork.device_id == device.device_id).limit(1))
    if fork is not None:
        raise ConflictError(
            f"check-in refused: this device's usage log forked at record {fork.seq} (a restored or cloned"
            " device state); its licenses are revoked"
        )


def record_fork(
    ctx: StoreContext, session: Session, device: Device, seq: int, offered_line: bytes | None
) -> UsageFork:
    """Keep both records as evidence (``offered_line`` None: the upload ended before position ``seq``), revoke every license bound to the device in one new revocation-list
    version, and commit; check-ins from the device are refused from now on."""
    held = session.scalar(
        select(UsageRecord).where(UsageRecord.device_id == device.device_id, UsageRecord.seq == seq)
    )
    assert held is not None
    now = ctx.now()
    licenses = list(
        session.scalars(
            select(License).where(License.device_id == device.device_id, License.revoked_at.is_(None))
        )
    )
    # A fleet license serves other devices too: the forked device loses its seat activation (the seat stays
    # used), not the license.
    seats = list(
        session.scalars(
            select(SeatActivation).where(
                SeatActivation.device_id == device.device_id, SeatActivation.revoked_at.is_(None)
            )
        )
    )
    revoked = sorted(lic.license_id for lic in licenses) + sorted(
        drm.seat_revocation_entry(a.license_id, a.device_id) for a in seats
    )
    if revoked:
        from store.services.licensing import revoke_licenses

        revoke_licenses(ctx, session, licenses, activations=seats)
    fork = UsageFork(
        device_id=device.device_id,
        seq=seq,
        held={
            "seq": held.seq,
            "t": held.t,
            "event": held.event,
            "license_id": held.license_id,
            "build_hash": held.build_hash,
            "runs": held.runs,
            "line_hash": held.line_hash,
            "received_at": held.received_at,
        },
        offered="" if offered_line is None else offered_line.decode("utf-8", "replace"),
        revoked=revoked,
        detected_at=now,
    )
    session.add(fork)
    session.commit()
    return fork


def fork_to_dict(fork: UsageFork) -> dict[str, Any]:
    return {
        "id": fork.id,
        "device_id": fork.device_id,
        "seq": fork.seq,
        "held": fork.held,
        "offered": fork.offered,
        "revoked": fork.revoked,
        "detected_at": fork.detected_at,
    }


def visible_forks(session: Session, user: User) -> list[UsageFork]:
    """Admins see every fork; a seller the forks of devices holding licenses on their listings; a buyer
    those of their own devices."""
    stmt = select(UsageFork).order_by(UsageFork.detected_at.desc())
    if user.role == "seller":
        devices = (
            select(License.device_id)
            .join(Listing, Listing.id == License.listing_id)
            .where(Listing.seller_id == user.id, License.device_id.is_not(None))
        )
        stmt = stmt.where(UsageFork.device_id.in_(devices))
    elif user.role != "admin":
        stmt = stmt.join(Device, Device.device_id == UsageFork.device_id).where(
            or_(Device.owner_id == user.id)
        )
    return list(session.scalars(stmt.limit(1000)))
