"""The built-in pre/post-processing steps that run between chain stages, with their shape rules.

Each step is pure numpy: it validates its parameters when the chain file is parsed, predicts its
output (shape, dtype) when the chain starts, and transforms arrays frame by frame."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_runtime.chain.slots import DTYPES
from edgemart.core.errors import UsageError

Shape = tuple[int | None, ...] | None  # None = rank unknown; None entries = dynamic dims
Fetch = Callable[[str], np.ndarray]


@dataclass(frozen=True)
class TensorType:
    shape: Shape
    dtype: str | None

    def describe(self) -> str:
        dims = (
            "?"
            if self.shape is None
            else "[" + ",".join("?" if d is None else str(d) for d in self.shape) + "]"
        )
        return f"{self.dtype or '?'} {dims}"


@dataclass(frozen=True)
class Step:
    """One parsed step: `op` plus its validated parameters; `refs` names the extra tensors it reads."""

    op: str
    params: Mapping[str, Any]
    refs: Mapping[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, **self.params, **self.refs}


class _Params:
    """Reads one step's parameters, raising UsageError with the path of the bad field."""

    def __init__(self, raw: Mapping[str, Any], path: str) -> None:
        self.raw = raw
        self.path = path
        self.used = {"op"}

    def get(self, name: str, default: Any = None) -> Any:
        self.used.add(name)
        return self.raw.get(name, default)

    def fail(self, name: str, what: str) -> UsageError:
        return UsageError(f"{self.path}.{name}: {what}")

    def ints(
        self, name: str, n: int | None, *, positive: bool, default: Any = None
    ) -> tuple[int, ...] | None:
        value = self.get(name, default)
        if value is None:
            return None
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        if ok and n is not None:
            ok = len(value) == n
        if ok and positive:
            ok = all(v > 0 for v in value)
        if not ok:
            count = f"{n} " if n is not None else ""
            raise self.fail(
                name, f"expected a list of {count}{'positive ' if positive else ''}integers, got {value!r}"
            )
        return tuple(value)

    def floats(self, name: str, default: Any) -> tuple[float, ...]:
        value = self.get(name, default)
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in items):
            raise self.fail(name, f"expected a number or a list of numbers, got {value!r}")
        return tuple(float(v) for v in items)

    def integer(self, name: str, default: int) -> int:
        value = self.get(name, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(name, f"expected an integer, got {value!r}")
        return value

    def choice(self, name: str, options: tuple[str, ...], default: str) -> str:
        value = self.get(name, default)
        if value not in options:
            raise self.fail(name, f"expected one of {', '.join(options)}, got {value!r}")
        return str(value)

    def ref(self, name: str, *, required: bool) -> str | None:
        value = self.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value:
            raise self.fail(name, "expected a tensor reference ('input' or 'stage.output')")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.raw) - self.used)
        if unknown:
            raise UsageError(f"{self.path}.{unknown[0]}: unknown parameter for step {self.raw['op']!r}")


# --- parameter parsing -------------------------------------------------------------------------


def _parse_resize(p: _Params) -> tuple[dict[str, Any], dict[str, str]]:
    size = p.ints("size", 2, positive=True)
    if size is None:
        raise p.fail("size", "required: [height, width]")
    return {
        "size": list(size),
        "layout": p.choice("layout", ("nhwc", "nchw"), "nhwc"),
        "method": p.choice("method", ("bilinear", "nearest"), "bilinear"),
    }, {}


def _parse_crop(p: _Params) -> tuple[dict[str, Any], dict[str, str]]:
    refs = {"boxes": p.ref("boxes", required=True)}
    scores = p.ref("scores", required=False)
    if scores is not None:
        refs["scores"] = scores
    decode = p.choice("decode", ("none", "blazeface"), "none")
    params: dict[str, Any] = {"decode": decode, "layout": p.choice("layout", ("nhwc", "nchw"), "nhwc")}
    (margin,) = p.floats("margin", 0.0)
    if not 0.0 <= margin <= 4.0:
        raise p.fail("margin", f"expected 0..4 (fraction of the box size), got {margin}")
    params["margin"] = margin
    square = p.get("square", False)
    if not isinstance(square, bool):
        raise p.fail("square", f"expected true or false, got {square!r}")
    params["square"] = square
    if decode == "blazeface":
        strides = p.ints("strides", None, positive=True, default=[8, 16, 16, 16])
        size = p.ints("input_size", 2, positive=True, default=[128, 128])
        params["strides"], params["input_size"] = list(strides or ()), list(size or ())
    return params, {k: v for k, v in refs.items() if v is not None}


