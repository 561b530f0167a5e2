"""Metering anchored at the store (#20): eval licenses carry the listing's offline budget, check-ins renew it
from the store's own run count, and two signed records for one position of a device's chain (a restored or
cloned state) are a fork: the device's licenses are revoked, its check-ins refused, the fork shown."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import drm
from edge_runtime import Device
from tests.store.conftest import serve_http

LICENSE_TYP = "edgemart-license/1"


@pytest.fixture
def listed(store, digits_base, digits_calibration):
    r = store.upload(
        "sally", digits_base, name="metered", targets="onnx-fp32", calibration=digits_calibration
    )
    assert r.status_code == 202, r.json
    store.wait()
    return "metered"


def _claims(token: str) -> drm.LicenseClaims:
    return drm.LicenseClaims.from_dict(drm.parse_envelope(token.encode(), LICENSE_TYP)[0])


def _enroll(store, who: str = "bob") -> drm.DeviceKeys:
    keys = drm.DeviceKeys.generate(pq=False)
    r = store.client.post(
        "/api/v1/devices/enroll", json={"csr": keys.csr().decode()}, headers=store.auth(who)
    )
    assert r.status_code == 201, r.json
    return keys


def _license(store, keys, listing: str, who: str = "bob") -> dict:
    r = store.client.post(
        f"/api/v1/listings/{listing}/eval-license",
        json={"device_id": keys.device_id, "target": "onnx-fp32"},
        headers=store.auth(who),
    )
    assert r.status_code in (200, 201), r.json
    return r.json


def _log(
    keys, lic, counters: list[int], start: list[bytes] | None = None, t0: int = 1_800_000_000
) -> list[bytes]:
    lines = list(start or [])
    for runs in counters:
        seq = len(lines)
        prev = lines[-1] if lines else None
        delta = runs - (drm.usagelog.parse_record(prev)["rec"]["runs"] if prev else 0)
        lines.append(
            drm.make_record(
                keys.sign, prev_line=prev, seq=seq, device_id=keys.device_id, t=t0 + seq, event="run",
                license_id=lic["license_id"], build_hash=lic["build_hash"], runs=runs, detail=f"reserve:{delta}",
            )
        )  # fmt: skip
    return lines


def _post(store, keys, lines: list[bytes], who: str = "bob"):
    return store.client.post(
        f"/api/v1/devices/{keys.device_id}/usage",
        data=b"".join(line + b"\n" for line in lines),
        headers={**store.auth(who), "Content-Type": "application/x-ndjson"},
    )


def test_eval_licenses_carry_the_listing_budget_and_only_its_seller_sets_it(store, listed):
    keys = _enroll(store)
    lic = _license(store, keys, listed)
    assert _claims(lic["license"]).offline == {"hours": 72, "runs": 200}  # the stated defaults
    for who in ("bob", "sam"):
        r = store.client.put(f"/api/v1/listings/{listed}/metering", json={"offline_runs": 5, "offline_hours": 2},
                             headers=store.auth(who))  # fmt: skip
        assert r.status_code in (403, 404), (who, r.status_code)
    for bad in (
        {"offline_runs": 0, "offline_hours": 2},
        {"offline_runs": 5},
        {"offline_runs": "5", "offline_hours": 2},
    ):
        r = store.client.put(f"/api/v1/listings/{listed}/metering", json=bad, headers=store.auth("sally"))
        assert r.status_code == 400, bad
    r = store.client.put(f"/api/v1/listings/{listed}/metering", json={"offline_runs": 5, "offline_hours": 2},
                         headers=store.auth("sally"))  # fmt: skip
    assert r.status_code == 200 and r.json["runs"] == 5
    other = _enroll(store)
    assert _claims(_license(store, other, listed)["license"]).offline == {"hours": 2, "runs": 5}


def test_check_in_renews_the_budget_from_the_stores_own_count(store, listed):
    keys = _enroll(store)
    lic = _license(store, keys, listed)
    lines = _log(keys, lic, [64, 128])
    r = _post(store, keys, lines)
    assert r.status_code == 200 and r.json["held"] == 2
    (token,) = r.json["budgets"]
    grant = drm.verify_budget_grant(
        token.encode(), root=store.ctx.vault.authority().cert, now=store.ctx.now(),
        device_id=keys.device_id, license_id=lic["license_id"],
    )  # fmt: skip
    assert grant.runs_until == 128 + 200 and grant.seq == 2
    assert grant.not_after == grant.issued_at + 72 * 3600
    # The cap still bounds the grant: near max_runs (1000) it grants only what is left.
    lines = _log(keys, lic, [990], start=lines)
    token = _post(store, keys, lines).json["budgets"][0]
    assert (
        drm.BudgetGrant.from_dict(drm.parse_envelope(token.encode(), "edgemart-budget/1")[0]).runs_until
        == 1000
    )


def test_a_fork_revokes_the_devices_licenses_refuses_check_ins_and_is_shown(store, listed):
    keys, bystander = _enroll(store), _enroll(store, "betty")
    lic = _license(store, keys, listed)
    other_lic = _license(store, bystander, listed, "betty")
    branch_a = _log(keys, lic, [64, 128, 192])
    assert _post(store, keys, branch_a).status_code == 200
    # The state was restored to after record 0 and ran again: record 1 exists twice, both signed.
    branch_b = _log(keys, lic, [64, 70], start=branch_a[:1], t0=1_800_000_500)
    assert branch_b[1] != branch_a[1]
    r = _post(store, keys, branch_b)
    assert r.status_code == 409 and "forked" in r.json["error"]["message"]
    listed_lic = store.client.get(f"/api/v1/licenses/{lic['license_id']}", headers=store.auth("bob")).json
    assert listed_lic["revoked"]
    rl = drm.verify_revocation_list(
        store.client.get("/api/v1/revocations").data,
        root=store.ctx.vault.authority().cert,
        now=store.ctx.now(),
    )
    assert lic["license_id"] in rl.revoked and other_lic["license_id"] not in rl.revoked
    # Every later check-in of the device is refused, even the original branch; another device is unaffected.
    for lines in (branch_a, branch_a + _log(keys, lic, [256], start=branch_a)[3:]):
        r = _post(store, keys, lines)
        assert r.status_code == 409 and "forked at record 1" in r.json["error"]["message"]
    assert _post(store, bystander, _log(bystander, other_lic, [64]), "betty").status_code == 200
    # No new license for the forked device either (the eval license stays revoked).
    r = store.client.post(f"/api/v1/listings/{listed}/eval-license",
                          json={"device_id": keys.device_id, "target": "onnx-fp32"}, headers=store.auth("bob"))  # fmt: skip
    assert r.status_code == 403
    # The seller and admins see the fork with both records; another seller sees nothing.
    for who in ("sally", "ada", "bob"):
        (fork,) = store.client.get("/api/v1/forks", headers=store.auth(who)).json["items"]
        assert fork["device_id"] == keys.device_id and fork["seq"] == 1
        assert fork["held"]["line_hash"] == drm.sha256_tag(branch_a[1]) and fork["held"]["runs"] == 128
        assert fork["offered"].encode() == branch_b[1]
        assert fork["revoked"] == [lic["license_id"]]
    assert store.client.get("/api/v1/forks", headers=store.auth("sam")).json["items"] == []
    assert store.client.get("/api/v1/forks", headers=store.auth("betty")).json["items"] == []


def test_a_rewrite_that_is_not_signed_by_the_device_is_not_a_fork(store, listed):
    """Only the device key makes a fork: a tampered record fails its signature and changes nothing."""
    keys = _enroll(store)
    lic = _license(store, keys, listed)
    lines = _log(keys, lic, [64, 128])
    assert _post(store, keys, lines).status_code == 200
    tampered = lines[1].replace(b'"runs":128', b'"runs":1')
    r = _post(store, keys, [lines[0], tampered])
    assert r.status_code == 200 and not r.json["ok"] and r.json["first_bad"] == 1
    assert store.client.get("/api/v1/forks", headers=store.auth("ada")).json["items"] == []
    assert not store.client.get(f"/api/v1/licenses/{lic['license_id']}", headers=store.auth("bob")).json[
        "revoked"
    ]


def test_direct_mode_restore_gains_at_most_one_budget_and_the_next_check_in_revokes(
    store, listed, digits_test, tmp_path, monkeypatch
):
    """The buyer's own attack on a direct-mode device: snapshot the device dir and the anchor after fetch,
    use the runs, check in, restore, run again. The restore runs one offline budget at most; the next check-in
    reports the fork, the store revokes, and the device refuses from then on."""
    anchors = tmp_path / "anchors"
    monkeypatch.setenv("EDGEMART_ANCHOR_DIR", str(anchors))
    r = store.client.put(f"/api/v1/listings/{listed}/metering", json={"offline_runs": 6, "offline_hours": 24},
                         headers=store.auth("sally"))  # fmt: skip
    assert r.status_code == 200
    x = np.load(digits_test)["x"][:1]

    def runs(device: Device, n: int) -> int:
        with device.open_model(listing=listed) as model:
            for i in range(n):
                try:
                    model.run({"x": x})
                except drm.LicenseRefused:
                    return i
        return n

    with serve_http(store.app) as url:
        device = Device.init(tmp_path / "dev")
        device.enroll(url, store.tokens["bob"])
        device.fetch(listed, "onnx-fp32")
        snap = tmp_path / "snap"
        shutil.copytree(device.dir, snap / "dev")
        shutil.copytree(anchors, snap / "anchors")
        assert runs(device, 20) == 6  # the offline budget, then a check-in is due
        out = device.sync()
        assert out["store"]["ok"] and out["budgets"][0]["runs_until"] == 12
        assert runs(device, 20) == 6  # renewed once from the store's count
        device.sync()
        # Restore everything the buyer can reach.
        shutil.rmtree(device.dir)
        shutil.rmtree(anchors)
        shutil.copytree(snap / "dev", device.dir)
        shutil.copytree(snap / "anchors", anchors)
        restored = Device.open(device.dir)
        assert runs(restored, 20) == 6  # one offline budget, once
        with pytest.raises(drm.ConflictError, match="forked"):
            restored.sync()
        assert restored.status()["state"]["revocation_version"] >= 2
        with pytest.raises(drm.LicenseRefused, match="revoked"):
            restored.open_model(listing=listed)
