# Why this is one module: every step between the seller's ONNX graph and onnx2tf's int8 TFLite (the static graph, the converter's run and its failures, the I/O names) works around the same converter's habits.
"""ONNX -> full-integer int8 TFLite through onnx2tf (1.x, TensorFlow 2.21), the `coral` extra.

The ONNX graph is first made static for the converter (fixed inputs folded with the Ifs they decide; one
run's shapes, batch 1 for batched samples; node names TensorFlow accepts; skl2onnx's label lookup as a
Gather; recurrent nodes unrolled by packagers/_unroll_rnn.py). onnx2tf then runs in a temporary directory
that is always removed, its log captured, in a child process (`python -m packagers._onnx2tf SPEC`):
TensorFlow never loads into the caller, where its bundled libraries break others loaded beside them
(SoftHSM's PKCS#11 login segfaulted in a process that had converted a model). In the store the packaging
task is already a sandboxed process of its own that exits afterwards, and there the conversion runs in it
(the sandbox calls convert_in_this_process): a child could not read its own /proc/self/cmdline under the sandbox's
Landlock rules, and TensorFlow's converter aborts without it. A converter failure is a
UsageError naming the cause. The seller's calibration samples are the representative dataset. The build
keeps float inputs and outputs with int8 internals (QUANTIZE/DEQUANTIZE at the edges), and its I/O tensors
carry the ONNX names so the fp32 comparison feeds both models alike."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edgemart.core.errors import UsageError
from packagers._specialize import fold_constant_ifs, specialize
from packagers._unroll_rnn import unroll_recurrent

# Set by a process that may load TensorFlow itself (the store's sandboxed task, which exits afterwards).
_in_process = False


def convert_in_this_process() -> None:
    """From now on this process runs the converter itself instead of in a child (see the module text)."""
    global _in_process
    _in_process = True


INSTALL_HINT = "pip install -e '.[coral]' in the edgemart checkout (make venv installs it)"
CALIBRATION_SAMPLES = 200  # representative samples (runs) fed to the TFLite calibrator, one at a time
LOG_CHARS = 8000  # the converter's log kept in the build metadata (its tail)


def converter_available() -> bool:
    return all(
        importlib.util.find_spec(m) is not None for m in ("onnx2tf", "tensorflow", "onnx_graphsurgeon")
    )


def require_converter() -> None:
    if not converter_available():
        raise UsageError(
            "coral-edgetpu converts ONNX with onnx2tf and TensorFlow, which are not installed here: "
            + INSTALL_HINT
        )


def static_for_converter(proto, shapes: dict[str, tuple[int, ...]]):
    """A copy of the ONNX graph the converter can take: each input's shape fixed to `shapes` (one run's),
    node names TensorFlow accepts as scopes, skl2onnx's ArrayFeatureExtractor label lookup as a Gather (or
    nothing, over arange classes), a Gather of one constant index as Slice + Squeeze (Edge TPU ops); output
    shapes re-inferred."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    for value in graph.input:
        if value.name in inits:
            continue
        if value.name not in shapes:
            raise UsageError(f"calibration samples have no array for model input '{value.name}'")
        shape = value.type.tensor_type.shape
        wanted = shapes[value.name]
        if len(shape.dim) != len(wanted):  # no shape recorded: the samples' own
            shape.ClearField("dim")
            for _ in wanted:
                shape.dim.add()
        for dim, size in zip(shape.dim, wanted, strict=True):
            dim.Clear()
            dim.dim_value = int(size)
    for value in graph.output:
        value.type.tensor_type.ClearField("shape")
    del graph.value_info[:]
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    nodes = []
    for k, node in enumerate(graph.node):
        node.name = re.sub(r"[^A-Za-z0-9_.\-]", "_", node.name or f"{node.op_type}_{k}") or f"node_{k}"
        if node.op_type == "ArrayFeatureExtractor" and node.domain == "ai.onnx.ml":
            table = consts.get(node.input[0])
            if table is None or table.ndim != 1:
                raise UsageError(
                    f"coral-edgetpu: node {node.name} (ArrayFeatureExtractor) looks up a non-constant table; "
                    "export the model without the label lookup (skl2onnx: options={'zipmap': False} and "
                    "keep the probabilities output), then: edgemart package MODEL.onnx --target coral-edgetpu --calibration CAL.npz --out DIR"
                )
            if np.array_equal(table, np.arange(len(table))):
                replaced = helper.make_node("Identity", [node.input[1]], list(node.output), name=node.name)
            else:
                replaced = helper.make_node(
                    "Gather", list(node.input), list(node.output), name=node.name, axis=0
                )
            nodes.append(replaced)
            continue
        index = (
            consts.get(node.input[1]) if node.op_type == "Gather" and node.domain in ("", "ai.onnx") else None
        )
        if index is not None and index.ndim == 0 and node.input[0] not in consts:
            nodes.extend(_gather_as_slice(node, int(index), graph, opset))
            continue
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return _infer(model, "the static graph")


