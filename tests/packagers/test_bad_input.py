"""Bad models, bad samples and bad options get one precise UsageError, never a traceback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from edgemart.core.errors import UsageError
from packagers import get_packager, inspect_model, load_calibration, package_model
from packagers.arm_cpu import ArmCpuOptions


def test_garbage_bytes_are_not_a_model():
    with pytest.raises(UsageError, match="not a model"):
        inspect_model(b"\x00\x01garbage that is no model at all")
    with pytest.raises(UsageError, match="empty"):
        inspect_model(b"")


def test_model_failing_the_checker(digits_bytes):
    model = onnx.load_from_string(digits_bytes)
    model.graph.node[1].input[0] = "no_such_tensor"
    with pytest.raises(UsageError, match="checker rejected"):
        package_model(model.SerializeToString(), "onnx-fp32")


def test_unsupported_opset(digits_bytes):
    model = onnx.load_from_string(digits_bytes)
    for imp in model.opset_import:
        if imp.domain == "":
            imp.version = 99
    with pytest.raises(UsageError, match="unsupported ONNX opset 99"):
        inspect_model(model.SerializeToString())


def test_dynamic_shapes_without_calibration_name_the_input(cls_model):
    with pytest.raises(UsageError, match=r"input 'x' has dynamic shape \[\?, 3, \?, \?\]"):
        package_model(cls_model, "arm-cpu")
    with pytest.raises(UsageError, match="input 'x' has dynamic shape"):
        package_model(cls_model, "onnx-fp32")


def test_quantizing_target_needs_calibration(digits_bytes):
    with pytest.raises(UsageError, match="needs calibration samples"):
        package_model(digits_bytes, "fpga-xint8")


def test_fp32_without_samples_measures_latency_only(digits_bytes):
    build = package_model(digits_bytes, "onnx-fp32", options={"latency_runs": 2})
    assert build.quality.agreement == {}
    assert any("no samples" in n for n in build.quality.notes)


@pytest.mark.parametrize(
    ("samples", "message"),
    [
        (
            {"image": np.zeros((4, 64), np.float32)},
            r"'x' expects float32 \[\?, 64\] .*, given none; key 'image'",
        ),
        ({"x": np.zeros((4, 64), np.float64)}, r"given \[4, 64\] float64"),
        (
            {"x": np.zeros((4, 32), np.float32)},
            r"'x' expects float32 \[\?, 64\] \(batch on axis 0\) or \[n, \?, 64\] \(n samples on axis 0\), "
            r"given \[4, 32\] float32",
        ),
        ({"x": np.zeros((4, 8, 8), np.float32)}, r"given \[4, 8, 8\] float32"),
        (
            {"x": np.zeros((4, 64), np.float32), "z": np.zeros((4, 2), np.float32)},
            "'z' matches no model input",
        ),
        ({"x": np.zeros((0, 64), np.float32)}, "zero samples"),
    ],
)
def test_calibration_not_matching_the_signature(digits_bytes, samples, message):
    with pytest.raises(UsageError, match=message):
        package_model(digits_bytes, "arm-cpu", calibration=samples)


def test_holdout_mismatch_names_the_split(digits_bytes, digits_cal):
    with pytest.raises(
        UsageError, match=r"holdout data does not fit the model inputs: 'x' .*given \[3, 64\] int64"
    ):
        package_model(
            digits_bytes, "arm-cpu", calibration=digits_cal, holdout={"x": np.zeros((3, 64), np.int64)}
        )


def test_full_int8_tflite_is_sealed_as_uploaded_for_coral_and_arm(digits_builds, digits_hold):
    if "coral-edgetpu" not in digits_builds:
        pytest.skip("the int8 TFLite comes from onnx2tf + TensorFlow: pip install -e '.[coral]' (make venv)")
    int8_tflite = digits_builds["coral-edgetpu"].payload
    for target in ("coral-edgetpu", "arm-cpu"):
        build = package_model(int8_tflite, target, holdout=digits_hold, options={"latency_runs": 1})
        assert build.format == "tflite"
        if target == "coral-edgetpu":
            assert build.payload == int8_tflite
        else:  # the same tensors and ops, plus a metadata entry naming the target (a build hash sells once)
            assert build.payload != int8_tflite and b"edgemart.target" in build.payload
            assert inspect_model(build.payload).op_counts == inspect_model(int8_tflite).op_counts
        assert build.metadata["as_uploaded"] is True
        assert build.quality.passed and build.quality.verdict_reason.startswith("as uploaded")
        assert any(n.startswith("as uploaded") for n in build.quality.notes)
        assert any("ran 450 samples, outputs finite: True" in n for n in build.quality.notes)
    assert build.quality.op_compatibility is None  # arm-cpu: a LiteRT CPU build
    coral = package_model(int8_tflite, "coral-edgetpu", options={"latency_runs": 1})
    assert coral.quality.op_compatibility["ops"] and coral.quality.op_compatibility["source"] == "tflite"
    with pytest.raises(UsageError, match="x86-cpu takes ONNX models; this is a TFLite model"):
        package_model(int8_tflite, "x86-cpu")


def test_pre_quantized_onnx_is_sealed_as_uploaded_for_arm_cpu(digits_builds):
    qdq = digits_builds["x86-cpu"].payload  # a QDQ ONNX someone quantized elsewhere
    assert inspect_model(qdq).quantized and not inspect_model(digits_builds["onnx-fp32"].payload).quantized
    build = package_model(qdq, "arm-cpu", options={"latency_runs": 1})  # no calibration needed
    assert build.payload == qdq and build.metadata["as_uploaded"] is True
    assert "QuantizeLinear" in build.quality.quantized_ops
    assert build.quality.agreement == {} and build.quality.verdict_reason.startswith("as uploaded")


def test_float_tflite_without_calibration_names_a_command_that_works(corpus: Path):
    from packagers._model import full_int8_problems

    model = (corpus / "models" / "mediapipe" / "face_detection_front.tflite").read_bytes()
    assert full_int8_problems(model)[0].endswith(("(float16)", "(float32)"))  # why it is not full int8
    for target in (
        "coral-edgetpu",
        "arm-cpu",
    ):  # quantized with samples (tests/packagers/test_float_tflite.py)
        with pytest.raises(
            UsageError,
            match=rf"edgemart package MODEL.tflite --target {target} --calibration samples.npz --out DIR",
        ) as err:
            package_model(model, target)
        assert "needs calibration samples" in err.value.message and "pip install" not in err.value.message
    with pytest.raises(UsageError, match="fpga-xint8 takes ONNX models; this is a tflite model"):
        package_model(model, "fpga-xint8", calibration={"input": np.zeros((1, 128, 128, 3), np.float32)})


def test_registry_and_typed_options():
    with pytest.raises(
        UsageError, match="valid targets: arm-cpu, coral-edgetpu, fpga-xint8, onnx-fp32, x86-cpu"
    ):
        get_packager("gpu-magic")
    with pytest.raises(UsageError, match="unknown option 'extra_options'.*valid options: .*nodes_to_exclude"):
        get_packager("arm-cpu", {"extra_options": "x"})
    with pytest.raises(UsageError, match="must be one of auto, minmax, entropy, percentile"):
        get_packager("arm-cpu", {"calibration_method": "kl"})
    with pytest.raises(UsageError, match="must be true or false"):
        get_packager("arm-cpu", {"per_channel": "maybe"})
    with pytest.raises(UsageError, match=r"min_agreement must be in \[0, 1\]"):
        get_packager("arm-cpu", {"min_agreement": "1.5"})
    packager = get_packager(
        "arm-cpu", {"per_channel": "false", "nodes_to_exclude": "a, b", "min_snr_db": "12"}
    )
    assert packager.options == ArmCpuOptions(per_channel=False, nodes_to_exclude=("a", "b"), min_snr_db=12.0)
    with pytest.raises(UsageError, match="unknown option 'run_compiler'"):
        get_packager("onnx-fp32", {"run_compiler": "true"})


def test_nodes_to_exclude_must_name_real_nodes(digits_bytes, digits_cal):
    with pytest.raises(UsageError, match="unknown node 'NoSuchNode'"):
        package_model(
            digits_bytes, "arm-cpu", calibration=digits_cal, options={"nodes_to_exclude": "NoSuchNode"}
        )


def test_load_calibration_drops_labels_and_text(corpus: Path, tmp_path: Path):
    samples = load_calibration(corpus / "data" / "rapidocr" / "ch_ppocr_mobile_v2.0_cls_infer.npz")
    assert set(samples) == {"x"}
    with pytest.raises(UsageError, match="not found"):
        load_calibration(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(UsageError, match="cannot read sample file"):
        load_calibration(bad)


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"", "as .npz"),  # EOFError from numpy
        ("zip:a.txt", "'a.txt' is not a .npy array"),  # numpy hands back bytes
        ("zip:x.npy", "'x.npy' is not a .npy array"),
        ("npy", "a single .npy array"),  # np.load returns an ndarray, which is no context manager
    ],
)
def test_load_calibration_refuses_malformed_files(tmp_path, content, needle) -> None:
    """Found by schemathesis through the store upload; the loader itself must refuse them precisely."""
    import io
    import zipfile

    import numpy as np

    from packagers import load_calibration

    path = tmp_path / "cal.npz"
    if content == "npy":
        buf = io.BytesIO()
        np.save(buf, np.zeros((2, 64), np.float32))
        path.write_bytes(buf.getvalue())
    elif isinstance(content, str):
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr(content.split(":", 1)[1], b"not an array")
    else:
        path.write_bytes(content)
    with pytest.raises(UsageError, match=needle):
        load_calibration(path)
