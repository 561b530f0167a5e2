"""The evaluation harness: run a licensed model over the buyer's data and report accuracy, agreement,
latency, throughput, memory and load time as text, JSON or a self-contained HTML page."""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_runtime.backends import TensorSpec
from edge_runtime.device import LicensedModel
from edge_runtime.evaluation.samples import RESERVED_KEYS, SINGLE_INPUT_KEY, Contract, bind, run_samples
from edgemart.core.errors import UsageError

DEFAULT_DYNAMIC_BATCH = 16
TOP_K = 5


@dataclass
class EvalReport:
    model: dict[str, Any]
    samples: int
    batch_size: int
    calls: int
    warmup_calls: int
    load_seconds: float
    latencies_ms: list[float]
    wall_seconds: float
    peak_rss_mb: float
    classification: dict[str, Any] | None = None
    agreement: dict[str, Any] | None = None
    ignored_keys: list[str] = field(default_factory=list)
    runs_left: int | None = None
    outputs: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    contract: dict[str, Any] | None = None  # how the data ran: one sample per call, sequences and state

    @property
    def latency(self) -> dict[str, float]:
        lat = np.asarray(self.latencies_ms, dtype=np.float64)
        if lat.size == 0:
            return {}
        p50, p90, p99 = np.percentile(lat, [50, 90, 99])
        return {
            "p50": float(p50),
            "p90": float(p90),
            "p99": float(p99),
            "mean": float(lat.mean()),
            "min": float(lat.min()),
            "max": float(lat.max()),
        }

    @property
    def throughput(self) -> float:
        busy = sum(self.latencies_ms) / 1000.0
        return self.samples / busy if busy > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "samples": self.samples,
            "batch_size": self.batch_size,
            "calls": self.calls,
            "warmup_calls": self.warmup_calls,
            "runs_used": self.calls + self.warmup_calls,
            "runs_left": self.runs_left,
            "load_seconds": self.load_seconds,
            "latency_ms": self.latency,
            "throughput_samples_per_s": self.throughput,
            "wall_seconds": self.wall_seconds,
            "peak_rss_mb": self.peak_rss_mb,
            "classification": self.classification,
            "agreement": self.agreement,
            "ignored_keys": self.ignored_keys,
            "latencies_ms": self.latencies_ms,
            "data_contract": self.contract,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def _license_terms(self) -> str:
        m = self.model
        expires = m.get("license_expires")
        runs = (
            "unlimited runs"
            if self.runs_left is None
            else f"{self.runs_left} of {m.get('max_runs')} runs left"
        )
        return f"{runs}; " + (f"expires {expires}" if expires else "no expiry")

    def to_text(self) -> str:
        m, lat = self.model, self.latency
        lines = [
            f"model      {m.get('listing')}  target {m.get('target')}  backend {m.get('backend')}",
            f"license    {m.get('license_id')}  build {m.get('build_hash', '')[:23]}…",
            f"           {self._license_terms()}",
            f"samples    {self.samples} in {self.calls} calls of batch {self.batch_size}"
            f" (+{self.warmup_calls} warm-up)",
            f"load       {self.load_seconds * 1000:.1f} ms (verify + unwrap + decrypt + session)",
        ]
        if lat:
            lines.append(
                f"latency    p50 {lat['p50']:.3f} ms  p90 {lat['p90']:.3f} ms  p99 {lat['p99']:.3f} ms"
                f"  (mean {lat['mean']:.3f}, per call)"
            )
        lines.append(f"throughput {self.throughput:.1f} samples/s")
        lines.append(f"memory     peak RSS {self.peak_rss_mb:.1f} MB")
        c = self.classification
        if c:
            lines.append(
                f"accuracy   top-1 {c['accuracy']:.4f}"
                + (f"  top-{c['k']} {c['top_k_accuracy']:.4f}" if c.get("top_k_accuracy") is not None else "")
                + f"  (output {c['output']}, {c['classes']} classes)"
            )
            lines.append("confusion  rows = true label, columns = predicted")
            for i, row in enumerate(c["confusion"]):
                lines.append(f"  {i:>3} | " + " ".join(f"{v:>4}" for v in row))
        a = self.agreement
        if a:
            for name, figures in a["outputs"].items():
                lines.append(
                    f"agreement  {name}: max |Δ| {figures['max_abs_diff']:.3g}, mean |Δ| "
                    f"{figures['mean_abs_diff']:.3g}, allclose {figures['allclose']}"
                    + (
                        f", labels agree {figures['label_agreement']:.4f}"
                        if "label_agreement" in figures
                        else ""
                    )
                )
        if self.contract and self.contract.get("state"):
            pairs = ", ".join(f"{p['input']} <- {p['output']}" for p in self.contract["state"])
            lines.append(
                f"streaming  {self.contract['sequences']} sequence(s), one call per step, state carried ({pairs})"
            )
        elif self.contract and self.samples and self.batch_size == 1 and self.contract.get("mode"):
            lines.append(f"data       {self.contract['mode']}")
        if self.ignored_keys:
            lines.append(f"note       ignored data keys: {', '.join(self.ignored_keys)}")
        return "\n".join(lines)

    def to_html(self) -> str:
        from edge_runtime.evaluation.report_html import render

        return render(self)


