"""LicensedModel.run_into: outputs written into the caller's arrays (chain slots), same results, checks and
metering as run(). onnxruntime writes them itself (IOBinding); LiteRT's are copied once from its buffers."""

from __future__ import annotations

import numpy as np
import pytest

import drm
from tests.edge_runtime.conftest import NOW


def _targets(model) -> dict[str, np.ndarray]:
    return {spec.name: np.full(spec.shape, np.nan, dtype=spec.dtype) for spec in model.outputs}


def _static_onnx() -> bytes:
    """Two outputs of static shape (the corpus digits model's batch dimension is dynamic)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 10)).astype(np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["logits"]),
            helper.make_node("ArgMax", ["logits"], ["label"], axis=1),
        ],
        "static",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10]),
            helper.make_tensor_value_info("label", TensorProto.INT64, [1, 1]),
        ],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model).SerializeToString()


def test_onnx_outputs_are_written_into_the_given_arrays(device, factory, digits_test) -> None:
    x = np.load(digits_test)["x"][:1].astype(np.float32)
    sealed = factory.seal(_static_onnx(), target="onnx-fp32")
    lic = factory.license(device, sealed, max_runs=10)
    with device.open_model(build=sealed.container, license_bytes=lic, now=NOW) as model:
        expected = model.run({"x": x})
        out = _targets(model)
        address = {name: a.ctypes.data for name, a in out.items()}
        got = model.run_into({"x": x}, out)
        for name, value in expected.items():
            assert np.array_equal(got[name], value)
        for name, target in out.items():
            assert got[name] is target and target.ctypes.data == address[name]  # no copy, no new array
        assert model.runs_left() == 8  # metered like run()


def test_litert_outputs_are_copied_once_into_the_given_arrays(
    device, factory, blazeface_build, blazeface_data
):
    image = np.load(blazeface_data)["input"][:1]
    lic = factory.license(device, blazeface_build, max_runs=None)
    with device.open_model(build=blazeface_build.container, license_bytes=lic, now=NOW) as model:
        expected = model.run({"input": image})
        out = _targets(model)
        got = model.run_into({"input": image}, out)
        for name, value in expected.items():
            assert got[name] is out[name] and np.array_equal(out[name], value)
        # Only some outputs given: the others come back as usual.
        first = model.outputs[0].name
        partial = model.run_into({"input": image}, {first: np.empty_like(expected[first])})
        assert set(partial) == set(expected)


def test_arrays_that_do_not_fit_an_output_are_refused_before_any_run(
    device, factory, digits_build, digits_test
):
    x = np.load(digits_test)["x"][:1]
    lic = factory.license(device, digits_build, max_runs=10)
    with device.open_model(build=digits_build.container, license_bytes=lic, now=NOW) as model:
        spec = model.outputs[0]
        shape = tuple(1 if d is None else d for d in spec.shape)
        bad = {
            "unknown": {"no_such_output": np.empty((1,), np.float32)},
            "dynamic": {spec.name: np.empty(shape, spec.dtype)},  # the digits output's batch is dynamic
            "dtype": {spec.name: np.empty(shape, np.float64)},
            "readonly": {spec.name: np.empty(shape, spec.dtype)},
        }
        bad["readonly"][spec.name].flags.writeable = False
        for _what, out in bad.items():
            with pytest.raises(drm.UsageError):
                model.run_into({"x": x}, out)
        assert model.runs_left() == 10  # nothing was run or counted
