# Why this is one module: the Packager base class and the one packaging flow every target follows.
"""The packager registry, typed option parsing, the `Build` result and the shared package-then-measure flow.

A target subclasses `Packager`, declares a frozen options dataclass and implements `convert`; the quality
report is measured here, identically for every target."""

from __future__ import annotations

import dataclasses
import hashlib
import platform
import time
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from edge_runtime.evaluation.samples import Contract, SampleSet, parse_pairs, unroll
from edgemart.core.errors import UsageError
from packagers._data import bind_samples, synthetic_samples
from packagers._model import ModelInfo, inspect_model
from packagers._runtime import OnnxRunner, median_latencies_ms, runner_for
from packagers.quality import QualityReport, compare_outputs, verdict

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class QualityOptions:
    """Options every target shares: the verdict thresholds and how figures are measured."""

    min_agreement: float = 0.98  # top-1 agreement with fp32 for classifier outputs
    min_snr_db: float = 20.0  # SNR against fp32 for every other float output
    latency_runs: int = 30  # timed runs per model (median reported), interleaved fp32/build
    latency_threads: int = 1  # intra-op threads for timing, like a small board's single big core
    max_quality_samples: int = 500  # samples per split used for agreement figures
    fixed: tuple[str, ...] = ()  # NAME=VALUE: inputs that always get VALUE (need no array; builds specialize)
    state: tuple[str, ...] = ()  # IN=OUT: recurrent state pairs, beyond those detected by name and shape
    detect_state: bool = True  # pair state inputs with outputs by name and shape

    def __post_init__(self) -> None:
        self.contract()  # a malformed NAME=VALUE is an error now, not when samples arrive
        if not 0.0 <= self.min_agreement <= 1.0:
            raise UsageError(f"option min_agreement must be in [0, 1], got {self.min_agreement}")
        if self.latency_runs < 1:
            raise UsageError(f"option latency_runs must be >= 1, got {self.latency_runs}")
        if self.latency_threads < 0:
            raise UsageError(f"option latency_threads must be >= 0, got {self.latency_threads}")
        if self.max_quality_samples < 1:
            raise UsageError(f"option max_quality_samples must be >= 1, got {self.max_quality_samples}")

    def contract(self) -> Contract:
        """The sample contract these options declare: fixed input values and state pairs."""
        return Contract(
            fixed=parse_pairs(self.fixed, "option fixed", numeric=True),
            state=parse_pairs(self.state, "option state"),
            detect_state=self.detect_state,
        )


@dataclass(frozen=True)
class Build:
    """One packaged model for one target, with the figures that say how good it is."""

    target: str
    payload: bytes = field(repr=False)
    format: str
    build_hash: str
    metadata: dict
    quality: QualityReport


@dataclass
class Conversion:
    """What a target's `convert` hands back to the shared flow."""

    payload: bytes
    format: str
    metadata: dict = field(default_factory=dict)
    worst_layers: list = field(default_factory=list)
    suggested_nodes_to_exclude: list = field(default_factory=list)
    float_ops: dict = field(default_factory=dict)
    quantized_ops: dict = field(default_factory=dict)
    op_compatibility: dict | None = None
    notes: list = field(default_factory=list)
    constraints: list = field(default_factory=list)  # accelerator rules checked node by node
    as_uploaded: bool = False  # the seller's pre-quantized model, sealed byte for byte
    calibration: dict | None = None  # range stability and calibration method choice (int8 ONNX targets)