def _classifier_output(
    outputs: dict[str, np.ndarray], specs: list[TensorSpec]
) -> tuple[str, np.ndarray | None, np.ndarray]:
    """(output name, scores or None, predicted labels) for a classifier-looking model, else raises KeyError."""
    scores_name = next(
        (s.name for s in specs if s.dtype.startswith("float") and outputs[s.name].ndim == 2), None
    )
    label_name = next((s.name for s in specs if s.dtype == "int64" and outputs[s.name].ndim == 1), None)
    scores = outputs[scores_name] if scores_name else None
    if label_name is not None:
        return label_name, scores, outputs[label_name]
    if scores is not None:
        return str(scores_name), scores, scores.argmax(axis=1)
    raise KeyError("no classifier output")


def _select_inputs(
    model: LicensedModel, data: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], list[str]]:
    """The data keys the contract reads (inputs, `x` for a single input, labels, sequence starts); the rest
    are reported as ignored, not refused (a file made for another build of the same model may carry them)."""
    names = {s.name for s in model.inputs}
    single = len(names) == 1 and not (names & set(data))
    used = {k for k in data if k in names or k in RESERVED_KEYS or (single and k == SINGLE_INPUT_KEY)}
    return {k: np.asarray(v) for k, v in data.items() if k in used}, sorted(set(data) - used)


