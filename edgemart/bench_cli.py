"""`edgemart bench`: run every benchmark module in bench/ and print one table (or JSON with dotted keys)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from typing import Any

from edgemart.core.errors import UsageError

# Each module exposes run(quick: bool) -> {"dotted.key": {"value", "target", "unit", "met", "note"}}.
MODULES = ("bench.drm", "bench.runtime", "bench.chain", "bench.packagers", "bench.licenses", "bench.store")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("bench", help="run the benchmarks in bench/ side by side")
    p.add_argument("--quick", action="store_true", help="smaller inputs; finishes in minutes on 2 cores")
    p.add_argument("--json", action="store_true", help="print one JSON object with dotted keys")
    p.add_argument("--markdown", action="store_true", help="print the README table (markdown)")
    p.add_argument("--only", default="", help="comma-separated module names, e.g. drm,chain")
    p.add_argument("--save", metavar="FILE", help="also write the JSON results to FILE")
    p.add_argument(
        "--readme",
        metavar="FILE",
        help="also replace the table after <!-- bench-table --> in FILE (markdown)",
    )
    p.add_argument("--note", default="", help="a line about the run (e.g. 'machine shared with 3 test runs')")
    p.set_defaults(func=run)


def _met(value: float, target: str | None) -> bool | None:
    if not target:
        return None
    op, _, num = target.partition(" ")
    bound = float(num)
    return (
        value <= bound
        if op == "<="
        else value >= bound
        if op == ">="
        else value < bound
        if op == "<"
        else value > bound
    )


def collect(quick: bool, only: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for module in MODULES:
        short = module.split(".", 1)[1]
        if only and short not in only:
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                continue
            raise
        sys.stderr.write(f"bench: {short} ...\n")
        t0 = time.perf_counter()
        figures = mod.run(quick)
        for key, fig in figures.items():
            fig = dict(fig)
            if fig.get("met") is None and isinstance(fig.get("value"), (int, float)):
                fig["met"] = _met(float(fig["value"]), fig.get("target"))
            results[key] = fig
        sys.stderr.write(f"bench: {short} done in {time.perf_counter() - t0:.1f}s\n")
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = ["| figure | value | target | met | note |", "|---|---|---|---|---|"]
    for key in sorted(results):
        f = results[key]
        v = f.get("value")
        val = f"{v:.4g}" if isinstance(v, float) else str(v)
        unit = f.get("unit") or ""
        met = {True: "yes", False: "**no**", None: "–"}[f.get("met")]
        lines.append(f"| `{key}` | {val} {unit} | {f.get('target') or '–'} | {met} | {f.get('note', '')} |")
    return "\n".join(lines)


TABLE_START, TABLE_END = "<!-- bench-table -->", "<!-- /bench-table -->"


def _machine(load_before: tuple[float, float, float]) -> dict[str, Any]:
    """Where the figures were measured: they are ratios, but a busy machine still widens them."""
    import platform

    import numpy as np

    versions = {"numpy": np.__version__}
    for module in ("onnxruntime", "ai_edge_litert", "cryptography"):
        try:
            versions[module] = importlib.import_module(module).__version__
        except (ImportError, AttributeError):
            pass
    return {
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "load_avg_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "versions": versions,
    }


def write_readme_table(
    path: str, results: dict[str, Any], machine: dict[str, Any], note: str, *, quick: bool
) -> None:
    """Replace the lines between TABLE_START and TABLE_END (or the next blank line) in ``path``."""
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    if TABLE_START not in lines:
        raise UsageError(f"{path} has no {TABLE_START} line to put the table after")
    start = lines.index(TABLE_START) + 1
    end = lines.index(TABLE_END) if TABLE_END in lines else lines.index("", start)
    load = machine["load_avg_1min_before_after"]
    header = (
        f"`edgemart bench{' --quick' if quick else ''}`: {machine['cpus']} CPUs {machine['machine']}, Python "
        f"{machine['python']}, load average {load[0]} before / {load[1]} after"
        + (f"; {note}" if note else "")
        + "."
    )
    lines[start:end] = [header, "", markdown(results)]
    if TABLE_END not in lines:
        lines.insert(start + 3, TABLE_END)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))


def run(args: argparse.Namespace) -> int:
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    known = {m.split(".", 1)[1] for m in MODULES}
    unknown = set(only) - known
    if unknown:
        raise UsageError(f"unknown benchmark module(s) {sorted(unknown)}; choose from {sorted(known)}")
    load_before = os.getloadavg()
    results = collect(args.quick, only)
    doc = {"quick": bool(args.quick), "figures": results, "machine": _machine(load_before), "note": args.note}
    if args.readme:
        write_readme_table(args.readme, results, doc["machine"], args.note, quick=bool(args.quick))
    if args.save:
        with open(args.save, "w") as fh:
            json.dump(doc, fh, indent=1, sort_keys=True)
    if args.json:
        print(json.dumps(doc, sort_keys=True))
    elif args.markdown:
        print(markdown(results))
    else:
        width = max((len(k) for k in results), default=10)
        for key in sorted(results):
            f = results[key]
            v = f.get("value")
            val = f"{v:.4g}" if isinstance(v, float) else str(v)
            met = {True: "met", False: "MISSED", None: ""}[f.get("met")]
            print(
                f"{key:<{width}}  {val:>10} {f.get('unit') or '':<5} {f.get('target') or '':<8} {met:<6} {f.get('note', '')}"
            )
    return 0
