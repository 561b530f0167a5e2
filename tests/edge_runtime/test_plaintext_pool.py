"""The plaintext buffer kept for the next build of the same size (edge_runtime.backends._pooled).

It is kept only zeroed, only once onnxruntime has its own copy, and it is reused only when nothing else
refers to it: a bytes object somebody holds must never change under them (the attack below holds one)."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_runtime import backends
from tests.edge_runtime.conftest import NOW

pytestmark = pytest.mark.skipif(sys.implementation.name != "cpython", reason="the pool is CPython only")


def _big_onnx() -> bytes:
    """A 2 MiB MatMul model: above the size from which builds are hashed and wiped on the helper thread."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((512, 1024)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 512])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1024])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model).SerializeToString()


def _drain() -> None:
    from drm.container import _worker

    _worker().submit(lambda: None).result()  # the helper runs its work in order: the wipe is done


def test_a_reopened_build_reuses_the_zeroed_buffer_and_runs(device, factory) -> None:
    plain = _big_onnx()
    sealed = factory.seal(plain, target="onnx-fp32")
    lic = factory.license(device, sealed, max_runs=None)
    x = np.ones((1, 512), np.float32)
    with device.open_model(build=sealed.container, license_bytes=lic, now=NOW) as first:
        expected = first.run({"x": x})["y"]
    _drain()
    pooled = backends._pooled
    assert pooled is not None and len(pooled) == len(plain) and not any(pooled)  # kept, and zero
    pooled_id = id(pooled)
    del pooled
    with device.open_model(build=sealed.container, license_bytes=lic, now=NOW) as second:
        assert np.array_equal(second.run({"x": x})["y"], expected)
    _drain()
    assert id(backends._pooled) == pooled_id  # the same object went round again
    assert not any(backends._pooled or b"")


def test_a_pooled_buffer_someone_holds_is_never_written(device, factory) -> None:
    plain = _big_onnx()
    sealed = factory.seal(plain, target="onnx-fp32")
    lic = factory.license(device, sealed, max_runs=None)
    with device.open_model(build=sealed.container, license_bytes=lic, now=NOW):
        pass
    _drain()
    held = backends._pooled  # an outside reference, as a traceback or a runtime might keep
    assert held is not None
    with device.open_model(build=sealed.container, license_bytes=lic, now=NOW):
        pass
    _drain()
    assert not any(held)  # the decryption went into another buffer: what we hold never changed
    assert backends._pooled is not held