def _parse_normalize(p: _Params) -> tuple[dict[str, Any], dict[str, str]]:
    mean, std = p.floats("mean", 0.0), p.floats("std", 1.0)
    if any(s == 0 for s in std):
        raise p.fail("std", "must not be zero")
    return {"mean": list(mean), "std": list(std), "axis": p.integer("axis", -1)}, {}


def _parse_argmax(p: _Params) -> tuple[dict[str, Any], dict[str, str]]:
    keepdims = p.get("keepdims", False)
    if not isinstance(keepdims, bool):
        raise p.fail("keepdims", f"expected true or false, got {keepdims!r}")
    return {"axis": p.integer("axis", -1), "keepdims": keepdims}, {}


def _parse_transpose(p: _Params) -> tuple[dict[str, Any], dict[str, str]]:
    perm = p.ints("perm", None, positive=False)
    if perm is None or sorted(perm) != list(range(len(perm))):
        raise p.fail("perm", f"expected a permutation of 0..n-1, got {p.raw.get('perm')!r}")
    return {"perm": list(perm)}, {}


def _parse_cast(p: _Params) -> tuple[dict[str, Any], dict[str, str]]:
    return {"dtype": p.choice("dtype", DTYPES, "")}, {}


_PARSERS: dict[str, Callable[[_Params], tuple[dict[str, Any], dict[str, str]]]] = {
    "resize": _parse_resize,
    "crop_by_boxes": _parse_crop,
    "normalize": _parse_normalize,
    "argmax": _parse_argmax,
    "transpose": _parse_transpose,
    "cast": _parse_cast,
}
STEP_NAMES = tuple(_PARSERS)


def parse_step(raw: Any, path: str) -> Step:
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: expected a mapping with an 'op' field, got {type(raw).__name__}")
    op = raw.get("op")
    if not isinstance(op, str) or op not in _PARSERS:  # `op: [..]` is unhashable: no dict lookup
        raise UsageError(f"{path}.op: unknown step {op!r} (built-in steps: {', '.join(STEP_NAMES)})")
    p = _Params(raw, path)
    params, refs = _PARSERS[op](p)
    p.finish()
    return Step(op, params, refs)


# --- shape/dtype rules -------------------------------------------------------------------------


def _axis(axis: int, rank: int, what: str) -> int:
    if not -rank <= axis < rank:
        raise UsageError(f"{what}: axis {axis} is out of range for rank {rank}")
    return axis % rank


def infer(step: Step, t: TensorType, ref_types: Mapping[str, TensorType], what: str) -> TensorType:
    """The (shape, dtype) a step produces from `t`; UsageError naming `what` when it cannot apply."""
    shape, rank = t.shape, None if t.shape is None else len(t.shape)
    if step.op == "resize" or step.op == "crop_by_boxes":
        if rank is not None and rank not in (3, 4):
            raise UsageError(f"{what}: {step.op} needs an image of rank 3 or 4, gets {t.describe()}")
        if step.op == "crop_by_boxes":
            boxes = ref_types["boxes"]
            need = 16 if step.params["decode"] == "blazeface" else 4
            if boxes.shape and boxes.shape[-1] is not None and boxes.shape[-1] < need:
                raise UsageError(
                    f"{what}: crop_by_boxes boxes {step.refs['boxes']} need a last dim >= {need}, gets {boxes.describe()}"
                )
            new_hw: tuple[int | None, int | None] = (None, None)
        else:
            h, w = step.params["size"]
            new_hw = (h, w)
        if shape is None:
            return TensorType(None, t.dtype)
        dims = list(shape)
        nhwc = step.params["layout"] == "nhwc"
        hi = (rank - 3) + (0 if nhwc else 1)  # type: ignore[operator]
        dims[hi], dims[hi + 1] = new_hw
        if step.op == "crop_by_boxes" and rank == 4:
            dims[0] = 1
        dtype = t.dtype if step.op == "crop_by_boxes" or step.params["method"] == "nearest" else "float32"
        return TensorType(tuple(dims), dtype)
    if step.op == "normalize":
        return TensorType(shape, "float32")
    if step.op == "argmax":
        if shape is None:
            return TensorType(None, "int64")
        ax = _axis(step.params["axis"], len(shape), what)
        dims = list(shape)
        if step.params["keepdims"]:
            dims[ax] = 1
        else:
            del dims[ax]
        return TensorType(tuple(dims), "int64")
    if step.op == "transpose":
        perm = step.params["perm"]
        if shape is None:
            return TensorType(None, t.dtype)
        if len(perm) != len(shape):
            raise UsageError(f"{what}: transpose perm {perm} does not fit rank {len(shape)}")
        return TensorType(tuple(shape[i] for i in perm), t.dtype)
    if step.op == "cast":
        return TensorType(shape, step.params["dtype"])
    raise AssertionError(step.op)


