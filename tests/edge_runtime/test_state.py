"""Rollback-resistant state: deleting, corrupting or restoring the state (or the whole dir) is a refusal."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

import drm
from edge_runtime import Device


@pytest.fixture
def used_device(device, factory, digits_build, digits_test, build_file, now):
    """A device that has run the digits model twice under a 5-run license."""
    lic = factory.license(device, digits_build, max_runs=5)
    path = build_file(digits_build)
    x = np.load(digits_test)["x"][:1]
    with device.open_model(build_path=path, license_bytes=lic, now=now) as model:
        model.run({"x": x})
        model.run({"x": x})
    return device, lic, path, x


def test_init_makes_private_keys_and_refuses_to_overwrite(tmp_path, factory, now):
    d = tmp_path / "dev"
    device = Device.init(d, trust=factory.root_pem, now=now)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for name in ("sign.key", "kem.key", "pqkem.key", "state.key", "state.bin", "usage.log"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600, name
    cert = drm.cert_from_bytes((d / "device.crt").read_bytes())
    assert drm.cert_device_id(cert) == device.device_id and cert.issuer == cert.subject
    before = (d / "sign.key").read_bytes()
    with pytest.raises(drm.UsageError, match="refusing to overwrite"):
        Device.init(d, now=now)
    assert (d / "sign.key").read_bytes() == before
    assert Device.open(d).device_id == device.device_id


def test_open_names_what_is_missing(tmp_path):
    with pytest.raises(drm.UsageError, match="does not exist"):
        Device.open(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    with pytest.raises(drm.UsageError, match=r"not an initialized device directory \(missing sign.key"):
        Device.open(tmp_path / "half")


def test_state_file_deleted_is_refusal_not_reset(used_device, refused, now):
    device, lic, path, _ = used_device
    (device.dir / "state.bin").unlink()
    refused(
        device,
        lambda: device.open_model(build_path=path, license_bytes=lic, now=now),
        "state file is missing",
    )
    assert not (device.dir / "state.bin").exists()  # a refusal never recreates it


def test_state_file_corrupted(used_device, refused, now):
    device, lic, path, _ = used_device
    blob = bytearray((device.dir / "state.bin").read_bytes())
    blob[-5] ^= 0xFF
    (device.dir / "state.bin").write_bytes(bytes(blob))
    refused(device, lambda: device.open_model(build_path=path, license_bytes=lic, now=now), "corrupt")


def test_state_from_another_device_is_refused(used_device, tmp_path, factory, refused, now):
    device, lic, path, _ = used_device
    other = Device.init(tmp_path / "other", trust=factory.root_pem, now=now)
    shutil.copy(other.dir / "state.bin", device.dir / "state.bin")
    refused(device, lambda: device.open_model(build_path=path, license_bytes=lic, now=now), "corrupt")


def test_state_restored_from_an_older_copy(
    device, factory, digits_build, digits_test, build_file, refused, now
):
    lic = factory.license(device, digits_build, max_runs=3)
    path = build_file(digits_build)
    x = np.load(digits_test)["x"][:1]
    snapshot = (device.dir / "state.bin").read_bytes()
    with device.open_model(build_path=path, license_bytes=lic, now=now) as model:
        model.run({"x": x})  # reserves 3 runs
        model.run({"x": x})
    # two commits later (reserve, release of the unused run)
    (device.dir / "state.bin").write_bytes(snapshot)  # back to "0 runs used"
    refused(
        device,
        lambda: device.open_model(build_path=path, license_bytes=lic, now=now),
        "restored from an older copy",
    )


def test_state_one_commit_behind_rolls_forward_and_grants_nothing(
    device, factory, digits_build, digits_test, build_file, refused, now
):
    # One record ahead of the state is what a crash between the log append and the state write leaves.
    # The signed record is evidence of the newer counter, so the device rolls forward instead of refusing.
    lic = factory.license(device, digits_build, max_runs=2)
    path = build_file(digits_build)
    x = np.load(digits_test)["x"][:1]
    snapshot = (device.dir / "state.bin").read_bytes()
    with device.open_model(build_path=path, license_bytes=lic, now=now) as model:
        model.run({"x": x})  # one commit: the reservation of both runs
        model.run({"x": x})
    (device.dir / "state.bin").write_bytes(snapshot)
    refused(
        device, lambda: device.open_model(build_path=path, license_bytes=lic, now=now), "run cap exhausted"
    )


def test_whole_device_dir_restored_is_caught_by_the_anchor(
    device, factory, digits_build, digits_test, build_file, refused, tmp_path, now
):
    lic = factory.license(device, digits_build, max_runs=2)
    path = build_file(digits_build)
    x = np.load(digits_test)["x"][:1]
    backup = tmp_path / "backup"
    shutil.copytree(device.dir, backup)
    with device.open_model(build_path=path, license_bytes=lic, now=now) as model:
        model.run({"x": x})
        model.run({"x": x})
    shutil.rmtree(device.dir)
    shutil.copytree(backup, device.dir)  # state, usage log and keys all from before the runs
    refused(device, lambda: device.open_model(build_path=path, license_bytes=lic, now=now), "anchor")


def test_missing_anchor_is_refused(used_device, anchor_dir, refused, now):
    device, lic, path, _ = used_device
    (anchor_dir / device.device_id).unlink()
    refused(device, lambda: device.open_model(build_path=path, license_bytes=lic, now=now), "anchor")


def test_truncated_usage_log_is_refused(used_device, refused, now):
    device, lic, path, _ = used_device
    log = (device.dir / "usage.log").read_bytes().splitlines(keepends=True)
    (device.dir / "usage.log").write_bytes(b"".join(log[:-1]))
    refused(device, lambda: device.open_model(build_path=path, license_bytes=lic, now=now), "usage log")


def test_usage_log_verifies_and_records_refusals(used_device, refused, now):
    device, lic, path, _ = used_device
    refused(
        device, lambda: device.open_model(build_path=path, license_bytes=lic, now=now + 30 * 86400), "expired"
    )
    report = device.verify_log()
    assert report["ok"] and report["matches_state"] and report["events"] == {"run": 2, "refused": 1}
    raw = bytearray((device.dir / "usage.log").read_bytes())
    raw[raw.index(b'"runs":5') + 7] = ord("9")  # edit a record (the reservation of 5 runs)
    (device.dir / "usage.log").write_bytes(bytes(raw))
    assert not device.verify_log()["ok"]


def test_concurrent_processes_share_one_counter(device, factory, digits_build, build_file, tmp_path):
    # Two processes run the same license at once; the lock + reload means no run is lost or double-granted.
    lic_path = tmp_path / "lic"
    lic_path.write_bytes(factory.license(device, digits_build, max_runs=1000))
    path = build_file(digits_build)
    code = (
        "import sys, numpy as np\n"
        "from edge_runtime import Device\n"
        "m = Device.open(sys.argv[1]).open_model(build_path=sys.argv[2], license_bytes=open(sys.argv[3],'rb').read())\n"
        "for _ in range(20): m.run({'x': np.zeros((1, 64), np.float32)})\n"
        "m.close()\n"
    )
    env = {**os.environ}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(device.dir), str(path), str(lic_path)], env=env)
        for _ in range(2)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    report = device.verify_log()
    # Each process reserves one block and gives back the unused part: 2 records each, 40 runs counted.
    assert report["ok"] and report["matches_state"] and report["events"] == {"run": 4}
    assert list(report["runs_by_license"].values()) == [40]
    with device.open_model(build_path=path, license_bytes=lic_path.read_bytes()) as model:
        assert model.runs_left() == 960


def test_import_isolation():
    code = (
        "import sys, edge_runtime, edge_runtime.cli\n"
        "from edge_runtime import Device, LicensedModel, evaluate, open_backend\n"
        "import edge_runtime.evaluation.report_html, edge_runtime._store_client\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'flask', 'sqlalchemy', 'store', 'packagers', 'licenses', 'onnx'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_cli_module_is_light():
    code = "import sys, edge_runtime.cli; print(','.join(m for m in ('numpy', 'onnxruntime', 'ai_edge_litert') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_a_process_holding_a_checked_state_sees_another_process_commit(
    device, factory, digits_build, digits_test, build_file, now
):
    # The ledger reuses the state it last checked while the files are unchanged (inode, size, mtime, ctime):
    # a commit by another process (another Device object on the same dir) must never be hidden by it.
    lic = factory.license(device, digits_build, max_runs=4)
    path = build_file(digits_build)
    x = np.load(digits_test)["x"][:1]
    before, _ = device.ledger.load()
    assert device.ledger.load()[0].log_seq == before.log_seq  # the reused copy
    other = Device.open(device.dir)
    with other.open_model(build_path=path, license_bytes=lic, now=now) as model:
        model.run({"x": x})
    after, _ = device.ledger.load()
    assert after.log_seq > before.log_seq and after.runs.get(drm_license_id(lic)) == 1
    with device.open_model(build_path=path, license_bytes=lic, now=now) as model:
        for _ in range(3):
            model.run({"x": x})
        with pytest.raises(drm.LicenseRefused):
            model.run({"x": x})  # 1 + 3 runs of 4: the cap counts both processes' runs


def test_a_state_file_edited_in_place_with_its_mtime_put_back_is_still_checked(used_device, refused, now):
    device, lic, path, _ = used_device
    device.ledger.load()  # the checked state is now held by the ledger
    state = device.dir / "state.bin"
    info = state.stat()
    blob = bytearray(state.read_bytes())
    blob[-5] ^= 0xFF
    time.sleep(0.02)  # past the file system's timestamp tick, as any later write is
    with open(state, "r+b") as fh:  # same inode, same size
        fh.write(bytes(blob))
    os.utime(state, ns=(info.st_atime_ns, info.st_mtime_ns))  # the mtime put back; the ctime cannot be
    assert state.stat().st_mtime_ns == info.st_mtime_ns
    refused(device, lambda: device.open_model(build_path=path, license_bytes=lic, now=now), "corrupt")


def drm_license_id(token: bytes) -> str:
    payload, _, _ = drm.parse_envelope(token, drm.license.LICENSE_TYP)
    return str(payload["license_id"])
