"""`edgemart licenses ...`: check a model against the compliance gate, and maintain the open-model index.

Imports only the standard library and drm.errors at module level; the gate loads inside the handlers."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgemart.core.errors import NotFoundError, Refusal, UsageError


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    licenses = subparsers.add_parser("licenses", help="license-compliance gate")
    sub = licenses.add_subparsers(dest="licenses_command", required=True)

    check = sub.add_parser("check", help="decide whether a model may be sold (exit 0 allow, 1 block)")
    check.add_argument("model", help="ONNX or TFLite model file")
    check.add_argument("--card", help="model card (Markdown with YAML front matter)")
    check.add_argument("--license", dest="license", help="declared SPDX license expression")
    check.add_argument("--index", help="license index directory of open models")
    check.add_argument("--json", action="store_true", help="print the decision as one JSON object")
    check.set_defaults(func=_check)

    index = sub.add_parser("index", help="manage the index of open models")
    index_sub = index.add_subparsers(dest="index_command", required=True)
    add = index_sub.add_parser("add", help="fingerprint an open model into the index")
    add.add_argument("model", help="ONNX or TFLite model file")
    add.add_argument("--name", required=True, help="the model's public name (what cards put in base_model)")
    add.add_argument("--license", dest="license", required=True, help="its SPDX license expression")
    add.add_argument("--index", required=True, help="license index directory (created if missing)")
    add.add_argument("--card", help="its model card")
    add.add_argument("--source", default="", help="where it comes from (URL, package)")
    add.add_argument(
        "--allow-empty",
        action="store_true",
        help="index it even if no learned tensor is found (then only byte copies of it are recognised)",
    )
    add.add_argument("--json", action="store_true", help="print the index entry as JSON")
    add.set_defaults(func=_index_add)


def _read_bytes(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from exc


def _read_text(path: str, what: str) -> str:
    try:
        return _read_bytes(path, what).decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{what} {path} is not UTF-8 text") from None


def _check(args: argparse.Namespace) -> int:
    from licenses import LicenseIndex, check_model

    model = _read_bytes(args.model, "model")
    card = _read_text(args.card, "model card") if args.card else None
    if args.index and not Path(args.index).is_dir():
        raise NotFoundError(f"license index directory not found: {args.index}")
    index = LicenseIndex(args.index) if args.index else None
    decision = check_model(model, card=card, declared_license=args.license, index=index)
    if args.json:
        print(json.dumps(decision.to_dict(), sort_keys=True))
    else:
        print(_render(decision))
    if decision.outcome == "block":
        reasons = "; ".join(f.message for f in decision.blocking)
        raise Refusal(f"blocked: {reasons}", code="license_blocked", details=decision.to_dict())
    return 0


def _render(decision) -> str:  # type: ignore[no-untyped-def]
    lines = [f"decision: {decision.outcome}", f"declared license: {decision.declared_license or '-'}"]
    for base in decision.lineage:
        detail = f"license {base['license'] or 'unverified'}, {base['relation']}"
        if base.get("similarity") is not None:
            detail += f", similarity {base['similarity']:.3f}, layers {base['layers_matched']}"
        lines.append(f"lineage: {base['name']} ({detail})")
    for finding in decision.findings:
        lines.append(f"[{finding.severity}] {finding.code}: {finding.message}")
        shown = {k: v for k, v in finding.evidence.items() if k != "layers"}
        if shown:
            lines.append("    evidence: " + json.dumps(shown, sort_keys=True))
    if decision.obligations:
        lines.append("obligations:")
        lines += [f"  - {text}" for text in decision.obligations]
    return "\n".join(lines)


def _index_add(args: argparse.Namespace) -> int:
    from licenses import LicenseIndex

    model = _read_bytes(args.model, "model")
    card = _read_text(args.card, "model card") if args.card else None
    entry = LicenseIndex(args.index).add(
        model,
        name=args.name,
        license=args.license,
        source=args.source,
        card=card,
        allow_empty=args.allow_empty,
    )
    if args.json:
        print(json.dumps(entry, sort_keys=True))
        return 0
    found = entry.get("found") or {}
    line = f"indexed {entry['name']} ({entry['license']}) as {entry['id']}: "
    if found:
        line += (
            f"{found['learned_tensors']} learned tensors, {found['parameters']:,} parameters, "
            f"{found['format']} stored as {', '.join(found['storage']) or '-'}, in {found['graphs']} graph(s)"
        )
        if found["fixed_tensors"]:
            line += f"; {found['fixed_tensors']} fixed-by-construction tensors ignored"
    else:
        line += f"{entry['layers']} weight layers"
    print(line)
    return 0


if __name__ == "__main__":  # pragma: no cover - manual use without the composition root
    parser = argparse.ArgumentParser(prog="edgemart")
    register(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args()
    try:
        sys.exit(ns.func(ns))
    except (UsageError, NotFoundError, Refusal) as err:
        print(f"error: {err.diagnostics()}", file=sys.stderr)
        sys.exit(err.exit_code)
