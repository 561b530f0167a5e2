"""Packaging jobs end in words a seller can act on: a reason code, the specific reason (which input, which
node, which limit) and the next step; `seller upload --wait` ends on failed and dead jobs with exit 1."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgemart.cli import main
from store.app import worker_loop
from tests.store.conftest import make_store, serve_http


def _custom_op_model() -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])
    node = helper.make_node("Weird", ["x"], ["y"], name="weird_node", domain="com.example")
    graph = helper.make_graph([node], "g", [x], [y])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def _mismatched_matmul_model() -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "W")
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm0")
    graph = helper.make_graph([node], "g", [x], [y], initializer=[w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.fixture
def st(tmp_path):
    store = make_store(tmp_path, WORKER="none")
    try:
        yield store
    finally:
        store.ctx.close()


def _package(st, model: bytes, calibration: bytes | None, target: str = "arm-cpu") -> dict:
    r = st.upload("sally", model, name="m", targets=target, calibration=calibration)
    assert r.status_code == 202, r.json
    worker_loop(st.ctx).drain()
    job = st.client.get(f"/api/v1/jobs/{r.json['jobs'][0]}", headers=st.auth("sally")).json
    assert job["state"] == "failed" and job["attempts"] == 1, job  # a property of the upload: no retries
    listing = st.client.get("/api/v1/listings/m", headers=st.auth("sally")).json
    assert listing["builds"][0]["error"].startswith(job["failure"]["reason"].rstrip("."))
    assert "/tmp" not in json.dumps(job) and "Traceback" not in json.dumps(job)
    return job["failure"]


def test_unsupported_op_names_its_node(st):
    failure = _package(st, _custom_op_model(), _npz(x=np.ones((20, 4), np.float32)))
    assert failure["code"] == "unsupported_op"
    assert "'weird_node'" in failure["reason"] and "com.example:Weird" in failure["reason"]
    assert "--listing m" in failure["next_step"]


def test_shape_mismatch_inside_the_model_names_the_node(st):
    failure = _package(st, _mismatched_matmul_model(), _npz(x=np.ones((20, 6), np.float32)))
    assert failure["code"] == "shape_mismatch"
    assert "'mm0'" in failure["reason"] and "MatMul" in failure["reason"]


def test_calibration_that_does_not_fit_an_input_is_refused_at_upload(st, digits_base, digits_calibration):
    """Checked synchronously by the sample contract now (issue #18): no job is created to fail later."""
    before = st.counts()
    with np.load(digits_calibration) as d:
        narrow = _npz(x=d["x"][:, :32])
    r = st.upload("sally", digits_base.read_bytes(), name="m", targets="arm-cpu", calibration=narrow)
    assert r.status_code == 422, r.json
    (problem,) = r.json["error"]["problems"]
    assert problem["code"] == "samples_do_not_fit"
    assert "'x' expects float32 [?, 64]" in problem["message"] and "given [200, 32]" in problem["message"]
    assert st.counts() == before


def test_calibration_too_small_says_how_many_are_needed(st, digits_base, digits_calibration):
    with np.load(digits_calibration) as d:
        three = _npz(x=d["x"][:3])
    failure = _package(st, digits_base.read_bytes(), three)
    assert failure["code"] == "calibration_too_small"
    assert "3 sample(s)" in failure["reason"] and "at least 8" in failure["reason"]
    assert "more calibration samples" in failure["next_step"]


def test_missing_calibration(st, digits_base):
    failure = _package(st, digits_base.read_bytes(), None)
    assert failure["code"] == "calibration_missing" and "calibration" in failure["next_step"]


# ------------------------------------------------------------------------------------------ the CLI


@pytest.fixture
def live(tmp_path):
    store = make_store(tmp_path / "data", JOB_MAX_ATTEMPTS=1)
    try:
        with serve_http(store.app) as url:
            yield url, store
    finally:
        store.ctx.close()


def _upload(url: str, token: str, model: Path, *extra: str) -> list[str]:
    return [
        "seller", "upload", str(model), "--name", "m", "--license", "MIT", "--store", url,
        "--token", token, "--wait", *extra,
    ]  # fmt: skip


def test_wait_ends_on_a_failed_job_with_exit_1_and_the_reason(live, capsys, tmp_path):
    url, store = live
    model = tmp_path / "weird.onnx"
    model.write_bytes(_custom_op_model())
    calibration = tmp_path / "cal.npz"
    calibration.write_bytes(_npz(x=np.ones((20, 4), np.float32)))
    argv = _upload(
        url, store.tokens["sally"], model, "--targets", "arm-cpu", "--calibration", str(calibration)
    )
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "edgemart: arm-cpu failed: " in err and "'weird_node'" in err and "  next: " in err


def test_wait_ends_on_a_dead_lettered_job_and_json_lists_the_reasons(live, capsys, tmp_path, monkeypatch):
    url, store = live

    from store.sandbox import SandboxChildError
    from store.services import confined

    def crash(*args: object, **kwargs: object) -> None:  # what the sandbox answers for a packager bug
        raise SandboxChildError("RuntimeError", "builtins", "packager bug with /secret/path in it")

    monkeypatch.setattr(confined, "package", crash)
    model = tmp_path / "m.onnx"
    model.write_bytes(_custom_op_model())
    assert main(_upload(url, store.tokens["sally"], model, "--targets", "onnx-fp32", "--json")) == 1
    doc = json.loads(capsys.readouterr().out)
    [failure] = doc["failures"]
    assert failure["state"] == "dead" and failure["target"] == "onnx-fp32"
    assert failure["code"] == "internal" and failure["reason"].startswith("gave up after 1 attempts")
    assert "RuntimeError" in failure["reason"] and "/secret/path" not in failure["reason"]
    assert "admin" in failure["next_step"]
    assert doc["results"]["onnx-fp32"]["state"] == "dead"