def evaluate(
    model: LicensedModel,
    data: dict[str, np.ndarray],
    *,
    progress: Callable[[int, int], None] | None = None,
    warmup: int = 3,
    batch_size: int | None = None,
    reference: dict[str, np.ndarray] | None = None,
    state: dict[str, str] | None = None,
) -> EvalReport:
    """Run ``model`` over ``data`` (one array per input, optional labels ``y``) and measure it.

    The data follows the sample contract (edge_runtime.evaluation.samples): batched on axis 0, or one sample per run;
    a model with recurrent state runs its sequences step by step, carrying the state (pairs detected by name
    and shape, or given in ``state``). Each call is one licensed run, warm-up calls included; the run
    budget is checked up front."""
    selected, ignored = _select_inputs(model, data)
    samples = bind(model.inputs, model.outputs, selected, "eval", Contract(state=state or {}))
    n = samples.count
    if samples.per_run:
        if batch_size not in (None, 1):
            raise UsageError(
                "--batch-size applies to data batched on axis 0; this data runs one sample per call"
                + (" (a stateful model runs step by step)" if samples.state else "")
            )
        batch_size, calls = 1, n
    else:
        fixed = samples.fixed_batch
        if fixed:
            if batch_size is not None and batch_size != fixed:
                raise UsageError(
                    f"the model's batch dimension is fixed to {fixed}; --batch-size {batch_size} cannot be used"
                )
            batch_size = fixed
        batch_size = batch_size or min(n, DEFAULT_DYNAMIC_BATCH)
        if batch_size < 1:
            raise UsageError("batch size must be >= 1")
        calls = -(-n // batch_size)
    warmup = max(0, warmup)
    left = model.runs_left()
    if left is not None and calls + warmup > left:
        raise UsageError(
            f"evaluation needs {calls + warmup} runs ({calls} calls + {warmup} warm-up) but the license"
            f" has {left} left; use fewer samples, a larger --batch-size or --warmup 0"
        )
    labels = np.asarray(data["y"]) if "y" in data else None
    if labels is not None and labels.shape[0] != n:
        raise UsageError(f"labels y hold {labels.shape[0]} entries for {n} samples")

    first = samples.first_feed()
    for _ in range(warmup):
        model.run(first)
    latencies: list[float] = []

    def timed(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        out = model.run(feed)
        latencies.append((time.perf_counter() - t0) * 1000.0)
        return out

    t_start = time.perf_counter()
    outputs = run_samples(timed, samples, max_batch=batch_size, on_run=progress)
    wall = time.perf_counter() - t_start
    report = EvalReport(
        model=model.describe(),
        samples=n,
        batch_size=batch_size,
        calls=calls,
        warmup_calls=warmup,
        load_seconds=model.load_seconds,
        latencies_ms=latencies,
        wall_seconds=wall,
        peak_rss_mb=_peak_rss_mb(),
        ignored_keys=ignored,
        runs_left=model.runs_left(),
        outputs=outputs,
        contract=samples.describe() if samples.per_run or samples.fixed else None,
    )
    if labels is not None:
        report.classification = _classification(outputs, model.outputs, labels)
    if reference is not None:
        report.agreement = _agreement(outputs, reference, model.outputs)
    return report


def _peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024.0 / (1024.0 if sys.platform == "darwin" else 1.0)


def _classification(
    outputs: dict[str, np.ndarray], specs: list[TensorSpec], labels: np.ndarray
) -> dict[str, Any] | None:
    try:
        name, scores, predicted = _classifier_output(outputs, specs)
    except KeyError:
        return None
    y = labels.astype(np.int64).reshape(-1)
    predicted = np.asarray(predicted).astype(np.int64).reshape(-1)
    classes = int(max(y.max(), predicted.max(), (scores.shape[1] - 1) if scores is not None else 0)) + 1
    confusion = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(confusion, (y, predicted), 1)
    top_k = None
    k = min(TOP_K, scores.shape[1]) if scores is not None else None
    if scores is not None and k is not None:
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        top_k = float((best == y[:, None]).any(axis=1).mean())
    return {
        "output": name,
        "accuracy": float((predicted == y).mean()),
        "top_k_accuracy": top_k,
        "k": k,
        "classes": classes,
        "confusion": confusion.tolist(),
    }


def _agreement(
    outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray], specs: list[TensorSpec]
) -> dict[str, Any]:
    result: dict[str, Any] = {}
    missing = [s.name for s in specs if s.name not in reference]
    for spec in specs:
        if spec.name not in reference:
            continue
        got, ref = outputs[spec.name], np.asarray(reference[spec.name])
        if got.shape != ref.shape:
            raise UsageError(
                f"reference {spec.name!r}: shape {list(ref.shape)}, model produced {list(got.shape)}"
            )
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        figures: dict[str, Any] = {
            "max_abs_diff": float(diff.max()) if diff.size else 0.0,
            "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
            "allclose": bool(np.allclose(got, ref, rtol=1e-3, atol=1e-5)),
            "bit_identical": bool(np.array_equal(got, ref)),
        }
        if spec.dtype.startswith("int") and got.ndim == 1:
            figures["label_agreement"] = float((got == ref).mean())
        elif got.ndim == 2 and spec.dtype.startswith("float"):
            figures["label_agreement"] = float((got.argmax(axis=1) == ref.argmax(axis=1)).mean())
        result[spec.name] = figures
    if not result:
        raise UsageError(
            f"reference has none of the model outputs {[s.name for s in specs]} (keys: {sorted(reference)})"
        )
    return {"outputs": result, "missing": missing}


class ProgressBar:
    """The eval progress line on stderr (only for runs long enough to need one): see edge_runtime.progress."""

    def __init__(self, stream: Any = None, *, min_calls: int = 20, width: int = 30) -> None:
        from edgemart.core.progress import LineProgress

        self.line = LineProgress(stream)
        self.min_calls = min_calls
        self.width = width

    def __call__(self, done: int, total: int) -> None:
        from edgemart.core.progress import bar

        if total < self.min_calls:
            return
        self.line.update(done / total, f"{bar(done / total, self.width)} {done}/{total}")
        if done == total:
            self.line.close()
