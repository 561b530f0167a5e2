"""Specialize an ONNX graph for the inputs a seller fixes: each becomes a constant, and every `If` whose
condition is then constant is replaced by the branch it takes, so quantization sees one plain graph.

The build no longer has the fixed inputs; its metadata and report say which values it was built for."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edgemart.core.errors import UsageError

# Ops whose output is not a pure function of their inputs, or that hold subgraphs: never folded here.
_NOT_FOLDABLE = frozenset(
    {"If", "Loop", "Scan", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
     "Multinomial", "Bernoulli", "Dropout", "SequenceConstruct"}
)  # fmt: skip


def specialize(model, fixed: Mapping[str, np.ndarray]) -> tuple[object, dict]:
    """(model with `fixed` inputs as initializers and constant Ifs inlined, what was done). In place."""
    from onnx import numpy_helper

    graph = model.graph
    if not fixed:
        return model, {}
    keep = [vi for vi in graph.input if vi.name not in fixed]
    missing = sorted(set(fixed) - {vi.name for vi in graph.input})
    if missing:
        raise UsageError(f"fixed input {missing[0]!r} is not a model input")
    del graph.input[:]
    graph.input.extend(keep)
    for name, value in fixed.items():
        graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    folded = fold_constant_ifs(model)
    _drop_dead(graph)  # also what only read a fixed input
    return model, {
        "fixed_inputs": {k: np.asarray(v).ravel()[0].item() for k, v in fixed.items()},
        "if_nodes_resolved": folded,
    }


def fold_constant_ifs(model) -> list[dict]:
    """Replace every `If` whose condition is computable from initializers by the branch it takes, then drop
    what nothing reads any more; in place. One row per If folded."""
    folded: list[dict] = []
    while True:
        step = _fold_one_if(model)
        if step is None:
            break
        folded.append(step)
    if folded:
        _drop_dead(model.graph)
    return folded


def _constant_names(graph) -> tuple[set[str], dict[str, object]]:
    """Tensors computable from initializers alone, and the node producing each."""
    known = {i.name for i in graph.initializer} | {""}
    producer: dict[str, object] = {}
    for node in graph.node:
        for out in node.output:
            producer[out] = node
        if (
            node.op_type not in _NOT_FOLDABLE
            and node.domain in ("", "ai.onnx")
            and all(i in known for i in node.input)
        ):
            known.update(node.output)
    return known, producer


def _evaluate(model, name: str, producer: Mapping[str, object]):
    """Run the constant nodes that `name` depends on, alone, and return its value."""
    import onnx
    import onnxruntime as ort

    graph = model.graph
    needed: list = []
    stack, seen = [name], set()
    while stack:
        tensor = stack.pop()
        node = producer.get(tensor)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        needed.append(node)
        stack.extend(node.input)  # type: ignore[attr-defined]
    order = {id(n): i for i, n in enumerate(graph.node)}
    needed.sort(key=lambda n: order[id(n)])
    used = {i for n in needed for i in n.input}
    sub = onnx.helper.make_graph(
        needed,
        "condition",
        [],
        [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.BOOL, None)],
        [i for i in graph.initializer if i.name in used],
    )
    probe = onnx.helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([name], {})[0]


def _fold_one_if(model) -> dict | None:
    import onnx

    graph = model.graph
    known, producer = _constant_names(graph)
    for index, node in enumerate(graph.node):
        if node.op_type != "If" or node.input[0] not in known:
            continue
        cond = np.asarray(_evaluate(model, node.input[0], producer))
        if cond.size != 1:
            continue
        taken = bool(cond.ravel()[0])
        branch = next(a.g for a in node.attribute if a.name == ("then_branch" if taken else "else_branch"))
        outer = {i.name for i in graph.initializer} | {i.name for i in graph.input}
        outer |= {o for n in graph.node for o in n.output}
        inner = {o for n in branch.node for o in n.output} | {i.name for i in branch.initializer}
        if inner & outer:
            continue  # a branch shadowing outer names: leave this If for the quantizer as it is
        new_nodes = list(branch.node)
        for out_vi, if_out in zip(branch.output, node.output, strict=True):
            new_nodes.append(
                onnx.helper.make_node(
                    "Identity", [out_vi.name], [if_out], name=f"{node.name or 'If'}_{if_out}"
                )
            )
        graph.initializer.extend(branch.initializer)
        graph.value_info.extend(branch.value_info)
        del graph.node[index]
        for offset, new in enumerate(new_nodes):
            graph.node.insert(index + offset, new)
        return {
            "node": node.name or f"If_{index}",
            "condition": node.input[0],
            "took": "then" if taken else "else",
        }
    return None


def _drop_dead(graph) -> None:
    """Remove nodes nothing consumes (the condition's arithmetic, the untaken inputs) and unused initializers."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs | _subgraph_reads(graph)
        dead = [i for i, n in enumerate(graph.node) if not any(o in used for o in n.output)]
        if not dead:
            break
        for i in reversed(dead):
            del graph.node[i]
    used = {i for n in graph.node for i in n.input} | outputs | _subgraph_reads(graph)
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _subgraph_reads(graph) -> set[str]:
    """Names the subgraphs of remaining nodes read from the outer scope (they are not node inputs)."""
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                names |= {i for n in sub.node for i in n.input}
                names |= _subgraph_reads(sub)
    return names
