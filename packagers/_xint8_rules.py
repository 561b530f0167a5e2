"""Vitis AI XINT8 rules on a power-of-two QDQ graph: the DPU compiler's constraints on quantize positions
(pos = -log2(scale)), enforced where they can be and checked node by node for the quality report.

Constraints (Vitis AI / Quark ONNX quantizer, XINT8 mode):
  Conv/Gemm   shift_cut  = wpos + ipos - opos in [0, 16];  shift_bias = wpos + ipos - bpos in
              [min(0, 8 + shift_cut - 24), 15] (lower bound 0 when a LeakyRelu follows)
  Add/Sub     shift_read = max(ipos) - min(ipos) in [0, 7];  shift_write = min(ipos) - opos in [-7, 25]
  Mul         shift_write = sum(ipos) - opos in [0, 32]
  HardSigmoid ipos in [0, 15], opos >= 7, 14 + ipos - opos in [0, 31]
  MaxPool, AveragePool, GlobalAveragePool: input pos == output pos;  Concat: every input pos == output pos
Accelerator variants: LeakyRelu alpha 26/256, HardSigmoid alpha 2731/16384 (the DPU's fixed-point slopes);
Sigmoid as that HardSigmoid when asked; Softmax is reported (the DPU runs it only with a softmax engine)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

POOLS = ("MaxPool", "AveragePool", "GlobalAveragePool")
SHIFT_WRITE = {"Add": (-7, 25), "Sub": (-7, 25), "Mul": (0, 32)}  # min(ipos) - opos; Mul: sum(ipos) - opos


def _shift_base(op: str, ipos: list[int]) -> int:
    return sum(ipos) if op == "Mul" else min(ipos)


DPU_LEAKY_ALPHA = 26.0 / 256.0
DPU_HARD_SIGMOID_ALPHA = 2731.0 / 16384.0


@dataclass
class _Graph:
    """Where each tensor's scale lives in a QDQ graph: quantized activations and weights by tensor name."""

    model: object

    def __post_init__(self) -> None:
        from onnx import numpy_helper

        g = self.model.graph  # type: ignore[attr-defined]
        self.inits = {i.name: i for i in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self._np = numpy_helper

    def array(self, name: str) -> np.ndarray:
        return self._np.to_array(self.inits[name])

    def put(self, name: str, value: np.ndarray) -> None:
        self.inits[name].CopyFrom(self._np.from_array(value, name))

    def input_scale(self, node, index: int) -> str | None:
        """Scale initializer of the DequantizeLinear feeding input `index` of `node`."""
        if index >= len(node.input) or not node.input[index]:
            return None
        dq = self.producer.get(node.input[index])
        return dq.input[1] if dq is not None and dq.op_type == "DequantizeLinear" else None

    def output_scale(self, node) -> str | None:
        """Scale initializer of the QuantizeLinear reading the node's first output."""
        q = next((c for c in self.consumers.get(node.output[0], []) if c.op_type == "QuantizeLinear"), None)
        return q.input[1] if q is not None else None

    def pos(self, scale: str | None) -> int | None:
        if scale is None:
            return None
        values = self.array(scale).astype(np.float64).ravel()
        if values.size != 1:
            return None  # per-channel: checked per channel where a rule needs it
        return int(round(-math.log2(float(values[0]))))

    def set_pos(self, scale: str, pos: int) -> None:
        self.put(scale, np.array(2.0**-pos, dtype=np.float32).reshape(self.array(scale).shape))

    def wpos(self, scale: str | None) -> list[int]:
        if scale is None:
            return []
        return [int(round(-math.log2(float(v)))) for v in self.array(scale).astype(np.float64).ravel()]


def _row(node, rule: str, value, allowed: str, status: str) -> dict:
    return {
        "node": node.name,
        "op": node.op_type,
        "rule": rule,
        "value": value,
        "allowed": allowed,
        "status": status,
    }


def _set_attributes(node, **values: float) -> None:
    from onnx import helper

    keep = [a for a in node.attribute if a.name not in values]
    del node.attribute[:]
    node.attribute.extend([*keep, *(helper.make_attribute(k, v) for k, v in values.items())])


def apply_dpu_variants(qdq, sigmoid_as_hard_sigmoid: bool) -> list[dict]:
    """Replace activations by the DPU's fixed-point variants in place; one row per node touched or reported."""
    rows = []
    for node in qdq.graph.node:
        if node.op_type == "LeakyRelu":
            attr = next((a for a in node.attribute if a.name == "alpha"), None)
            old = attr.f if attr is not None else 0.01
            _set_attributes(node, alpha=DPU_LEAKY_ALPHA)
            rows.append(_row(node, "DPU LeakyRelu alpha 26/256", round(old, 6), "26/256", "converted"))
        elif node.op_type == "HardSigmoid":
            values = {a.name: a.f for a in node.attribute}
            _set_attributes(node, alpha=DPU_HARD_SIGMOID_ALPHA, beta=0.5)
            rows.append(
                _row(
                    node,
                    "DPU HardSigmoid slope 2731/16384",
                    round(values.get("alpha", 0.2), 6),
                    "2731/16384",
                    "converted",
                )  # fmt: skip
            )
        elif node.op_type == "Sigmoid":
            if sigmoid_as_hard_sigmoid:
                node.op_type = "HardSigmoid"
                _set_attributes(node, alpha=DPU_HARD_SIGMOID_ALPHA, beta=0.5)
                rows.append(
                    _row(node, "Sigmoid as the DPU HardSigmoid", "Sigmoid", "HardSigmoid", "converted")
                )
            else:
                rows.append(
                    _row(
                        node,
                        "Sigmoid on the DPU",
                        "Sigmoid",
                        "HardSigmoid (option sigmoid_as_hard_sigmoid)",
                        "runs on the CPU",
                    )  # fmt: skip
                )
        elif node.op_type == "Softmax":
            rows.append(
                _row(
                    node,
                    "Softmax on the DPU",
                    "Softmax",
                    "a DPU with a softmax engine",
                    "runs on the CPU otherwise",
                )
            )
    return rows


def enforce(qdq, max_rounds: int = 5) -> dict[tuple[str, str], str]:
    """Align pooling and concat positions and bring shifts into range by moving positions in place (as the
    Vitis AI quantizer does); returns what moved, by (node, rule), for `check`."""
    graph = _Graph(qdq)
    adjusted: dict[tuple[str, str], str] = {}
    for _ in range(max_rounds):
        if not _adjust_once(graph, adjusted):
            break
    return adjusted


def check(qdq, adjusted: dict[tuple[str, str], str]) -> list[dict]:
    """Every rule checked on the final graph: one row per node and rule (ok, adjusted, violated)."""
    return _check(_Graph(qdq), adjusted)


def _adjust_once(graph: _Graph, adjusted: dict) -> bool:
    changed = False

    def move(node, rule: str, scale: str, new: int) -> None:
        nonlocal changed
        old = graph.pos(scale)
        if old is None or old == new:
            return
        graph.set_pos(scale, new)
        adjusted.setdefault((node.name, rule), f"adjusted: pos {old} -> {new}")
        changed = True

    for node in graph.model.graph.node:  # type: ignore[attr-defined]
        op = node.op_type
        if op in POOLS:
            i, o = graph.input_scale(node, 0), graph.output_scale(node)
            if i is not None and o is not None and graph.pos(i) is not None:
                move(node, "input pos == output pos", o, graph.pos(i))  # type: ignore[arg-type]
        elif op == "Concat":
            scales = [graph.input_scale(node, k) for k in range(len(node.input))] + [graph.output_scale(node)]
            known = [s for s in scales if s is not None and graph.pos(s) is not None]
            if len(known) > 1:
                lowest = min(graph.pos(s) for s in known)  # type: ignore[type-var]
                for s in known:
                    move(node, "inputs pos == output pos", s, lowest)
        elif op in ("Conv", "Gemm", "ConvTranspose"):
            ipos, opos_scale = graph.pos(graph.input_scale(node, 0)), graph.output_scale(node)
            wpos = graph.wpos(graph.input_scale(node, 1))
            opos = graph.pos(opos_scale)
            if ipos is None or opos is None or not wpos:
                continue
            low, high = max(wpos) + ipos - 16, min(wpos) + ipos  # 0 <= w + i - o <= 16 for every channel
            if opos < low or opos > high:
                move(node, "shift_cut", opos_scale, min(max(opos, low), high))  # type: ignore[arg-type]
        elif op in SHIFT_WRITE:
            ipos = [graph.pos(graph.input_scale(node, k)) for k in range(2)]
            opos_scale = graph.output_scale(node)
            opos = graph.pos(opos_scale)
            if None in ipos or opos is None:
                continue
            base = _shift_base(op, ipos)  # type: ignore[arg-type]
            low, high = SHIFT_WRITE[op]
            if not low <= base - opos <= high:
                move(node, "shift_write", opos_scale, base - min(max(base - opos, low), high))  # type: ignore[arg-type]
        elif op == "HardSigmoid":
            i_scale, o_scale = graph.input_scale(node, 0), graph.output_scale(node)
            ipos, opos = graph.pos(i_scale), graph.pos(o_scale)
            if ipos is not None and not 0 <= ipos <= 15:
                move(node, "input pos in [0, 15]", i_scale, min(max(ipos, 0), 15))  # type: ignore[arg-type]
            if opos is not None and opos < 7:
                move(node, "output pos >= 7", o_scale, 7)  # type: ignore[arg-type]
    return changed


def _status(ok: bool, adjusted: dict, node, rule: str) -> str:
    if not ok:
        return "violated"
    return adjusted.get((node.name, rule), "ok")


def _check(graph: _Graph, adjusted: dict) -> list[dict]:
    rows: list[dict] = []
    for node in graph.model.graph.node:  # type: ignore[attr-defined]
        op = node.op_type
        if op in POOLS:
            i, o = graph.pos(graph.input_scale(node, 0)), graph.pos(graph.output_scale(node))
            if i is not None and o is not None:
                rule = "input pos == output pos"
                rows.append(_row(node, rule, f"{i} / {o}", "equal", _status(i == o, adjusted, node, rule)))
        elif op == "Concat":
            poses = [graph.pos(graph.input_scale(node, k)) for k in range(len(node.input))]
            poses.append(graph.pos(graph.output_scale(node)))
            known = [p for p in poses if p is not None]
            if len(known) > 1:
                rule = "inputs pos == output pos"
                text = " / ".join(str(p) for p in known)
                rows.append(
                    _row(node, rule, text, "all equal", _status(len(set(known)) == 1, adjusted, node, rule))
                )
        elif op in ("Conv", "Gemm", "ConvTranspose"):
            ipos, opos = graph.pos(graph.input_scale(node, 0)), graph.pos(graph.output_scale(node))
            wpos = graph.wpos(graph.input_scale(node, 1))
            if ipos is None or not wpos:
                continue
            if opos is not None:
                cuts = [w + ipos - opos for w in wpos]
                value = cuts[0] if len(set(cuts)) == 1 else f"{min(cuts)}..{max(cuts)}"
                ok = all(0 <= c <= 16 for c in cuts)
                rows.append(
                    _row(node, "shift_cut", value, "[0, 16]", _status(ok, adjusted, node, "shift_cut"))
                )
            bias_scale = graph.input_scale(node, 2)
            if bias_scale is not None and opos is not None:
                bpos = graph.wpos(bias_scale)
                leaky = any(c.op_type == "LeakyRelu" for c in graph.consumers.get(node.output[0], []))
                shifts = [
                    w + ipos - b
                    for w, b in zip(wpos if len(wpos) == len(bpos) else wpos * len(bpos), bpos, strict=False)
                ]
                cut = min(w + ipos - opos for w in wpos)
                low = 0 if leaky else min(0, 8 + cut - 24)
                ok = all(low <= s <= 15 for s in shifts)
                value = shifts[0] if len(set(shifts)) == 1 else f"{min(shifts)}..{max(shifts)}"
                rows.append(
                    _row(node, "shift_bias", value, f"[{low}, 15]", _status(ok, adjusted, node, "shift_bias"))
                )
        elif op in ("Add", "Sub"):
            ipos = [graph.pos(graph.input_scale(node, k)) for k in range(2)]
            opos = graph.pos(graph.output_scale(node))
            if None in ipos:
                continue
            sr = max(ipos) - min(ipos)  # type: ignore[type-var, operator]
            rows.append(
                _row(node, "shift_read", sr, "[0, 7]", _status(0 <= sr <= 7, adjusted, node, "shift_read"))
            )
        if op in SHIFT_WRITE:
            ipos = [graph.pos(graph.input_scale(node, k)) for k in range(2)]
            opos = graph.pos(graph.output_scale(node))
            if None not in ipos and opos is not None:
                sw = _shift_base(op, ipos) - opos  # type: ignore[arg-type]
                low, high = SHIFT_WRITE[op]
                ok = low <= sw <= high
                rows.append(
                    _row(
                        node,
                        "shift_write",
                        sw,
                        f"[{low}, {high}]",
                        _status(ok, adjusted, node, "shift_write"),
                    )
                )
        if op == "HardSigmoid":
            ipos, opos = graph.pos(graph.input_scale(node, 0)), graph.pos(graph.output_scale(node))
            if ipos is not None:
                rule = "input pos in [0, 15]"
                rows.append(_row(node, rule, ipos, "[0, 15]", _status(0 <= ipos <= 15, adjusted, node, rule)))
            if opos is not None:
                rule = "output pos >= 7"
                rows.append(_row(node, rule, opos, ">= 7", _status(opos >= 7, adjusted, node, rule)))
            if ipos is not None and opos is not None:
                shift = 14 + ipos - opos
                rows.append(
                    _row(node, "shift_sigmoid", shift, "[0, 31]", "ok" if 0 <= shift <= 31 else "violated")
                )
    return rows
