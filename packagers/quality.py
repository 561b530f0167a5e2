# Why this is one module: the report's figures and their HTML rendering change together, one section at a time.
"""The quality report every build carries: size, latency, agreement with fp32, worst layers, verdict.

Figures are computed here from runner outputs; `QualityReport` renders them as JSON and a self-contained HTML page."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

SPLITS = ("holdout", "calibration")
EXACT_SNR_DB = 100.0  # reported for tensors the quantized model reproduces exactly


@dataclass(frozen=True)
class QualityReport:
    """Honest figures for one build, measured side by side with the fp32 original on this machine."""

    target: str
    format: str
    size: dict
    latency: dict
    agreement: dict  # split -> output name -> figures (see output_figures)
    thresholds: dict
    passed: bool
    verdict_reason: str
    worst_layers: list = field(default_factory=list)
    float_ops: dict = field(default_factory=dict)
    quantized_ops: dict = field(default_factory=dict)
    suggested_nodes_to_exclude: list = field(default_factory=list)
    op_compatibility: dict | None = None
    notes: list = field(default_factory=list)
    constraints: list = field(default_factory=list)  # accelerator rules, node by node (fpga-xint8)
    calibration: dict | None = None  # range stability and method choice (int8 ONNX targets)

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))

    def to_html(self) -> str:
        return render_html(self)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------- figures


def output_kind(reference: np.ndarray) -> str:
    """`label` for integer outputs, `top1` for [N, C>1] float scores, `error` for everything else."""
    if reference.dtype.kind in "iub":
        return "label"
    if reference.ndim == 2 and reference.shape[-1] > 1:
        return "top1"
    return "error"


def _is_probability(reference: np.ndarray) -> bool:
    """A float output holding one value in [0, 1] per sample ([N], [N, 1])."""
    if reference.dtype.kind != "f" or reference.size == 0 or reference.ndim == 0 or reference.ndim > 2:
        return False
    if reference.ndim == 2 and reference.shape[1] != 1:
        return False
    return bool(np.all((reference >= 0.0) & (reference <= 1.0)))


def snr_db(reference: np.ndarray, test: np.ndarray) -> float | None:
    """Signal-to-noise ratio in dB of `test` against `reference`; None when they are identical."""
    ref = reference.astype(np.float64).ravel()
    noise = float(np.sum((ref - test.astype(np.float64).ravel()) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0.0:
        return None
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def output_figures(reference: np.ndarray, test: np.ndarray) -> dict:
    kind = output_kind(reference)
    figures: dict = {"kind": kind, "samples": int(reference.shape[0]) if reference.ndim else 1}
    if reference.shape != test.shape:
        figures.update(
            kind="error", shape_mismatch=[list(reference.shape), list(test.shape)], snr_db=-math.inf
        )
        return figures
    if kind == "label":
        same = (reference == test).reshape(reference.shape[0], -1).all(axis=1)
        figures["agreement"] = float(np.mean(same))
    elif kind == "top1":
        figures["agreement"] = float(np.mean(np.argmax(reference, -1) == np.argmax(test, -1)))
    if kind == "error" and _is_probability(reference):
        # One probability per step or sample (a detector's score): how often both sides decide alike.
        figures["decision_agreement"] = float(np.mean((reference > 0.5) == (test > 0.5)))
    if reference.dtype.kind == "f":
        diff = np.abs(reference.astype(np.float64) - test.astype(np.float64))
        figures["max_abs_error"] = float(diff.max()) if diff.size else 0.0
        figures["mean_abs_error"] = float(diff.mean()) if diff.size else 0.0
        figures["snr_db"] = snr_db(reference, test)
    return figures


def compare_outputs(reference: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray]) -> dict[str, dict]:
    return {name: output_figures(reference[name], test[name]) for name in reference}


def verdict(agreement: Mapping[str, Mapping[str, dict]], min_agreement: float, min_snr_db: float):
    """(passed, reason): the first figure under its threshold, or the weakest figure when all pass."""
    failures: list[str] = []
    weakest: tuple[float, str] | None = None
    for split in SPLITS:
        for name, fig in agreement.get(split, {}).items():
            if fig["kind"] in ("top1", "label"):
                value, text = (
                    fig["agreement"],
                    f"{split} top-1 agreement of '{name}' is {fig['agreement']:.4f}",
                )
                if value < min_agreement:
                    failures.append(f"{text} < min_agreement {min_agreement}")
                margin = value - min_agreement
            else:
                snr = fig.get("snr_db")
                if snr is None:
                    continue  # bit-identical
                text = f"{split} SNR of '{name}' is {snr:.1f} dB"
                if snr < min_snr_db:
                    failures.append(f"{text} < min_snr_db {min_snr_db}")
                margin = (snr - min_snr_db) / 100.0
            if weakest is None or margin < weakest[0]:
                weakest = (margin, text)
    if failures:
        return False, "; ".join(failures)
    if weakest is None:
        return True, "outputs are bit-identical to fp32"
    return True, f"all figures meet the thresholds; weakest: {weakest[1]}"


# ---------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:60em;color:#222}
h1{font-size:1.4em} h2{font-size:1.1em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
.pass{background:#e6f4ea;border-left:6px solid #1e8e3e;padding:.6em 1em}
.fail{background:#fce8e6;border-left:6px solid #d93025;padding:.6em 1em}
.warn{background:#fef7e0;border-left:6px solid #f9ab00;padding:.6em 1em}
code{background:#f3f3f3;padding:0 .2em}
"""


