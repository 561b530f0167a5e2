"""Calibration quality for the int8 ONNX targets: how stable each quantized activation's range is for the
seller's calibration set (disjoint halves of the samples), and which calibration method agrees best with fp32.

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
# Python per tensor and took 14-24 s on PP-OCR cls (vs ~2 s for the whole minmax build); ask for it by name.
AUTO_METHODS = ("minmax", "percentile")
RANGE_RESAMPLES = 32  # random splits of the calibration set into disjoint halves (and quarters)
# Spread ~ n^-a; with fewer than 8 samples a is not measured and the 1/sqrt(n) law is assumed (on the
# digits corpus a was 0.3 from 2 to 8 samples and 0.5 from 25 to 100, so small-set suggestions run low).
DEFAULT_RATE = 0.5
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


def _split_spread(
    mins: np.ndarray, maxs: np.ndarray, size: int, resamples: int, rng, symmetric: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(relative std, max / min) of each tensor's scale over sets of `size` runs, from `resamples` random
    pairs of disjoint sets: independent replicates of that size. (Bootstrap resamples of the whole set
    cannot go past its extremes and understated the spread of a range 1.3-1.8x on the digits corpus.)"""
    perms = np.stack([rng.permutation(mins.shape[0])[: 2 * size] for _ in range(resamples)])
    first = _widths(mins, maxs, perms[:, :size], symmetric)
    second = _widths(mins, maxs, perms[:, size:], symmetric)
    both = np.concatenate([first, second])
    mean = both.mean(axis=0)
    std = np.sqrt(np.mean((first - second) ** 2, axis=0) / 2.0)
    low, high = both.min(axis=0), both.max(axis=0)
    spread = np.where(mean > 0, std / np.where(mean > 0, mean, 1.0), 0.0)
    return spread, np.where(low > 0, high / np.where(low > 0, low, 1.0), 1.0)


# 10% quantiles of chi-square with 1..10 degrees of freedom; Wilson-Hilferty (within 1%) beyond.
_CHI2_Q10 = (0.0158, 0.2107, 0.5844, 1.0636, 1.6103, 2.2041, 2.8331, 3.4895, 4.1682, 4.8652)


