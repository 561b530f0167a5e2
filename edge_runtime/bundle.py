"""Device side of firmware bundles: install the builds and licenses of a verified bundle that are bound to
this device (or to a fleet key it holds); reading and verifying the archive is drm.bundle_reader's.

Nothing from the archive is ever written under a name it chose: members are read into memory under
strict limits and handed to Device.install, which owns the device directory."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.asymmetric import ed25519

import drm
from drm.bundle import DEFAULT_LIMITS, BundleLimits, activation_member_name
from drm.bundle_reader import (
    Member,
    VerifiedBundle,
    iter_members,
    read_bundle,
    verify_bundle,
    verify_members,
)
from edgemart.core.errors import Refusal

__all__ = [
    "Member",
    "fleet_keys",
    "install_bundle",
    "VerifiedBundle",
    "iter_members",
    "read_bundle",
    "verify_bundle",
    "verify_members",
]


# --------------------------------------------------------------------------- installation


def fleet_keys(device_dir: Path) -> dict[str, Any]:
    """The fleet private keys a device holds: DIR/fleet/<fleet_key_id>.key (X25519 PEM, 0600), each checked
    against its id (edge_runtime.device.read_fleet_keys; UsageError names a bad file)."""
    from edge_runtime.device import read_fleet_keys

    return dict(read_fleet_keys(Path(device_dir)))


def install_bundle(
    source: bytes | bytearray | BinaryIO,
    device_dir: str | Path,
    *,
    now: int | None = None,
    builder_key: ed25519.Ed25519PublicKey | None = None,
    limits: BundleLimits = DEFAULT_LIMITS,
) -> dict[str, Any]:
    """Verify a bundle against the device's pinned root, then install every build+license bound to this
    device (or a fleet key it holds) through Device.install, with this device's seat activation when the
    bundle carries one. Licenses for others are skipped and reported, and so is a fleet license whose carried
    activations are all for other devices; a device with no license in the bundle is refused."""
    from edge_runtime.device import Device

    directory = Path(device_dir)
    device = Device.open(directory)
    clock = int(time.time()) if now is None else int(now)
    verified = verify_bundle(source, now=clock, root=device.root(), builder_key=builder_key, limits=limits)
    held = device.fleet_key_ids()
    chosen: list[tuple[str, drm.LicenseClaims]] = []
    skipped: list[dict[str, str]] = []
    for path, claims in sorted(verified.claims.items()):
        if claims.device_id is not None:
            if claims.device_id == device.device_id:
                chosen.append((path, claims))
            else:
                skipped.append(
                    {"license_id": claims.license_id, "reason": f"bound to device {claims.device_id}"}
                )
        elif claims.fleet_key_id in held:
            carried = [d for (lid, d) in verified.activations if lid == claims.license_id]
            if carried and device.device_id not in carried:
                skipped.append(
                    {
                        "license_id": claims.license_id,
                        "reason": f"fleet license whose {len(carried)} seat activation(s) in this bundle are"
                        " for other devices",
                    }
                )
            else:
                chosen.append((path, claims))
        else:
            skipped.append(
                {
                    "license_id": claims.license_id,
                    "reason": f"bound to fleet key {claims.fleet_key_id}, which this device does not hold",
                }
            )
    if not chosen:
        held_text = f" (fleet keys held: {', '.join(sorted(held))})" if held else " (no fleet keys held)"
        raise Refusal(
            f"device {device.device_id}{held_text} is not in this bundle's license set "
            f"({len(verified.claims)} license(s), none bound to it or to a fleet key it holds)"
        )
    release = verified.manifest.release
    if release is not None:
        device.check_bundle_release(release, now=clock)
    installed = []
    for path, claims in chosen:
        activation = None
        if (claims.license_id, device.device_id) in verified.activations:
            name = activation_member_name(claims.license_id, device.device_id)
            activation = device.install_activation(verified.members[name], now=clock)
        build_path = f"builds/{claims.build_hash[7:]}.emdl"
        result = device.install(
            build=verified.members[build_path],
            license=verified.members[path],
            listing=claims.listing,
            now=now,
        )
        entry = {**result, "binding": "device" if claims.device_id else "fleet"}
        if claims.fleet_key_id is not None:
            entry["seat"] = None if activation is None else activation["seat"]
        installed.append(entry)
    if release is not None:
        device.record_bundle_release(release, now=clock)
    return {
        "ok": True,
        "device_id": device.device_id,
        "release": None if release is None else release.to_dict(),
        "builder": {"kid": verified.builder_kid, "pinned": verified.builder_pinned},
        "installed": installed,
        "skipped": skipped,
        "chains": sorted(n for n in verified.members if n.startswith("chains/")),
    }
