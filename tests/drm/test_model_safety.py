"""drm.model_safety on its own: every hostile construction refused naming the tensor, every corpus model
accepted, and no byte string makes the walk fail with anything but UnsafeModel."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from edgemart.core.model_safety import ModelLimits, UnsafeModel, check_model_bytes
from tests import hostile_models as hm

FUZZ = int(os.environ.get("EDGEMART_FUZZ_EXAMPLES", "300"))


@pytest.fixture(scope="module")
def corpus_models(corpus: Path) -> list[Path]:
    models = sorted((corpus / "models").rglob("*.onnx")) + sorted((corpus / "models").rglob("*.tflite"))
    assert len(models) >= 10
    return models


def test_the_exfiltration_model_is_a_real_attack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the walk, onnx's own reader hands the planted key file back as the bias: the case is live."""
    import onnx

    hm.plant_secret(tmp_path)
    monkeypatch.chdir(tmp_path)
    proto = onnx.load_model_from_string(hm.exfil_gemm_bias())
    onnx.checker.check_model(proto)  # onnx's own path checks accept the relative location
    bias = next(t for t in proto.graph.initializer if t.name == "bias")
    assert numpy_helper.to_array(bias, base_dir="").tobytes() == hm.SECRET


@pytest.mark.parametrize("case", sorted(hm.ONNX_CASES))
def test_bytes_and_a_view_of_them_are_walked_alike(case: str, corpus_models: list[Path]) -> None:
    # A bytes model is walked as it is (faster indexing), any other buffer through a view: same verdicts.
    build, _ = hm.ONNX_CASES[case]
    data = build()
    outcomes = []
    for model in (data, memoryview(data), bytearray(data)):
        with pytest.raises(UnsafeModel) as err:
            check_model_bytes(model)
        outcomes.append(err.value.message)
    assert outcomes[0] == outcomes[1] == outcomes[2]
    for path in corpus_models:
        raw = path.read_bytes()
        assert check_model_bytes(raw) == check_model_bytes(memoryview(raw))


@pytest.mark.parametrize("case", sorted(hm.ONNX_CASES))
def test_hostile_onnx_is_refused_naming_the_tensor(case: str) -> None:
    build, words = hm.ONNX_CASES[case]
    with pytest.raises(UnsafeModel, match=None) as err:
        check_model_bytes(build())
    assert words in err.value.message, err.value.message
    assert "\n" not in err.value.message and err.value.http_status == 422 and err.value.exit_code == 2


@pytest.mark.parametrize("case", sorted(hm.TFLITE_CASES))
def test_hostile_tflite_is_refused(case: str, corpus: Path) -> None:
    base = (corpus / "models" / "mediapipe" / "face_detection_front.tflite").read_bytes()
    build, words = hm.TFLITE_CASES[case]
    with pytest.raises(UnsafeModel) as err:
        check_model_bytes(build(base))
    assert words in err.value.message, err.value.message


def test_the_tflite_edit_alone_keeps_a_valid_model(corpus: Path) -> None:
    """The TFLite cases differ from an accepted model only by the hostile field."""
    base = (corpus / "models" / "mediapipe" / "face_detection_front.tflite").read_bytes()
    assert check_model_bytes(hm._tflite_edit(base, lambda model, schema: None)).format == "tflite"


def test_every_corpus_model_passes_and_is_summarized(corpus_models: list[Path]) -> None:
    for path in corpus_models:
        summary = check_model_bytes(path.read_bytes())
        assert summary.tensors > 0 and summary.declared_bytes > 0, path
        assert summary.format == ("tflite" if path.suffix == ".tflite" else "onnx")


def test_limits_are_configuration(digits_base: Path) -> None:
    raw = digits_base.read_bytes()
    check_model_bytes(raw)
    with pytest.raises(UnsafeModel, match="limit per tensor"):
        check_model_bytes(raw, ModelLimits(max_tensor_bytes=1024))
    with pytest.raises(UnsafeModel, match="model limit"):
        check_model_bytes(raw, ModelLimits(max_total_tensor_bytes=4096))
    with pytest.raises(UnsafeModel, match="more than 3 nodes"):
        check_model_bytes(raw, ModelLimits(max_nodes=3))
    with pytest.raises(UnsafeModel, match="nests graphs 3 deep"):
        check_model_bytes(hm.exfil_if_branch(2), ModelLimits(max_graph_depth=2))


def test_a_refusal_names_every_enclosing_message() -> None:
    """Names are read again only when a refusal needs them (the walk itself skips them): the message still
    gives the whole path, unnamed nodes as their kind, and a name given twice as its last value (protobuf's
    rule for a singular field, which onnxruntime follows)."""
    with pytest.raises(UnsafeModel) as err:
        check_model_bytes(hm.exfil_if_branch(2))
    assert err.value.message.startswith(
        "tensor 'w_then_2' (in graph 'main' > node 'if' > attribute 'then_branch' > graph 'then_1' > node > "
        "attribute 'then_branch' > graph 'then_2') keeps its data outside the model file"
    ), err.value.message
    with pytest.raises(UnsafeModel) as err:
        check_model_bytes(hm.exfil_constant_node())
    assert "tensor 'c_value' (in graph 'main' > node 'const' > attribute 'value')" in err.value.message
    # TensorProto field 8 (name) appended again: the reader keeps the last one, and so does the message.
    raw = hm.huge_declared_tensor()
    import onnx

    proto = onnx.load_model_from_string(raw)
    tensor = proto.graph.initializer[0]
    renamed = tensor.SerializeToString() + b"\x42\x07renamed"
    proto.graph.ClearField("initializer")
    proto.graph.initializer.add().ParseFromString(renamed)
    assert proto.graph.initializer[0].name == "renamed"
    with pytest.raises(UnsafeModel) as err:
        check_model_bytes(proto.SerializeToString())
    assert err.value.message.startswith("tensor 'renamed' (in graph 'main') declares shape"), (
        err.value.message
    )


def test_decrypted_bytes_are_walked_in_place(digits_base: Path) -> None:
    """The device passes its bytearray: no copy of the plaintext is made (memoryview over the buffer)."""
    buf = bytearray(digits_base.read_bytes())
    assert check_model_bytes(buf).format == "onnx"


@settings(max_examples=FUZZ, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_random_bytes_never_crash_the_walk(data: bytes) -> None:
    try:
        check_model_bytes(data)
    except UnsafeModel:
        pass


@settings(max_examples=FUZZ, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_corpus_models_never_crash_the_walk(data: st.DataObject) -> None:
    from tests.conftest import CORPUS

    name = data.draw(
        st.sampled_from(["digits/digits_mlp_base.onnx", "mediapipe/face_detection_front.tflite"])
    )
    raw = bytearray((CORPUS / "models" / name).read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(8, len(raw)))
    try:
        check_model_bytes(bytes(raw[:cut]))
    except UnsafeModel:
        pass