def upper_factor(runs: int) -> float:
    """sqrt(dof / chi2_0.10(dof)), dof = runs - 1: a relative std measured on `runs` samples times this is
    a one-sided 90% upper bound (3.1x on 3 samples, 1.6x on 8, 1.09x on 200)."""
    dof = max(runs - 1, 1)
    if dof <= len(_CHI2_Q10):
        quantile = _CHI2_Q10[dof - 1]
    else:
        c = 2.0 / (9.0 * dof)
        quantile = dof * (1.0 - c - 1.2816 * math.sqrt(c)) ** 3
    return math.sqrt(dof / quantile)


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
    """How much each quantized activation's minmax scale would move between calibration sets of this size,
    and whether the set is large enough for `threshold` (relative std of the scale).

    `probe` is the fp32 model with `tensors` as outputs; it runs once per sample (the only model run) and
    every split reuses the per-sample ranges. Disjoint halves give the spread at half size; spread ~ n^-a,
    with a fitted from quarters vs halves, carries it to the whole set and gives the suggested size."""
    started = time.perf_counter()
    total = samples.count
    measured = samples.take(slice(0, min(total, STABILITY_MAX_RUNS)))
    out: dict = {
        "statistic": f"relative std of each quantized activation's minmax scale between disjoint halves of "
        f"the calibration samples ({resamples} random splits), scaled to the whole set's size by the "
        "shrink rate measured from quarters",
        "threshold": threshold,
        "samples": total,
        "measured_on": measured.count,
        "resamples": resamples,
        "tensors": len(tensors),
    }
    if not tensors:
        out.update(verdict="stable", spread_max=0.0, spread_upper_max=0.0, spread_median=0.0, worst_tensors=[], unstable_tensors=0,
                   suggested_samples=None, message="no activation is quantized: nothing to calibrate")  # fmt: skip
        return _timed(out, started)
    mins, maxs = _per_run_ranges(probe, tensors, measured)
    runs = mins.shape[0]
    if runs < 2:
        out.update(
            verdict="too_small", spread_max=None, spread_upper_max=None, spread_median=None, worst_tensors=[], unstable_tensors=None,
            suggested_samples=SUGGEST_FLOOR,
            message=f"one calibration run: no spread can be measured; use at least {SUGGEST_FLOOR} samples "
            "(a floor, not a measurement)",
        )  # fmt: skip
        return _timed(out, started)
    rng = np.random.default_rng(seed)
    half = runs // 2
    spread_half, ratio = _split_spread(mins, maxs, half, resamples, rng, symmetric)
    # How the spread shrinks with n: measured between quarter- and half-size sets when there are 8 runs
    # or more (clamped to [0.25, 1]), else DEFAULT_RATE.
    rate = np.full(len(tensors), DEFAULT_RATE)
    if runs >= 8:
        spread_quarter, _ = _split_spread(mins, maxs, runs // 4, resamples, rng, symmetric)
        with np.errstate(divide="ignore", invalid="ignore"):
            fitted = np.log(spread_quarter / spread_half) / math.log(half / (runs // 4))
        rate = np.where(np.isfinite(fitted) & (spread_half > 0), np.clip(fitted, 0.25, 1.0), DEFAULT_RATE)
    spread = spread_half * (half / total) ** rate  # expected at the whole set's size
    # Measured on few samples the spread is itself uncertain: the verdict takes its 90% upper bound.
    upper = spread * upper_factor(total)
    order = np.argsort(-upper)
    unstable = [int(i) for i in order if upper[i] > threshold]
    out.update(
        spread_max=round(float(spread.max()), 4),
        spread_upper_max=round(float(upper[order[0]]), 4),
        spread_median=round(float(np.median(spread)), 4),
        unstable_tensors=len(unstable),
        worst_tensors=[
            {
                "tensor": tensors[i],
                "spread": round(float(spread[i]), 4),
                "spread_upper": round(float(upper[i]), 4),
                "spread_half_size": round(float(spread_half[i]), 4),
                "shrink_rate": round(float(rate[i]), 3),
                "scale_max_over_min": round(float(ratio[i]), 3),
            }
            for i in order[:WORST_SHOWN]
        ],
    )
    if not unstable:
        out.update(
            verdict="stable",
            suggested_samples=None,
            message=f"stable: every quantized activation's scale is expected to vary by at most "
            f"{upper[order[0]]:.1%} (relative std, 90% upper bound) between calibration sets of {total} "
            f"samples (threshold {threshold:.0%})",
        )
        return _timed(out, started)
    suggested, capped = _suggest(spread_half[unstable], rate[unstable], half, total, threshold)
    out.update(
        verdict="too_small",
        suggested_samples=suggested,
        suggestion_capped=capped,
        message=f"the calibration set is too small for stable ranges: {len(unstable)} of {len(tensors)} "
        f"quantized activations' scales may vary by more than {threshold:.0%} between sets of {total} "
        f"samples (worst {upper[order[0]]:.1%} at 90% confidence, {spread[order[0]]:.1%} expected: "
        f"{tensors[order[0]]}); "
        + (
            f"use more than {suggested} samples (the estimate passes the cap)"
            if capped
            else f"use about {suggested} samples"
        )
        + ("" if runs >= 8 else " (a rough estimate: under 8 samples the shrink rate is assumed, 1/sqrt(n))"),
    )
    return _timed(out, started)


def _suggest(
    spread_half: np.ndarray, rate: np.ndarray, half: int, total: int, threshold: float
) -> tuple[int, bool]:
    """(the smallest set size, in ~5% steps, at which every given tensor's upper-bound spread meets
    `threshold`, capped at SUGGEST_CAP; whether the cap was hit)."""
    n = float(total + 1)
    while n < SUGGEST_CAP:
        count = _round_up(n)
        if float(np.max(spread_half * (half / count) ** rate)) * upper_factor(count) <= threshold:
            return count, False
        n = max(n * 1.05, n + 1)
    return SUGGEST_CAP, True


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
# 2048 (TensorRT's figure) took 76-90 s on PP-OCR cls; 512 takes 14-24 s.
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
