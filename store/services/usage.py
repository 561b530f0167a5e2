"""Usage sync: verify a device's signed, hash-chained usage log and keep only its valid continuation;
per-listing figures for sellers."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

import drm
from drm.usagelog import parse_record
from store.context import StoreContext
from store.models import Device, License, Listing, UsageRecord, User


def _lines(data: bytes) -> list[bytes]:
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


def upload(ctx: StoreContext, session: Session, device: Device, data: bytes) -> dict[str, Any]:
    """Accept the records that extend what the store already holds, after checking chain and signatures.

    The device may send its whole log or only the new tail; records the store already has must be
    byte-identical: a different record at a position the store already holds is a fork of the device's
    chain (a restored or cloned state), recorded with both records, and the device's licenses are revoked
    (store.services.metering); check-ins from a forked device are refused. The valid prefix of a broken
    upload is kept; the report names the first bad line."""
    from store.services import metering

    metering.refuse_if_forked(session, device)
    cert = drm.cert_from_bytes(device.cert_pem.encode())
    public_key = cert.public_key()
    lines = _lines(data)
    held = list(
        session.execute(
            select(UsageRecord.seq, UsageRecord.line_hash)
            .where(UsageRecord.device_id == device.device_id)
            .order_by(UsageRecord.seq)
        )
    )
    held_hash = {seq: h for seq, h in held}
    next_seq = len(held)
    if not lines:
        return {"ok": True, "accepted": 0, "first_bad": None, "reason": "", "held": next_seq}
    try:
        first_seq = int(parse_record(lines[0])["rec"]["seq"])
    except drm.FormatError as exc:
        return {"ok": False, "accepted": 0, "first_bad": 0, "reason": exc.message, "held": next_seq}
    if first_seq > next_seq:
        return {
            "ok": False,
            "accepted": 0,
            "first_bad": 0,
            "reason": f"sequence gap: the store holds records up to {next_seq - 1}, upload starts at {first_seq}",
            "held": next_seq,
        }
    start_prev = held_hash[first_seq - 1] if first_seq > 0 else None
    report = drm.verify_log(
        data, public_key, device_id=device.device_id, start_seq=first_seq, start_prev=start_prev
    )
    ok, first_bad, reason = report.ok, report.first_bad, report.reason
    accepted = 0
    now = ctx.now()
    for i, rec in enumerate(report.records):
        seq = rec["seq"]
        line_hash = drm.sha256_tag(lines[i])
        if seq in held_hash:
            if held_hash[seq] != line_hash:
                # Signed by the device key and chained from a position the store holds: the device itself
                # produced two histories. Keep the records accepted before it, then record the fork.
                session.commit()
                fork = metering.record_fork(ctx, session, device, seq, lines[i])
                raise drm.ConflictError(
                    f"check-in refused: record {seq} differs from the one this device uploaded before: its usage"
                    f" log forked (a restored or cloned device state); {len(fork.revoked)} license(s) or seat"
                    " activation(s) revoked"
                )
            continue
        session.add(
            UsageRecord(
                device_id=device.device_id,
                seq=seq,
                license_id=rec["license_id"],
                build_hash=rec["build_hash"],
                event=rec["event"],
                t=rec["t"],
                runs=rec["runs"],
                line_hash=line_hash,
                received_at=now,
            )
        )
        accepted += 1
    session.commit()
    if ok and report.records and report.records[-1]["seq"] + 1 < next_seq:
        # A device uploads its whole log, which only grows: ending before what it sent earlier means the
        # log (and the state with it) was restored from an older copy, even if every record matches.
        end = int(report.records[-1]["seq"]) + 1
        fork = metering.record_fork(ctx, session, device, end, None)
        raise drm.ConflictError(
            f"check-in refused: this device's usage log forked: it ends after record {end - 1}, before the"
            f" {next_seq} records it uploaded earlier (its state was restored from an older copy);"
            f" {len(fork.revoked)} license(s) or seat activation(s) revoked"
        )
    return {
        "ok": ok,
        "accepted": accepted,
        "first_bad": first_bad,
        "reason": reason,
        "held": next_seq + accepted,
    }


def listing_usage(session: Session, listing: Listing) -> dict[str, Any]:
    """Figures for the seller: events per device and target, from verified usage records only."""
    rows = session.execute(
        select(
            UsageRecord.device_id,
            License.kind,
            UsageRecord.event,
            func.count(),
            func.max(UsageRecord.t),
            License.build_id,
        )
        # Only records a device made under its own license count: no inflating someone else's figures.
        .join(
            License,
            (License.license_id == UsageRecord.license_id)
            & or_(License.device_id == UsageRecord.device_id, License.fleet_key_id.is_not(None)),
        )
        .where(License.listing_id == listing.id)
        .group_by(UsageRecord.device_id, License.kind, UsageRecord.event, License.build_id)
    ).all()
    targets = {b.id: b.target for b in listing.builds}
    devices: dict[str, dict[str, Any]] = {}
    totals = {"run": 0, "refused": 0, "sync": 0}
    by_target: dict[str, dict[str, int]] = {}
    run_counts: dict[str, int] = {}
    for (device_id, _), runs in _run_counters(session, License.listing_id == listing.id).items():
        run_counts[device_id] = run_counts.get(device_id, 0) + runs
    for device_id, kind, event, count, last_t, build_id in rows:
        if event == "run":
            count = run_counts.pop(device_id, 0)
        d = devices.setdefault(
            device_id,
            {
                "device_id": device_id,
                "run": 0,
                "refused": 0,
                "sync": 0,
                "last_seen": 0,
                "kinds": set(),
                "targets": set(),
            },
        )
        d[event] = d.get(event, 0) + count
        d["last_seen"] = max(d["last_seen"], last_t or 0)
        d["kinds"].add(kind)
        target = targets.get(build_id, "?")
        d["targets"].add(target)
        totals[event] = totals.get(event, 0) + count
        t = by_target.setdefault(target, {"run": 0, "refused": 0})
        t[event] = t.get(event, 0) + count
    licenses_issued = session.scalar(
        select(func.count()).select_from(License).where(License.listing_id == listing.id)
    )
    return {
        "listing": listing.id,
        "licenses": licenses_issued or 0,
        "devices": [
            {**d, "kinds": sorted(d["kinds"]), "targets": sorted(d["targets"])}
            for d in sorted(devices.values(), key=lambda d: -d["last_seen"])
        ],
        "totals": totals,
        "by_target": by_target,
    }


def _run_counters(session: Session, where: Any) -> dict[tuple[str, str], int]:
    """Runs used per (device, license) of the licenses ``where`` selects, as the devices last reported.

    Devices meter runs in reserved blocks ("reserve:n" / "release:n"), so a license's runs are the counter
    carried by its latest run record, not the number of run records. Only records a device made under its
    own license count."""
    latest: dict[tuple[str, str], tuple[int, int]] = {}
    for device_id, license_id, seq, runs in session.execute(
        select(UsageRecord.device_id, UsageRecord.license_id, UsageRecord.seq, UsageRecord.runs)
        .join(
            License,
            (License.license_id == UsageRecord.license_id)
            & or_(License.device_id == UsageRecord.device_id, License.fleet_key_id.is_not(None)),
        )
        .where(where, UsageRecord.event == "run")
    ):
        key = (device_id, license_id)
        if key not in latest or seq > latest[key][0]:
            latest[key] = (seq, runs)
    return {key: runs for key, (_, runs) in latest.items()}


def device_license_runs(session: Session, device_id: str, license_ids: list[str]) -> dict[str, int]:
    """The authoritative run count per license on one device: the counter its synced log carries."""
    where = (UsageRecord.device_id == device_id) & License.license_id.in_(license_ids)
    return {lid: runs for (_, lid), runs in _run_counters(session, where).items()}


def runs_left(session: Session, licenses: list[License]) -> dict[str, int | None]:
    """Runs left per license as of the devices' last usage sync (None: no cap)."""
    used: dict[str, int] = {}
    ids = [lic.license_id for lic in licenses]
    for (_, license_id), runs in _run_counters(session, License.license_id.in_(ids)).items():
        used[license_id] = used.get(license_id, 0) + runs
    return {
        lic.license_id: None if lic.max_runs is None else max(0, lic.max_runs - used.get(lic.license_id, 0))
        for lic in licenses
    }


def seller_overview(session: Session, seller: User) -> list[dict[str, Any]]:
    listings = session.scalars(
        select(Listing).where(Listing.seller_id == seller.id).order_by(Listing.created_at.desc())
    )
    return [listing_usage(session, listing) for listing in listings]