def _gather_as_slice(node, index: int, graph, opset: int) -> list:
    """Gather of one constant index as Slice + Squeeze (STRIDED_SLICE and SQUEEZE are Edge TPU ops; GATHER
    is not, and would end the Edge TPU region there), e.g. a recurrent state's layer: state[0]."""
    from onnx import helper, numpy_helper

    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    end = index + 1 if index != -1 else np.iinfo(np.int64).max
    names = [f"{node.name}__{what}" for what in ("start", "end", "axis")]
    for name, value in zip(names, (index, end, axis), strict=True):
        graph.initializer.append(numpy_helper.from_array(np.array([value], np.int64), name))
    row = f"{node.name}__row"
    sliced = helper.make_node("Slice", [node.input[0], *names], [row], name=f"{node.name}_slice")
    if opset >= 13:
        squeeze = helper.make_node("Squeeze", [row, names[2]], list(node.output), name=node.name)
    else:
        squeeze = helper.make_node("Squeeze", [row], list(node.output), name=node.name, axes=[axis])
    return [sliced, squeeze]


def convert_int8(
    proto,
    arrays: dict[str, np.ndarray],
    per_run: bool = False,
    fixed: Mapping[str, np.ndarray] | None = None,
) -> tuple[bytes, str, dict]:
    """(full-integer int8 TFLite with float I/O named as the ONNX I/O, the converter's log tail, what was
    rewritten before converting: `fixed_inputs`/`if_nodes_resolved`, `recurrent_unrolled`).

    `arrays`: samples with the batch on axis 0 (the build takes one: a static batch of 1), or with
    `per_run` one whole feed per entry (the build takes that feed's shape, e.g. a time-major [T, 1, F]).
    `fixed` inputs become constants and the Ifs they decide are replaced by their branch; an If left
    deciding at run time is a UsageError naming the inputs to fix. Recurrent nodes are unrolled
    (packagers/_unroll_rnn.py) on the static graph."""
    import onnx

    require_converter()
    prepared: dict = {}
    if fixed or any(n.op_type == "If" for n in proto.graph.node):
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)
        if fixed:
            proto, prepared = specialize(copy, dict(fixed))
        else:
            proto, folded = copy, fold_constant_ifs(copy)
            prepared = {"if_nodes_resolved": folded} if folded else {}
        refuse_runtime_ifs(proto)
    runs: dict[str, np.ndarray] = {}
    if per_run:
        shapes = {k: tuple(v.shape[1:]) for k, v in arrays.items()}
        if len({s[0] if s else 1 for s in shapes.values()}) > 1:
            # onnx2tf slices every input by the first input's leading dim (e.g. audio [1, 576] and state
            # [2, 1, 128]): the representative dataset is then the runs themselves (see _convert).
            runs = {k: v[:CALIBRATION_SAMPLES] for k, v in arrays.items()}
        # The calibrator slices the first axis of the input's static shape: the feeds, end to end.
        arrays = {k: v.reshape(-1, *v.shape[2:]) for k, v in arrays.items()}
    else:
        shapes = {k: (1, *v.shape[1:]) for k, v in arrays.items()}
    static = static_for_converter(proto, shapes)
    unrolled = unroll_recurrent(static)
    if unrolled:
        prepared["recurrent_unrolled"] = unrolled
        static = _infer(static, "the unrolled recurrent graph")
    inits = {i.name for i in static.graph.initializer}
    in_names = [i.name for i in static.graph.input if i.name not in inits]
    out_names = [o.name for o in static.graph.output]
    with tempfile.TemporaryDirectory(prefix="edgemart-onnx2tf-") as tmp:
        work = Path(tmp)
        onnx.save(static, str(work / "model.onnx"))
        inputs, keep = [], []
        for k, name in enumerate(in_names):
            rows = CALIBRATION_SAMPLES * (shapes[name][0] if shapes[name] else 1)
            data = np.ascontiguousarray(arrays[name][:rows], dtype=np.float32)
            np.save(work / f"cal{k}.npy", data)
            channels = int(data.shape[1]) if data.ndim >= 3 else 1
            inputs.append([name, str(work / f"cal{k}.npy"), int(data.ndim), channels])
            if data.ndim >= 3:
                keep.append(name)  # the build takes the same layout as the ONNX model
        spec = {
            "model": str(work / "model.onnx"),
            "out": str(work / "out"),
            "inputs": inputs,
            "keep_layout": keep,
            "runs": {},
        }
        for k, (name, run) in enumerate(runs.items()):
            np.save(work / f"run{k}.npy", np.ascontiguousarray(run, dtype=np.float32))
            spec["runs"][name] = str(work / f"run{k}.npy")
        returncode, log = _run_converter(spec, work / "converter.log")
        built = work / "out" / "model_integer_quant.tflite"
        if returncode != 0 or not built.is_file():
            raise UsageError(_failure(log, returncode), details={"converter_log": log[-LOG_CHARS:]})
        payload = built.read_bytes()
    return with_onnx_io_names(payload, in_names, out_names), log[-LOG_CHARS:], prepared