def _fmt(value) -> str:
    if value is None:
        return "exact"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-inf"
        return f"{value:.4g}"
    return html.escape(str(value))


def svg_bars(
    title: str, items: list[tuple[str, float]], unit: str = "", threshold: float | None = None
) -> str:
    """A horizontal bar chart as inline SVG (no external assets)."""
    finite = [v for _, v in items if v is not None and math.isfinite(v)]
    top = max(finite + ([threshold] if threshold is not None else []) + [1e-12])
    low = min(finite + [0.0])
    span = top - low or 1.0
    label_w, bar_w, row_h = 220, 300, 22
    height = 30 + row_h * len(items) + 10
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + bar_w + 110}" height="{height}" '
        f'role="img" aria-label="{html.escape(title)}">',
        f'<text x="0" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>',
    ]
    zero_x = label_w + bar_w * (0 - low) / span
    for i, (label, value) in enumerate(items):
        y = 28 + i * row_h
        shown = value if value is not None and math.isfinite(value) else top
        x0, x1 = sorted((zero_x, label_w + bar_w * (shown - low) / span))
        parts.append(f'<text x="0" y="{y + 14}" font-size="12">{html.escape(label[:34])}</text>')
        parts.append(
            f'<rect x="{x0:.1f}" y="{y + 2}" width="{max(x1 - x0, 1):.1f}" height="{row_h - 6}" fill="#4285f4"/>'
        )
        parts.append(f'<text x="{x1 + 4:.1f}" y="{y + 14}" font-size="12">{_fmt(value)}{unit}</text>')
    if threshold is not None:
        tx = label_w + bar_w * (threshold - low) / span
        parts.append(
            f'<line x1="{tx:.1f}" y1="24" x2="{tx:.1f}" y2="{height - 4}" stroke="#d93025" stroke-dasharray="4 3"/>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _table(rows: list[list], head: list[str]) -> str:
    out = ["<table><tr>", *(f"<th>{html.escape(h)}</th>" for h in head), "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _latency_row(latency: dict) -> list:
    per = f"per {latency.get('per', 'run')}, batch {latency.get('batch')}"
    if latency.get("representative", True):
        return [f"latency, median of {latency.get('runs')} runs (ms, {per})", latency.get("fp32_ms"),
                latency.get("build_ms"), latency.get("ratio")]  # fmt: skip
    return [f"{latency.get('machine')} host check, NOT this build's latency (ms, {per})", latency.get("fp32_ms"),
            latency.get("host_build_ms"), latency.get("host_ratio")]  # fmt: skip


def _calibration_html(cal: dict) -> list[str]:
    """The calibration section: range stability over resamples of the set, and how the method was chosen."""
    st = cal.get("stability", {})
    choice = cal.get("method_choice", {})
    ok = st.get("verdict") != "too_small"
    out = [
        "<h2>Calibration</h2>",
        f'<div class="{"pass" if ok else "warn"}"><b>{"STABLE" if ok else "TOO SMALL"}</b>: '
        f"{html.escape(str(st.get('message', '')))}</div>",
        _table(
            [
                ["samples", cal.get("samples")],
                ["method", f"{cal.get('method')} (requested: {cal.get('requested')})"],
                ["why", choice.get("why", "")],
                ["largest scale spread (relative std, expected)", st.get("spread_max")],
                ["largest scale spread (90% upper bound, the verdict's figure)", st.get("spread_upper_max")],
                ["median scale spread", st.get("spread_median")],
                ["threshold", st.get("threshold")],
                ["suggested samples", st.get("suggested_samples") or "-"],
            ],
            ["figure", "value"],
        ),
    ]
    if st.get("worst_tensors"):
        out.append(f"<p>{html.escape(str(st.get('statistic', '')))}; worst activations:</p>")
        out.append(
            _table(
                [
                    [
                        w["tensor"],
                        w["spread"],
                        w["spread_upper"],
                        w["spread_half_size"],
                        w["shrink_rate"],
                        w["scale_max_over_min"],
                    ]
                    for w in st["worst_tensors"]
                ],
                [
                    "tensor",
                    "spread",
                    "90% upper",
                    "spread at half size",
                    "shrink rate a (n^-a)",
                    "scale max / min (halves)",
                ],
            )
        )
    if choice.get("candidates"):
        out.append(f"<p>Candidates measured on {html.escape(str(choice.get('evaluated_on', '')))}:</p>")
        out.append(
            _table(
                [[c["method"], c["agreement"], c["snr_db"], "chosen" if c["method"] == cal.get("method") else ""]
                 for c in choice["candidates"]],
                ["method", "lowest top-1 agreement", "lowest SNR dB", ""],
            )
        )  # fmt: skip
    return out


def render_html(report: QualityReport) -> str:
    r = report
    status = "pass" if r.passed else "fail"
    body = [
        f"<h1>Quality report: {html.escape(r.target)} ({html.escape(r.format)})</h1>",
        f'<div class="{status}"><b>{"PASSED" if r.passed else "FAILED"}</b>: {html.escape(r.verdict_reason)}</div>',
        "<h2>Size and latency vs fp32</h2>",
        _table(
            [
                ["size (bytes)", r.size.get("fp32_bytes"), r.size.get("build_bytes"), r.size.get("ratio")],
                _latency_row(r.latency),
            ],
            ["figure", "fp32", "build", "ratio"],
        ),
        f"<p>Latency measured on {html.escape(str(r.latency.get('measured_on', r.latency.get('machine'))))}; "
        f"the build is made for {html.escape(str(r.latency.get('made_for', 'this machine')))}."
        + (f" {html.escape(r.latency['note'])}." if r.latency.get("note") else "")
        + "</p>",
        svg_bars(
            "build / fp32 (lower is better)",
            [("size ratio", r.size.get("ratio"))]
            + (
                [("latency ratio", r.latency.get("ratio"))]
                if r.latency.get("representative", True)
                else [(f"{r.latency.get('machine')} host check", r.latency.get("host_ratio"))]
            ),
            "x",
            threshold=1.0,
        ),
        "<h2>Agreement with fp32</h2>",
    ]
    rows, bars = [], []
    for split, outputs in r.agreement.items():
        for name, fig in outputs.items():
            rows.append(
                [
                    split,
                    name,
                    fig.get("kind"),
                    fig.get("samples"),
                    fig.get("agreement", ""),
                    fig.get("decision_agreement", ""),
                    fig.get("snr_db", ""),
                    fig.get("max_abs_error", ""),
                    fig.get("mean_abs_error", ""),
                ]
            )
            if "agreement" in fig:
                bars.append((f"{split}: {name}", fig["agreement"]))
    body.append(
        _table(
            rows,
            [
                "split",
                "output",
                "kind",
                "samples",
                "top-1",
                "decisions alike (>0.5)",
                "SNR dB",
                "max |err|",
                "mean |err|",
            ],
        )
    )
    if bars:
        body.append(svg_bars("top-1 agreement", bars, threshold=r.thresholds.get("min_agreement")))
    if r.worst_layers:
        body.append("<h2>Worst layers (intermediate activations vs fp32)</h2>")
        body.append(
            _table(
                [
                    [w["node"], w["op_type"], w["tensor"], w["snr_db"], w.get("snr_drop_db")]
                    for w in r.worst_layers
                ],
                ["node", "op", "tensor", "SNR dB", "SNR drop dB"],
            )
        )
        body.append(
            svg_bars("SNR of worst layers (dB)", [(w["node"], w["snr_db"]) for w in r.worst_layers], " dB")
        )
    if r.calibration:
        body.extend(_calibration_html(r.calibration))
    if r.suggested_nodes_to_exclude:
        names = ",".join(r.suggested_nodes_to_exclude)
        body.append(
            "<h2>Suggestion</h2><p>These nodes lose the most precision when quantized. Try "
            f"<code>--option nodes_to_exclude={html.escape(names)}</code>.</p>"
        )
    body.append("<h2>Ops left in float</h2>")
    body.append(_table(sorted(r.float_ops.items()), ["op", "count"]) if r.float_ops else "<p>none</p>")
    if r.quantized_ops:
        body.append("<h2>Quantized ops</h2>" + _table(sorted(r.quantized_ops.items()), ["op", "count"]))
    if r.op_compatibility:
        oc = r.op_compatibility
        body.append("<h2>Edge TPU op compatibility</h2>")
        body.append(f"<p>{html.escape(oc.get('summary', ''))}</p>")
        body.append(
            _table(
                [[o["op"], o["mapped_to"], o["placement"], o["reason"]] for o in oc.get("ops", [])],
                ["op", "TFLite op", "runs on", "why"],
            )
        )
        if oc.get("compiler_log"):
            body.append(f"<pre>{html.escape(oc['compiler_log'])}</pre>")
    if r.constraints:
        body.append("<h2>Vitis AI XINT8 constraints, node by node</h2>")
        body.append(
            _table(
                [
                    [c["node"], c["op"], c["rule"], c["value"], c["allowed"], c["status"]]
                    for c in r.constraints
                ],
                ["node", "op", "rule", "value", "allowed", "status"],
            )
        )
    if r.notes:
        body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in r.notes) + "</ul>")
    body.append(
        "<h2>Thresholds</h2>" + _table([[k, v] for k, v in r.thresholds.items()], ["threshold", "value"])
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>edgemart quality: {html.escape(r.target)}</title><style>{_CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>"
    )