class Packager(ABC):
    """Base class of every target; subclasses are registered with `@register`."""

    target: ClassVar[str]
    options_type: ClassVar[type[QualityOptions]] = QualityOptions
    needs_calibration: ClassVar[bool] = True
    made_for: ClassVar[str] = "any onnxruntime CPU"  # the hardware the build is made for, in the report
    made_for_tflite: ClassVar[str | None] = (
        None  # the same for a TFLite build of this target, when it differs
    )
    # platform.machine() values on which this machine's timing is the build's own latency (None: any)
    native_machines: ClassVar[frozenset[str] | None] = None

    def __init__(self, options: QualityOptions | Mapping[str, Any] | None = None) -> None:
        if isinstance(options, QualityOptions):
            if not isinstance(options, self.options_type):
                raise UsageError(f"target {self.target} takes {self.options_type.__name__} options")
            self.options = options
        else:
            self.options = parse_options(self.options_type, options, self.target)

    @abstractmethod
    def convert(
        self,
        model: bytes,
        info: ModelInfo,
        calibration: SampleSet | None,
        progress: Progress,
        *,
        holdout: SampleSet | None = None,
    ) -> Conversion:
        """Produce the payload (and any target-specific figures) from the validated model.

        `calibration` runs one sample per run or in batches; never stateful (state is unrolled beforehand).
        `holdout` (as given: may be stateful) is for choices measured against fp32, never for calibrating."""

    def as_uploaded(self, info: ModelInfo, model: bytes, progress: Progress) -> Conversion | None:
        """The uploaded model itself when it already is this target's build (pre-quantized); None to convert."""
        return None

    def check_input(self, info: ModelInfo, model: bytes) -> None:
        """Reject models this target cannot take, before any work is done."""
        if info.format != "onnx":
            raise UsageError(
                f"target {self.target} takes ONNX models; this is a {info.format} model "
                f"(TFLite input is accepted by coral-edgetpu and arm-cpu)"
            )

    def missing_calibration(self, info: ModelInfo) -> UsageError:
        """The error for a model this target must calibrate but was given no samples for."""
        return UsageError(
            f"target {self.target} quantizes activations and needs calibration samples "
            "(--calibration PATH.npz keyed by input name, or 'x')"
        )

    def package(
        self,
        model: bytes,
        *,
        calibration: Mapping[str, np.ndarray] | SampleSet | None = None,
        holdout: Mapping[str, np.ndarray] | SampleSet | None = None,
        progress: Progress | None = None,
    ) -> Build:
        report = progress or (lambda fraction, message: None)
        model = bytes(model)
        report(0.0, "inspecting model")
        info = inspect_model(model)
        self.check_input(info, model)
        contract = self.options.contract()
        cal = self.bind(info, calibration, "calibration")
        hold = self.bind(info, holdout, "holdout")
        sealed = self.as_uploaded(info, model, report)
        if cal is None:
            timing = synthetic_samples(info, contract)  # names the input whose dims only samples can fix
            if self.needs_calibration and sealed is None:
                raise self.missing_calibration(info)
        started = time.perf_counter()
        steps = cal
        if cal is not None and cal.state and info.format == "onnx" and sealed is None:
            report(0.02, "running the calibration sequences through fp32 to carry their state")
            steps = unroll(OnnxRunner(model).run, cal)
        conversion = sealed or self.convert(
            model, info, steps, lambda f, m: report(0.05 + 0.6 * f, m), holdout=hold
        )
        seconds = time.perf_counter() - started
        report(0.7, "measuring quality against fp32")
        quality = self._measure(model, info, conversion, cal, hold, None if cal is not None else timing)
        metadata = {
            "target": self.target,
            "options": dataclasses.asdict(self.options),
            "input_signature": [s.to_dict() for s in info.inputs],
            "output_signature": [s.to_dict() for s in info.outputs],
            "source_format": info.format,
            "source_opsets": dict(info.opsets),
            "tool_versions": tool_versions(),
            "packaging_seconds": round(seconds, 3),
            "machine": platform.machine(),
            **conversion.metadata,
        }
        samples = cal or hold
        if samples is not None:
            metadata["samples"] = samples.describe()
        report(1.0, "done")
        return Build(
            target=self.target,
            payload=conversion.payload,
            format=conversion.format,
            build_hash="sha256:" + hashlib.sha256(conversion.payload).hexdigest(),
            metadata=metadata,
            quality=quality,
        )

    def bind(
        self, info: ModelInfo, samples: Mapping[str, np.ndarray] | SampleSet | None, role: str
    ) -> SampleSet | None:
        """`samples` bound to the model by this target's contract (fixed inputs, state pairs)."""
        return None if samples is None else bind_samples(info, samples, role, self.options.contract())

    def _measure(
        self,
        model: bytes,
        info: ModelInfo,
        conv: Conversion,
        cal: SampleSet | None,
        hold: SampleSet | None,
        timing: SampleSet | None,
    ) -> QualityReport:
        opts = self.options
        threads = opts.latency_threads
        fp32 = OnnxRunner(model, threads) if info.format == "onnx" else runner_for(model, "tflite", threads)
        built = runner_for(conv.payload, conv.format, threads)
        notes = list(conv.notes)
        agreement: dict[str, dict] = {}
        for split, samples in (("calibration", cal), ("holdout", hold)):
            if samples is None:
                continue
            subset = _first_samples(samples, opts.max_quality_samples)
            outputs = built.run_all(subset)
            if conv.as_uploaded:  # no fp32 original to compare with: the samples show that it runs
                finite = all(np.all(np.isfinite(v)) for v in outputs.values() if v.dtype.kind == "f")
                notes.append(
                    f"{split}: the uploaded build ran {subset.count} samples, outputs finite: {finite}"
                )
                continue
            agreement[split] = compare_outputs(fp32.run_all(subset), outputs)
        source = hold if hold is not None else cal
        if source is not None and source.state:
            pairs = ", ".join(f"{p.input} <- {p.output} ({p.how})" for p in source.state)
            notes.append(
                f"stateful model: {len(source.sequences)} sequence(s) run step by step, fp32 and the build "
                f"each carrying their own state ({pairs}); figures compare every step's outputs"
            )
        if source is not None and source.fixed:
            notes.append(
                "fixed inputs: " + ", ".join(f"{k}={v}" for k, v in source.describe()["fixed_inputs"].items())
            )
        if hold is None and not conv.as_uploaded:
            notes.append("no holdout samples given: agreement on calibration samples alone is optimistic")
        if not agreement and not conv.as_uploaded:
            notes.append("no samples given: agreement not measured, latency measured on synthetic inputs")
        feed_source = source if source is not None else timing
        assert feed_source is not None
        feed = feed_source.first_feed()
        fp32_ms, build_ms = median_latencies_ms([fp32, built], feed, opts.latency_runs)
        passed, reason = verdict(agreement, opts.min_agreement, opts.min_snr_db)
        if conv.as_uploaded:
            reason = "as uploaded: the seller's pre-quantized model, sealed byte for byte (no fp32 original to compare)"
        stability = (conv.calibration or {}).get("stability", {})
        if stability.get("verdict") == "too_small":
            notes.append(f"calibration: {stability['message']}")
        if not passed and conv.suggested_nodes_to_exclude:
            reason += "; suggested: --option nodes_to_exclude=" + ",".join(conv.suggested_nodes_to_exclude)
        return QualityReport(
            target=self.target,
            format=conv.format,
            size={
                "fp32_bytes": len(model),
                "build_bytes": len(conv.payload),
                "ratio": round(len(conv.payload) / len(model), 4),
            },
            latency=self._latency(
                fp32_ms, build_ms, _feed_rows(feed), "step" if feed_source.state else "run", conv.format
            ),
            agreement=agreement,
            thresholds={"min_agreement": opts.min_agreement, "min_snr_db": opts.min_snr_db},
            passed=passed,
            verdict_reason=reason,
            worst_layers=conv.worst_layers,
            float_ops=conv.float_ops,
            quantized_ops=conv.quantized_ops,
            suggested_nodes_to_exclude=conv.suggested_nodes_to_exclude,
            op_compatibility=conv.op_compatibility,
            notes=notes,
            constraints=conv.constraints,
            calibration=conv.calibration,
        )

    def made_for_format(self, fmt: str) -> str:
        """What the report says a build of format ``fmt`` is made for."""
        return self.made_for_tflite if fmt == "tflite" and self.made_for_tflite else self.made_for

    def _latency(self, fp32_ms: float, build_ms: float, batch: int, per: str, fmt: str = "onnx") -> dict:
        """Timing figures that say where they were measured; on a machine the build is not made for, the
        build's run is a host check (`host_build_ms`), never presented as its latency (`build_ms` None)."""
        machine = platform.machine()
        native = self.native_machines is None or machine in self.native_machines
        ratio = round(build_ms / fp32_ms, 4) if fp32_ms > 0 else None
        figures = {
            "fp32_ms": round(fp32_ms, 4),
            "build_ms": round(build_ms, 4) if native else None,
            "ratio": ratio if native else None,
            "host_build_ms": round(build_ms, 4),
            "host_ratio": ratio,
            "measured_on": f"{machine}, onnxruntime/LiteRT CPU, {self.options.latency_threads} thread(s)",
            "made_for": self.made_for_format(fmt),
            "representative": native,
            "runs": self.options.latency_runs,
            "batch": batch,
            "per": per,
            "threads": self.options.latency_threads,
            "machine": machine,
        }
        if not native:
            figures["note"] = (
                f"measured on this {machine} host only as a check that the build runs; it is made for "
                f"{self.made_for_format(fmt)}, where its latency is not measured here (run edgemart device eval"
                " there)"
            )
        return figures


