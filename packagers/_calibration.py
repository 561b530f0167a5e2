"""Calibration quality for the int8 ONNX targets: how stable each quantized activation's range is for the
seller's calibration set (bootstrap over the samples), and which calibration method agrees best with fp32.

`_qdq` quantizes and calls these; entropy ranges are made here too (onnxruntime's calibrator, enough bins)."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence

import numpy as np

from edge_runtime.evaluation.samples import SampleSet
from packagers._base import _first_samples
from packagers._runtime import OnnxRunner
from packagers.quality import compare_outputs

# Tried in this order; a tie keeps the earlier one. Entropy is left out: its KL threshold search runs in
# Python per tensor and took 18-24 s on PP-OCR cls (vs ~3 s for the whole minmax build); ask for it by name.
AUTO_METHODS = ("minmax", "percentile")
RANGE_RESAMPLES = 32  # bootstrap resamples of the calibration set per size
STABILITY_MAX_RUNS = 512  # runs whose activations are measured; a larger set is at least as stable
SUGGEST_FLOOR = 32  # suggested when one sample leaves nothing to measure a spread from
SUGGEST_CAP = 5000  # suggestions are capped here (and say so)
WORST_SHOWN = 5


def activation_tensors(qdq_model, fp32_model) -> list[str]:
    """The fp32 tensors a QDQ model quantizes at run time: inputs of its QuantizeLinear nodes that are not
    initializers (onnxruntime stores weights already quantized), named as in `fp32_model` (a graph output
    the quantizer renamed `<name>_QuantizeLinear_Input` is `<name>` there)."""
    known = {i.name for i in fp32_model.graph.input} | {o for n in fp32_model.graph.node for o in n.output}
    inits = {i.name for i in qdq_model.graph.initializer}
    seen: dict[str, None] = {}
    for node in qdq_model.graph.node:
        name = node.input[0] if node.op_type == "QuantizeLinear" else ""
        if not name or name in inits:
            continue
        name = name.removesuffix("_QuantizeLinear_Input") if name not in known else name
        if name in known:
            seen.setdefault(name, None)
    return list(seen)


def _per_run_ranges(
    probe: bytes, tensors: Sequence[str], samples: SampleSet
) -> tuple[np.ndarray, np.ndarray]:
    """(mins, maxs), each [runs, tensors]: every tensor's range in each run of `samples` (one sample per run)."""
    runner = OnnxRunner(probe, output_names=list(tensors))
    mins, maxs = [], []
    for _, feed in samples.runs(1):
        out = runner.run(feed)
        mins.append([float(np.min(out[t])) if out[t].size else 0.0 for t in tensors])
        maxs.append([float(np.max(out[t])) if out[t].size else 0.0 for t in tensors])
    return np.asarray(mins, np.float64), np.asarray(maxs, np.float64)


def _widths(mins: np.ndarray, maxs: np.ndarray, picks: np.ndarray, symmetric: bool) -> np.ndarray:
    """[resamples, tensors]: the quantity each minmax scale is proportional to, for each resample of runs.

    Asymmetric: (max(hi, 0) - min(lo, 0)) / 255; symmetric: max(|lo|, |hi|) / 127.5 (onnxruntime's rules)."""
    lo = mins[picks].min(axis=1)
    hi = maxs[picks].max(axis=1)
    if symmetric:
        return np.maximum(np.abs(lo), np.abs(hi))
    return np.maximum(hi, 0.0) - np.minimum(lo, 0.0)


def _relative_spread(widths: np.ndarray) -> np.ndarray:
    mean = widths.mean(axis=0)
    return np.where(mean > 0, widths.std(axis=0) / np.where(mean > 0, mean, 1.0), 0.0)


