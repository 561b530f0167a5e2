"""The TPM 2.0 anchor (#20 item 3) against a software TPM (swtpm, started here) through tpm2-tools: a restored
device state is refused where the file anchor, copied along by the user, lets it through; the counter cannot
be reset by redefining its NV index; a crash mid-commit still rolls forward; `device status` names the anchor."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

import drm
from edge_runtime import Device
from edge_runtime.anchor import TpmAnchor

pytestmark = pytest.mark.skipif(
    not (shutil.which("swtpm") and shutil.which("tpm2_nvdefine")),
    reason="swtpm and tpm2-tools are not installed (make apt installs them)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def swtpm(tmp_path: Path):
    """A fresh software TPM on two local TCP ports; yields its TCTI string."""
    state = tmp_path / "swtpm"
    state.mkdir()
    for _ in range(5):
        port = _free_port()
        ctrl = port + 1  # the swtpm TCTI talks to the control channel on port + 1
        proc = subprocess.Popen(
            ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}",
             "--server", f"type=tcp,port={port},bindaddr=127.0.0.1", "--ctrl", f"type=tcp,port={ctrl},bindaddr=127.0.0.1",
             "--flags", "not-need-init,startup-clear"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        tcti = f"swtpm:host=127.0.0.1,port={port}"
        for _ in range(100):
            if proc.poll() is not None:
                break
            done = subprocess.run(["tpm2_getrandom", "4"], env={"TPM2TOOLS_TCTI": tcti, "PATH": "/usr/bin:/bin"},
                                  capture_output=True)  # fmt: skip
            if done.returncode == 0:
                try:
                    yield tcti
                finally:
                    proc.kill()
                    proc.wait(10)
                return
            time.sleep(0.05)
        proc.kill()
        proc.wait(10)
        assert proc.stderr is not None
        problem = (
            proc.stderr.read().decode(errors="replace")[-500:] + done.stderr.decode(errors="replace")[-300:]
        )
    pytest.fail(f"swtpm did not start: {problem}")


@pytest.fixture
def x(digits_test):
    return np.load(digits_test)["x"][:1]


def _use(device: Device, lic: bytes, path: Path, x, n: int, now: int) -> None:
    with device.open_model(build_path=path, license_bytes=lic, now=now) as model:
        for _ in range(n):
            model.run({"x": x})


def test_a_restore_the_file_anchor_lets_through_is_refused_by_the_tpm(
    swtpm, tmp_path, factory, digits_build, build_file, anchor_dir, now, x, refused
):
    path = build_file(digits_build)
    results = {}
    for kind in ("file", "tpm"):
        tpm = TpmAnchor(0x01500E10, swtpm) if kind == "tpm" else None
        device = Device.init(tmp_path / kind, trust=factory.root_pem, now=now, tpm=tpm)
        lic = factory.license(device, digits_build, max_runs=10)
        snap = tmp_path / f"snap-{kind}"
        shutil.copytree(device.dir, snap / "dev")
        shutil.copytree(anchor_dir, snap / "anchors", dirs_exist_ok=True)
        _use(device, lic, path, x, 10, now)
        # The user restores everything they can reach: the device dir and the anchor directory.
        shutil.rmtree(device.dir)
        shutil.copytree(snap / "dev", device.dir)
        shutil.rmtree(anchor_dir)
        shutil.copytree(snap / "anchors", anchor_dir)
        restored = Device.open(device.dir)
        if kind == "file":
            with restored.open_model(build_path=path, license_bytes=lic, now=now) as model:
                results[kind] = model.runs_left()
        else:
            refused(restored, lambda d=restored, li=lic: d.open_model(build_path=path, license_bytes=li, now=now),
                    "disagrees with the rollback anchor")  # fmt: skip
            results[kind] = "refused"
            # The refusal record it appended does not let the restored log catch up with the counter.
            for _ in range(3):
                assert not restored.status()["state"]["ok"]
                with pytest.raises(drm.LicenseRefused):
                    restored.open_model(build_path=path, license_bytes=lic, now=now)
    assert results == {"file": 10, "tpm": "refused"}  # the file anchor alone: the 10 runs are back


def test_status_names_the_anchor_and_a_removed_anchor_config_is_refused(
    swtpm, tmp_path, factory, digits_build, build_file, now, x, refused
):
    device = Device.init(tmp_path / "d", trust=factory.root_pem, now=now, tpm=TpmAnchor(0x01500E11, swtpm))
    st = device.status()
    assert st["anchor"]["kind"] == "tpm" and "0x01500e11" in st["anchor"]["where"] and st["state"]["ok"]
    lic = factory.license(device, digits_build, max_runs=10)
    _use(device, lic, build_file(digits_build), x, 3, now)
    # Switching the device to the file anchor (delete anchor.json, plant a file anchor) is refused.
    (device.dir / "anchor.json").unlink()
    plain = Device.open(device.dir)
    assert plain.status()["anchor"]["kind"] == "file"
    refused(plain, lambda: plain.open_model(build_path=build_file(digits_build), license_bytes=lic, now=now),
            "anchored by a tpm anchor")  # fmt: skip


def test_redefining_the_nv_index_cannot_reset_the_counter(
    swtpm, tmp_path, factory, digits_build, build_file, now, x, refused
):
    """Root's attack on the TPM: snapshot the state, use runs, restore, then undefine and redefine the NV
    counter hoping for a fresh one. A new counter starts at the highest value the TPM has counted."""
    tpm = TpmAnchor(0x01500E12, swtpm)
    device = Device.init(tmp_path / "d", trust=factory.root_pem, now=now, tpm=tpm)
    lic = factory.license(device, digits_build, max_runs=10)
    snap = tmp_path / "snap"
    shutil.copytree(device.dir, snap)
    _use(device, lic, build_file(digits_build), x, 10, now)
    shutil.rmtree(device.dir)
    shutil.copytree(snap, device.dir)
    tpm._run("tpm2_nvundefine", "-C", "o", f"{tpm.nv_index:#x}")
    tpm._run(
        "tpm2_nvdefine", "-C", "o", "-s", "8", "-a", "nt=counter|ownerwrite|ownerread", f"{tpm.nv_index:#x}"
    )
    tpm._run("tpm2_nvincrement", "-C", "o", f"{tpm.nv_index:#x}")
    restored = Device.open(device.dir)
    refused(restored, lambda: restored.open_model(build_path=build_file(digits_build), license_bytes=lic, now=now),
            "disagrees with the rollback anchor")  # fmt: skip


def test_a_crash_between_the_counter_and_the_state_rolls_forward(swtpm, tmp_path, factory, now):
    device = Device.init(tmp_path / "d", trust=factory.root_pem, now=now, tpm=TpmAnchor(0x01500E13, swtpm))
    ledger = device.ledger
    st, _ = ledger.load()
    line, anchor_blob, _, new = ledger.prepare(st, event="sync", t=now, detail="test")
    # The commit's first two steps (log record, counter), then a crash before the state file is replaced.
    (ledger.log_path).open("ab").write(line + b"\n")
    ledger.anchor.write(new.log_seq, anchor_blob, new.anchor)
    st2, rolled = Device.open(device.dir).ledger.load()
    assert rolled and st2.generation == new.generation and st2.log_seq == 1


def test_cli_init_with_a_tpm_anchor_and_status(swtpm, tmp_path):
    import json
    import os
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    base = [sys.executable, "-m", "edgemart", "device"]
    r = subprocess.run([*base, "init", "--device-dir", str(tmp_path / "d"), "--anchor", "tpm",
                        "--tpm-nv-index", "0x01500e14", "--tpm-tcti", swtpm, "--json"],
                       capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "TPM 2.0 NV counter 0x01500e14" in json.loads(r.stdout)["anchor"]
    r = subprocess.run([*base, "status", "--device-dir", str(tmp_path / "d")], capture_output=True, text=True,
                       env=env, timeout=120)  # fmt: skip
    assert r.returncode == 0 and "hardware monotonic counter" in r.stdout
    r = subprocess.run([*base, "init", "--device-dir", str(tmp_path / "e"), "--anchor", "tpm",
                        "--tpm-nv-index", "12"], capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--tpm-nv-index" in r.stderr