def refuse_runtime_ifs(proto) -> None:
    """A UsageError for the first `If` whose branch is picked at run time, naming the model inputs its
    condition reads (the seller fixes them with --fixed); the converter needs one static graph."""
    graph = proto.graph
    inputs = {i.name for i in graph.input} - {i.name for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type != "If":
            continue
        reads, stack, seen = [], [node.input[0]], set()
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in inputs:
                reads.append(name)
            elif name in producer:
                stack.extend(producer[name].input)
        named = sorted(reads) or ["(none)"]
        raise UsageError(
            f"coral-edgetpu: node {node.name or 'If'} (If) picks its branch at run time from input(s) "
            f"{', '.join(repr(n) for n in named)}; the Edge TPU build is one static graph: fix "
            + ("them" if len(named) > 1 else "it")
            + " to the value the device always feeds, e.g. edgemart package MODEL.onnx --target coral-edgetpu "
            f"--calibration CAL.npz --fixed {named[0]}=VALUE --out DIR (model card: fixed: {{{named[0]}: VALUE}})"
        )


def _infer(model, what: str):
    import onnx

    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception as exc:  # onnx raises InferenceError and others: a message for the seller either way
        raise UsageError(f"coral-edgetpu: ONNX shape inference failed on {what}: {exc}") from None


def _run_converter(spec: dict, log_path: Path) -> tuple[int, str]:
    """onnx2tf.convert in a child process (in this one after convert_in_this_process()), its stdout/stderr
    (Python and TensorFlow's C++ logging alike) in `log_path`. (returncode, log): 0 when it returned, else
    the child's exit status (1 when the converter raised or called sys.exit, as onnx2tf does on errors)."""
    if _in_process:
        return _run_here(spec, log_path)
    spec_path = log_path.with_name("spec.json")
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)  # this checkout's packages, whatever sys.path says
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    with open(log_path, "wb") as sink:
        proc = subprocess.run(
            [sys.executable, "-m", "packagers._onnx2tf", str(spec_path)],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            check=False,
        )
    log = _clean(log_path.read_text(errors="replace"))
    return proc.returncode, log


def _run_here(spec: dict, log_path: Path) -> tuple[int, str]:
    """onnx2tf.convert in this process, its output sent to `log_path` for the time of the call."""
    for key, value in (
        ("TF_CPP_MIN_LOG_LEVEL", "2"),
        ("CUDA_VISIBLE_DEVICES", ""),
        ("TF_ENABLE_ONEDNN_OPTS", "0"),
    ):
        os.environ.setdefault(key, value)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    returncode = 0
    with open(log_path, "w", buffering=1, errors="replace") as sink:
        os.dup2(sink.fileno(), 1)  # C++ logging
        os.dup2(sink.fileno(), 2)
        try:
            with (
                contextlib.redirect_stdout(sink),
                contextlib.redirect_stderr(sink),
            ):  # Python's, whoever holds them
                _convert(spec)
        except SystemExit as exc:
            returncode = exc.code if isinstance(exc.code, int) and exc.code else 1
        except Exception as exc:  # the converter's failure on the seller's model, whatever its type
            returncode = 1
            sink.write("".join(traceback.format_exception_only(type(exc), exc)))
        finally:
            sink.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
    return returncode, _clean(log_path.read_text(errors="replace"))


def _convert(spec: dict) -> None:
    import onnx2tf

    inputs = []
    for name, path, ndim, channels in spec["inputs"]:
        shape = [1, channels] + [1] * (ndim - 2) if ndim >= 3 else [1] * ndim
        inputs.append([name, path, np.zeros(shape, np.float32), np.ones(shape, np.float32)])
    with warnings.catch_warnings(), _whole_runs_as_dataset(spec["runs"]):
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")
        onnx2tf.convert(
            input_onnx_file_path=spec["model"],
            output_folder_path=spec["out"],
            output_integer_quantized_tflite=True,
            quant_type="per-channel",
            custom_input_op_name_np_data_path=inputs,
            keep_ncw_or_nchw_or_ncdhw_input_names=spec["keep_layout"] or None,
            not_use_onnxsim=True,
            verbosity="warn",
        )