# --- frame-time implementations ----------------------------------------------------------------


def _resize(img: np.ndarray, size: tuple[int, int], nhwc: bool, method: str) -> np.ndarray:
    squeeze = img.ndim == 3
    x = img[None] if squeeze else img
    if not nhwc:
        x = x.transpose(0, 2, 3, 1)
    h, w = x.shape[1], x.shape[2]
    oh, ow = size
    if method == "nearest":
        ys = np.minimum((np.arange(oh) + 0.5) * h / oh, h - 1).astype(np.intp)
        xs = np.minimum((np.arange(ow) + 0.5) * w / ow, w - 1).astype(np.intp)
        out = x[:, ys][:, :, xs]
    else:  # bilinear, half-pixel centres (align_corners=False)
        y0, y1, wy = _bilinear_axis(h, oh)
        x0, x1, wx = _bilinear_axis(w, ow)
        xf = x.astype(np.float32, copy=False)
        # Separable, rows first (at the source width, usually the smaller side when a crop is scaled up),
        # then columns; each pass is two whole-row/whole-pixel gathers (take) and an in-place lerp
        # a + (b - a) * w on the gathered copies: no full-size temporaries beyond those two.
        top = xf.take(y0, axis=1)
        rows = xf.take(y1, axis=1)
        rows -= top
        rows *= wy[None, :, None, None]
        rows += top
        out = rows.take(x0, axis=2)
        right = rows.take(x1, axis=2)
        right -= out
        right *= wx[None, None, :, None]
        out += right
    if not nhwc:
        out = out.transpose(0, 3, 1, 2)
    out = np.ascontiguousarray(out)
    return out[0] if squeeze else out


