"""License enforcement on real models: outputs match the plain model, and every attack is a recorded refusal."""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
import pytest

import drm
from edge_runtime import Device

DAY = 86400
NOW = int(time.time())  # within the conftest's NOW by seconds; the clock tolerance absorbs the difference


def test_onnx_outputs_bit_identical_to_plain_onnxruntime(
    tmp_path, device, factory, digits_build, digits_base, digits_test, build_file, refused
):
    lic = factory.license(device, digits_build)
    x = np.load(digits_test)["x"]
    plain = ort.InferenceSession(str(digits_base), providers=["CPUExecutionProvider"])
    with device.open_model(build_path=build_file(digits_build), license_bytes=lic, now=NOW) as model:
        assert (
            model.license_id and model.build_hash == digits_build.build_hash and model.target == "onnx-fp32"
        )
        assert [s.name for s in model.inputs] == ["x"] and model.inputs[0].shape == (None, 64)
        for i in range(0, 40, 8):
            got = model.run({"x": x[i : i + 8]})
            want = plain.run(None, {"x": x[i : i + 8]})
            for spec, ref in zip(model.outputs, want, strict=True):
                np.testing.assert_array_equal(got[spec.name], ref)
                assert got[spec.name].dtype == ref.dtype
    report = device.verify_log()
    # One reservation before the first run, one release of the unused part on close: 5 runs counted.
    assert report["ok"] and report["events"] == {"run": 2} and report["matches_state"]
    assert report["runs_by_license"] == {model.license_id: 5}


def test_tflite_outputs_bit_identical_to_plain_litert(
    tmp_path, device, factory, blazeface_build, blazeface_model, blazeface_data, build_file, refused
):
    from ai_edge_litert.interpreter import Interpreter

    lic = factory.license(device, blazeface_build)
    data = np.load(blazeface_data)["input"]
    plain = Interpreter(model_path=str(blazeface_model))
    plain.allocate_tensors()
    with device.open_model(build_path=build_file(blazeface_build), license_bytes=lic, now=NOW) as model:
        assert model.backend_name == "litert" and model.inputs[0].shape == (1, 128, 128, 3)
        for i in range(len(data)):
            got = model.run({"input": data[i : i + 1]})
            plain.set_tensor(plain.get_input_details()[0]["index"], data[i : i + 1])
            plain.invoke()
            for d in plain.get_output_details():
                np.testing.assert_array_equal(got[d["name"]], plain.get_tensor(d["index"]))


def test_run_cap_counts_each_call_and_refuses_after(
    tmp_path, device, factory, digits_build, digits_test, build_file, refused
):
    lic = factory.license(device, digits_build, max_runs=3)
    x = np.load(digits_test)["x"][:2]
    path = build_file(digits_build)
    with device.open_model(build_path=path, license_bytes=lic, now=NOW) as model:
        for left in (2, 1, 0):
            model.run({"x": x})
            assert model.runs_left() == left
        refused(device, lambda: model.run({"x": x}), "run cap exhausted")
    # Re-opening (or replaying the same license file) does not reset the counter.
    refused(
        device, lambda: device.open_model(build_path=path, license_bytes=lic, now=NOW), "run cap exhausted"
    )
    report = device.verify_log()
    # One reservation of all 3 runs (the cap), nothing left to give back, two refusals.
    assert report["events"] == {"run": 1, "refused": 2} and report["matches_state"]
    assert report["runs_by_license"] == {model.license_id: 3}


def test_replayed_old_license_after_exhausting_grants_nothing(
    tmp_path, device, factory, digits_build, digits_test, build_file, refused
):
    old = factory.license(device, digits_build, max_runs=1, now=NOW - 3600)
    new = factory.license(device, digits_build, max_runs=1, now=NOW)
    path = build_file(digits_build)
    x = np.load(digits_test)["x"][:1]
    for lic in (old, new):
        with device.open_model(build_path=path, license_bytes=lic, now=NOW) as model:
            model.run({"x": x})
    for lic in (old, new):
        refused(
            device,
            lambda lic=lic: device.open_model(build_path=path, license_bytes=lic, now=NOW),
            "run cap exhausted",
        )


