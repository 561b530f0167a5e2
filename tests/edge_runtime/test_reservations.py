"""Run reservations: runs are counted in durable blocks, unused runs are given back on close and lost on a
crash, and the cap, the validity window and the clock checks still hold on every run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import drm
from edge_runtime import Device, Policy

DAY = 86400


def _run_records(device) -> list[dict]:
    report = drm.verify_log(
        (device.dir / "usage.log").read_bytes(), device.keys.sign.public_key(), device_id=device.device_id
    )
    assert report.ok, report.reason
    return [r for r in report.records if r["event"] == "run"]


@pytest.fixture
def x(digits_test):
    return np.load(digits_test)["x"][:1]


def test_kill_9_mid_reservation_loses_the_unused_runs_never_gains(
    device, factory, digits_build, build_file, tmp_path, x
):
    lic_path = tmp_path / "lic"
    lic_path.write_bytes(factory.license(device, digits_build, max_runs=100))
    path = build_file(digits_build)
    code = (
        "import sys, time, numpy as np\n"
        "from edge_runtime import Device\n"
        "m = Device.open(sys.argv[1]).open_model(build_path=sys.argv[2], license_bytes=open(sys.argv[3],'rb').read())\n"
        "for _ in range(5): m.run({'x': np.zeros((1, 64), np.float32)})\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(device.dir), str(path), str(lic_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    report = device.verify_log()
    # The reservation made before the first run stands; no release could be written.
    assert report["ok"] and report["matches_state"] and report["events"] == {"run": 1}
    assert list(report["runs_by_license"].values()) == [64]
    with device.open_model(build_path=path, license_bytes=lic_path.read_bytes()) as model:
        assert model.runs_left() == 100 - 64  # 5 used + 59 lost: fewer than the 95 really left, never more
        for _ in range(36):
            model.run({"x": x})
        with pytest.raises(drm.LicenseRefused):
            model.run({"x": x})


@pytest.mark.parametrize(("cap", "block"), [(5, 64), (5, 2), (7, 7), (3, 1)])
def test_reservations_never_exceed_the_cap(
    tmp_path, factory, digits_build, build_file, refused, now, x, cap, block
):
    Device.init(tmp_path / "dev", trust=factory.root_pem, now=now)
    device = Device.open(tmp_path / "dev", policy=Policy(reserve_block=block))
    lic = factory.license(device, digits_build, max_runs=cap)
    with device.open_model(build_path=build_file(digits_build), license_bytes=lic, now=now) as model:
        for _ in range(cap):
            model.run({"x": x})
        refused(device, lambda: model.run({"x": x}), "run cap exhausted")
    records = _run_records(device)
    assert all(r["runs"] <= cap for r in records)
    sizes = [int(r["detail"].removeprefix("reserve:")) for r in records]
    assert sum(sizes) == cap and all(0 < s <= block for s in sizes)
    assert records[-1]["runs"] == cap and device.verify_log()["matches_state"]


def test_policy_rejects_an_empty_reservation():
    with pytest.raises(drm.UsageError, match="reserve_block must be at least 1"):
        Policy(reserve_block=0)


def test_release_on_close_gives_the_unused_runs_to_a_later_open(
    device, factory, digits_build, build_file, refused, now, x
):
    lic = factory.license(device, digits_build, max_runs=10)
    path = build_file(digits_build)
    with device.open_model(build_path=path, license_bytes=lic, now=now) as model:
        for _ in range(3):
            model.run({"x": x})
        assert model.runs_left() == 7  # its own unused reservation counts as available to it
    reserve, release = _run_records(device)
    assert (reserve["detail"], reserve["runs"]) == ("reserve:10", 10)
    assert (release["detail"], release["runs"]) == ("release:7", 3)
    with device.open_model(build_path=path, license_bytes=lic, now=now) as model:
        assert model.runs_left() == 7
        for _ in range(7):
            model.run({"x": x})
        refused(device, lambda: model.run({"x": x}), "run cap exhausted")
    assert device.verify_log()["runs_by_license"] == {model.license_id: 10}


def test_two_models_on_one_device_never_share_a_reservation(
    device, factory, digits_build, build_file, refused, now, x
):
    lic = factory.license(device, digits_build, max_runs=100)
    path = build_file(digits_build)
    a = device.open_model(build_path=path, license_bytes=lic, now=now)
    b = device.open_model(build_path=path, license_bytes=lic, now=now)
    for _ in range(10):
        a.run({"x": x})  # a holds 64
    for _ in range(36):
        b.run({"x": x})  # b gets only the 36 left under the cap
    assert a.runs_left() == 54 and b.runs_left() == 0
    refused(device, lambda: b.run({"x": x}), "run cap exhausted")
    a.close()  # gives 54 back
    for _ in range(5):
        b.run({"x": x})
    b.close()
    report = device.verify_log()
    assert report["matches_state"] and report["runs_by_license"] == {a.license_id: 10 + 36 + 5}
    assert [r["detail"] for r in _run_records(device)] == [
        "reserve:64",
        "reserve:36",
        "release:54",
        "reserve:54",
        "release:49",
    ]
    with device.open_model(build_path=path, license_bytes=lic, now=now) as model:
        assert model.runs_left() == 100 - 51


def test_run_past_not_after_inside_a_reservation_is_refused(
    device, factory, digits_build, build_file, refused, now, x
):
    lic = factory.license(device, digits_build, days=1, max_runs=100)
    with device.open_model(build_path=build_file(digits_build), license_bytes=lic, now=now) as model:
        model.run({"x": x})
        model.now = model.claims.not_after  # the first second past the window
        refused(device, lambda: model.run({"x": x}), "expired")
        model.now = now + 2 * DAY
        refused(device, lambda: model.run({"x": x}), "expired")
        assert len(_run_records(device)) == 1  # refused while the reservation still held runs
    report = device.verify_log()
    assert report["events"] == {"run": 2, "refused": 2} and report["runs_by_license"] == {model.license_id: 1}


def test_clock_rollback_inside_a_reservation_is_refused(
    device, factory, digits_build, build_file, refused, now, x
):
    lic = factory.license(device, digits_build, days=7, max_runs=100)
    path = build_file(digits_build)
    with device.open_model(build_path=path, license_bytes=lic, now=now + DAY) as model:
        model.run({"x": x})
        model.now = now  # wound back a day: behind the high-water mark the reservation persisted
        refused(device, lambda: model.run({"x": x}), "clock rollback")
        model.now = now + DAY - 60  # within the tolerance (NTP jitter)
        model.run({"x": x})
        # Later clock readings inside the reservation are not on disk yet; going back behind them is
        # still a rollback, judged against the model's own high-water mark.
        model.now = now + 2 * DAY
        model.run({"x": x})
        model.now = now + DAY + 3600
        refused(device, lambda: model.run({"x": x}), "clock rollback")
        model.now = now + 2 * DAY
    # close() persisted the model's high-water mark with the release: a new open cannot go back either.
    refused(
        device,
        lambda: device.open_model(build_path=path, license_bytes=lic, now=now + DAY + 3600),
        "clock rollback",
    )
    assert device.verify_log()["runs_by_license"] == {model.license_id: 3}


def test_revocation_installed_by_another_process_stops_a_reservation(
    device, factory, digits_build, build_file, refused, now, x
):
    lic = factory.license(device, digits_build, max_runs=100)
    lid = drm.verify_license(
        lic, root=factory.authority.cert, now=now, device_id=device.device_id
    ).claims.license_id
    with device.open_model(build_path=build_file(digits_build), license_bytes=lic, now=now) as model:
        model.run({"x": x})
        Device.open(device.dir).install_revocations(factory.revocations(version=3, revoked=[lid]), now=now)
        refused(device, lambda: model.run({"x": x}), "revoked")


def test_crash_before_the_release_reached_the_state_rolls_forward_exactly(
    device, factory, digits_build, build_file, refused, now, x
):
    lic = factory.license(device, digits_build, max_runs=10)
    path = build_file(digits_build)
    with device.open_model(build_path=path, license_bytes=lic, now=now) as model:
        for _ in range(4):
            model.run({"x": x})
        reserved_state = (device.dir / "state.bin").read_bytes()
    # The release record is in the log, the state still says 10 reserved: what a crash mid-commit leaves.
    (device.dir / "state.bin").write_bytes(reserved_state)
    with device.open_model(build_path=path, license_bytes=lic, now=now) as model:
        assert model.runs_left() == 6
    assert device.verify_log()["matches_state"]


def test_a_signed_record_that_does_not_follow_from_the_counter_is_refused(
    device, factory, digits_build, build_file, refused, now, x
):
    # Even a record signed with the device key cannot set the counter freely: a release must give back
    # exactly what the counter says, so a forged "release" of more runs than the state holds is caught.
    lic = factory.license(device, digits_build, max_runs=100)
    path = build_file(digits_build)
    model = device.open_model(build_path=path, license_bytes=lic, now=now)
    model.run({"x": x})  # reserve:64, no release
    log = (device.dir / "usage.log").read_bytes()
    last = log.splitlines()[-1]
    forged = drm.make_record(
        device.keys.sign,
        prev_line=last,
        seq=len(log.splitlines()),
        device_id=device.device_id,
        t=now,
        event="run",
        license_id=model.license_id,
        build_hash=model.build_hash,
        runs=0,
        detail="release:5",
    )
    (device.dir / "usage.log").write_bytes(log + forged + b"\n")
    refused(device, lambda: device.open_model(build_path=path, license_bytes=lic, now=now), "does not follow")
    model.close()  # the ledger cannot be trusted: the unused runs stay counted, nothing is given back
    assert (device.dir / "usage.log").read_bytes().count(b'"detail":"release:') == 1  # only the forged one
    assert "not given back" in (device.dir / "audit.log").read_text().splitlines()[-1]
