"""A self-contained HTML evaluation report: inline CSS and SVG plots, no scripts, no external assets."""

from __future__ import annotations

import html
from typing import Any, Protocol

import numpy as np


class _Report(Protocol):
    """What the page needs of an eval report (evaluate.EvalReport); a protocol, so this module does not
    import the one that imports it."""

    def to_dict(self) -> dict[str, Any]: ...


_W, _H, _PAD = 560, 220, 40
_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:980px}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse}td,th{padding:.25em .7em;border-bottom:1px solid #ddd;text-align:left}
.fig{margin:.5em 0}.mono{font-family:ui-monospace,monospace;font-size:.9em}
svg text{font-size:11px;fill:#333}
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _axes(title: str, x_label: str, y_label: str) -> list[str]:
    return [
        f'<svg width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}" role="img" aria-label="{_esc(title)}">',
        f'<line x1="{_PAD}" y1="{_H - _PAD}" x2="{_W - 10}" y2="{_H - _PAD}" stroke="#555"/>',
        f'<line x1="{_PAD}" y1="10" x2="{_PAD}" y2="{_H - _PAD}" stroke="#555"/>',
        f'<text x="{_W / 2}" y="{_H - 8}" text-anchor="middle">{_esc(x_label)}</text>',
        f'<text x="12" y="{_H / 2}" transform="rotate(-90 12 {_H / 2})" text-anchor="middle">{_esc(y_label)}</text>',
    ]


def latency_histogram_svg(latencies_ms: list[float], bins: int = 30) -> str:
    lat = np.asarray(latencies_ms, dtype=np.float64)
    parts = _axes("latency histogram", "latency per call (ms)", "calls")
    if lat.size:
        counts, edges = np.histogram(lat, bins=min(bins, max(1, lat.size)))
        top = max(1, int(counts.max()))
        inner_w, inner_h = _W - _PAD - 10, _H - _PAD - 10
        bar_w = inner_w / len(counts)
        for i, c in enumerate(counts):
            h = inner_h * c / top
            parts.append(
                f'<rect x="{_PAD + i * bar_w:.1f}" y="{_H - _PAD - h:.1f}" width="{max(bar_w - 1, 1):.1f}"'
                f' height="{h:.1f}" fill="#4a7ebb"><title>{edges[i]:.3f}–{edges[i + 1]:.3f} ms: {c}</title></rect>'
            )
        parts.append(f'<text x="{_PAD}" y="{_H - _PAD + 14}">{edges[0]:.3f}</text>')
        parts.append(f'<text x="{_W - 10}" y="{_H - _PAD + 14}" text-anchor="end">{edges[-1]:.3f}</text>')
        parts.append(f'<text x="{_PAD + 4}" y="20">{top}</text>')
    parts.append("</svg>")
    return "".join(parts)


def latency_timeline_svg(latencies_ms: list[float]) -> str:
    lat = np.asarray(latencies_ms, dtype=np.float64)
    parts = _axes("latency over time", "call #", "latency (ms)")
    if lat.size:
        top = float(lat.max()) or 1.0
        inner_w, inner_h = _W - _PAD - 10, _H - _PAD - 10
        step = inner_w / max(1, lat.size - 1)
        points = " ".join(
            f"{_PAD + i * step:.1f},{_H - _PAD - inner_h * v / top:.1f}" for i, v in enumerate(lat)
        )
        parts.append(f'<polyline points="{points}" fill="none" stroke="#c0504d" stroke-width="1.2"/>')
        parts.append(f'<text x="{_PAD + 4}" y="20">{top:.3f} ms</text>')
        parts.append(f'<text x="{_W - 10}" y="{_H - _PAD + 14}" text-anchor="end">{lat.size}</text>')
    parts.append("</svg>")
    return "".join(parts)


def confusion_svg(confusion: list[list[int]]) -> str:
    m = np.asarray(confusion, dtype=np.int64)
    n = m.shape[0]
    cell = max(8, min(36, 360 // max(n, 1)))
    size = 30 + n * cell
    parts = [
        f'<svg width="{size + 10}" height="{size + 10}"'
        f' viewBox="0 0 {size + 10} {size + 10}" role="img" aria-label="confusion matrix">'
    ]
    row_sums = np.maximum(m.sum(axis=1, keepdims=True), 1)
    for i in range(n):
        parts.append(f'<text x="24" y="{30 + i * cell + cell * 0.65:.1f}" text-anchor="end">{i}</text>')
        parts.append(f'<text x="{30 + i * cell + cell / 2:.1f}" y="22" text-anchor="middle">{i}</text>')
        for j in range(n):
            frac = m[i, j] / row_sums[i, 0]
            shade = int(255 - 200 * frac)
            parts.append(
                f'<rect x="{30 + j * cell}" y="{30 + i * cell}" width="{cell}" height="{cell}"'
                f' fill="rgb({shade},{shade},255)" stroke="#fff"><title>true {i}, predicted {j}: {m[i, j]}'
                f"</title></rect>"
            )
            if cell >= 20 and m[i, j]:
                parts.append(
                    f'<text x="{30 + j * cell + cell / 2:.1f}" y="{30 + i * cell + cell * 0.65:.1f}"'
                    f' text-anchor="middle">{m[i, j]}</text>'
                )
    parts.append("</svg>")
    return "".join(parts)


def render(report: _Report) -> str:
    d = report.to_dict()
    m, lat = d["model"], d["latency_ms"]
    rows = [
        ("listing", m.get("listing")),
        ("target", m.get("target")),
        ("backend", m.get("backend")),
        ("license", m.get("license_id")),
        ("build", m.get("build_hash")),
        (
            "samples",
            f"{d['samples']} in {d['calls']} calls of batch {d['batch_size']} (+{d['warmup_calls']} warm-up)",
        ),
        ("runs left", "unlimited" if d["runs_left"] is None else d["runs_left"]),
        ("license expires", m.get("license_expires") or "never"),
        ("model load", f"{d['load_seconds'] * 1000:.1f} ms (verify + unwrap + decrypt + session)"),
        ("throughput", f"{d['throughput_samples_per_s']:.1f} samples/s"),
        ("peak RSS", f"{d['peak_rss_mb']:.1f} MB"),
    ]
    if lat:
        rows.insert(
            8, ("latency", f"p50 {lat['p50']:.3f} ms · p90 {lat['p90']:.3f} ms · p99 {lat['p99']:.3f} ms")
        )
    body = ["<h1>edgemart evaluation report</h1>", "<table>"]
    body += [f"<tr><th>{_esc(k)}</th><td class=mono>{_esc(v)}</td></tr>" for k, v in rows]
    body.append("</table>")
    c = d["classification"]
    if c:
        body.append("<h2>Classification</h2><table>")
        body.append(f"<tr><th>top-1 accuracy</th><td>{c['accuracy']:.4f}</td></tr>")
        if c.get("top_k_accuracy") is not None:
            body.append(f"<tr><th>top-{c['k']} accuracy</th><td>{c['top_k_accuracy']:.4f}</td></tr>")
        body.append(f"<tr><th>output used</th><td class=mono>{_esc(c['output'])}</td></tr></table>")
        body.append("<h2>Confusion matrix (rows: true, columns: predicted)</h2>")
        body.append(f'<div class="fig">{confusion_svg(c["confusion"])}</div>')
    a = d["agreement"]
    if a:
        body.append(
            "<h2>Agreement with reference outputs</h2><table><tr><th>output</th><th>max |Δ|</th>"
            "<th>mean |Δ|</th><th>allclose</th><th>label agreement</th></tr>"
        )
        for name, f in a["outputs"].items():
            body.append(
                f"<tr><td class=mono>{_esc(name)}</td><td>{f['max_abs_diff']:.3g}</td>"
                f"<td>{f['mean_abs_diff']:.3g}</td><td>{f['allclose']}</td>"
                f"<td>{_esc(f.get('label_agreement', '—'))}</td></tr>"
            )
        body.append("</table>")
    body.append("<h2>Latency histogram</h2>")
    body.append(f'<div class="fig">{latency_histogram_svg(d["latencies_ms"])}</div>')
    body.append("<h2>Latency over time</h2>")
    body.append(f'<div class="fig">{latency_timeline_svg(d["latencies_ms"])}</div>')
    if d["ignored_keys"]:
        body.append(f"<p>Ignored data keys: {_esc(', '.join(d['ignored_keys']))}</p>")
    title = _esc(f"edgemart eval · {m.get('listing')}")
    return (
        f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>{title}</title>"
        f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n"
    )
