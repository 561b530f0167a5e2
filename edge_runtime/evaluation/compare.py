"""Two builds of one listing on the same data, side by side: the buyer's comparison of, say, an int8
arm-cpu build with the onnx-fp32 baseline. The baseline runs first; the candidate runs with the baseline's
outputs as its reference, so agreement is measured output by output on the buyer's own samples."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from typing import Any

from edge_runtime.evaluation.evaluate import EvalReport


@dataclass
class Comparison:
    candidate: EvalReport  # its `agreement` is against the baseline's outputs
    baseline: EvalReport

    def figures(self) -> list[tuple[str, Any, Any]]:
        """(figure, candidate, baseline) rows, the same in text, JSON and HTML."""
        c, b = self.candidate, self.baseline
        rows: list[tuple[str, Any, Any]] = [
            ("target", c.model.get("target"), b.model.get("target")),
            ("version", c.model.get("version"), b.model.get("version")),
            ("backend", c.model.get("backend"), b.model.get("backend")),
            ("samples", c.samples, b.samples),
            ("load ms", round(c.load_seconds * 1000, 2), round(b.load_seconds * 1000, 2)),
        ]
        for key in ("p50", "p99"):
            rows.append((f"latency {key} ms", _round(c.latency.get(key)), _round(b.latency.get(key))))
        rows.append(("throughput samples/s", _round(c.throughput), _round(b.throughput)))
        rows.append(("peak RSS MB", _round(c.peak_rss_mb), _round(b.peak_rss_mb)))
        if c.classification and b.classification:
            rows.append(("top-1 accuracy", c.classification["accuracy"], b.classification["accuracy"]))
        rows.append(("runs left", c.runs_left, b.runs_left))
        return rows

    def agreement(self) -> dict[str, Any]:
        return (self.candidate.agreement or {}).get("outputs", {})

    def latency_ratio(self) -> float | None:
        c, b = self.candidate.latency.get("p50"), self.baseline.latency.get("p50")
        return round(c / b, 4) if c and b else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "compare": {
                "candidate": self.candidate.model.get("target"),
                "baseline": self.baseline.model.get("target"),
                "figures": [{"figure": f, "candidate": c, "baseline": b} for f, c, b in self.figures()],
                "agreement": self.agreement(),
                "latency_p50_ratio": self.latency_ratio(),
                "measured_on": "this device",
            },
            "candidate": self.candidate.to_dict(),
            "baseline": self.baseline.to_dict(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, default=str)

    def to_text(self) -> str:
        rows = self.figures()
        width = max(len(f) for f, _, _ in rows)
        lines = [f"{'':<{width}}  {'candidate':>14}  {'baseline':>14}"]
        lines += [f"{f:<{width}}  {_cell(c):>14}  {_cell(b):>14}" for f, c, b in rows]
        for name, fig in self.agreement().items():
            lines.append(
                f"agreement  {name}: max |Δ| {fig['max_abs_diff']:.3g}, mean |Δ| {fig['mean_abs_diff']:.3g}"
                + (f", labels agree {fig['label_agreement']:.4f}" if "label_agreement" in fig else "")
            )
        if (ratio := self.latency_ratio()) is not None:
            lines.append(f"latency    candidate p50 / baseline p50 = {ratio:.3f} (measured on this device)")
        return "\n".join(lines)

    def to_html(self) -> str:
        rows = "".join(
            f"<tr><th>{html.escape(f)}</th><td>{html.escape(_cell(c))}</td><td>{html.escape(_cell(b))}</td></tr>"
            for f, c, b in self.figures()
        )
        agreement = "".join(
            f"<tr><th>{html.escape(name)}</th><td>{fig['max_abs_diff']:.3g}</td><td>{fig['mean_abs_diff']:.3g}</td>"
            f"<td>{html.escape(_cell(fig.get('label_agreement')))}</td></tr>"
            for name, fig in self.agreement().items()
        )
        title = f"{self.candidate.model.get('target')} vs {self.baseline.model.get('target')}"
        return (
            "<!doctype html><html><head><meta charset='utf-8'><title>edgemart comparison: "
            f"{html.escape(title)}</title><style>body{{font-family:sans-serif;margin:2em}}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
            "th{text-align:left}</style></head><body>"
            f"<h1>{html.escape(str(self.candidate.model.get('listing')))}: {html.escape(title)}</h1>"
            "<p>Both builds ran on this device over the same samples; agreement compares the candidate's outputs"
            " with the baseline's.</p>"
            f"<table><tr><th></th><th>candidate</th><th>baseline</th></tr>{rows}</table>"
            "<h2>Agreement</h2><table><tr><th>output</th><th>max |Δ|</th><th>mean |Δ|</th>"
            f"<th>labels agree</th></tr>{agreement}</table>"
            "<h2>Candidate</h2>"
            + _body(self.candidate.to_html())
            + "<h2>Baseline</h2>"
            + _body(self.baseline.to_html())
            + "</body></html>"
        )


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 3)


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _body(page: str) -> str:
    """The inside of a report page's <body>, to show two reports on one page."""
    start, end = page.find("<body"), page.rfind("</body>")
    if start < 0 or end < 0:
        return page
    return page[page.index(">", start) + 1 : end]
