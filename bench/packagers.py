"""Packagers benchmark: size, latency (int8 vs fp32, side by side), agreement and packaging time per target.

Headline keys (`packagers.<target>.<figure>`) are the digits MLP; per-model keys add the model name."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from edgemart.core.errors import UsageError

CORPUS = Path(os.environ.get("EDGEMART_CORPUS", Path.home() / ".cache" / "edgemart-corpus"))
TARGETS = ("arm-cpu", "fpga-xint8", "coral-edgetpu")


def _models(quick: bool) -> list[tuple[str, str, str, str | None, bool]]:
    """(short name, model path, calibration npz, holdout npz, split the one sample file 2/3 : 1/3)."""
    models = [
        ("digits_mlp", "models/digits/digits_mlp_base.onnx", "data/digits/digits_calibration.npz",
         "data/digits/digits_test.npz", False),
        ("ppocr_cls", "models/rapidocr/ch_ppocr_mobile_v2.0_cls_infer.onnx",
         "data/rapidocr/ch_ppocr_mobile_v2.0_cls_infer.npz", None, True),
    ]  # fmt: skip
    if not quick:
        models.append(
            ("ppocr_det", "models/rapidocr/ch_PP-OCRv4_det_infer.onnx", "data/rapidocr/ch_PP-OCRv4_det_infer.npz",
             None, False)
        )  # fmt: skip
    return models


def _fig(value, target, unit, note):
    met = None
    if target is not None and value is not None:
        op, bound = target.split()
        met = value <= float(bound) if op == "<=" else value >= float(bound)
    return {"value": value, "target": target, "unit": unit, "met": met, "note": note}


def run(quick: bool) -> dict[str, dict]:
    from packagers import load_calibration, package_model

    runs = 20 if quick else 50
    machine = platform.machine()
    out: dict[str, dict] = {}
    for short, model_path, cal_path, hold_path, split in _models(quick):
        model = (CORPUS / model_path).read_bytes()
        samples = load_calibration(CORPUS / cal_path)
        if split:
            n = next(iter(samples.values())).shape[0]
            cut = max(1, (2 * n) // 3)
            cal, hold = {k: v[:cut] for k, v in samples.items()}, {k: v[cut:] for k, v in samples.items()}
        else:
            cal = samples
            hold = load_calibration(CORPUS / hold_path) if hold_path else samples
        for target in TARGETS:
            key = f"packagers.{target.replace('-', '_')}.{short}"
            try:
                build = package_model(
                    model, target, calibration=cal, holdout=hold, options={"latency_runs": runs}
                )
            except UsageError as exc:
                out[f"{key}.supported"] = _fig(0.0, None, "bool", exc.message[:200])
                continue
            q = build.quality
            classifier = [f for f in q.agreement["holdout"].values() if "agreement" in f]
            agreement = min(f["agreement"] for f in classifier) if classifier else None
            snr = [f.get("snr_db") for f in q.agreement["holdout"].values() if f.get("snr_db") is not None]
            lat_note = (
                f"median of {runs} interleaved runs, batch {q.latency['batch']}, 1 thread, on {machine}; "
                f"fp32 {q.latency['fp32_ms']} ms vs build {q.latency['build_ms']} ms"
            )
            if short == "digits_mlp":
                lat_note += ". A 64-64-32-10 MLP is too small for int8 to pay off: Q/DQ overhead dominates"
            out[f"{key}.size_ratio"] = _fig(q.size["ratio"], "<= 0.3", "x", f"{q.size['build_bytes']} B vs "
                                            f"{q.size['fp32_bytes']} B; small graphs carry Q/DQ node overhead")  # fmt: skip
            out[f"{key}.latency_ratio"] = _fig(q.latency["ratio"], "<= 0.6" if target == "arm-cpu" else None,
                                               "x", lat_note)  # fmt: skip
            if agreement is not None:
                out[f"{key}.agreement"] = _fig(agreement, ">= 0.99", "ratio",
                                               f"top-1 agreement with fp32 on {classifier[0]['samples']} held-out samples")  # fmt: skip
            if snr:
                out[f"{key}.snr_db"] = _fig(min(snr), ">= 20", "dB", "output SNR vs fp32 on held-out samples")
            out[f"{key}.packaging_seconds"] = _fig(
                build.metadata["packaging_seconds"], None, "s", q.verdict_reason[:200]
            )
            if short == "digits_mlp":
                head = f"packagers.{target.replace('-', '_')}"
                for figure in ("size_ratio", "latency_ratio", "agreement"):
                    if f"{key}.{figure}" in out:
                        out[f"{head}.{figure}"] = dict(
                            out[f"{key}.{figure}"], note="digits MLP: " + out[f"{key}.{figure}"]["note"]
                        )
    return out


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run("--quick" in sys.argv), indent=2))
