"""Packagers benchmark: size, latency (int8 vs fp32, side by side), agreement and packaging time per target.

Per-model keys are `packagers.<target>.<model>.<figure>`. Headlines: `size_ratio` is the largest over the
PP-OCR models, `latency_ratio` the slowest over PP-OCR det and rec and exists only for a target this machine
can time honestly (x86-cpu on x86_64); other targets get a `host_check_ratio`, never a latency; `agreement`
is the digits MLP's."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from edgemart.core.errors import UsageError

CORPUS = Path(os.environ.get("EDGEMART_CORPUS", Path.home() / ".cache" / "edgemart-corpus"))
TARGETS = ("arm-cpu", "x86-cpu", "fpga-xint8", "coral-edgetpu")
CPU_TARGETS = ("arm-cpu", "x86-cpu")
PPOCR = ("ppocr_cls", "ppocr_det", "ppocr_rec")
SIZE_TARGET = {"arm-cpu": "<= 0.35"}  # on the PP-OCR models (issue #18); x86-cpu keeps QDQ for speed


def _models(quick: bool) -> list[tuple[str, str, str, str | None, bool, tuple[str, ...]]]:
    """(short name, model path, calibration npz, holdout npz, split 2/3 : 1/3, targets)."""
    rapid = "models/rapidocr/"
    data = "data/rapidocr/"
    # PP-OCR det and rec in the quick run too: they carry the size and x86 latency figures.
    heavy = TARGETS[:3] if not quick else CPU_TARGETS
    return [
        ("digits_mlp", "models/digits/digits_mlp_base.onnx", "data/digits/digits_calibration.npz",
         "data/digits/digits_test.npz", False, TARGETS),
        ("ppocr_cls", rapid + "ch_ppocr_mobile_v2.0_cls_infer.onnx", data + "ch_ppocr_mobile_v2.0_cls_infer.npz",
         None, True, TARGETS),
        ("ppocr_det", rapid + "ch_PP-OCRv4_det_infer.onnx", data + "ch_PP-OCRv4_det_infer.npz", None, False, heavy),
        ("ppocr_rec", rapid + "ch_PP-OCRv4_rec_infer.onnx", data + "ch_PP-OCRv4_rec_infer.npz", None, False, heavy),
    ]  # fmt: skip


def _fig(value, target, unit, note):
    met = None
    if target is not None and value is not None:
        op, bound = target.split()
        met = value <= float(bound) if op == "<=" else value >= float(bound)
    return {"value": value, "target": target, "unit": unit, "met": met, "note": note}


def run(quick: bool) -> dict[str, dict]:
    from packagers import load_calibration, package_model

    runs = 30 if quick else 60
    machine = platform.machine()
    out: dict[str, dict] = {}
    for short, model_path, cal_path, hold_path, split, targets in _models(quick):
        model = (CORPUS / model_path).read_bytes()
        samples = load_calibration(CORPUS / cal_path)
        if split:
            n = next(iter(samples.values())).shape[0]
            cut = max(1, (2 * n) // 3)
            cal, hold = {k: v[:cut] for k, v in samples.items()}, {k: v[cut:] for k, v in samples.items()}
        else:
            cal = samples
            hold = load_calibration(CORPUS / hold_path) if hold_path else samples
        for target in targets:
            key = f"packagers.{target.replace('-', '_')}.{short}"
            try:
                build = package_model(
                    model, target, calibration=cal, holdout=hold, options={"latency_runs": runs}
                )
            except UsageError as exc:
                out[f"{key}.supported"] = _fig(0.0, None, "bool", exc.message[:200])
                continue
            q = build.quality
            lat = q.latency
            classifier = [f for f in q.agreement["holdout"].values() if "agreement" in f]
            agreement = min(f["agreement"] for f in classifier) if classifier else None
            snr = [f.get("snr_db") for f in q.agreement["holdout"].values() if f.get("snr_db") is not None]
            fmt = build.metadata.get("format_choice", {}).get("format", build.format)
            size_target = SIZE_TARGET.get(target) if short in PPOCR else "<= 0.3"
            out[f"{key}.size_ratio"] = _fig(
                q.size["ratio"], size_target, "x",
                f"{q.size['build_bytes']} B vs {q.size['fp32_bytes']} B ({fmt}"
                + ("; value_info dropped, names shortened)" if build.format == "onnx" else ")"),
            )  # fmt: skip
            timing = (
                f"median of {runs} interleaved runs, batch {lat['batch']}, {lat['threads']} thread, on {machine}; "
                f"fp32 {lat['fp32_ms']} ms vs build {lat['host_build_ms']} ms"
            )
            if lat["representative"]:
                out[f"{key}.latency_ratio"] = _fig(
                    lat["ratio"], "<= 0.8" if short in ("ppocr_det", "ppocr_rec") else None, "x", timing
                )
            else:
                out[f"{key}.host_check_ratio"] = _fig(
                    lat["host_ratio"], None, "x",
                    f"NOT a latency: the build is made for {lat['made_for']}; {timing} only checks it runs",
                )  # fmt: skip
            if agreement is not None:
                out[f"{key}.agreement"] = _fig(agreement, ">= 0.99", "ratio",
                                               f"top-1 agreement with fp32 on {classifier[0]['samples']} held-out samples")  # fmt: skip
            if snr:
                out[f"{key}.snr_db"] = _fig(min(snr), ">= 20", "dB", "output SNR vs fp32 on held-out samples")
            out[f"{key}.packaging_seconds"] = _fig(
                build.metadata["packaging_seconds"], None, "s", q.verdict_reason[:200]
            )
    _headlines(out)
    return out


def _headlines(out: dict[str, dict]) -> None:
    """Target-level figures: the worst PP-OCR size and native latency, and the digits agreement."""
    for target in TARGETS:
        head = f"packagers.{target.replace('-', '_')}"
        sizes = [(out[k]["value"], m) for m in PPOCR if (k := f"{head}.{m}.size_ratio") in out]
        if sizes:
            value, model = max(sizes)
            out[f"{head}.size_ratio"] = dict(
                out[f"{head}.{model}.size_ratio"],
                note=f"largest over PP-OCR {', '.join(m for _, m in sizes)}: {model}",
            )
        lats = [
            (out[k]["value"], m)
            for m in ("ppocr_det", "ppocr_rec")
            if (k := f"{head}.{m}.latency_ratio") in out
        ]
        if lats:
            value, model = max(lats)
            out[f"{head}.latency_ratio"] = dict(
                out[f"{head}.{model}.latency_ratio"], note=f"slowest of PP-OCR det and rec: {model}; "
                + out[f"{head}.{model}.latency_ratio"]["note"],
            )  # fmt: skip
        if f"{head}.digits_mlp.agreement" in out:
            out[f"{head}.agreement"] = dict(
                out[f"{head}.digits_mlp.agreement"],
                note="digits MLP: " + out[f"{head}.digits_mlp.agreement"]["note"],
            )


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run("--quick" in sys.argv), indent=2))