@functools.lru_cache(maxsize=64)
def _bilinear_axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (below, above) and weight of the upper one for each output position along one axis
    (half-pixel centres, clamped at the edges); read-only, computed once per size pair."""
    f = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    below = np.floor(f).astype(np.intp)
    above = np.minimum(below + 1, n_in - 1)
    weight = (f - below).astype(np.float32)
    for a in (below, above, weight):
        a.setflags(write=False)
    return below, above, weight


def blazeface_anchors(strides: list[int], input_size: list[int]) -> np.ndarray:
    """SSD anchor centres (x, y) of MediaPipe's BlazeFace: 2 anchors per layer, layers of equal stride merged.

    Computed once per configuration (read-only array): decode runs on every frame."""
    return _blazeface_anchors(tuple(strides), tuple(input_size))


@functools.lru_cache(maxsize=16)
def _blazeface_anchors(strides: tuple[int, ...], input_size: tuple[int, ...]) -> np.ndarray:
    h, w = input_size
    centres: list[tuple[float, float]] = []
    i = 0
    while i < len(strides):
        stride, per_cell = strides[i], 0
        while i < len(strides) and strides[i] == stride:
            per_cell += 2
            i += 1
        gh, gw = -(-h // stride), -(-w // stride)
        for y in range(gh):
            for x in range(gw):
                centres.extend([((x + 0.5) / gw, (y + 0.5) / gh)] * per_cell)
    anchors = np.asarray(centres, dtype=np.float32)
    anchors.flags.writeable = False
    return anchors


def decode_boxes(
    step: Step, boxes: np.ndarray, scores: np.ndarray | None, *, only: int | None = None
) -> np.ndarray:
    """Boxes as [N, 4] normalized (ymin, xmin, ymax, xmax); with ``only``, just that box, as [1, 4]."""
    raw = boxes.reshape(-1, boxes.shape[-1])
    pick = slice(None) if only is None else slice(only, only + 1)
    if step.params["decode"] == "none":
        return raw[pick, :4].astype(np.float32)
    anchors = blazeface_anchors(step.params["strides"], step.params["input_size"])
    if len(anchors) != len(raw):
        raise UsageError(f"crop_by_boxes: {len(raw)} boxes but the blazeface anchors give {len(anchors)}")
    raw, anchors = raw[pick].astype(np.float32), anchors[pick]
    ih, iw = step.params["input_size"]
    cx = raw[:, 0] / iw + anchors[:, 0]
    cy = raw[:, 1] / ih + anchors[:, 1]
    bw, bh = raw[:, 2] / iw, raw[:, 3] / ih
    return np.stack([cy - bh / 2, cx - bw / 2, cy + bh / 2, cx + bw / 2], axis=1)


def _crop(step: Step, img: np.ndarray, fetch: Fetch) -> np.ndarray:
    boxes_raw = fetch(step.refs["boxes"])
    scores = fetch(step.refs["scores"]).reshape(-1) if "scores" in step.refs else None
    n_boxes = boxes_raw.size // boxes_raw.shape[-1] if boxes_raw.ndim else 0
    if scores is not None and len(scores) != n_boxes:
        raise UsageError(f"crop_by_boxes: {n_boxes} boxes but {len(scores)} scores")
    best = int(np.argmax(scores)) if scores is not None else 0
    # Only the chosen box is decoded (per frame this is 1 of BlazeFace's 896); decode_boxes checks the rest.
    box = decode_boxes(step, boxes_raw, scores, only=best)
    ymin, xmin, ymax, xmax = (float(v) for v in box[0])
    nhwc = step.params["layout"] == "nhwc"
    x = img if img.ndim == 4 else img[None]
    h, w = (x.shape[1], x.shape[2]) if nhwc else (x.shape[2], x.shape[3])
    cy, cx = (ymin + ymax) / 2 * h, (xmin + xmax) / 2 * w
    bh, bw = max(ymax - ymin, 0.0) * h, max(xmax - xmin, 0.0) * w
    if step.params["square"]:
        bh = bw = max(bh, bw)
    scale = 1.0 + step.params["margin"]
    bh, bw = bh * scale, bw * scale
    y0, y1 = int(np.clip(np.floor(cy - bh / 2), 0, h - 1)), int(np.clip(np.ceil(cy + bh / 2), 1, h))
    x0, x1 = int(np.clip(np.floor(cx - bw / 2), 0, w - 1)), int(np.clip(np.ceil(cx + bw / 2), 1, w))
    y1, x1 = max(y1, y0 + 1), max(x1, x0 + 1)
    out = x[:1, y0:y1, x0:x1] if nhwc else x[:1, :, y0:y1, x0:x1]
    return out if img.ndim == 4 else out[0]


def apply(step: Step, x: np.ndarray, fetch: Fetch) -> np.ndarray:
    """Run one step on a frame's array; `fetch` returns the extra tensors the step refers to."""
    p = step.params
    if step.op == "resize":
        return _resize(x, tuple(p["size"]), p["layout"] == "nhwc", p["method"])  # type: ignore[arg-type]
    if step.op == "crop_by_boxes":
        return _crop(step, x, fetch)
    if step.op == "normalize":
        axis = p["axis"] % max(x.ndim, 1)
        shape = [1] * x.ndim
        if len(p["mean"]) > 1 or len(p["std"]) > 1:
            shape[axis] = -1
        mean = np.asarray(p["mean"], np.float32).reshape(shape)
        std = np.asarray(p["std"], np.float32).reshape(shape)
        return ((x.astype(np.float32) - mean) / std).astype(np.float32)
    if step.op == "argmax":
        return np.argmax(x, axis=p["axis"], keepdims=p["keepdims"]).astype(np.int64)
    if step.op == "transpose":
        return np.ascontiguousarray(np.transpose(x, p["perm"]))
    if step.op == "cast":
        return x.astype(p["dtype"])
    raise AssertionError(step.op)
