"""Start-time check of a chain: every binding, after its steps, must fit the model input it feeds.

Runs in the supervisor on the signatures the stage processes report once their models are open,
so a mismatch is a UsageError naming the stage and tensor before the first frame."""

from __future__ import annotations

from typing import Any

from edge_runtime.chain.spec import Binding, ChainSpec, split_ref
from edge_runtime.chain.steps import TensorType, infer
from edgemart.core.errors import UsageError


def _tensor_type(spec: dict[str, Any]) -> TensorType:
    return TensorType(tuple(spec["shape"]), spec["dtype"])


def fits(actual: TensorType, expected: TensorType) -> bool:
    if actual.dtype is not None and expected.dtype is not None and actual.dtype != expected.dtype:
        return False
    if actual.shape is None or expected.shape is None:
        return True
    if len(actual.shape) != len(expected.shape):
        return False
    return all(a is None or e is None or a == e for a, e in zip(actual.shape, expected.shape, strict=True))


def check_signatures(
    spec: ChainSpec, signatures: dict[str, dict[str, Any]]
) -> tuple[dict[str, TensorType | None], dict[str, TensorType]]:
    """Check every stage input and chain output; returns (chain input types, chain output types)."""
    outputs: dict[str, dict[str, TensorType]] = {
        stage: {o["name"]: _tensor_type(o) for o in sig["outputs"]} for stage, sig in signatures.items()
    }
    inputs: dict[str, TensorType | None] = dict(spec.inputs)
    # An undeclared chain input takes the type of the first model input it feeds without steps.
    for stage in spec.stages:
        model_inputs = {i["name"]: _tensor_type(i) for i in signatures[stage.name]["inputs"]}
        for name, binding in stage.inputs.items():
            if "." not in binding.source and not binding.steps and inputs.get(binding.source) is None:
                inputs[binding.source] = model_inputs.get(name)

    def ref_type(ref: str, where: str) -> TensorType:
        if "." not in ref:
            return inputs.get(ref) or TensorType(None, None)
        stage, tensor = split_ref(ref)
        if tensor not in outputs[stage]:
            raise UsageError(
                f"{where}: stage {stage!r} has no output {tensor!r} (outputs: {', '.join(outputs[stage])})"
            )
        return outputs[stage][tensor]

    def through_steps(binding: Binding, where: str) -> TensorType:
        t = ref_type(binding.source, where)
        for i, step in enumerate(binding.steps):
            refs = {k: ref_type(r, where) for k, r in step.refs.items()}
            t = infer(step, t, refs, f"{where} step {i} ({step.op})")
        return t

    for stage in spec.stages:
        model_inputs = {i["name"]: _tensor_type(i) for i in signatures[stage.name]["inputs"]}
        for name in stage.inputs:
            if name not in model_inputs:
                raise UsageError(
                    f"stage {stage.name!r}: the model has no input {name!r} "
                    f"(inputs: {', '.join(model_inputs)})"
                )
        for name, expected in model_inputs.items():
            bound = stage.inputs.get(name)
            if bound is None:
                raise UsageError(f"stage {stage.name!r}: model input {name!r} is not bound to any tensor")
            where = f"stage {stage.name!r} input {name!r}"
            actual = through_steps(bound, where)
            if not fits(actual, expected):
                via = f" after {', '.join(s.op for s in bound.steps)}" if bound.steps else ""
                raise UsageError(
                    f"{where}: the model expects {expected.describe()}, "
                    f"but {bound.source}{via} gives {actual.describe()}"
                )
    result = {name: through_steps(b, f"chain output {name!r}") for name, b in spec.outputs.items()}
    return inputs, result
