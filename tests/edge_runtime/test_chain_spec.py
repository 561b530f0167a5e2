"""Chain files and built-in steps: malformed files name the bad field; steps keep their shape rules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.chain.spec import load_chain, parse_chain
from edge_runtime.chain.steps import TensorType, apply, blazeface_anchors, infer, parse_step
from edgemart.core.errors import UsageError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "chains"
GOOD = {
    "stages": [
        {"name": "a", "vendor": "va", "model": {"listing": "m1"}, "inputs": {"x": "x"}},
        {"name": "b", "vendor": "vb", "model": {"build": "b.emdl", "license": "b.lic"},
         "inputs": {"x": {"from": "x", "steps": [{"op": "cast", "dtype": "float32"}]}}},
    ],
    "outputs": {"label": {"from": "a.probabilities", "steps": [{"op": "argmax"}]}},
}  # fmt: skip


def _bad(mutate, path: Path = Path("c.yaml")) -> str:
    data = json.loads(json.dumps(GOOD))
    mutate(data)
    with pytest.raises(UsageError) as info:
        parse_chain(data, path)
    return info.value.message


def test_examples_parse() -> None:
    face = load_chain(EXAMPLES / "face_mesh.yaml")
    assert [s.name for s in face.stages] == ["detect", "mesh"]
    assert face.processes() == {"vendor:mediapipe": [face.stages[0]], "vendor:acme-vision": [face.stages[1]]}
    digits = load_chain(EXAMPLES / "digits_two_vendors.json")
    assert digits.isolation == "vendor" and set(digits.outputs) == {"label_a", "label_b", "probabilities_b"}


def test_good_chain_resolves_paths_against_the_file(tmp_path: Path) -> None:
    spec = parse_chain(GOOD, tmp_path / "chain.yaml")
    assert spec.stage("b").model.build == (tmp_path / "b.emdl").resolve()
    assert spec.producer_of("a.probabilities") == "vendor:va" and spec.producer_of("x") == "supervisor"


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d.update(isolation="thread"), "c.yaml: isolation: expected vendor or stage"),
        (lambda d: d.update(slots=1), "c.yaml: slots: expected an integer from 2 to 64"),
        (lambda d: d.update(timeouts={"frame": -1}), "c.yaml: timeouts.frame: expected a positive number"),
        (lambda d: d.update(extra=1), "c.yaml: extra: unknown field"),
        (lambda d: d.pop("outputs"), "c.yaml: outputs: required field is missing"),
        (lambda d: d["stages"][1].pop("vendor"), "c.yaml: stages[1].vendor: required field is missing"),
        (lambda d: d["stages"][0].update(name="a b"), "c.yaml: stages[0].name: expected a name"),
        (lambda d: d["stages"][1].update(name="a"), "c.yaml: stages[1].name: duplicate name 'a'"),
        (lambda d: d["stages"][1]["model"].pop("license"), "c.yaml: stages[1].model.license: required field"),
        (lambda d: d["stages"][0]["inputs"].update(x="zz.out"), "c.yaml: stages[0].inputs: 'zz.out' does not name"),
        (lambda d: d["stages"][0]["inputs"].update(x="b.out"), "c.yaml: stages[0].inputs: 'b.out' does not name an output of an earlier"),
        (lambda d: d["stages"][1]["inputs"]["x"]["steps"].append({"op": "blur"}), "c.yaml: stages[1].inputs.x.steps[1].op: unknown step 'blur'"),
        (lambda d: d["stages"][1]["inputs"]["x"]["steps"][0].update(dtype="float8"), "c.yaml: stages[1].inputs.x.steps[0].dtype: expected one of"),
        (lambda d: d["outputs"]["label"]["steps"].append({"op": "resize", "size": [0, 3]}), "c.yaml: outputs.label.steps[1].size: expected a list of 2 positive"),
        (lambda d: d["outputs"]["label"]["steps"].append({"op": "transpose", "perm": [0, 0]}), "c.yaml: outputs.label.steps[1].perm: expected a permutation"),
        (lambda d: d["outputs"]["label"]["steps"].append({"op": "argmax", "axes": 1}), "c.yaml: outputs.label.steps[1].axes: unknown parameter"),
        (lambda d: d["outputs"]["label"]["steps"].append({"op": "crop_by_boxes"}), "c.yaml: outputs.label.steps[1].boxes: expected a tensor reference"),
        (lambda d: d.update(inputs={"x": {"dtype": "float32", "shape": [1, -2]}}), "c.yaml: inputs.x.shape: expected a list of sizes"),
    ],
)  # fmt: skip
def test_malformed_chain_names_the_field(mutate, expected: str) -> None:
    assert _bad(mutate).startswith(expected)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="chain file not found"):
        load_chain(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("stages: [\n")
    with pytest.raises(UsageError, match=r"bad.yaml: not valid YAML"):
        load_chain(tmp_path / "bad.yaml")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UsageError, match=r"bad.json: not valid JSON"):
        load_chain(tmp_path / "bad.json")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(UsageError, match=r"list.yaml: top level: expected a mapping"):
        load_chain(tmp_path / "list.yaml")


def test_blazeface_anchors_match_the_model_outputs() -> None:
    anchors = blazeface_anchors([8, 16, 16, 16], [128, 128])
    assert anchors.shape == (896, 2)  # face_detection_short_range: regressors [1, 896, 16]
    assert np.allclose(anchors[0], [0.5 / 16, 0.5 / 16]) and np.allclose(anchors[-1], [7.5 / 8, 7.5 / 8])


def test_steps_follow_their_shape_rules() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((1, 40, 60, 3), dtype=np.float32)
    resize = parse_step({"op": "resize", "size": [20, 30]}, "s")
    out = apply(resize, image, lambda r: image)
    assert out.shape == (1, 20, 30, 3)
    assert infer(resize, TensorType((1, None, None, 3), "float32"), {}, "s") == TensorType(
        (1, 20, 30, 3), "float32"
    )
    # Downscaling by exactly 2 with half-pixel centres averages each 2x2 block.
    assert np.allclose(out[0, 0, 0], image[0, :2, :2].mean(axis=(0, 1)), atol=1e-6)

    crop = parse_step({"op": "crop_by_boxes", "boxes": "d.boxes", "scores": "d.scores"}, "s")
    boxes = np.array([[0.0, 0.0, 0.5, 0.5], [0.25, 0.5, 0.75, 1.0]], np.float32)
    scores = np.array([0.1, 0.9], np.float32)
    cropped = apply(crop, image, lambda r: boxes if r == "d.boxes" else scores)
    assert np.array_equal(cropped, image[:, 10:30, 30:60])  # the top-scoring box, read in place

    probs = rng.random((4, 10), dtype=np.float32)
    argmax = parse_step({"op": "argmax", "axis": -1}, "s")
    assert np.array_equal(apply(argmax, probs, lambda r: probs), probs.argmax(-1))
    assert infer(argmax, TensorType((None, 10), "float32"), {}, "s") == TensorType((None,), "int64")
    norm = parse_step({"op": "normalize", "mean": 0.5, "std": 0.5}, "s")
    assert np.allclose(apply(norm, image, lambda r: image), image * 2 - 1)
    tr = parse_step({"op": "transpose", "perm": [0, 3, 1, 2]}, "s")
    assert apply(tr, image, lambda r: image).shape == (1, 3, 40, 60)
    with pytest.raises(UsageError, match="does not fit rank 2"):
        infer(tr, TensorType((None, 10), "float32"), {}, "s")


def test_blazeface_crop_decodes_only_the_chosen_box_and_matches_the_full_decode() -> None:
    """Per frame only the top-scoring box is decoded; it is the same box the full decode gives."""
    from edge_runtime.chain.steps import decode_boxes

    rng = np.random.default_rng(3)
    crop = parse_step(
        {"op": "crop_by_boxes", "boxes": "d.r", "scores": "d.c", "decode": "blazeface", "margin": 0.25,
         "square": True},
        "s",
    )  # fmt: skip
    image = rng.random((1, 128, 128, 3), dtype=np.float32)
    for _ in range(20):
        regressors = (rng.standard_normal((1, 896, 16)) * 8).astype(np.float32)
        scores = rng.standard_normal((1, 896, 1)).astype(np.float32)
        best = int(scores.reshape(-1).argmax())
        full = decode_boxes(crop, regressors, scores.reshape(-1))
        assert full.shape == (896, 4)
        assert np.array_equal(decode_boxes(crop, regressors, None, only=best), full[best : best + 1])
        out = apply(crop, image, lambda r: regressors if r == "d.r" else scores)  # noqa: B023
        assert out.ndim == 4 and out.shape[0] == 1 and out.shape[-1] == 3
    with pytest.raises(UsageError, match="896 boxes but 5 scores"):
        apply(crop, image, lambda r: regressors if r == "d.r" else scores[:, :5])
    with pytest.raises(UsageError, match="anchors give 896"):
        apply(crop, image, lambda r: regressors[:, :10] if r == "d.r" else scores[:, :10])


@pytest.mark.parametrize(
    "shape,size,layout,dtype",
    [
        ((1, 70, 70, 3), (192, 192), "nhwc", np.float32),
        ((2, 33, 17, 1), (8, 40), "nhwc", np.float32),
        ((1, 3, 25, 31), (64, 12), "nchw", np.float32),
        ((1, 40, 60, 3), (40, 60), "nhwc", np.uint8),
    ],
)
def test_bilinear_resize_matches_the_four_tap_formula(shape, size, layout, dtype) -> None:
    rng = np.random.default_rng(1)
    image = (rng.random(shape) * 255).astype(dtype)
    if layout == "nhwc" and dtype == np.float32:
        image = np.pad(image, ((0, 0), (2, 1), (3, 0), (0, 0)))[:, 2:-1, 3:]  # a non-contiguous view
    step = parse_step({"op": "resize", "size": list(size), "layout": layout}, "s")
    got = apply(step, image, lambda r: image)
    x = image.astype(np.float64) if layout == "nhwc" else image.astype(np.float64).transpose(0, 2, 3, 1)
    n, h, w, c = x.shape
    want = np.empty((n, *size, c))
    for i in range(size[0]):
        fy = min(max((i + 0.5) * h / size[0] - 0.5, 0), h - 1)
        y0 = int(fy)
        y1, wy = min(y0 + 1, h - 1), fy - y0
        for j in range(size[1]):
            fx = min(max((j + 0.5) * w / size[1] - 0.5, 0), w - 1)
            x0 = int(fx)
            x1, wx = min(x0 + 1, w - 1), fx - x0
            want[:, i, j] = (
                x[:, y0, x0] * (1 - wy) * (1 - wx)
                + x[:, y0, x1] * (1 - wy) * wx
                + x[:, y1, x0] * wy * (1 - wx)
                + x[:, y1, x1] * wy * wx
            )
    if layout == "nchw":
        want = want.transpose(0, 3, 1, 2)
    assert got.dtype == np.float32 and got.shape == want.shape and got.flags.c_contiguous
    assert np.allclose(got, want, rtol=1e-5, atol=1e-4 * max(1.0, float(np.abs(want).max())))