def test_wrong_device(tmp_path, factory, digits_build, device, build_file, refused):
    other = Device.init(tmp_path / "other", trust=factory.root_pem, now=NOW)
    lic = factory.license(other, digits_build)  # bound to the other device (and wrapped to its keys)
    refused(
        device,
        lambda: device.open_model(build_path=build_file(digits_build), license_bytes=lic, now=NOW),
        "bound to another device",
    )


def test_license_for_another_target_of_the_same_build_is_refused(
    factory, digits_build, device, build_file, refused
):
    """A license names the target its build was made for; a container sealed for another target (same
    plaintext, so the same build hash) does not run under it, on open or on install."""
    import dataclasses

    arm = dataclasses.replace(digits_build, target="arm-cpu")
    lic = factory.license(device, arm)  # license says arm-cpu; the container header says onnx-fp32
    refused(
        device,
        lambda: device.open_model(build_path=build_file(digits_build), license_bytes=lic, now=NOW),
        "target",
    )
    refused(device, lambda: device.install(build=digits_build.container, license=lic, now=NOW), "target")


def test_license_claiming_this_device_but_wrapped_for_another_fails_unwrap(
    tmp_path, factory, digits_build, device, build_file, refused
):
    other = Device.init(tmp_path / "other", trust=factory.root_pem, now=NOW)
    lic = factory.license(device, digits_build, recipient=other.keys.kem_public())
    refused(
        device,
        lambda: device.open_model(build_path=build_file(digits_build), license_bytes=lic, now=NOW),
        "unwrap failed",
    )


def test_expired_and_expiry_during_a_session(
    tmp_path, device, factory, digits_build, digits_test, build_file, refused
):
    lic = factory.license(device, digits_build, days=1)
    path = build_file(digits_build)
    x = np.load(digits_test)["x"][:1]
    with device.open_model(build_path=path, license_bytes=lic, now=NOW) as model:
        model.run({"x": x})
        model.now = NOW + 2 * DAY
        refused(device, lambda: model.run({"x": x}), "expired")
    refused(
        device, lambda: device.open_model(build_path=path, license_bytes=lic, now=NOW + 2 * DAY), "expired"
    )


def test_not_yet_valid(tmp_path, device, factory, digits_build, build_file, refused):
    lic = factory.future_license(device, digits_build, starts=NOW + 3 * DAY)
    refused(
        device,
        lambda: device.open_model(build_path=build_file(digits_build), license_bytes=lic, now=NOW),
        "not yet valid",
    )


def test_clock_rollback_refused_and_recorded(
    tmp_path, device, factory, digits_build, digits_test, build_file, refused
):
    lic = factory.license(device, digits_build, days=2)
    path = build_file(digits_build)
    x = np.load(digits_test)["x"][:1]
    with device.open_model(build_path=path, license_bytes=lic, now=NOW + DAY) as model:
        model.run({"x": x})
    # Winding the clock back a day (to get more evaluation time) is a rollback, not a fresh start.
    refused(device, lambda: device.open_model(build_path=path, license_bytes=lic, now=NOW), "clock rollback")
    # Within the tolerance is fine (NTP jitter).
    with device.open_model(build_path=path, license_bytes=lic, now=NOW + DAY - 60) as model:
        model.run({"x": x})
    # Forward again past expiry: the expired license stays expired even if the clock is later set back.
    refused(
        device, lambda: device.open_model(build_path=path, license_bytes=lic, now=NOW + 3 * DAY), "expired"
    )


def test_trusted_time_never_below_license_issue_time(
    tmp_path, device, factory, digits_build, build_file, refused
):
    # Issued "in the future" relative to the device clock: trusted now = max(clock, hwm, issued_at),
    # so a 1-day license issued at NOW+5d is judged from NOW+5d, not from the lagging clock.
    lic = factory.license(device, digits_build, days=1, now=NOW + 5 * DAY)
    with device.open_model(build_path=build_file(digits_build), license_bytes=lic, now=NOW) as model:
        assert model.runs_left() == 100


