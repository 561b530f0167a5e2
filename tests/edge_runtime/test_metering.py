"""The offline budget of a metered eval license on the device: runs stop at the budget until a store-signed
grant renews it; a restored state never keeps a grant made after it; forged or foreign grants are refused."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import drm
from edge_runtime import Device

HOUR = 3600


@pytest.fixture
def x(digits_test):
    return np.load(digits_test)["x"][:1]


def _runs(model, x, n: int) -> int:
    """Run up to n times; how many ran before the first refusal."""
    for i in range(n):
        try:
            model.run({"x": x})
        except drm.LicenseRefused:
            return i
    return n


def test_runs_stop_at_the_offline_budget_until_a_grant_renews_it(
    device, factory, digits_build, build_file, now, x, refused
):
    lic = factory.license(device, digits_build, max_runs=100, offline={"runs": 5, "hours": 24})
    path = build_file(digits_build)
    model = device.open_model(build_path=path, license_bytes=lic, now=now)
    assert _runs(model, x, 10) == 5
    refused(device, lambda: model.run({"x": x}), "offline budget used up")
    model.close()
    # A check-in: the store counted 5 runs and grants 4 more, after the records it held.
    seq = device.verify_log()["records"]
    device.install_budget_grant(factory.grant(device, lic, runs_until=9, seq=seq), now=now)
    model = device.open_model(build_path=path, license_bytes=lic, now=now)
    assert _runs(model, x, 10) == 4
    model.close()
    assert device.verify_log()["runs_by_license"] == {drm.LicenseClaims.from_dict(
        drm.parse_envelope(lic, "edgemart-license/1")[0]).license_id: 9}  # fmt: skip


def test_the_budget_also_ends_by_time(device, factory, digits_build, build_file, now, x, refused):
    lic = factory.license(device, digits_build, max_runs=100, offline={"runs": 50, "hours": 2})
    path = build_file(digits_build)
    model = device.open_model(build_path=path, license_bytes=lic, now=now)
    assert _runs(model, x, 3) == 3
    model.now = now + 2 * HOUR  # within the license's window, past the offline budget's
    refused(device, lambda: model.run({"x": x}), "offline budget expired")
    refused(
        device,
        lambda: device.open_model(build_path=path, license_bytes=lic, now=now + 2 * HOUR),
        "offline budget expired",
    )
    # A grant made at a check-in two hours in renews the deadline.
    seq = device.verify_log()["records"]
    device.install_budget_grant(
        factory.grant(device, lic, runs_until=60, seq=seq, now=now + 2 * HOUR), now=now
    )
    with device.open_model(build_path=path, license_bytes=lic, now=now + 2 * HOUR + 60) as model:
        assert _runs(model, x, 3) == 3


def test_a_license_without_an_offline_budget_is_not_metered(
    device, factory, digits_build, build_file, now, x
):
    lic = factory.license(device, digits_build, max_runs=20)
    with device.open_model(build_path=build_file(digits_build), license_bytes=lic, now=now) as model:
        assert _runs(model, x, 25) == 20  # the run cap, nothing else


def test_a_restore_keeping_the_newer_grant_gains_only_one_budget(
    device, factory, digits_build, build_file, now, x, anchor_dir, tmp_path, audit_reasons
):
    """Attack: snapshot the device dir and the anchor, use the budget, check in (grant for 5 more), restore
    the snapshot but keep the new grant file. The grant was made after more records than the restored log
    holds, so it is ignored: the restored state runs its own budget once (5), not the grant's 10."""
    lic = factory.license(device, digits_build, max_runs=100, offline={"runs": 5, "hours": 24})
    path = build_file(digits_build)
    snap = tmp_path / "snap"
    shutil.copytree(device.dir, snap / "device")
    shutil.copytree(anchor_dir, snap / "anchors")
    with device.open_model(build_path=path, license_bytes=lic, now=now) as model:
        assert _runs(model, x, 10) == 5
    seq = device.verify_log()["records"]
    device.install_budget_grant(factory.grant(device, lic, runs_until=10, seq=seq), now=now)
    kept = {p.name: p.read_bytes() for p in (device.dir / "budgets").iterdir()}
    shutil.rmtree(device.dir)
    shutil.rmtree(anchor_dir)
    shutil.copytree(snap / "device", device.dir)
    shutil.copytree(snap / "anchors", anchor_dir)
    (device.dir / "budgets").mkdir(mode=0o700, exist_ok=True)
    for name, data in kept.items():
        (device.dir / "budgets" / name).write_bytes(data)
    restored = Device.open(device.dir)
    with restored.open_model(build_path=path, license_bytes=lic, now=now) as model:
        assert _runs(model, x, 20) == 5  # one budget, not the grant's
    assert any("budget grant made after" in r for r in audit_reasons(restored))


def test_forged_and_foreign_grants_are_refused(device, factory, digits_build, build_file, now, x, tmp_path):
    lic = factory.license(device, digits_build, max_runs=100, offline={"runs": 2, "hours": 24})
    other = Device.init(tmp_path / "other", trust=factory.root_pem, now=now)
    rogue = type(factory)()  # another store: its own root and issuer
    foreign = [
        factory.grant(other, lic, runs_until=50, seq=0),  # for another device
        rogue.grant(device, lic, runs_until=50, seq=0),  # signed under another root
        factory.grant(
            device,
            factory.license(device, digits_build, offline={"runs": 1, "hours": 1}),
            runs_until=50,
            seq=0,
        ),  # fmt: skip  # for another license: installs, but not for this one
    ]
    for token in foreign[:2]:
        with pytest.raises(drm.UsageError, match="budget grant this device refuses"):
            device.install_budget_grant(token, now=now)
    device.install_budget_grant(foreign[2], now=now)
    tampered = bytearray(factory.grant(device, lic, runs_until=50, seq=0))
    tampered[tampered.index(b'"payload":"') + 20] ^= 1
    with pytest.raises(drm.UsageError):
        device.install_budget_grant(bytes(tampered), now=now)
    # A grant file planted by hand (not through install) that does not verify is ignored, not obeyed.
    lid = drm.LicenseClaims.from_dict(drm.parse_envelope(lic, "edgemart-license/1")[0]).license_id
    (device.dir / "budgets" / f"{lid}.grant").write_bytes(foreign[1])
    with device.open_model(build_path=build_file(digits_build), license_bytes=lic, now=now) as model:
        assert _runs(model, x, 10) == 2


def test_budget_claims_are_signed_and_bounded(factory, device, digits_build):
    for bad in ({"runs": 0, "hours": 1}, {"runs": 1, "hours": 0}, {"runs": 1}, {"runs": True, "hours": 1},
                {"runs": 1, "hours": 1, "extra": 1}):  # fmt: skip
        with pytest.raises(drm.FormatError):
            factory.license(device, digits_build, offline=bad)
    with pytest.raises(drm.FormatError, match="only an eval license"):
        drm.issue_license(
            issuer=factory.issuer, cek=digits_build.cek, recipient=device.keys.kem_public(), kind="production",
            listing="l", build_hash=digits_build.build_hash, target="onnx-fp32", now=10**9, days=None,
            max_runs=None, device_id=device.device_id, offline={"runs": 1, "hours": 1},
        )  # fmt: skip
