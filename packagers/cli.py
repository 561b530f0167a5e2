"""`edgemart package`: package one model for one target offline and write the build plus its quality report.

Imports only the standard library and drm.errors at module level; the packagers load inside the handler."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from edgemart.core.errors import UsageError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "package",
        help="quantize and package a model for one target, with a quality report",
        description="Package MODEL for --target; writes DIR/<stem>.<target>.<ext>, DIR/quality.json and "
        "DIR/quality.html. Exit 0 when the quality verdict passes, 1 when it fails, 2 on bad input.",
    )
    p.add_argument("model", metavar="MODEL", help="ONNX or TFLite model file")
    p.add_argument("--target", required=True, help="arm-cpu, x86-cpu, coral-edgetpu, fpga-xint8 or onnx-fp32")
    p.add_argument(
        "--calibration",
        metavar="PATH.npz",
        help="calibration samples keyed by input name (or x): an array of the input's rank has the batch on "
        "axis 0, rank + 1 has one sample per entry on axis 0; optional sequence_start for stateful models",
    )
    p.add_argument("--holdout", metavar="PATH.npz", help="held-out samples for the agreement figures")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="target option, e.g. min_agreement=0.99 or nodes_to_exclude=Conv_3,Conv_7 (repeatable)",
    )
    p.add_argument(
        "--fixed",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an input that always gets VALUE (e.g. sr=16000): it needs no array and the int8 builds are "
        "specialized for it (repeatable)",
    )
    p.add_argument(
        "--state",
        action="append",
        default=[],
        metavar="IN=OUT",
        help="recurrent state: input IN is fed output OUT of the step before (e.g. state=stateN); pairs "
        "named like that are also detected (repeatable)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=handle_package)


def parse_option_pairs(pairs: list[str]) -> dict[str, str]:
    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--option expects KEY=VALUE, got {pair!r}")
        if key.strip() in options:
            raise UsageError(f"--option {key.strip()} given twice")
        options[key.strip()] = value
    return options


def _read_model(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise UsageError(f"model file not found: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"model path is a directory: {path}") from None
    except OSError as exc:
        raise UsageError(f"cannot read model {path}: {exc.strerror}") from None


def _progress_line() -> Callable[[float, str], None]:
    from edgemart.core.progress import LineProgress, bar

    line = LineProgress()

    def show(fraction: float, message: str) -> None:
        line.update(fraction, f"{bar(fraction)} {fraction * 100:5.1f}% {message[:60]}")
        if fraction >= 1.0:
            line.close()

    return show


def handle_package(args: argparse.Namespace) -> int:
    from packagers import load_calibration, package_model

    options = parse_option_pairs(args.option)
    for flag, key in ((args.fixed, "fixed"), (args.state, "state")):
        if flag:
            if key in options:
                raise UsageError(f"--{key} and --option {key}=... given together; use one")
            options[key] = ",".join(flag)
    model = _read_model(args.model)
    calibration = load_calibration(args.calibration) if args.calibration else None
    holdout = load_calibration(args.holdout) if args.holdout else None
    build = package_model(
        model,
        args.target,
        calibration=calibration,
        holdout=holdout,
        options=options,
        progress=_progress_line(),
    )
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output directory {out}: {exc.strerror}") from None
    model_path = out / f"{Path(args.model).stem}.{build.target}.{build.format}"
    json_path, html_path = out / "quality.json", out / "quality.html"
    quality = build.quality.to_dict()
    model_path.write_bytes(build.payload)
    json_path.write_text(
        json.dumps({"build_hash": build.build_hash, "metadata": build.metadata, "quality": quality}, indent=2)
    )
    html_path.write_text(build.quality.to_html())
    if args.json:
        print(
            json.dumps(
                {
                    "build_hash": build.build_hash,
                    "target": build.target,
                    "format": build.format,
                    "paths": {
                        "model": str(model_path),
                        "quality_json": str(json_path),
                        "quality_html": str(html_path),
                    },
                    "quality": quality,
                }
            )
        )
    else:
        q = build.quality
        print(f"{build.target}: {model_path} ({len(build.payload)} bytes, {build.build_hash})")
        lat = q.latency
        if lat.get("representative", True):
            timing = f"latency {lat['ratio']}x fp32 (median of {lat['runs']} on {lat['machine']})"
        else:
            timing = (
                f"latency not measured on {lat['made_for']} (this {lat['machine']} host ran it at "
                f"{lat['host_ratio']}x fp32, a check only)"
            )
        print(f"  size {q.size['ratio']}x fp32, {timing}")
        print(f"  verdict: {'PASSED' if q.passed else 'FAILED'}: {q.verdict_reason}")
        if q.calibration:
            cal = q.calibration
            print(
                f"  calibration: {cal['method']} ({cal['method_choice']['why']}); {cal['stability']['message']}"
            )
        print(f"  report: {html_path}")
    if not build.quality.passed:
        sys.stderr.write(f"quality verdict failed: {build.quality.verdict_reason}\n")
        return 1
    return 0