@contextlib.contextmanager
def _whole_runs_as_dataset(runs: dict[str, str]):
    """With `runs` (input name -> .npy of whole feeds, one per entry), the int8 converter onnx2tf makes
    calibrates on those feeds as they are: its own dataset slices every input by the first input's leading
    dim, which breaks inputs of different leading dims. onnx2tf sets `representative_dataset` and then
    calls `convert()` on the converter from `TFLiteConverter.from_saved_model`; for the time of the call
    that converter's `convert` sets ours first. Nothing is changed without `runs`."""
    if not runs:
        yield
        return
    import tensorflow as tf

    feeds = {name: np.load(path) for name, path in runs.items()}
    count = min(len(v) for v in feeds.values())

    def dataset():
        for i in range(count):
            yield {name: tf.convert_to_tensor(v[i], tf.float32) for name, v in feeds.items()}

    cls = tf.lite.TFLiteConverter
    original = cls.__dict__["from_saved_model"]

    def from_saved_model(*args, **kwargs):
        converter = original.__get__(None, cls)(*args, **kwargs)
        convert = converter.convert

        def convert_with_runs():
            converter.representative_dataset = dataset
            return convert()

        converter.convert = convert_with_runs
        return converter

    cls.from_saved_model = staticmethod(from_saved_model)
    try:
        yield
    finally:
        cls.from_saved_model = original


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _clean(log: str) -> str:
    return "\n".join(line for line in _ANSI.sub("", log).splitlines() if line.strip())


def _failure(log: str, returncode: int) -> str:
    """The converter's cause in one line: the unsupported op, or the last error line of its log."""
    missing = re.search(r"No module named 'onnx2tf\.ops\.(\w+)'", log) or re.search(
        r"(\w+) OP is not yet implemented", log
    )
    if missing:
        cause = f"op {missing.group(1)} is not supported by onnx2tf"
    else:
        lines = log.splitlines()
        # The Python exception that ended the converter, else its last error line (not a runtime warning).
        errors = [ln.strip() for ln in lines if re.match(r"\s*[\w.]+(Error|Exception|Exit)\b: ", ln)]
        errors = errors or [ln.strip() for ln in lines if "ERROR" in ln or re.match(r"\s*E\d{4} ", ln)]
        node = re.findall(r"onnx_op_name: (\S+)", log)
        op = re.findall(r"onnx_op_type: (\w+)", log)
        where = " ".join(filter(None, [f"op {op[-1]}" if op else "", f"node {node[-1]}" if node else ""]))
        cause = (f"at {where}: " if where else "") + (
            errors[-1][:300] if errors else f"exit status {returncode}"
        )
    return (
        f"coral-edgetpu: onnx2tf could not convert this model to int8 TFLite: {cause}. Build it for a target "
        "that takes it as it is: edgemart package MODEL.onnx --target arm-cpu --calibration CAL.npz --out DIR"
    )


def with_onnx_io_names(payload: bytes, in_names: list[str], out_names: list[str]) -> bytes:
    """The TFLite model with its graph inputs/outputs renamed after the ONNX ones (onnx2tf's serving
    signature keeps input names and calls outputs output_0.. in ONNX order)."""
    import flatbuffers

    from packagers._model import tflite_schema

    schema = tflite_schema()
    tree = schema.ModelT.InitFromPackedBuf(payload, 0)
    graph = tree.subgraphs[0]
    names: dict[int, str] = {}
    for sig in tree.signatureDefs or []:
        for item in sig.inputs or []:
            key = item.name.decode() if isinstance(item.name, bytes) else str(item.name)
            if key in in_names:
                names[item.tensorIndex] = key
        for item in sig.outputs or []:
            key = item.name.decode() if isinstance(item.name, bytes) else str(item.name)
            match = re.fullmatch(r"output_(\d+)", key)
            if match and int(match.group(1)) < len(out_names):
                names[item.tensorIndex] = out_names[int(match.group(1))]
                item.name = out_names[int(match.group(1))].encode()
            elif key in out_names:
                names[item.tensorIndex] = key
    wanted = list(graph.inputs) + list(graph.outputs)
    if len(in_names) + len(out_names) != len(wanted) or set(names) != set(wanted):
        raise UsageError(
            "coral-edgetpu: the converted model's inputs/outputs do not match the ONNX model's "
            f"({len(graph.inputs)} in / {len(graph.outputs)} out vs {len(in_names)} / {len(out_names)}); "
            "build it for a target that takes it as it is: edgemart package MODEL.onnx --target arm-cpu --calibration CAL.npz --out DIR"
        )
    for index, name in names.items():
        graph.tensors[index].name = name.encode()
    builder = flatbuffers.Builder(len(payload) + 1024)
    builder.Finish(tree.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _main(argv: list[str]) -> int:
    """The child's side: convert per the spec file; the caller reads the log and the output folder."""
    spec = json.loads(Path(argv[0]).read_text())
    returncode, log = _run_here(spec, Path(argv[0]).with_name("converter-child.log"))
    sys.stdout.write(log + "\n")
    return returncode


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