def _first_samples(samples: SampleSet, limit: int) -> SampleSet:
    """At most `limit` samples; a stateful set keeps whole sequences when it can (at least the first one)."""
    if samples.count <= limit:
        return samples
    if samples.state:
        ends = [end for _, end in samples.sequences if end <= limit]
        return samples.take(slice(0, ends[-1] if ends else limit))
    return samples.take(slice(0, limit))


def _feed_rows(feed: Mapping[str, np.ndarray]) -> int:
    """Rows of the run that was timed: axis 0 of its first input with one."""
    return next((int(v.shape[0]) for v in feed.values() if np.ndim(v) >= 1), 1)


def tool_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("onnx", "onnxruntime", "ai-edge-litert", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


# ---------------------------------------------------------------- registry and options

_REGISTRY: dict[str, type[Packager]] = {}


def register(cls: type[Packager]) -> type[Packager]:
    if cls.target in _REGISTRY:
        raise ValueError(f"target {cls.target} registered twice")
    _REGISTRY[cls.target] = cls
    return cls


def registered_targets() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get_packager(target: str, options: Mapping[str, Any] | QualityOptions | None = None) -> Packager:
    """The packager for `target`, configured with typed `options`; UsageError lists the valid targets."""
    try:
        cls = _REGISTRY[target]
    except (KeyError, TypeError):
        raise UsageError(
            f"unknown target {target!r}; valid targets: {', '.join(registered_targets())}"
        ) from None
    return cls(options)


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def parse_options(cls: type[QualityOptions], raw: Mapping[str, Any] | None, target: str) -> QualityOptions:
    """Build the frozen options dataclass from a mapping; strings (CLI `key=value`) are coerced by type."""
    if raw is None:
        return cls()
    if not isinstance(raw, Mapping):
        raise UsageError(f"options for target {target} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        if key not in hints or key not in names:
            raise UsageError(f"unknown option {key!r} for target {target}; valid options: {', '.join(names)}")
        values[key] = _coerce(key, value, hints[key], target)
    return cls(**values)


def _coerce(key: str, value: Any, hint: Any, target: str) -> Any:
    where = f"option {key} for target {target}"
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise UsageError(f"{where} must be one of {', '.join(map(str, allowed))}, got {value!r}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise UsageError(f"{where} must be true or false, got {value!r}")
    if hint is int or hint is float:
        if isinstance(value, bool):
            raise UsageError(f"{where} must be a number, got {value!r}")
        if isinstance(value, int | float) and (hint is float or float(value).is_integer()):
            return hint(value)
        if isinstance(value, str):
            try:
                return hint(value.strip())
            except ValueError:
                pass
        raise UsageError(f"{where} must be {'an integer' if hint is int else 'a number'}, got {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            items = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            items = list(value)
        else:
            raise UsageError(f"{where} must be a comma-separated list of names, got {value!r}")
        return tuple(items)
    if hint is str or origin in (typing.Union, types.UnionType):
        if not isinstance(value, str):
            raise UsageError(f"{where} must be a string, got {value!r}")
        return value
    raise UsageError(f"{where} has an unsupported type")
