"""A license-valid sealed build whose model points at files outside itself never opens on the device: the
model-safety walk runs over the decrypted bytes in memory before onnxruntime or LiteRT sees them."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgemart.core.model_safety import UnsafeModel
from tests import hostile_models as hm
from tests.edge_runtime.conftest import NOW


@pytest.mark.parametrize(
    "case", ["gemm_bias_exfiltration", "if_branch", "function_body", "huge_declared_tensor"]
)
def test_sealed_hostile_build_is_refused_before_any_runtime(
    case, tmp_path, monkeypatch, device, factory, build_file
):
    hm.plant_secret(tmp_path)
    monkeypatch.chdir(tmp_path)
    build, words = hm.ONNX_CASES[case]
    sealed = factory.seal(build(), target="onnx-fp32")
    lic = factory.license(device, sealed)
    with pytest.raises(UnsafeModel) as err:
        with device.open_model(build_path=build_file(sealed), license_bytes=lic, now=NOW):
            pass
    assert words in err.value.message
    assert not any(hm.SECRET[:16] in p.read_bytes() for p in Path(device.dir).rglob("*") if p.is_file())


def test_the_walk_remembered_for_a_clean_build_never_covers_a_hostile_one(
    tmp_path, monkeypatch, device, factory, build_file, digits_build
):
    # The device remembers, by SHA-256 of the plaintext, small builds that passed the walk in this process.
    # Opening a clean build many times and then a hostile one (same size class, other bytes) still walks it.
    hm.plant_secret(tmp_path)
    monkeypatch.chdir(tmp_path)
    clean = factory.license(device, digits_build)
    for _ in range(3):
        with device.open_model(build_path=build_file(digits_build), license_bytes=clean, now=NOW):
            pass
    hostile, words = hm.ONNX_CASES["gemm_bias_exfiltration"]
    sealed = factory.seal(hostile(), target="onnx-fp32")
    with pytest.raises(UnsafeModel) as err:
        with device.open_model(
            build_path=build_file(sealed), license_bytes=factory.license(device, sealed), now=NOW
        ):
            pass
    assert words in err.value.message
