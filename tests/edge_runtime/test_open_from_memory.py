"""A build already in memory (`open_model(build=...)`): the same checks as from a file, read in place.

Attacks: a tampered or truncated container, another build under this license, a hostile model sealed with
a valid license, and ambiguous arguments. The caller's buffer is never written to or kept."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

import drm
from edgemart.core.model_safety import UnsafeModel
from tests import hostile_models as hm
from tests.edge_runtime.conftest import NOW


def test_a_container_in_memory_runs_like_the_file(device, factory, digits_build, build_file, digits_test):
    lic = factory.license(device, digits_build)
    x = np.load(digits_test)["x"][:4]
    buffer = bytearray(digits_build.container)
    before = hashlib.sha256(buffer).digest()
    with device.open_model(build=buffer, license_bytes=lic, now=NOW) as from_memory:
        a = from_memory.run({"x": x})
    with device.open_model(build_path=build_file(digits_build), license_bytes=lic, now=NOW) as from_file:
        b = from_file.run({"x": x})
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert hashlib.sha256(buffer).digest() == before  # read in place, never written
    buffer.extend(b"x")  # BufferError if the device still held a view of it


@pytest.mark.parametrize("where", ["header", "first_chunk", "tag", "truncated", "extended"])
def test_a_tampered_container_in_memory_is_refused(where, device, factory, refused, digits_build):
    lic = factory.license(device, digits_build)
    data = bytearray(digits_build.container)
    if where == "header":
        data[20] ^= 1
    elif where == "first_chunk":
        data[-100] ^= 1
    elif where == "tag":
        data[-1] ^= 1
    elif where == "truncated":
        del data[-17:]
    else:
        data += b"\0"
    with pytest.raises((drm.LicenseRefused, drm.UsageError)) as info:
        device.open_model(build=bytes(data), license_bytes=lic, now=NOW)
    if isinstance(info.value, drm.LicenseRefused):
        assert "integrity" in info.value.reason or "build" in info.value.reason, info.value.reason


def test_another_build_under_this_license_is_refused(device, factory, refused, digits_build, digits_base):
    other = factory.seal(digits_base.read_bytes() + b"", target="onnx-fp32")  # same model, other key
    lic = factory.license(device, digits_build)
    refused(device, lambda: device.open_model(build=other.container, license_bytes=lic, now=NOW), "build")


def test_a_hostile_model_in_memory_is_walked_before_any_runtime(tmp_path, monkeypatch, device, factory):
    hm.plant_secret(tmp_path)
    monkeypatch.chdir(tmp_path)
    build, words = hm.ONNX_CASES["gemm_bias_exfiltration"]
    sealed = factory.seal(build(), target="onnx-fp32")
    with pytest.raises(UnsafeModel) as err:
        device.open_model(build=sealed.container, license_bytes=factory.license(device, sealed), now=NOW)
    assert words in err.value.message


def test_ambiguous_or_missing_arguments_are_usage_errors(device, factory, digits_build, build_file):
    lic = factory.license(device, digits_build)
    with pytest.raises(drm.UsageError, match="one of build, build_path or listing"):
        device.open_model(
            build=digits_build.container, build_path=build_file(digits_build), license_bytes=lic
        )
    with pytest.raises(drm.UsageError, match="needs license_bytes"):
        device.open_model(build=digits_build.container)
    with pytest.raises(drm.UsageError, match="not an edgemart container"):
        device.open_model(build=b"not a container at all", license_bytes=lic, now=NOW)
