"""Issue #17 evasion suite: derivatives hidden by graph rewrites are blocked naming their base and the share of
its parameters reused; independent models put through the same rewrites are allowed.

Everything is generated here from corpus models and from models trained with numpy (licenses._zoo): an LSTM
voice-activity detector whose public export keeps its weights inside an If, and small MLPs (one shipped as
TFLite). One case per rewrite; licenses/_evasion.py lists them."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

from licenses import LicenseIndex, check_model
from licenses import _evasion as E
from licenses import _zoo as Z
from licenses._fingerprint import fingerprint, match
from licenses._formats import is_fixed_tensor, parse_model

PROPRIETARY = "LicenseRef-Proprietary"


@pytest.fixture(scope="module")
def suite(corpus: Path) -> E.Suite:
    return E.build_suite(corpus)


@pytest.fixture(scope="module")
def evasion_index(suite: E.Suite, model_bytes):
    with tempfile.TemporaryDirectory() as tmp:
        index = LicenseIndex(Path(tmp) / "index")
        for name, model, license_expr in suite.bases:
            index.add(model, name=name, license=license_expr)
        # other open models in the index, so the right base must win among several
        index.add(
            model_bytes("rapidocr/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
            name="ppocr-cls",
            license="Apache-2.0",
        )
        index.add(
            model_bytes("mediapipe/face_detection_front.tflite"), name="blazeface-front", license="Apache-2.0"
        )
        yield index


def _case(suite: E.Suite, label: str) -> E.Case:
    return next(c for c in suite.cases if c.label == label)


def test_suite_lists_every_case(suite: E.Suite) -> None:
    assert [c.label for c in suite.cases] == E.case_labels()
    assert len(suite.derivatives) >= 25 and len(suite.independents) >= 25
    # every derivative transform has an independent counterpart put through the same rewrite
    assert {c.transform for c in suite.derivatives} <= {c.transform for c in suite.independents}


@pytest.mark.parametrize("label", [label for label in E.case_labels() if "-independent:" not in label])
def test_derivative_is_blocked_naming_its_base(label: str, suite: E.Suite, evasion_index) -> None:
    case = _case(suite, label)
    decision = check_model(case.model, declared_license=PROPRIETARY, index=evasion_index)
    assert decision.outcome == "block", label
    findings = [f for f in decision.findings if f.code == "undeclared_derivative"]
    assert findings and findings[0].evidence["base"] == case.base, [f.evidence.get("base") for f in findings]
    evidence = findings[0].evidence
    share = evidence["parameter_share"]
    assert evidence["tensors_matched"], "the evidence names the tensors that matched"
    assert all(t["similarity"] >= 0.8 for t in evidence["tensors_matched"])
    if case.transform in ("new_head", "removed_layer"):
        assert 0.2 <= share < 1.0, share
    else:  # inserted layers keep every base tensor
        assert share >= 0.9, share
    assert f"{share:.0%} of its weight parameters found" in findings[0].message


@pytest.mark.parametrize("label", [label for label in E.case_labels() if "-independent:" in label])
def test_independent_is_allowed(label: str, suite: E.Suite, evasion_index) -> None:
    case = _case(suite, label)
    decision = check_model(case.model, declared_license=PROPRIETARY, index=evasion_index)
    assert decision.outcome == "allow", [f.message for f in decision.findings]
    assert evasion_index.lookup(case.model) == []


def test_cc_by_nc_base_blocks_the_if_wrapped_copy_on_its_license(suite: E.Suite, evasion_index) -> None:
    decision = check_model(
        _case(suite, "digits-nc:if_wrapped").model, declared_license=PROPRIETARY, index=evasion_index
    )
    forbids = next(f for f in decision.findings if f.code == "base_license_forbids")
    assert forbids.evidence["base_license"] == "CC-BY-NC-4.0"


def test_partial_derivative_evidence_states_the_share(suite: E.Suite, evasion_index) -> None:
    """A new head keeps the two hidden layers (6144 of 6464 weights): the evidence says so, tensor by tensor."""
    match_ = evasion_index.lookup(_case(suite, "digits-nc:new_head").model)[0]
    assert match_.name == "digits-nc"
    evidence = match_.evidence
    assert evidence["parameters_total"] == 64 * 64 + 64 * 32 + 32 * 10
    assert evidence["parameters_matched"] == 64 * 64 + 64 * 32
    assert evidence["parameter_share"] == pytest.approx(6144 / 6464, abs=1e-4)
    assert len(evidence["tensors_matched"]) == 2


def test_gate_reorder_is_matched_gate_by_gate(suite: E.Suite, evasion_index) -> None:
    """ONNX LSTM W (i,o,f,c gate blocks) against the base's PyTorch-layout (i,f,g,o) MatMul weight."""
    match_ = evasion_index.lookup(_case(suite, "vad-stream:batched_lstm_onnx_gate_order").model)[0]
    uploads = {name for t in match_.evidence["tensors_matched"] for name in t["upload"]}
    assert {f"Y:W[0].{gate}" for gate in "ifco"} <= uploads
    assert {f"Y:R[0].{gate}" for gate in "ifco"} <= uploads


# ------------------------------------------------------------------------------------ discovery and fixed


