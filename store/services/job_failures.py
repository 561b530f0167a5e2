"""What a seller reads when a packaging job does not end in a build: one reason code, the specific reason
(which input, which node, which limit) and the next step. Tracebacks go to the worker log, never here.

`explain` maps any exception a packaging attempt raised; `worker_stopped` the attempt whose worker died."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from edgemart.core.errors import EdgemartError

# Codes a client may branch on (GET /api/v1/jobs/ID -> failure.code).
CODES = (
    "sample_mismatch",  # calibration data does not fit an input (name, rank, dim, dtype)
    "calibration_missing",
    "calibration_too_small",
    "unsupported_op",  # a node the runtime or the target cannot run
    "shape_mismatch",  # the model's own shapes do not agree (a node's inputs)
    "invalid_model",
    "invalid_option",
    "quality_failed",
    "duplicate_build",
    "limit",  # memory, attempts, a worker that kept stopping
    "internal",  # a fault on the store's side, retried and then left for an admin
)

_REUPLOAD = "fix it and publish a new version (edgemart seller upload MODEL --listing {listing})"
# Samples and options are not the model: the same version is packaged again with new ones.
_REPACKAGE = "re-package this version (edgemart seller repackage {listing} --targets {target} {what})"


@dataclass(frozen=True)
class Failure:
    code: str
    reason: str
    next_step: str
    retry: bool = False  # worth another attempt without any change (a fault on our side)

    def text(self) -> str:
        return f"{self.reason.rstrip('.')}. Next: {self.next_step}"

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "reason": self.reason, "next_step": self.next_step}


_ORT_UNREGISTERED = re.compile(r"([\w.]*):?(\w+)\(-?\d+\) is not a registered function/op")
_ORT_NO_KERNEL = re.compile(r"Could not find an implementation for (\w+)\(\d+\) node with name '([^']*)'")
_ORT_NODE = re.compile(r"Node \(([^)]*)\) Op \((\w+)\)[^\]]*\]\s*(.*)")
_TEMP_PATH = re.compile(r"(/[\w.+-]+)+/[\w.+-]*\.(onnx|tflite|npz)")


def _clean(message: str) -> str:
    """One line, no temp-file paths of the worker's machine."""
    first = message.strip().splitlines()[0] if message.strip() else ""
    first = re.sub(r"\[ONNXRuntimeError\] : \d+ : \w+ : ", "", first)
    first = re.sub(r"Load model from \S+ failed:", "", first)
    return _TEMP_PATH.sub("the model", first).strip()[:400]


def _nodes_of(model: bytes | None, op_type: str) -> list[str]:
    """Names of the nodes running ``op_type`` in an ONNX model (for a message that names them)."""
    if not model:
        return []
    try:
        from packagers._model import parse_onnx

        proto = parse_onnx(model)
    except EdgemartError:
        return []
    return [n.name or f"#{i}" for i, n in enumerate(proto.graph.node) if n.op_type == op_type][:5]


def _from_runtime_message(message: str, target: str, model: bytes | None, listing: str) -> Failure | None:
    """Failures onnxruntime / LiteRT describe in words: an op it cannot run, nodes whose shapes disagree."""
    text = _clean(message)
    if m := _ORT_NO_KERNEL.search(text):
        op, node = m.group(1), m.group(2)
        return Failure(
            "unsupported_op",
            f"node {node!r} runs op {op}, which the {target} runtime cannot execute",
            f"replace that op or choose another target; then {_REUPLOAD.format(listing=listing)}",
        )
    if m := _ORT_UNREGISTERED.search(text):
        domain, op = m.group(1), m.group(2)
        nodes = _nodes_of(model, op)
        where = f"node(s) {', '.join(repr(n) for n in nodes)}" if nodes else "the model"
        qualified = f"{domain}:{op}" if domain else op
        return Failure(
            "unsupported_op",
            f"{where} use op {qualified}, which is not a standard ONNX op the {target} runtime knows",
            f"export the model without custom ops; then {_REUPLOAD.format(listing=listing)}",
        )
    if m := _ORT_NODE.search(text):
        node, op, detail = m.group(1), m.group(2), m.group(3).strip()
        return Failure(
            "shape_mismatch",
            f"node {node!r} ({op}) does not fit its inputs: {detail or 'shape inference failed'}",
            f"check the model's input shapes and that node's weights; then {_REUPLOAD.format(listing=listing)}",
        )
    return None