def test_revoked_license(tmp_path, device, factory, digits_build, digits_test, build_file, refused):
    lic = factory.license(device, digits_build)
    lid = drm.verify_license(
        lic, root=factory.authority.cert, now=NOW, device_id=device.device_id
    ).claims.license_id
    path = build_file(digits_build)
    x = np.load(digits_test)["x"][:1]
    with device.open_model(build_path=path, license_bytes=lic, now=NOW) as model:
        model.run({"x": x})
        device.install_revocations(factory.revocations(version=2, revoked=[lid]), now=NOW)
        refused(device, lambda: model.run({"x": x}), "revoked")  # also mid-session
    refused(device, lambda: device.open_model(build_path=path, license_bytes=lic, now=NOW), "revoked")


def test_revocation_list_downgrade_refused(tmp_path, device, factory, digits_build, build_file, refused):
    lic = factory.license(device, digits_build)
    lid = drm.verify_license(
        lic, root=factory.authority.cert, now=NOW, device_id=device.device_id
    ).claims.license_id
    old = factory.revocations(version=1, revoked=[])
    device.install_revocations(old, now=NOW)
    device.install_revocations(factory.revocations(version=2, revoked=[lid]), now=NOW)
    path = build_file(digits_build)
    # Through the API: an older list is refused and not installed.
    refused(device, lambda: device.install_revocations(old, now=NOW), "older than held version 2")
    # On disk: copying the old list over the new one does not un-revoke.
    (device.dir / "revocation.bin").write_bytes(old)
    refused(
        device,
        lambda: device.open_model(build_path=path, license_bytes=lic, now=NOW),
        "older than held version 2",
    )
    (device.dir / "revocation.bin").unlink()
    refused(
        device,
        lambda: device.open_model(build_path=path, license_bytes=lic, now=NOW),
        "revocation list missing",
    )


def test_tampered_build_bit_flip(tmp_path, device, factory, digits_build, build_file, refused):
    lic = factory.license(device, digits_build)
    data = bytearray(digits_build.container)
    data[len(data) // 2] ^= 0x01
    path = tmp_path / "tampered.emdl"
    path.write_bytes(bytes(data))
    refused(device, lambda: device.open_model(build_path=path, license_bytes=lic, now=NOW), "integrity")


def test_swapped_build_under_this_license(
    tmp_path, device, factory, digits_build, corpus, build_file, refused
):
    # Another seller's build (a different model) presented under this license.
    other = factory.seal(
        (corpus / "models" / "digits" / "digits_mlp_finetuned.onnx").read_bytes(), target="onnx-fp32"
    )
    lic = factory.license(device, digits_build)
    path = tmp_path / "swapped.emdl"
    path.write_bytes(other.container)
    refused(device, lambda: device.open_model(build_path=path, license_bytes=lic, now=NOW), "another build")
    # Same build re-sealed under a different key with the header naming the licensed hash: decrypt fails.
    resealed = factory.seal(digits_build.plaintext, target="onnx-fp32")
    path.write_bytes(resealed.container)
    refused(device, lambda: device.open_model(build_path=path, license_bytes=lic, now=NOW), "integrity")


def test_license_for_another_build(
    tmp_path, device, factory, digits_build, blazeface_build, build_file, refused
):
    lic = factory.license(device, blazeface_build)
    refused(
        device,
        lambda: device.open_model(build_path=build_file(digits_build), license_bytes=lic, now=NOW),
        "another build",
    )


def test_license_from_an_untrusted_issuer(tmp_path, device, factory, digits_build, build_file, refused):
    rogue = type(factory)()
    lic = rogue.license(device, digits_build)
    refused(
        device,
        lambda: device.open_model(build_path=build_file(digits_build), license_bytes=lic, now=NOW),
        "pinned root",
    )


def test_shape_and_dtype_mismatch_name_the_input(
    tmp_path, device, factory, digits_build, build_file, refused
):
    lic = factory.license(device, digits_build)
    with device.open_model(build_path=build_file(digits_build), license_bytes=lic, now=NOW) as model:
        with pytest.raises(drm.UsageError, match="input 'x': dtype float64"):
            model.run({"x": np.zeros((1, 64))})
        with pytest.raises(drm.UsageError, match=r"input 'x': shape \[1, 63\]"):
            model.run({"x": np.zeros((1, 63), np.float32)})
        assert model.runs_left() == 100  # refused inputs cost no run
