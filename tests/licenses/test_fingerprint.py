"""Weight fingerprints on real corpus models: every transform kind still names its base; independents never match."""

from __future__ import annotations

import numpy as np
import pytest

from edgemart.core.errors import UsageError
from licenses import _transforms as T
from licenses._fingerprint import fingerprint, match
from licenses._formats import detect_format, parse_model


def _fp(model: bytes):
    return fingerprint(parse_model(model))


@pytest.fixture(scope="module")
def digits_fp(digits_bytes):
    return _fp(digits_bytes)


@pytest.mark.parametrize("kind", sorted(T.mlp_transforms()))
def test_mlp_transforms_match_digits_base(kind, digits_bytes, open_index) -> None:
    derived = T.mlp_transforms()[kind](digits_bytes)
    matches = open_index.lookup(derived)
    assert matches, kind
    assert matches[0].name == "digits-base"
    k, n = (int(x) for x in matches[0].layers_matched.split("/"))
    assert k >= 2 and n == 3


@pytest.mark.parametrize(
    "kind", ["renamed", "opset_changed", "fp16", "finetune_noise", "pruned50", "int8_qdq"]
)
def test_generic_transforms_match_digits_base(kind, digits_bytes, digits_calibration_x, open_index) -> None:
    derived = T.onnx_transforms(digits_calibration_x)[kind](digits_bytes)
    assert derived != digits_bytes
    matches = open_index.lookup(derived)
    assert [m.name for m in matches][:1] == ["digits-base"], kind
    assert matches[0].evidence["relation"] == "weights"


@pytest.mark.parametrize("kind", ["renamed", "fp16", "finetune_noise", "pruned50"])
def test_generic_transforms_match_conv_model(kind, model_bytes, open_index) -> None:
    derived = T.onnx_transforms()[kind](model_bytes("rapidocr/ch_ppocr_mobile_v2.0_cls_infer.onnx"))
    matches = open_index.lookup(derived)
    assert [m.name for m in matches][:1] == ["ppocr-cls"], kind


def test_conv_model_int8_qdq(model_bytes, corpus, open_index) -> None:
    samples = np.load(corpus / "data/rapidocr/ch_ppocr_mobile_v2.0_cls_infer.npz")["x"][:4]
    derived = T.int8_qdq(model_bytes("rapidocr/ch_ppocr_mobile_v2.0_cls_infer.onnx"), {"x": samples})
    matches = open_index.lookup(derived)
    assert [m.name for m in matches][:1] == ["ppocr-cls"]


@pytest.mark.parametrize(
    ("relative", "base"),
    [
        ("digits/digits_mlp_finetuned.onnx", "digits-base"),
        ("digits/digits_mlp_pruned.onnx", "digits-base"),
        ("mediapipe/face_detection_short_range.tflite", "blazeface-front"),
    ],
)
def test_corpus_derivatives(relative, base, model_bytes, manifest, open_index) -> None:
    matches = open_index.lookup(model_bytes(relative))
    assert matches and matches[0].name == base


def test_short_range_is_a_byte_copy(model_bytes, open_index) -> None:
    match_ = open_index.lookup(model_bytes("mediapipe/face_detection_short_range.tflite"))[0]
    assert match_.evidence["relation"] == "byte_copy" and match_.similarity == 1.0


@pytest.mark.parametrize(
    "relative",
    [
        "digits/digits_mlp_independent.onnx",
        "mediapipe/face_detection_full_range_sparse.tflite",
        "mediapipe/face_detection_back.tflite",
        "mediapipe/face_landmark.tflite",
        "rapidocr/ch_PP-OCRv4_det_infer.onnx",
    ],
)
def test_independent_models_do_not_match(relative, model_bytes, open_index) -> None:
    assert open_index.lookup(model_bytes(relative)) == []


def test_manifest_relations_agree(manifest, corpus) -> None:
    """Every weight relation the corpus measured is reproduced by the exact match, both ways."""
    for relation in manifest["relations"]:
        a = relation.get("base") or relation.get("a")
        b = relation.get("derived") or relation.get("b")
        expected = relation["type"] in ("identical", "finetuned_derivative", "pruned_derivative")
        fa, fb = _fp((corpus / a).read_bytes()), _fp((corpus / b).read_bytes())
        assert match(fb, fa).derived is expected, relation["type"]
        assert match(fa, fb).derived is expected, relation["type"]


def test_independent_digits_stay_far_below_threshold(model_bytes, digits_fp) -> None:
    result = match(_fp(model_bytes("digits/digits_mlp_independent.onnx")), digits_fp)
    assert result.layers_matched == 0
    assert result.similarity < 0.6


def test_detect_format(model_bytes, digits_bytes) -> None:
    assert detect_format(digits_bytes) == "onnx"
    assert detect_format(model_bytes("mediapipe/face_detection_front.tflite")) == "tflite"
    with pytest.raises(UsageError, match="unrecognized model format"):
        parse_model(b"GIF89a not a model")
    with pytest.raises(UsageError, match="empty"):
        parse_model(b"")


def test_fp16_weights_are_dequantized(model_bytes) -> None:
    layers = parse_model(model_bytes("mediapipe/face_detection_full_range.tflite")).layers
    assert layers and all(layer.weight.dtype == np.float32 for layer in layers)
    assert all(np.isfinite(layer.weight).all() and np.abs(layer.weight).sum() > 0 for layer in layers)


def test_sparse_weights_densify_like_litert(model_bytes, corpus) -> None:
    """Our densifier agrees with LiteRT's DENSIFY+DEQUANTIZE on every sparse tensor of the corpus model."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from licenses._formats import _tflite_tensor_value

    path = corpus / "models/mediapipe/face_detection_full_range_sparse.tflite"
    data = path.read_bytes()
    interpreter = Interpreter(
        model_path=str(path),
        experimental_preserve_all_tensors=True,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], np.float32))
    interpreter.invoke()
    root = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    graph = root.subgraphs[0]
    checked = 0
    for index, tensor in enumerate(graph.tensors):
        if tensor.sparsity is None:
            continue
        ours = _tflite_tensor_value(tensor, bytes(root.buffers[tensor.buffer].data)).astype(np.float32)
        densified = next(op.outputs[0] for op in graph.operators if op.inputs[0] == index)
        dequantized = next(
            op.outputs[0] for op in graph.operators if len(op.inputs) and op.inputs[0] == densified
        )
        np.testing.assert_array_equal(ours, interpreter.get_tensor(dequantized))
        checked += 1
    assert checked > 10


def test_tflite_conversion_runs_like_the_onnx_model(digits_bytes, digits_test) -> None:
    """The ONNX->TFLite transform is a real conversion: LiteRT reproduces onnxruntime's probabilities."""
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    x = np.load(digits_test)["x"][:8]
    expected = ort.InferenceSession(digits_bytes).run(["probabilities"], {"x": x})[0]
    interpreter = Interpreter(model_content=T.mlp_to_tflite(digits_bytes))
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    got = []
    for row in x:
        interpreter.set_tensor(inp["index"], row[None, :])
        interpreter.invoke()
        got.append(interpreter.get_tensor(out["index"])[0])
    np.testing.assert_allclose(np.stack(got), expected, atol=1e-5)