def explain(exc: BaseException, *, target: str, listing: str, model: bytes | None = None) -> Failure:
    """The seller-facing reason for one failed packaging attempt (see CODES)."""
    if isinstance(exc, MemoryError):
        return Failure(
            "limit",
            f"packaging for {target} ran out of memory on the packaging worker",
            "try a smaller model or a smaller calibration set, or ask an admin to retry on a larger worker",
            retry=True,
        )
    if isinstance(exc, EdgemartError):
        if exc.http_status >= 500:  # the blob store or another service is down for a moment
            return Failure(
                "internal",
                f"a store service was unavailable while packaging for {target} ({type(exc).__name__})",
                "nothing to change: the job is retried automatically",
                retry=True,
            )
        return _from_refusal(exc, target=target, listing=listing, model=model)
    module = getattr(exc, "origin_module", type(exc).__module__)  # a sandboxed child's exception, as text
    if module.startswith(("onnxruntime", "onnx")) or "ONNXRuntimeError" in str(exc):
        found = _from_runtime_message(str(exc), target, model, listing)
        if found is not None:
            return found
    return Failure(
        "internal",
        f"packaging for {target} stopped on an internal error ({getattr(exc, 'type_name', type(exc).__name__)})",
        "nothing to change yet: the job is retried; if it keeps failing an admin sees the details in the"
        " worker log",
        retry=True,
    )


def _from_refusal(exc: EdgemartError, *, target: str, listing: str, model: bytes | None) -> Failure:
    message = _clean(exc.message)
    code = exc.code if exc.code in CODES else None
    reupload = _REUPLOAD.format(listing=listing)
    with_samples = _REPACKAGE.format(listing=listing, target=target, what="--calibration SAMPLES.npz")
    if code is None:
        found = _from_runtime_message(exc.message, target, model, listing)
        if found is not None:
            return found
    lowered = message.lower()
    if code == "calibration_too_small":
        return Failure(code, message, f"collect more calibration samples; then {with_samples}")
    if code is None and "needs calibration samples" in lowered:
        code = "calibration_missing"
    elif code is None and ("calibration data" in lowered or "holdout data" in lowered):
        code = "sample_mismatch"
    elif code is None and "option" in lowered:
        code = "invalid_option"
    elif code is None and ("conversion of op" in lowered or "cannot convert" in lowered):
        code = "unsupported_op"
    elif code is None and lowered.startswith(("onnx checker", "not a model", "tflite", "model ")):
        code = "invalid_model"
    steps = {
        "calibration_missing": "make calibration samples (.npz keyed by input name, or x); then"
        f" {with_samples}",
        "sample_mismatch": "re-export the calibration .npz so each array matches its model input"
        f" (name, dtype, shape with samples on axis 0); then {with_samples}",
        "invalid_option": "correct the target option (see `edgemart package --help`); then "
        + _REPACKAGE.format(listing=listing, target=target, what="--option KEY=VALUE"),
        "unsupported_op": f"choose another target for this model, or replace the op; then {reupload}",
        "invalid_model": f"check the model file (it must load in onnxruntime or LiteRT); then {reupload}",
        "duplicate_build": "nothing to do: this exact build is already sold in the named listing",
        "limit": "make the model or its samples smaller, or ask the store operator to raise the named"
        " SANDBOX_* limit; then re-package",
    }
    code = code or "invalid_model"
    return Failure(code, message, steps.get(code, f"fix the model or its samples; then {reupload}"))


def worker_stopped(worker: str | None, attempt: int, target: str) -> Failure:
    """An attempt whose worker process went away (killed, out of memory, host lost)."""
    return Failure(
        "limit",
        f"the packaging worker stopped during attempt {attempt} for {target} (killed or out of memory)",
        "nothing to change if it was a restart: the job is retried; if every attempt stops, try a smaller"
        " model or ask an admin",
        retry=True,
    )


def gave_up(attempts: int, last: Failure) -> Failure:
    """The dead-letter verdict: the attempts are used up; the last attempt's reason says why."""
    return Failure(
        last.code,
        f"gave up after {attempts} attempts: {last.reason}",
        "an admin can retry the job once the cause is fixed (Jobs page or POST /api/v1/jobs/ID/retry);"
        " otherwise try a smaller model or fewer targets",
    )