def _round_up(n: float) -> int:
    """Up to two significant digits (37 -> 37, 137 -> 140, 2041 -> 2100)."""
    n = math.ceil(n)
    if n <= 100:
        return n
    step = 10 ** (len(str(n)) - 2)
    return -(-n // step) * step


def range_stability(
    probe: bytes,
    tensors: Sequence[str],
    samples: SampleSet,
    *,
    symmetric: bool,
    threshold: float,
    resamples: int = RANGE_RESAMPLES,
    seed: int = 0,
) -> dict:
    """How much each quantized activation's minmax scale moves across bootstrap resamples of the calibration
    set, and whether the set is large enough for `threshold` (relative std of the scale).

    `probe` is the fp32 model with `tensors` as outputs; it runs once per sample (the only model run) and
    the resamples reuse the per-sample ranges. The suggested size fits spread ~ n^-a from resamples of
    half and full size (a clamped to [0.25, 1]; 0.5, the 1/sqrt(n) law, when no shrinking is measured)."""
    started = time.perf_counter()
    total = samples.count
    measured = samples.take(slice(0, min(total, STABILITY_MAX_RUNS)))
    out: dict = {
        "statistic": f"relative std of each quantized activation's minmax scale over {resamples} bootstrap "
        "resamples of the calibration samples",
        "threshold": threshold,
        "samples": total,
        "measured_on": measured.count,
        "resamples": resamples,
        "tensors": len(tensors),
    }
    if not tensors:
        out.update(verdict="stable", spread_max=0.0, spread_median=0.0, worst_tensors=[], unstable_tensors=0,
                   suggested_samples=None, message="no activation is quantized: nothing to calibrate")  # fmt: skip
        return _timed(out, started)
    mins, maxs = _per_run_ranges(probe, tensors, measured)
    runs = mins.shape[0]
    if runs < 2:
        out.update(
            verdict="too_small", spread_max=None, spread_median=None, worst_tensors=[], unstable_tensors=None,
            suggested_samples=SUGGEST_FLOOR,
            message=f"one calibration run: no spread can be measured; use at least {SUGGEST_FLOOR} samples "
            "(a floor, not a measurement)",
        )  # fmt: skip
        return _timed(out, started)
    rng = np.random.default_rng(seed)
    full = _widths(mins, maxs, rng.integers(0, runs, size=(resamples, runs)), symmetric)
    half = _widths(mins, maxs, rng.integers(0, runs, size=(resamples, max(1, runs // 2))), symmetric)
    spread, spread_half = _relative_spread(full), _relative_spread(half)
    ratio = np.where(
        full.min(axis=0) > 0, full.max(axis=0) / np.where(full.min(axis=0) > 0, full.min(axis=0), 1), 1.0
    )
    order = np.argsort(-spread)
    unstable = [int(i) for i in order if spread[i] > threshold]
    out.update(
        spread_max=round(float(spread[order[0]]), 4),
        spread_median=round(float(np.median(spread)), 4),
        unstable_tensors=len(unstable),
        worst_tensors=[
            {
                "tensor": tensors[i],
                "spread": round(float(spread[i]), 4),
                "spread_half_size": round(float(spread_half[i]), 4),
                "scale_max_over_min": round(float(ratio[i]), 3),
            }
            for i in order[:WORST_SHOWN]
        ],
    )
    if not unstable:
        out.update(
            verdict="stable",
            suggested_samples=None,
            message=f"stable: every quantized activation's scale varies by at most {spread[order[0]]:.1%} "
            f"(relative std) across resamples of the {total} samples (threshold {threshold:.0%})",
        )
        return _timed(out, started)
    needed, capped = 0.0, False
    for i in unstable:
        shrink = spread_half[i] / spread[i] if spread[i] > 0 else 0.0
        a = min(max(math.log2(shrink), 0.25), 1.0) if shrink > 1.0 else 0.5
        needed = max(needed, runs * (spread[i] / threshold) ** (1.0 / a))
    suggested = max(_round_up(needed), total + 1)
    if suggested > SUGGEST_CAP:
        suggested, capped = SUGGEST_CAP, True
    worst = tensors[order[0]]
    out.update(
        verdict="too_small",
        suggested_samples=suggested,
        suggestion_capped=capped,
        message=f"the calibration set is too small for stable ranges: {len(unstable)} of {len(tensors)} "
        f"quantized activations' scales vary by more than {threshold:.0%} across resamples of the "
        f"{total} samples (worst {spread[order[0]]:.1%}, {worst}); use about "
        f"{'at least ' if capped else ''}{suggested} samples",
    )
    return _timed(out, started)


def _timed(out: dict, started: float) -> dict:
    out["seconds"] = round(time.perf_counter() - started, 3)
    return out


def _score(figures: Mapping[str, dict]) -> tuple[float, float]:
    """(lowest top-1 agreement, lowest SNR dB) over the outputs: the quality report's own figures."""
    agreements = [f["agreement"] for f in figures.values() if "agreement" in f]
    # Not capped at EXACT_SNR_DB: two candidates both past it still differ, and that is measured.
    snrs = [math.inf if f["snr_db"] is None else f["snr_db"] for f in figures.values() if "snr_db" in f]
    return (min(agreements) if agreements else 1.0, min(snrs) if snrs else math.inf)


def choose_method(
    reference: bytes, candidates: Mapping[str, bytes], samples: SampleSet, evaluated_on: str
) -> dict:
    """The candidate whose outputs agree best with `reference` on `samples`: highest lowest top-1 agreement
    (classifier outputs), then highest lowest SNR; a tie keeps the earlier candidate. Every figure is kept."""
    expected = OnnxRunner(reference).run_all(samples)
    rows = []
    for method, model in candidates.items():
        started = time.perf_counter()
        agreement, snr = _score(compare_outputs(expected, OnnxRunner(model).run_all(samples)))
        rows.append(
            {
                "method": method,
                "agreement": round(agreement, 4),
                "snr_db": round(snr, 2) if math.isfinite(snr) else None,
                "score": (agreement, snr),
                "eval_seconds": round(time.perf_counter() - started, 3),
            }
        )
    best = max(rows, key=lambda r: r["score"])  # max keeps the first of equal scores
    others = [r for r in rows if r is not best]
    if all(r["score"] == best["score"] for r in others):
        why = f"every candidate measured alike (top-1 {best['agreement']}, SNR {best['snr_db']} dB); kept the first"
    else:
        why = (
            f"{best['method']} agrees best with fp32 on {evaluated_on}: top-1 {best['agreement']}, SNR "
            f"{best['snr_db']} dB, vs "
            + ", ".join(f"{r['method']} {r['agreement']} / {r['snr_db']} dB" for r in others)
        )
    for r in rows:
        del r["score"]
    return {"chosen": best["method"], "why": why, "candidates": rows, "evaluated_on": evaluated_on}


def choose_method_for(
    fp32, candidates: dict, calibration: SampleSet, holdout: SampleSet | None, limit: int
) -> dict:
    """choose_method on the held-out samples (at most `limit`, as the report measures them), else on the
    calibration samples, which is optimistic and said so."""
    if holdout is not None:
        samples, where = _first_samples(holdout, limit), "holdout"
    else:
        samples, where = _first_samples(calibration, limit), "calibration"
    what = f"{samples.count} {where} samples" + (
        "" if holdout is not None else " (no holdout given: optimistic)"
    )
    return choose_method(
        fp32.SerializeToString(),  # type: ignore[attr-defined]
        {m: q.SerializeToString() for m, q in candidates.items()},
        samples,
        what,
    )


# Histogram bins of the entropy (KL) threshold search. quantize_static leaves onnxruntime's 128, equal to its
# 128 quantized bins: one candidate threshold, the min/max range, so "entropy" was minmax on one batch.
# 2048 (TensorRT's figure) took 76-90 s on PP-OCR cls; 512 takes 18-24 s.
ENTROPY_BINS = 512


def entropy_ranges(src: str, tmp: str, reader, op_types: tuple[str, ...]) -> str:
    """Entropy-calibrated ranges of the model at `src`, saved as an onnxruntime calibration cache (made once
    per `tmp`: the QOperator pass reuses the QDQ pass's)."""
    import os

    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, save_tensors_data

    path = f"{tmp}/entropy-ranges.json"
    if not os.path.exists(path):
        calibrator = create_calibrator(
            src,
            list(op_types) or None,
            augmented_model_path=f"{tmp}/entropy-augmented.onnx",
            calibrate_method=CalibrationMethod.Entropy,
            extra_options={"num_bins": ENTROPY_BINS, "num_quantized_bins": 128},
        )
        calibrator.collect_data(reader)
        save_tensors_data(calibrator.compute_data(), path)
    return path
