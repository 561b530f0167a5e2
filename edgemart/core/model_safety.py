# Why this is one module: one walker per format (ONNX protobuf wire, TFLite flatbuffer) plus the sample-file check: every refusal rule of docs/FORMAT.md's model-safety section in one place.
"""The one model-safety check: seller bytes (ONNX or TFLite) are walked before any parser or runtime sees them.

Pure: bytes and limits in, a summary out or `UnsafeModel` (exit 2, HTTP 422) naming the tensor. No ONNX or
flatbuffers library is used, so the check cannot itself be steered by the bytes into reading files, and the
device runs it without the `onnx` package. What it refuses (docs/FORMAT.md, "Model safety"):

- ONNX: any tensor stored outside the file (``data_location = EXTERNAL`` or an ``external_data`` entry) in
  initializers, sparse initializers, ``Constant`` and other attribute tensors, every subgraph at any depth
  (``If``/``Loop``/``Scan`` bodies), functions and training graphs; declared tensor sizes or counts beyond
  the caps; graph nesting deeper than the cap; malformed protobuf wire data; protobuf groups.
- TFLite: a flatbuffer whose tables, vectors or strings point outside the file, buffers whose
  ``offset``/``size`` (the >2 GiB layout) lie outside the file, tensors naming a buffer that does not exist,
  declared sizes beyond the caps, more subgraphs or tensors than the caps.

`check_sample_file` does the same for the sample arrays sellers and buyers hand over (.npz / .npy): zip
directory and array headers are checked against `SampleLimits` before anything inflates."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import IO, Any, BinaryIO

from edgemart.core.errors import UsageError


class UnsafeModel(UsageError):
    """The model refers to data outside itself or declares more than the limits allow (exit 2, HTTP 422)."""

    http_status = 422
    code = "unsafe_model"


@dataclass(frozen=True)
class ModelLimits:
    """Caps on what a model may declare. Sizes in bytes; depth counts graphs (the main graph is depth 1)."""

    max_tensor_bytes: int = 1 << 30  # one declared tensor
    max_total_tensor_bytes: int = 4 << 30  # all declared tensors together
    max_tensors: int = 200_000
    max_nodes: int = 1_000_000
    max_graph_depth: int = 16
    max_subgraphs: int = 10_000  # TFLite subgraphs / ONNX graphs incl. every body and function
    max_rank: int = 32


DEFAULT_LIMITS = ModelLimits()


@dataclass(frozen=True)
class ModelSummary:
    """What the check saw: for reports and `index add` style summaries."""

    format: str  # "onnx" | "tflite"
    tensors: int
    declared_bytes: int
    graphs: int
    max_depth: int
    nodes: int


def check_model_bytes(
    model: bytes | bytearray | memoryview, limits: ModelLimits = DEFAULT_LIMITS
) -> ModelSummary:
    """Refuse (UnsafeModel) a model that reads outside itself or exceeds `limits`; otherwise summarize it."""
    data = memoryview(model).cast("B")  # no copy: on the device these are decrypted weights
    if len(data) >= 8 and data[4:8] == b"TFL3":
        return _TfliteCheck(data, limits).run()
    # The protobuf walk reads every field key byte by byte: indexing a bytes object is faster than a view of
    # it (15% of the walk), and the walk slices out only names, so a bytes model is walked as it is.
    return _OnnxCheck(model if isinstance(model, bytes) else data, limits).run()


_SHOWN_BYTES = 400  # of a name, at most, read into a message


def _shown(name: bytes | memoryview) -> str:
    """A tensor name fit for one line of a message: printable, bounded."""
    text = bytes(name[:_SHOWN_BYTES]).decode("utf-8", "replace")
    text = "".join(c if c.isprintable() else "?" for c in text)
    return repr(text[:80] + ("…" if len(text) > 80 else ""))


# -------------------------------------------------------------------------------------------------- ONNX

# protobuf wire types
_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5

# ONNX message fields that hold messages we must enter, by message kind (onnx/onnx.proto3, field numbers).
_MODEL, _GRAPH, _NODE, _ATTR, _TENSOR, _SPARSE, _FUNCTION, _TRAINING = range(8)
_CHILDREN: dict[int, dict[int, int]] = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _NODE: {5: _ATTR},
    _ATTR: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _FUNCTION: {7: _NODE, 11: _ATTR},
    _TRAINING: {1: _GRAPH, 2: _GRAPH},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
    _TENSOR: {},
}
_TENSOR_DIMS, _TENSOR_TYPE, _TENSOR_NAME, _TENSOR_EXTERNAL, _TENSOR_LOCATION = 1, 2, 8, 13, 14
_Where = tuple | None  # (parent _Where, message kind, message start, message end)
_KIND_NAMES = ("model", "graph", "node", "attribute", "tensor", "sparse tensor", "function", "training info")
_NAME_FIELD = {_GRAPH: 2, _NODE: 3, _ATTR: 1, _FUNCTION: 1, _TENSOR: _TENSOR_NAME}  # each `name` field
# The fields the walk reads, per message kind; every other field is only checked and skipped. Names are not
# among them: a message that needs one (a refusal) finds it by reading the named message again (_name_of).
_TENSOR_FIELDS = frozenset({_TENSOR_DIMS, _TENSOR_TYPE, _TENSOR_EXTERNAL, _TENSOR_LOCATION})
_WANTED = {kind: frozenset(children) for kind, children in _CHILDREN.items()}
_WANTED[_TENSOR] = _TENSOR_FIELDS

# What _fields does with each key byte, per set of wanted fields: skip a length-delimited field without looking
# at it (the fast path), keep the field, check and skip it on the general path, or read a longer key first.
_SKIP_LEN, _KEEP_LEN, _KEEP, _SKIP, _LONG_KEY = range(5)


def _actions(wanted: frozenset[int]) -> tuple[int, ...]:
    row = []
    for key in range(256):
        field, wire = key >> 3, key & 7
        if key & 0x80:
            row.append(_LONG_KEY)
        elif field == 0 or wire not in (_VARINT, _I64, _LEN, _I32):
            row.append(_SKIP)  # the general path refuses field 0 and groups
        elif field in wanted:
            row.append(_KEEP_LEN if wire == _LEN else _KEEP)
        else:
            row.append(_SKIP_LEN if wire == _LEN else _SKIP)
    return tuple(row)


_ACTIONS = {kind: _actions(wanted) for kind, wanted in _WANTED.items()}
_TENSOR_ACTIONS = _ACTIONS[_TENSOR]
_NODE_ACTIONS, _NODE_WANTED = _ACTIONS[_NODE], _WANTED[_NODE]
_ATTR_ACTIONS, _ATTR_WANTED, _ATTR_CHILDREN = _ACTIONS[_ATTR], _WANTED[_ATTR], _CHILDREN[_ATTR]
_NAME_ACTIONS = {kind: (_actions(frozenset({f})), frozenset({f})) for kind, f in _NAME_FIELD.items()}
# TensorProto.DataType -> bytes per element (strings count their declared length via dims only: 1).
_ONNX_ITEMSIZE = {
    1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 8: 1, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 14: 8, 15: 16, 16: 2,
}  # fmt: skip
_ONNX_UNKNOWN_ITEMSIZE = 1  # float8 / int4 / future types: at most one byte per element


class _OnnxCheck:
    def __init__(self, data: bytes | memoryview, limits: ModelLimits) -> None:
        self.data = data
        self.limits = limits
        self.tensors = self.nodes = self.graphs = self.max_depth = 0
        self.declared = 0

    def run(self) -> ModelSummary:
        if not self.data:
            raise UnsafeModel("model file is empty")
        limits = self.limits
        fields = self._fields
        # Explicit stack of (kind, start, end, graph depth, where): no recursion, however deep the bytes nest.
        # `where` is a chain (parent, kind, start, end) of the enclosing named messages, rendered (names read)
        # only when a refusal needs it.
        stack: list[tuple[int, int, int, int, _Where]] = [(_MODEL, 0, len(self.data), 0, None)]
        pop, push = stack.pop, stack.append
        while stack:
            kind, start, end, depth, where = pop()
            if kind == _TENSOR:
                self._tensor(start, end, where)
                continue
            if kind == _GRAPH:
                depth += 1
                self.graphs += 1
                self.max_depth = max(self.max_depth, depth)
                if depth > limits.max_graph_depth:
                    raise UnsafeModel(
                        f"model nests graphs {depth} deep (at {self._where(where) or 'the main graph'}); "
                        f"the limit is {limits.max_graph_depth}"
                    )
                if self.graphs > limits.max_subgraphs:
                    raise UnsafeModel(f"model has more than {limits.max_subgraphs} graphs")
            elif kind == _ATTR:  # an attribute_proto of a function (a node's attributes are read in _node)
                self._attribute(start, end, depth, where, push)
                continue
            found = fields(start, end, _ACTIONS[kind], _WANTED[kind])
            if not found:
                continue
            children = _CHILDREN[kind]
            label = (where, kind, start, end) if kind in _NAME_FIELD else where
            for field, wire, lo, hi in found:
                if wire != _LEN:
                    raise self._malformed(f"field {field} of a {_KIND_NAMES[kind]} is not a message")
                child = children[field]
                # Nodes (with their attributes) and tensors are read on the spot: most messages of a model
                # are these, and the stack round trip cost more than reading them.
                if child == _NODE:
                    self._node(lo, hi, depth, label, push)
                elif child == _TENSOR:
                    self._tensor(lo, hi, label)
                else:
                    push((child, lo, hi, depth, label))
        return ModelSummary("onnx", self.tensors, self.declared, self.graphs, self.max_depth, self.nodes)

    def _node(self, start: int, end: int, depth: int, where: _Where, push: Any) -> None:
        self.nodes += 1
        if self.nodes > self.limits.max_nodes:
            raise UnsafeModel(f"model has more than {self.limits.max_nodes} nodes")
        attributes = self._fields(start, end, _NODE_ACTIONS, _NODE_WANTED)
        if attributes:
            label = (where, _NODE, start, end)
            for field, wire, lo, hi in attributes:
                if wire != _LEN:
                    raise self._malformed(f"field {field} of a node is not a message")
                self._attribute(lo, hi, depth, label, push)

    def _attribute(self, start: int, end: int, depth: int, where: _Where, push: Any) -> None:
        found = self._fields(start, end, _ATTR_ACTIONS, _ATTR_WANTED)
        if found:
            label = (where, _ATTR, start, end)
            for field, wire, lo, hi in found:
                if wire != _LEN:
                    raise self._malformed(f"field {field} of an attribute is not a message")
                child = _ATTR_CHILDREN[field]
                if child == _TENSOR:
                    self._tensor(lo, hi, label)
                else:  # a graph or a sparse tensor
                    push((child, lo, hi, depth, label))

    def _name_of(self, kind: int, start: int, end: int) -> str:
        """The shown name of the message at data[start:end], '' when it has none (read again, on refusal)."""
        actions, wanted = _NAME_ACTIONS[kind]
        names = [(lo, hi) for _, wire, lo, hi in self._fields(start, end, actions, wanted) if wire == _LEN]
        if not names or names[-1][1] <= names[-1][0]:
            return ""
        lo, hi = names[-1]  # protobuf: the last occurrence of a singular field wins
        return _shown(self.data[lo : min(hi, lo + _SHOWN_BYTES)])

    def _where(self, where: _Where) -> str:
        """Where a message sits: "graph 'main' > node 'If_0' > attribute 'then_branch' > graph 'then'"."""
        parts = []
        while where is not None:
            where, kind, start, end = where
            name = self._name_of(kind, start, end)
            parts.append(f"{_KIND_NAMES[kind]} {name}" if name else _KIND_NAMES[kind])
        return " > ".join(reversed(parts))

    @staticmethod
    def _malformed(what: str) -> UnsafeModel:
        return UnsafeModel(
            f"not a model: neither ONNX (malformed protobuf: {what}) nor TFLite (no 'TFL3' identifier)"
        )

    def _fields(
        self, start: int, end: int, actions: tuple[int, ...], wanted: frozenset[int]
    ) -> list[tuple[int, int, int, int]]:
        """(field number, wire type, value start, value end) of each field of one message whose number is in
        ``wanted``; every other field is checked and skipped. ``actions`` is the same set as a table by key
        byte (_actions).

        The hot loop of the check (every field key of every message is read): a one-byte key (fields 1-15)
        says at once whether the field is kept, and a length-delimited field (most inputs, outputs, weights
        and every submessage) is skipped or kept in a handful of operations. Everything else takes the general
        path with every check; varints are decoded inline, with a one-byte fast path."""
        data = self.data
        out: list[tuple[int, int, int, int]] = []
        pos = start
        # A field that runs past the message ends the loop (pos >= end); the check after it refuses that, so
        # the fast path needs no check of its own. Literals stand for _SKIP_LEN (0), _KEEP_LEN (1), _LEN (2).
        while pos < end:
            key = data[pos]
            action = actions[key]
            if action < 2:  # _SKIP_LEN or _KEEP_LEN
                pos += 1
                if pos >= end:
                    raise self._malformed("truncated or overlong varint")
                length = data[pos]
                if length < 0x80:
                    pos += 1
                else:
                    length, pos = self._varint(pos, end)
                if action:
                    out.append((key >> 3, 2, pos, pos + length))
                pos += length
                continue
            pos += 1
            if action == _LONG_KEY:  # fields 16-2047 in two bytes (an attribute's `type` is field 20)
                if pos < end and not data[pos] & 0x80:
                    key = (key & 0x7F) | data[pos] << 7
                    pos += 1
                else:
                    key, pos = self._varint(pos - 1, end)
                keep = key >> 3 in wanted
            else:
                keep = action == _KEEP
            field, wire = key >> 3, key & 7
            if field == 0:
                raise self._malformed("field number 0")
            lo = pos
            if wire == _LEN:
                if pos >= end:
                    raise self._malformed("truncated or overlong varint")
                length = data[pos]
                if length & 0x80:
                    length, lo = self._varint(pos, end)
                else:
                    lo = pos + 1
                pos = lo + length
            elif wire == _VARINT:
                while True:  # skip the value; _varint re-reads it (with its checks) where it is used
                    if pos >= end or pos - lo > 9:
                        raise self._malformed("truncated or overlong varint")
                    byte = data[pos]
                    pos += 1
                    if not byte & 0x80:
                        break
            elif wire == _I64:
                pos += 8
            elif wire == _I32:
                pos += 4
            else:  # groups are not part of ONNX (proto3) and would need a second parser here
                raise self._malformed(f"wire type {wire}")
            if keep:
                out.append((field, wire, lo, pos))
        if pos > end:
            raise self._malformed("a field runs past its message")
        return out

    def _varint(self, pos: int, end: int) -> tuple[int, int]:
        result = shift = 0
        data = self.data
        while True:
            if pos >= end or shift > 63:
                raise self._malformed("truncated or overlong varint")
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result, pos
            shift += 7

    def _tensor(self, start: int, end: int, where: _Where) -> None:
        self.tensors += 1
        if self.tensors > self.limits.max_tensors:
            raise UnsafeModel(f"model has more than {self.limits.max_tensors} tensors")
        data = self.data
        dims: list[int] = []
        data_type = 0
        external = False
        for field, wire, lo, hi in self._fields(start, end, _TENSOR_ACTIONS, _TENSOR_FIELDS):
            if field == _TENSOR_DIMS:
                if wire == _VARINT:
                    dims.append(data[lo] if hi - lo == 1 else self._signed(self._varint(lo, hi)[0]))
                elif wire == _LEN:  # packed
                    pos = lo
                    while pos < hi:
                        value, pos = self._varint(pos, hi)
                        dims.append(self._signed(value))
            elif field == _TENSOR_TYPE and wire == _VARINT:
                data_type = data[lo] if hi - lo == 1 else self._varint(lo, hi)[0]
            elif field == _TENSOR_EXTERNAL:
                external = True
            elif field == _TENSOR_LOCATION and wire == _VARINT:
                if self._varint(lo, hi)[0] != 0:  # 0 = DEFAULT (inside the file), 1 = EXTERNAL
                    external = True
        if external:
            name = self._name_of(_TENSOR, start, end) or "''"
            label = f"tensor {name}" + (f" (in {self._where(where)})" if where else "")
            raise UnsafeModel(
                f"{label} keeps its data outside the model file (external data); "
                "upload a single self-contained file (onnx.save_model(..., save_as_external_data=False))"
            )
        try:
            self.declared = _declare(
                self.limits, dims, _ONNX_ITEMSIZE.get(data_type, _ONNX_UNKNOWN_ITEMSIZE), self.declared
            )
        except _TooLarge as exc:
            name = self._name_of(_TENSOR, start, end) or "''"
            raise UnsafeModel(f"tensor {name} (in {self._where(where)}) {exc}") from None

    @staticmethod
    def _signed(value: int) -> int:
        return value - (1 << 64) if value >= 1 << 63 else value


class _TooLarge(Exception):
    """A declared shape beyond the limits; the caller names the tensor."""


def _declare(limits: ModelLimits, dims: list[int], itemsize: int, total: int) -> int:
    """`total` plus the bytes `dims` declare; _TooLarge past a cap."""
    if len(dims) > limits.max_rank:
        raise _TooLarge(f"has rank {len(dims)}; the limit is {limits.max_rank}")
    size = itemsize
    for d in dims:
        if d < 0:
            raise _TooLarge(f"declares a negative dimension {d}")
        size *= d
        if size > limits.max_tensor_bytes:
            raise _TooLarge(
                f"declares shape {dims[:8]}, over the {limits.max_tensor_bytes}-byte limit per tensor"
            )
    total += size
    if total > limits.max_total_tensor_bytes:
        raise _TooLarge(
            f"brings the declared tensors over the {limits.max_total_tensor_bytes}-byte model limit"
        )
    return total


# ------------------------------------------------------------------------------------------------ TFLite

# TFLite schema field slots (tensorflow/lite/schema/schema.fbs)
_M_SUBGRAPHS, _M_BUFFERS = 2, 4
_SG_TENSORS, _SG_INPUTS, _SG_OUTPUTS, _SG_OPERATORS = 0, 1, 2, 3
_T_SHAPE, _T_TYPE, _T_BUFFER, _T_NAME = 0, 1, 2, 3
_B_DATA, _B_OFFSET, _B_SIZE = 0, 1, 2
_OP_INPUTS, _OP_OUTPUTS = 1, 2
_TFLITE_ITEMSIZE = {
    0: 4, 1: 2, 2: 4, 3: 1, 4: 8, 5: 1, 6: 1, 7: 2, 8: 8, 9: 1, 10: 8, 11: 16, 12: 8, 15: 4, 16: 2, 17: 1, 18: 2,
}  # fmt: skip


class _TfliteCheck:
    """A bounds-checking flatbuffer reader for the parts of a TFLite model that point at data."""

    def __init__(self, data: memoryview, limits: ModelLimits) -> None:
        self.data = data
        self.limits = limits

    def _fail(self, what: str) -> UnsafeModel:
        return UnsafeModel(f"TFLite flatbuffer is corrupt: {what}")

    def _u32(self, pos: int) -> int:
        if pos < 0 or pos + 4 > len(self.data):
            raise self._fail(f"offset {pos} outside the file")
        return struct.unpack_from("<I", self.data, pos)[0]

    def _scalar(self, fmt: str, pos: int) -> int:
        if pos < 0 or pos + struct.calcsize(fmt) > len(self.data):
            raise self._fail(f"offset {pos} outside the file")
        return struct.unpack_from("<" + fmt, self.data, pos)[0]

    def _table(self, pos: int) -> tuple[int, int, int]:
        """(table position, vtable position, vtable size)."""
        vtable = pos - self._scalar("i", pos)
        vsize = self._scalar("H", vtable)
        if vsize < 4 or vsize % 2 or vtable + vsize > len(self.data):
            raise self._fail("bad vtable")
        tsize = self._scalar("H", vtable + 2)
        if pos + tsize > len(self.data):
            raise self._fail("table runs past the file")
        return pos, vtable, vsize

    def _field(self, table: tuple[int, int, int], slot: int) -> int | None:
        pos, vtable, vsize = table
        entry = 4 + 2 * slot
        if entry + 2 > vsize:
            return None
        rel = self._scalar("H", vtable + entry)
        return pos + rel if rel else None

    def _ref(self, pos: int) -> int:
        return pos + self._u32(pos)

    def _vector(self, table: tuple[int, int, int], slot: int, elem: int) -> tuple[int, int]:
        """(first element position, length) of a vector field; (0, 0) when absent."""
        field = self._field(table, slot)
        if field is None:
            return 0, 0
        vec = self._ref(field)
        length = self._u32(vec)
        if vec + 4 + length * elem > len(self.data):
            raise self._fail(f"vector of {length} elements runs past the file")
        return vec + 4, length

    def _tables(self, table: tuple[int, int, int], slot: int) -> list[tuple[int, int, int]]:
        start, length = self._vector(table, slot, 4)
        return [self._table(self._ref(start + 4 * i)) for i in range(length)]

    def _ints(self, table: tuple[int, int, int], slot: int) -> list[int]:
        start, length = self._vector(table, slot, 4)
        return list(struct.unpack_from(f"<{length}i", self.data, start)) if length else []

    def _label(self, tensor: tuple[int, int, int], subgraph: int) -> str:
        start, length = self._vector(tensor, _T_NAME, 1)
        return f"tensor {_shown(self.data[start : start + length])} (subgraph {subgraph})"

    def run(self) -> ModelSummary:
        size = len(self.data)
        model = self._table(self._u32(0))
        buffers = self._tables(model, _M_BUFFERS)
        if len(buffers) > self.limits.max_tensors:
            raise UnsafeModel(f"TFLite model has more than {self.limits.max_tensors} buffers")
        for index, buf in enumerate(buffers):
            self._vector(buf, _B_DATA, 1)  # inline data must lie inside the file
            off_field, size_field = self._field(buf, _B_OFFSET), self._field(buf, _B_SIZE)
            offset = self._scalar("Q", off_field) if off_field is not None else 0
            length = self._scalar("Q", size_field) if size_field is not None else 0
            # offset 0/1 with size 0 mark "no data" / "data in the flatbuffer"; anything else must be in the file
            if (offset > 1 or length) and (offset <= 1 or offset + length > size):
                raise UnsafeModel(
                    f"TFLite buffer {index} points outside the model file (offset {offset}, size {length})"
                )
        subgraphs = self._tables(model, _M_SUBGRAPHS)
        if not subgraphs:
            raise UnsafeModel("TFLite model has no subgraph")
        if len(subgraphs) > self.limits.max_subgraphs:
            raise UnsafeModel(f"TFLite model has more than {self.limits.max_subgraphs} subgraphs")
        tensors = nodes = 0
        declared = 0
        for g, subgraph in enumerate(subgraphs):
            graph_tensors = self._tables(subgraph, _SG_TENSORS)
            tensors += len(graph_tensors)
            if tensors > self.limits.max_tensors:
                raise UnsafeModel(f"TFLite model has more than {self.limits.max_tensors} tensors")
            for tensor in graph_tensors:
                buf_field = self._field(tensor, _T_BUFFER)
                buffer = self._scalar("I", buf_field) if buf_field is not None else 0
                if buffer >= max(len(buffers), 1):
                    raise UnsafeModel(
                        f"{self._label(tensor, g)} names buffer {buffer}; the model has {len(buffers)}"
                    )
                type_field = self._field(tensor, _T_TYPE)
                ttype = self._scalar("b", type_field) if type_field is not None else 0
                dims = self._ints(tensor, _T_SHAPE)
                try:
                    declared = _declare(self.limits, dims, _TFLITE_ITEMSIZE.get(ttype, 8), declared)
                except _TooLarge as exc:
                    raise UnsafeModel(f"{self._label(tensor, g)} {exc}") from None
            count = len(graph_tensors)
            for slot in (_SG_INPUTS, _SG_OUTPUTS):
                for i in self._ints(subgraph, slot):
                    if not -1 <= i < count:
                        raise UnsafeModel(f"TFLite subgraph {g} names tensor {i}; it has {count}")
            operators = self._tables(subgraph, _SG_OPERATORS)
            nodes += len(operators)
            if nodes > self.limits.max_nodes:
                raise UnsafeModel(f"TFLite model has more than {self.limits.max_nodes} operators")
            for op in operators:
                for slot in (_OP_INPUTS, _OP_OUTPUTS):
                    for i in self._ints(op, slot):
                        if not -1 <= i < count:
                            raise UnsafeModel(
                                f"TFLite operator in subgraph {g} names tensor {i}; it has {count}"
                            )
        return ModelSummary("tflite", tensors, declared, len(subgraphs), 1, nodes)


# --------------------------------------------------------------------------------------- sample archives


@dataclass(frozen=True)
class SampleLimits:
    """What a samples file (.npz archive or bare .npy) may declare, checked from its zip directory and
    array headers before anything is inflated or allocated."""

    max_bytes: int = 256 * 1024 * 1024  # all arrays together, uncompressed
    max_members: int = 1024
    max_ratio: float = 200.0  # uncompressed / compressed size of one member (checked above 1 MiB)


DEFAULT_SAMPLE_LIMITS = SampleLimits()
_RATIO_FLOOR = 1 << 20


def check_sample_file(fp: BinaryIO, limits: SampleLimits = DEFAULT_SAMPLE_LIMITS, *, name: str = "") -> None:
    """Refuse (UsageError) a zip/npz bomb, object arrays and `.npy` headers that claim more than they hold.

    `fp` is a seekable binary file the caller opened; it is left at an unspecified position."""
    import zipfile

    if zipfile.is_zipfile(fp):
        fp.seek(0)
        _check_archive(fp, limits)
        return
    fp.seek(0, 2)
    size = fp.tell()
    fp.seek(0)
    if size > limits.max_bytes:
        raise UsageError(f"it holds {size} bytes; the limit is {limits.max_bytes}")
    _check_npy_header(fp, name or "array", size)


def _check_archive(fp: BinaryIO, limits: SampleLimits) -> None:
    import zipfile

    try:
        with zipfile.ZipFile(fp) as archive:
            members = archive.infolist()
            if len(members) > limits.max_members:
                raise UsageError(f"it has {len(members)} members; the limit is {limits.max_members}")
            total = sum(m.file_size for m in members)
            if total > limits.max_bytes:
                raise UsageError(
                    f"it inflates to {total} bytes; the limit is {limits.max_bytes} "
                    "(send fewer samples or raise the configured cap)"
                )
            for m in members:
                ratio = m.file_size // max(m.compress_size, 1)
                if m.file_size > _RATIO_FLOOR and m.file_size > limits.max_ratio * max(m.compress_size, 1):
                    raise UsageError(
                        f"member {m.filename[:60]!r} compresses {ratio}:1, "
                        f"over the {limits.max_ratio:g}:1 limit (a zip bomb?)"
                    )
                with archive.open(m) as member:
                    _check_npy_header(member, m.filename, m.file_size)
    except zipfile.BadZipFile as exc:
        raise UsageError(str(exc)[:120]) from None


def _check_npy_header(member: IO[bytes], filename: str, size: int) -> None:
    import numpy as np

    name = filename[:60]
    try:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(member)
        elif version in ((2, 0), (3, 0)):
            shape, _, dtype = np.lib.format.read_array_header_2_0(member)
        else:
            raise ValueError(f"unknown .npy version {version}")
    except (ValueError, EOFError, OSError) as exc:
        raise UsageError(f"member {name!r} is not a .npy array: {str(exc)[:80]}") from None
    if dtype.hasobject:
        raise UsageError(f"member {name!r} holds Python objects; only numeric arrays are read")
    declared = dtype.itemsize * math.prod(shape)
    if declared > size:
        raise UsageError(
            f"member {name!r} declares shape {list(shape)[:8]} ({declared} bytes) but holds {size} bytes"
        )
