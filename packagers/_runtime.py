"""Run ONNX and TFLite payloads from bytes, batched, for quality figures and timing.

One `Runner` per model; outputs come back as a dict keyed by output name."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np

from edge_runtime.evaluation.samples import SampleSet, run_samples
from edgemart.core.errors import UsageError


class Runner:
    """Common interface: `run(feeds) -> {output name: array}` for one run; feeds the model does not take
    (an input a specialized build no longer has) are left out."""

    output_names: tuple[str, ...]
    input_names: frozenset[str]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def own(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v for k, v in feeds.items() if k in self.input_names}

    def run_all(self, samples: SampleSet, max_batch: int = 64) -> dict[str, np.ndarray]:
        """Every sample (a stateful set step by step, carrying this model's own state), outputs joined."""
        return run_samples(self.run, samples, max_batch=max_batch)


class OnnxRunner(Runner):
    def __init__(self, model: bytes, threads: int = 0, output_names: Sequence[str] | None = None) -> None:
        import onnxruntime as ort
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        except (
            RuntimeError,
            ValueError,
            ort_errors.Fail,
            ort_errors.InvalidGraph,
            ort_errors.InvalidArgument,
            ort_errors.InvalidProtobuf,
            ort_errors.NotImplemented,
        ) as exc:
            first = str(exc).strip().splitlines()[0][:400]
            raise UsageError(f"onnxruntime cannot load the model: {first}") from None
        self.output_names = tuple(output_names or (o.name for o in self.session.get_outputs()))
        self.input_names = frozenset(i.name for i in self.session.get_inputs())

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(list(self.output_names), self.own(feeds))
        return dict(zip(self.output_names, values, strict=True))


def make_litert_interpreter(model: bytes, threads: int = 1, preserve_all_tensors: bool = False):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]
        except ImportError:
            raise UsageError("running TFLite needs ai-edge-litert: pip install edgemart[packagers]") from None
    try:
        return Interpreter(
            model_content=bytes(model),
            num_threads=max(threads, 1),
            experimental_preserve_all_tensors=preserve_all_tensors,
        )
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"LiteRT cannot load the model: {str(exc).strip().splitlines()[0]}") from None


class TfliteRunner(Runner):
    """LiteRT interpreter from bytes; resizes the batch axis to each feed and quantizes int8 I/O."""

    def __init__(self, model: bytes, threads: int = 1) -> None:
        self.interpreter = make_litert_interpreter(model, threads)
        self.interpreter.allocate_tensors()
        self.inputs = self.interpreter.get_input_details()
        self.output_names = tuple(d["name"] for d in self.interpreter.get_output_details())
        self.input_names = frozenset(d["name"] for d in self.inputs)
        self._shape: dict[int, tuple[int, ...]] = {d["index"]: tuple(d["shape"]) for d in self.inputs}

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = _feed_rows(feeds, self.inputs)
        if rows > 1 and all(_static_batch_one(d) for d in self.inputs):
            # A static batch-1 model (what the Edge TPU compiler needs): one sample per invoke.
            parts = [self._run_one({k: v[i : i + 1] for k, v in feeds.items()}) for i in range(rows)]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return self._run_one(feeds)

    def _run_one(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        resized = False
        for detail in self.inputs:
            array = feeds[detail["name"]]
            if tuple(array.shape) != self._shape[detail["index"]]:
                self.interpreter.resize_tensor_input(detail["index"], list(array.shape), strict=True)
                self._shape[detail["index"]] = tuple(array.shape)
                resized = True
        if resized:
            self.interpreter.allocate_tensors()
        for detail in self.inputs:
            array = feeds[detail["name"]]
            if detail["dtype"] in (np.int8, np.uint8) and array.dtype.kind == "f":
                scale, zero = detail["quantization"]
                info = np.iinfo(detail["dtype"])
                array = np.clip(np.round(array / scale) + zero, info.min, info.max).astype(detail["dtype"])
            self.interpreter.set_tensor(detail["index"], array)
        self.interpreter.invoke()
        out = {}
        for detail in self.interpreter.get_output_details():
            value = self.interpreter.get_tensor(detail["index"]).copy()
            if detail["dtype"] in (np.int8, np.uint8):
                scale, zero = detail["quantization"]
                value = (value.astype(np.float32) - zero) * np.float32(scale)
            out[detail["name"]] = value
        return out


def _static_batch_one(detail: Mapping) -> bool:
    sig = detail.get("shape_signature")
    dims = sig if sig is not None and len(sig) else detail["shape"]
    return len(dims) > 0 and int(dims[0]) == 1


def _feed_rows(feeds: Mapping[str, np.ndarray], inputs: Sequence[Mapping]) -> int:
    shapes = [feeds[d["name"]].shape for d in inputs if d["name"] in feeds]
    return int(shapes[0][0]) if shapes and len(shapes[0]) else 1


def runner_for(model: bytes, fmt: str, threads: int = 0) -> Runner:
    return TfliteRunner(model, threads or 1) if fmt == "tflite" else OnnxRunner(model, threads)


def median_latencies_ms(
    runners: Sequence[Runner], feed: Mapping[str, np.ndarray], runs: int, warmup: int = 3
) -> list[float]:
    """Median wall time per runner, runs interleaved so both see the same machine state."""
    for runner in runners:
        for _ in range(warmup):
            runner.run(feed)
    times: list[list[float]] = [[] for _ in runners]
    for _ in range(max(runs, 1)):
        for i, runner in enumerate(runners):
            start = time.perf_counter()
            runner.run(feed)
            times[i].append((time.perf_counter() - start) * 1000.0)
    return [float(np.median(t)) for t in times]
