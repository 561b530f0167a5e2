"""Recurrent ONNX nodes (`LSTM`, `GRU`, `RNN`) rewritten as their cell math, step by step, for onnx2tf.

onnx2tf 1.28.8 fails on minimal LSTM/GRU graphs (Reshape/Split shape errors, tf-keras `initial_state`), so
coral-edgetpu unrolls them first, on the static graph (batch 1): every step is a Slice (+ Reshape) of the step's input,
two MatMuls (input and hidden weights, pre-transposed constants), one bias Add, Slices into the gates and
Sigmoid/Tanh/Mul/Add, exactly as in the ONNX operator spec (LSTM gates i, o, f, c; GRU z, r, h with
`linear_before_reset` 0 or 1; forward, reverse and bidirectional). Outputs Y, Y_h, Y_c keep their names and
shapes (Reshape + Concat). Limits, each a UsageError naming what to change: a static sequence length of at
most MAX_STEPS; W, R, B, P and sequence_lens constants (sequence_lens all equal to that length); default
activations only, no clip, no input_forget; float32."""

from __future__ import annotations

import numpy as np

from edgemart.core.errors import UsageError

MAX_STEPS = 64  # steps unrolled per recurrent node; streaming models run 1 per call
RECURRENT_OPS = ("LSTM", "GRU", "RNN")
_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
_DEFAULT_ACTIVATIONS = {"LSTM": ["sigmoid", "tanh", "tanh"], "GRU": ["sigmoid", "tanh"], "RNN": ["tanh"]}
ELSEWHERE = "edgemart package MODEL.onnx --target arm-cpu --calibration CAL.npz --out DIR"


def unroll_recurrent(model) -> list[dict]:
    """Replace every recurrent node of `model` (static shapes inferred) by its unrolled cell math, in place.
    One row per node rewritten: name, op, direction, steps."""
    from onnx import numpy_helper

    graph = model.graph
    if not any(n.op_type in RECURRENT_OPS and n.domain in ("", "ai.onnx") for n in graph.node):
        return []
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    shapes = _known_shapes(graph)
    done: list[dict] = []
    nodes = []
    for node in graph.node:
        if node.op_type not in RECURRENT_OPS or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        builder = _Unroller(node, consts, shapes)
        nodes.extend(builder.build())
        graph.initializer.extend(builder.initializers)
        done.append(
            {"node": node.name, "op": node.op_type, "direction": builder.direction, "steps": builder.steps}
        )
    del graph.node[:]
    graph.node.extend(nodes)
    return done


def _known_shapes(graph) -> dict[str, list[int | None]]:
    out: dict[str, list[int | None]] = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    for init in graph.initializer:
        out[init.name] = list(init.dims)
    return out


def _refuse(node, why: str) -> UsageError:
    return UsageError(
        f"coral-edgetpu: node {node.name} ({node.op_type}) cannot be unrolled into cell math for the int8 "
        f"converter: {why}. Build it for a target that takes recurrent nodes as they are: {ELSEWHERE}"
    )


