"""A float TFLite upload quantized to full int8 with ai-edge-quantizer (static_wi8_ai8), TensorFlow-free.

The uploaded flatbuffer is first made quantizable: fp16 weights stored behind DEQUANTIZE ops are folded to
fp32 constants (else the quantizer leaves those ops in and picks zero points LiteRT refuses), and a model
without a signature gets one (the quantizer calibrates by signature). The result is checked: every tensor
but the graph's inputs and outputs int8/int32, and it loads in LiteRT."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Iterator

import numpy as np

from edge_runtime.evaluation.samples import SampleSet
from edgemart.core.errors import UsageError
from packagers._model import ModelInfo, builtin_op_names, full_int8_problems, tflite_schema, tflite_tree
from packagers._runtime import make_litert_interpreter

RECIPE = "static_wi8_ai8"
HOW = f"quantized from the uploaded float TFLite with ai-edge-quantizer {RECIPE}"
CALIBRATION_SAMPLES = 200  # calibration runs at most (min/max ranges settle well before this)
_FLOAT16, _FLOAT32 = 1, 0


def calibration_required(target: str) -> UsageError:
    """The error for a float TFLite given without calibration samples: what to pass, in a command that works."""
    return UsageError(
        f"target {target} quantizes a float TFLite to full int8 and needs calibration samples to measure "
        "activation ranges: pass an .npz keyed by input name (batch on axis 0), e.g. "
        f"edgemart package MODEL.tflite --target {target} --calibration samples.npz --out DIR"
    )


def quantize_float_tflite(
    model: bytes,
    info: ModelInfo,
    calibration: SampleSet,
    progress: Callable[[float, str], None],
    target: str = "coral-edgetpu",
) -> tuple[bytes, dict]:
    """The float TFLite `model` as a full-int8 TFLite, with metadata saying how it was made; graph inputs and
    outputs are what the quantizer makes them (LiteRT runners quantize/dequantize int8 I/O)."""
    if calibration.state:
        raise UsageError(
            "a stateful float TFLite cannot be quantized here: give a model without state inputs"
        )
    try:
        from ai_edge_quantizer import calibrator, quantizer, recipe, recipe_manager
        from ai_edge_quantizer.utils import qsv_utils
    except ImportError:
        raise UsageError(
            "quantizing a float TFLite needs ai-edge-quantizer: pip install 'edgemart[packagers]'"
        ) from None
    progress(0.05, "folding fp16 weights to fp32, adding a signature")
    prepared, folded, signature = prepare_float_tflite(model, target)
    progress(0.1, f"calibrating activation ranges ({RECIPE})")
    runs = list(_calibration_feeds(calibration, CALIBRATION_SAMPLES))
    try:
        with _quiet():  # the calibrator's tqdm bar cannot be turned off
            # Quantizer.calibrate keeps a moving average (0.95) of per-run min/max, which clips what only a
            # few runs reach (one sample per run here); the ranges over every run are what we calibrate on.
            manager = recipe_manager.RecipeManager()
            manager.load_quantization_recipe(recipe.static_wi8_ai8())
            calib = calibrator.Calibrator(prepared, num_threads=1, qsv_update_func=qsv_utils.min_max_update)
            calib.calibrate({signature: runs}, manager)
            ranges = calib.get_model_qsvs()
        progress(0.6, "quantizing weights and activations to int8")
        with _quiet():
            q = quantizer.Quantizer(prepared, recipe.static_wi8_ai8())
            result = q.quantize(ranges, enable_progress_bar=False, enable_progress_report=False)
            payload = bytes(result.quantized_model)
    except (ValueError, RuntimeError, KeyError, NotImplementedError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UsageError(
            f"ai-edge-quantizer {RECIPE} cannot quantize this TFLite: {first}; quantize it to full int8 "
            f"yourself, then: edgemart package MODEL_int8.tflite --target {target}"
        ) from None
    problems = full_int8_problems(payload)
    if problems:
        ops = ", ".join(sorted({op for op in _float_ops(payload)})) or "none"
        raise UsageError(
            f"ai-edge-quantizer {RECIPE} left tensors that are not int8/int32: {', '.join(problems)} "
            f"(ops still float: {ops}); quantize it to full int8 yourself, then: "
            f"edgemart package MODEL_int8.tflite --target {target}"
        )
    progress(0.8, "checking the build loads in LiteRT")
    interpreter = make_litert_interpreter(payload)
    interpreter.allocate_tensors()
    io_types = sorted(
        {
            np.dtype(d["dtype"]).name
            for d in interpreter.get_input_details() + interpreter.get_output_details()
        }
    )
    meta = {
        "quantization": HOW,
        "quantizer": f"ai-edge-quantizer {_version('ai-edge-quantizer')}, recipe {RECIPE} "
        f"(int8 weights per channel, int8 activations, min/max ranges; I/O {'/'.join(io_types)})",
        "calibration_samples": len(runs) * _rows(runs),
        "folded_fp16_weights": folded,
        "runtime": "LiteRT",
        "as_uploaded": False,
    }
    return payload, meta


def prepare_float_tflite(model: bytes, target: str = "coral-edgetpu") -> tuple[bytes, int, str]:
    """(model with fp16 DEQUANTIZE constants folded to fp32 and unused tensors dropped, folded count,
    signature key); a model without a signature gets `serving_default` over its graph inputs/outputs."""
    import flatbuffers

    schema = tflite_schema()
    tree = tflite_tree(model)
    if len(tree.subgraphs or []) != 1:
        raise UsageError(
            f"this TFLite has {len(tree.subgraphs or [])} subgraphs; float TFLite quantization takes "
            "one-subgraph models: quantize it to full int8 yourself, then: "
            f"edgemart package MODEL_int8.tflite --target {target}"
        )
    graph = tree.subgraphs[0]
    names = builtin_op_names()
    for code in tree.operatorCodes or []:
        # Schema-v3 files name an op in deprecatedBuiltinCode only (builtinCode 0, ADD); the quantizer reads
        # builtinCode and would quantize every op as an ADD (weights as activations, int8 biases).
        code.builtinCode = max(code.builtinCode, code.deprecatedBuiltinCode)
    sparse = [t for t in graph.tensors or [] if t.sparsity is not None]
    if sparse:
        raise UsageError(
            f"this TFLite stores {len(sparse)} sparse weight tensors (DENSIFY ops), which ai-edge-quantizer "
            "does not take: export it dense, then: "
            f"edgemart package MODEL.tflite --target {target} --calibration samples.npz --out DIR"
        )
    replace: dict[int, int] = {}  # DEQUANTIZE output tensor -> the constant that now holds fp32 values
    kept = []
    for op in graph.operators or []:
        name = names.get(tree.operatorCodes[op.opcodeIndex].builtinCode, "")
        if name == "DEQUANTIZE" and len(op.inputs) == 1:
            src = graph.tensors[op.inputs[0]]
            data = tree.buffers[src.buffer].data if src.buffer else None
            if src.type == _FLOAT16 and data is not None and len(data):
                values = np.frombuffer(bytes(np.asarray(data, np.uint8)), np.float16).astype("<f4")
                tree.buffers[src.buffer].data = np.frombuffer(values.tobytes(), np.uint8)
                src.type = _FLOAT32
                replace[op.outputs[0]] = op.inputs[0]
                continue
        kept.append(op)
    graph.operators = kept
    for op in kept:
        op.inputs = [replace.get(int(i), int(i)) for i in op.inputs]
    graph.outputs = [replace.get(int(i), int(i)) for i in graph.outputs]
    _drop_unused_tensors(graph)
    if not tree.signatureDefs:
        tree.signatureDefs = [_signature(schema, graph, "serving_default")]
    sig = tree.signatureDefs[0].signatureKey
    key = sig.decode() if isinstance(sig, bytes) else str(sig)
    builder = flatbuffers.Builder(len(model) * 2 + 1024)
    builder.Finish(tree.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output()), len(replace), key


def _drop_unused_tensors(graph) -> None:
    """Remove tensors no op, graph input or graph output refers to; renumber every reference."""
    used: set[int] = set(int(i) for i in graph.inputs) | set(int(i) for i in graph.outputs)
    for op in graph.operators:
        for field in ("inputs", "outputs", "intermediates"):
            used.update(int(i) for i in (getattr(op, field, None) or []) if i >= 0)
    order = sorted(used)
    new = {old: i for i, old in enumerate(order)}
    graph.tensors = [graph.tensors[i] for i in order]

    def remap(values):
        return [new[int(i)] if i >= 0 else -1 for i in values]

    for op in graph.operators:
        op.inputs, op.outputs = remap(op.inputs), remap(op.outputs)
        if op.intermediates is not None and len(op.intermediates):
            op.intermediates = remap(op.intermediates)
    graph.inputs, graph.outputs = remap(graph.inputs), remap(graph.outputs)


def _signature(schema, graph, key: str):
    sig = schema.SignatureDefT()
    sig.signatureKey = key.encode()
    sig.subgraphIndex = 0

    def tensor_map(indices):
        rows = []
        for i in indices:
            row = schema.TensorMapT()
            row.name, row.tensorIndex = graph.tensors[int(i)].name, int(i)
            rows.append(row)
        return rows

    sig.inputs, sig.outputs = tensor_map(graph.inputs), tensor_map(graph.outputs)
    return sig


def _calibration_feeds(samples: SampleSet, limit: int) -> Iterator[dict[str, np.ndarray]]:
    """One feed per run, as many runs as hold `limit` samples; float inputs as float32."""
    seen = 0
    for rows, feed in samples.runs(max_batch=1):
        yield {k: (v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in feed.items()}
        seen += rows
        if seen >= limit:
            return


def _rows(runs: list[dict[str, np.ndarray]]) -> int:
    first = next(iter(runs[0].values()), None) if runs else None
    return int(first.shape[0]) if first is not None and first.ndim else 1


def _float_ops(model: bytes) -> Iterator[str]:
    """Op types that read or write a float tensor inside the graph (not its I/O)."""
    schema = tflite_schema()
    tree = schema.ModelT.InitFromPackedBuf(model, 0)
    graph = tree.subgraphs[0]
    io_tensors = set(int(i) for i in graph.inputs) | set(int(i) for i in graph.outputs)
    names = builtin_op_names()
    for op in graph.operators or []:
        tensors = [int(i) for i in [*op.inputs, *op.outputs] if i >= 0 and int(i) not in io_tensors]
        if any(graph.tensors[i].type not in (9, 2) for i in tensors):
            code = tree.operatorCodes[op.opcodeIndex]
            yield names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "?")


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ai-edge-quantizer draws tqdm bars and logs through absl; a CLI run shows our progress lines only.
    (sys.stdout/stderr are swapped for the block: packaging runs in the CLI or in a sandbox process.)"""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),  # tqdm progress bars
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        absl.setLevel(level)