def test_weights_inside_if_branches_are_found() -> None:
    parsed = parse_model(Z.vad_streaming_if(Z.train_vad(0)))
    summary = parsed.summary()
    assert summary["learned_tensors"] == 8  # w_ih, w_hh, w1, w2 in each branch
    assert summary["fixed_tensors"] == 4  # the DFT basis and the 0/1 pair-sum matrix in each branch
    assert summary["locations"] == ["graph/If.else_branch", "graph/If.then_branch"]
    assert summary["graphs"] == 3


def test_the_vad_exports_compute_the_same_function() -> None:
    """The If export, the If-less export and the batched LSTM export are one model: same outputs."""
    import onnxruntime as ort

    weights = Z.train_vad(0)
    assert Z.vad_accuracy(weights) > 0.9  # it was trained, not just initialised
    frame = np.random.default_rng(3).normal(0, 1, (1, Z.FRAME)).astype(np.float32)
    state = np.zeros((1, Z.HIDDEN), np.float32)
    prob_if = Z.run_vad_step(Z.vad_streaming_if(weights), frame, state, state, sr=16000)[0]
    prob_plain = Z.run_vad_step(Z.vad_streaming_plain(weights), frame, state, state)[0]
    session = ort.InferenceSession(Z.vad_sequence_lstm(weights), providers=["CPUExecutionProvider"])
    prob_seq = session.run(None, {"frames": frame[None]})[0].reshape(1, 1)
    np.testing.assert_allclose(prob_if, prob_plain, atol=1e-6)
    np.testing.assert_allclose(prob_seq, prob_if, atol=1e-5)


@pytest.mark.parametrize(
    "transform",
    ["function_body", "loop_body", "constant_and_sparse_attributes", "sparse_initializers", "if_wrapped_qdq"],
)
def test_rewrites_keep_every_learned_tensor(transform: str, digits_bytes) -> None:
    rewritten = E.GRAPH_REWRITES[transform](digits_bytes)
    found = parse_model(rewritten).summary()
    assert found["learned_tensors"] >= 3, found
    result = match(fingerprint(parse_model(rewritten)), fingerprint(parse_model(digits_bytes)))
    assert result.derived and result.layers_matched_text == "3/3"


def _positional_encoding(positions: int, dim: int) -> np.ndarray:
    pos = np.arange(positions)[:, None]
    rates = 1 / 10000 ** (np.arange(0, dim, 2) / dim)
    table = np.zeros((positions, dim))
    table[:, 0::2], table[:, 1::2] = np.sin(pos * rates), np.cos(pos * rates)
    return table


def _mel_bank(filters: int, bins: int) -> np.ndarray:
    edges = np.linspace(0, bins - 1, filters + 2)
    k = np.arange(bins)
    return np.stack(
        [
            np.clip(np.minimum((k - a) / (b - a), (c - k) / (c - b)), 0, None)
            for a, b, c in zip(edges, edges[1:], edges[2:], strict=False)
        ]
    )


def _anchor_grid(size: int) -> np.ndarray:
    centers = (np.arange(size) + 0.5) / size
    x, y = np.meshgrid(centers, centers)
    return np.stack([x.ravel(), y.ravel(), np.full(size * size, 1.0), np.full(size * size, 1.0)], axis=1)


@pytest.mark.parametrize(
    "tensor",
    [
        pytest.param(Z.dft_basis(), id="windowed_dft"),
        pytest.param(np.fft.rfft(np.eye(64)).real.T, id="plain_dft"),
        pytest.param(_positional_encoding(64, 32), id="positional_encoding"),
        pytest.param(_mel_bank(20, 65), id="mel_filter_bank"),
        pytest.param(_anchor_grid(16), id="anchor_grid"),
        pytest.param(np.eye(48), id="identity"),
        pytest.param(np.zeros((32, 32)), id="zeros"),
        pytest.param(np.full((16, 64), 0.25), id="constant_fill"),
        pytest.param(Z.pair_sum(), id="pair_sum"),
    ],
)
def test_fixed_tensors_carry_no_evidence(tensor: np.ndarray) -> None:
    assert is_fixed_tensor(np.asarray(tensor, np.float32)[:, :, None])


def test_learned_tensors_are_not_fixed(model_bytes) -> None:
    weights = Z.train_vad(0)
    for tensor in (weights.w_ih, weights.w_hh, weights.w1, *Z.train_mlp(0)[::2]):
        assert not is_fixed_tensor(tensor[:, :, None])
    for relative in ("digits/digits_mlp_base.onnx", "rapidocr/ch_PP-OCRv4_det_infer.onnx"):
        parsed = parse_model(model_bytes(relative))
        assert not [layer.name for layer in parsed.layers if layer.fixed and layer.weight.size >= 64]


def test_shared_front_end_alone_is_no_evidence(evasion_index) -> None:
    """Two independently trained VADs share the DFT front end bit for bit; that links nothing."""
    ours = fingerprint(parse_model(Z.vad_streaming_if(Z.train_vad(1))))
    assert all("dft" not in name and "pairs" not in name for name in ours.names)
    assert evasion_index.lookup(Z.vad_streaming_if(Z.train_vad(1))) == []