class _Unroller:
    def __init__(self, node, consts: dict[str, np.ndarray], shapes: dict[str, list[int | None]]) -> None:
        from onnx import helper

        self.node = node
        self.op = node.op_type
        self.consts = consts
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        self.direction = attrs.get("direction", b"forward")
        self.direction = self.direction.decode() if isinstance(self.direction, bytes) else str(self.direction)
        if self.direction not in ("forward", "reverse", "bidirectional"):
            raise _refuse(node, f"direction {self.direction!r} is not in the ONNX spec")
        self.dirs = 2 if self.direction == "bidirectional" else 1
        self.layout = int(attrs.get("layout", 0))
        self.lbr = int(attrs.get("linear_before_reset", 0))
        if "clip" in attrs:
            raise _refuse(node, "attribute clip is set (only unclipped cells are unrolled)")
        if int(attrs.get("input_forget", 0)):
            raise _refuse(node, "input_forget=1 (coupled input and forget gates) is not unrolled")
        acts = attrs.get("activations")
        if acts is not None:
            names = [a.decode().lower() if isinstance(a, bytes) else str(a).lower() for a in acts]
            if names != _DEFAULT_ACTIVATIONS[self.op] * self.dirs:
                raise _refuse(
                    node,
                    f"activations {names} are not the default {_DEFAULT_ACTIVATIONS[self.op]} per direction",
                )
        if attrs.get("activation_alpha") or attrs.get("activation_beta"):
            raise _refuse(node, "activation_alpha/activation_beta are set (default activations only)")
        inputs = list(node.input) + [""] * (8 - len(node.input))
        x_name, w_name, r_name, b_name, lens_name, h0_name = inputs[:6]
        c0_name = inputs[6] if self.op == "LSTM" else ""
        p_name = inputs[7] if self.op == "LSTM" else ""
        for role, name in (("W", w_name), ("R", r_name), ("B", b_name), ("P", p_name)):
            if name and name not in consts:
                raise _refuse(node, f"its {role} input '{name}' is computed, not a constant (initializer)")
        self.w = consts[w_name].astype(np.float32)
        self.r = consts[r_name].astype(np.float32)
        self.hidden = int(self.r.shape[-1])
        gates = _GATES[self.op] * self.hidden
        self.b = consts[b_name].astype(np.float32) if b_name else np.zeros((self.dirs, 2 * gates), np.float32)
        self.p = consts[p_name].astype(np.float32) if p_name else None
        x_shape = shapes.get(x_name)
        if not x_shape or len(x_shape) != 3 or any(d is None or d <= 0 for d in x_shape):
            raise _refuse(node, f"its input '{x_name}' has no static shape ({x_shape}) after fixing batch 1")
        self.steps = int(x_shape[1 if self.layout else 0])
        self.batch = int(x_shape[0 if self.layout else 1])
        if self.steps > MAX_STEPS:
            raise _refuse(
                node,
                f"its sequence length {self.steps} is above the unrolling bound of {MAX_STEPS} steps "
                "(streaming models run one step per call: export with a shorter sequence)",
            )
        if lens_name:
            if lens_name not in consts:
                raise _refuse(node, f"sequence_lens '{lens_name}' is an input, not a constant")
            if not np.all(consts[lens_name] == self.steps):
                raise _refuse(
                    node,
                    f"sequence_lens {consts[lens_name].tolist()} differ from the sequence length {self.steps}",
                )
        self.x, self.h0, self.c0 = x_name, h0_name, c0_name
        self.outputs = list(node.output) + [""] * (3 - len(node.output))
        if self.outputs[2] and self.op != "LSTM":
            raise _refuse(node, "it has a third output, which only LSTM defines")
        self.prefix = f"{node.name}__"
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0

    # -- small graph-building helpers --------------------------------------------------------------------
    def _name(self, what: str) -> str:
        self._count += 1
        return f"{self.prefix}{what}_{self._count}"

    def _const(self, what: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self._name(what)
        self.initializers.append(numpy_helper.from_array(np.array(value, order="C"), name))
        return name

    def _op(self, op: str, inputs: list[str], what: str, **attrs) -> str:
        from onnx import helper

        out = self._name(what)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def _take(self, source: str, index: int, axis: int, width: int, what: str) -> str:
        """Row `index` of `source` on `axis` as [batch, width]: Slice + Reshape (both Edge TPU ops; Gather
        is not)."""
        part = self._op(
            "Slice",
            [
                source,
                self._const("start", np.array([index], np.int64)),
                self._const("end", np.array([index + 1], np.int64)),
                self._const("axis", np.array([axis], np.int64)),
            ],
            what + "_slice",
        )
        return self._reshape(part, [self.batch, width], what)

    def _slice(self, source: str, gate: int) -> str:
        h = self.hidden
        return self._op(
            "Slice",
            [
                source,
                self._const("start", np.array([gate * h], np.int64)),
                self._const("end", np.array([(gate + 1) * h], np.int64)),
                self._const("axis", np.array([1], np.int64)),
            ],
            "gate",
        )

    def _reshape(self, source: str, shape: list[int], what: str) -> str:
        return self._op("Reshape", [source, self._const("shape", np.array(shape, np.int64))], what)

    # -- the rewrite ---------------------------------------------------------------------------------------
    def _initial(self, name: str, d: int, what: str) -> str:
        if not name:
            return self._const(what, np.zeros((self.batch, self.hidden), np.float32))
        return self._take(
            name, d, 1 if self.layout else 0, self.hidden, what
        )  # [D, B, H] or (layout 1) [B, D, H]

    def build(self) -> list:
        h_all: list[list[str]] = []  # per direction, per time index
        last_h, last_c = [], []
        for d in range(self.dirs):
            reverse = self.direction == "reverse" or d == 1
            hs, (h, c) = self._direction(d, reverse)
            h_all.append(hs)
            last_h.append(h)
            last_c.append(c)
        y, y_h, y_c = self.outputs
        b, hid = self.batch, self.hidden
        if y:
            parts = []
            for t in range(self.steps):
                shape = [b, 1, 1, hid] if self.layout else [1, 1, b, hid]
                per_dir = [self._reshape(h_all[d][t], shape, "y_step") for d in range(self.dirs)]
                parts.append(
                    per_dir[0]
                    if self.dirs == 1
                    else self._op("Concat", per_dir, "y_dirs", axis=2 if self.layout else 1)
                )
            self.nodes.append(_join(parts, y, 1 if self.layout else 0, self.prefix + "Y"))
        for name, states in ((y_h, last_h), (y_c, last_c)):
            if not name:
                continue
            shape = [b, 1, hid] if self.layout else [1, b, hid]
            parts = [self._reshape(s, shape, "state_out") for s in states]
            self.nodes.append(_join(parts, name, 1 if self.layout else 0, f"{self.prefix}{name}"))
        return self.nodes

    def _direction(self, d: int, reverse: bool) -> tuple[list[str], tuple[str, str]]:
        """The steps of direction `d`: (h per time index, (last h, last c))."""
        g = _GATES[self.op]
        hid = self.hidden
        w_t = self._const("W_T", self.w[d].T.copy())  # [I, g*H]
        wb, rb = self.b[d][: g * hid], self.b[d][g * hid :]
        r_t = rzr_t = rh_t = bias_h = ""
        if self.op == "GRU" and self.lbr:  # Rb stays with the hidden term: r * (H R_h^T + Rbh)
            bias_x = self._const("Wb", wb)
            bias_h = self._const("Rb", rb)
        else:  # the biases are plain sums (GRU lbr=0: Wbh + Rbh outside the reset product)
            bias_x = self._const("B", wb + rb)
        if self.op == "GRU" and not self.lbr:
            # the candidate's hidden term is (r * H) R_h^T: its recurrent weights apart from the z, r ones
            rzr_t = self._const("Rzr_T", self.r[d][: 2 * hid].T.copy())
            rh_t = self._const("Rh_T", self.r[d][2 * hid :].T.copy())
        else:
            r_t = self._const("R_T", self.r[d].T.copy())  # [H, g*H]
        h = self._initial(self.h0, d, "h0")
        c = self._initial(self.c0, d, "c0") if self.op == "LSTM" else ""
        p = self.p[d] if self.p is not None else None
        hs: dict[int, str] = {}
        order = range(self.steps - 1, -1, -1) if reverse else range(self.steps)
        for t in order:
            x_t = self._take(self.x, t, 1 if self.layout else 0, int(self.w.shape[-1]), "x")  # [B, I]
            xw = self._op("Add", [self._op("MatMul", [x_t, w_t], "xw"), bias_x], "xwb")
            if self.op == "LSTM":
                hr = self._op("MatMul", [h, r_t], "hr")
                pre = self._op("Add", [xw, hr], "pre")
                i_pre, o_pre, f_pre, c_pre = (self._slice(pre, k) for k in range(4))
                if p is not None:
                    i_pre = self._op(
                        "Add", [i_pre, self._op("Mul", [c, self._const("Pi", p[:hid])], "pc")], "pi"
                    )
                    f_pre = self._op(
                        "Add", [f_pre, self._op("Mul", [c, self._const("Pf", p[2 * hid :])], "pc")], "pf"
                    )
                i = self._op("Sigmoid", [i_pre], "i")
                f = self._op("Sigmoid", [f_pre], "f")
                cand = self._op("Tanh", [c_pre], "cand")
                c = self._op("Add", [self._op("Mul", [f, c], "fc"), self._op("Mul", [i, cand], "ic")], "c")
                if p is not None:
                    o_pre = self._op(
                        "Add", [o_pre, self._op("Mul", [c, self._const("Po", p[hid : 2 * hid])], "pc")], "po"
                    )
                o = self._op("Sigmoid", [o_pre], "o")
                h = self._op("Mul", [o, self._op("Tanh", [c], "tc")], "h")
            elif self.op == "RNN":
                h = self._op("Tanh", [self._op("Add", [xw, self._op("MatMul", [h, r_t], "hr")], "pre")], "h")
            else:
                xz, xr, xh = (self._slice(xw, k) for k in range(3))
                if self.lbr:
                    hr = self._op("Add", [self._op("MatMul", [h, r_t], "hr"), bias_h], "hrb")
                    hz, hrr, hh = (self._slice(hr, k) for k in range(3))
                else:
                    hzr = self._op("MatMul", [h, rzr_t], "hzr")
                    hz, hrr = (self._slice(hzr, k) for k in range(2))
                z = self._op("Sigmoid", [self._op("Add", [xz, hz], "zpre")], "z")
                r = self._op("Sigmoid", [self._op("Add", [xr, hrr], "rpre")], "r")
                if self.lbr:
                    hidden_term = self._op("Mul", [r, hh], "rh")
                else:
                    hidden_term = self._op("MatMul", [self._op("Mul", [r, h], "rh"), rh_t], "rhR")
                cand = self._op("Tanh", [self._op("Add", [xh, hidden_term], "hpre")], "cand")
                # H = (1 - z) * cand + z * H_prev = cand + z * (H_prev - cand)
                h = self._op(
                    "Add", [cand, self._op("Mul", [z, self._op("Sub", [h, cand], "dh")], "zdh")], "h"
                )
            hs[t] = h
        return [hs[t] for t in range(self.steps)], (h, c)


def _join(parts: list[str], out: str, axis: int, name: str):
    from onnx import helper

    if len(parts) == 1:
        return helper.make_node("Identity", parts, [out], name=name)
    return helper.make_node("Concat", parts, [out], name=name, axis=axis)
