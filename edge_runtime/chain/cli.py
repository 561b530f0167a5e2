"""`edgemart device run`: run a slot chain over a batch, a directory or a stdin stream of frames.

Registered into the `device` group by edge_runtime.cli; imports only stdlib and drm.errors at the
top so `edgemart device --help` stays light."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgemart.core.errors import UsageError


def register_run(device_subparsers: Any) -> None:
    p = device_subparsers.add_parser(
        "run",
        help="run a chain of licensed models (one process per vendor, shared-memory slots)",
        description="Run a slot chain over inputs and report per-stage latency and throughput.",
    )
    p.add_argument("--device-dir", help="the initialized device directory, used directly by this process")
    p.add_argument(
        "--service",
        metavar="SOCKET",
        help="run the chain in the device service at this socket (default: $EDGEMART_DEVICE_SOCKET, else the"
        " standard socket when the service runs); its stages name installed listings",
    )
    p.add_argument("--chain", required=True, help="chain description file (.yaml, .yml or .json)")
    p.add_argument(
        "--input",
        required=True,
        help="an .npz batch (first axis = frames), a directory of .npy/.npz frames, or '-' for .npy on stdin",
    )
    p.add_argument(
        "--input-key",
        action="append",
        default=[],
        metavar="INPUT=KEY",
        help="read chain input INPUT from the .npz array KEY (repeatable)",
    )
    p.add_argument(
        "--save-outputs", metavar="OUT.npz", help="write the chain outputs, frames stacked on axis 0"
    )
    p.add_argument("--limit", type=int, default=None, help="stop after this many frames")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=_run)


class _Unseekable:
    """stdin as a plain reader: numpy's fromfile fast path needs a seekable file, a pipe is not."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw

    def read(self, n: int = -1) -> bytes:
        return bytes(self._raw.read(n))

    def more(self) -> bool:
        return bool(self._raw.peek(1)) if hasattr(self._raw, "peek") else True


def _one_input(names: list[str], what: str) -> str:
    if len(names) != 1:
        raise UsageError(
            f"{what} holds one array per frame, but the chain has inputs {', '.join(names)}: use .npz frames"
        )
    return names[0]


def iter_frames(
    path: str, input_names: list[str], keys: dict[str, str] | None = None
) -> Iterator[dict[str, Any]]:
    """Frames from an .npz batch, a directory of .npy/.npz files, or '-' (concatenated .npy on stdin)."""
    import numpy as np

    if path == "-":
        name = _one_input(input_names, "stdin")
        stream = _Unseekable(sys.stdin.buffer)
        while stream.more():
            try:
                array = np.lib.format.read_array(stream, allow_pickle=False)
            except ValueError as exc:
                raise UsageError(f"stdin: not a stream of .npy arrays: {exc}") from None
            yield {name: array}
        return
    source = Path(path)
    if source.is_dir():
        files = sorted(f for f in source.iterdir() if f.suffix in (".npy", ".npz"))
        if not files:
            raise UsageError(f"{source}: no .npy or .npz files")
        for f in files:
            _check_sample_file(f)
            if f.suffix == ".npy":
                yield {_one_input(input_names, str(f)): np.load(f, allow_pickle=False)}
            else:
                with np.load(f, allow_pickle=False) as data:
                    yield _pick(dict(data), input_names, str(f), keys or {})
        return
    if not source.is_file():
        raise UsageError(f"input not found: {source}")
    _check_sample_file(source)
    try:
        with np.load(source, allow_pickle=False) as data:
            batch = _pick(dict(data), input_names, str(source), keys or {})
    except (ValueError, OSError) as exc:
        raise UsageError(f"{source}: not a readable .npz file: {exc}") from None
    counts = {name: len(a) if a.ndim else 0 for name, a in batch.items()}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise UsageError(f"{source}: inputs must share a non-empty first (frame) axis, got {counts}")
    for i in range(next(iter(counts.values()))):
        yield {name: a[i : i + 1] for name, a in batch.items()}


def _pick(data: dict[str, Any], input_names: list[str], where: str, keys: dict[str, str]) -> dict[str, Any]:
    data = {**data, **{name: data[key] for name, key in keys.items() if key in data}}
    if len(input_names) == 1 and input_names[0] not in data:
        for alias in ("x", *(k for k in data if len(data) == 1)):
            if alias in data:
                return {input_names[0]: data[alias]}
    missing = [n for n in input_names if n not in data]
    if missing:
        raise UsageError(
            f"{where}: missing chain input(s) {', '.join(missing)} (file has {', '.join(data) or 'nothing'})"
        )
    return {n: data[n] for n in input_names}


def _run(args: argparse.Namespace) -> int:
    import numpy as np

    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1")
    keys: dict[str, str] = {}
    for item in args.input_key:
        name, sep, key = item.partition("=")
        if not sep or not name or not key:
            raise UsageError(f"--input-key {item!r}: expected INPUT=KEY")
        keys[name] = key
    outputs: dict[str, list[Any]] = {}
    if args.device_dir is None or args.service:
        report = _run_in_service(args, keys, outputs)
    else:
        report = _run_here(args, keys, outputs)
    if args.save_outputs:
        stacked = {k: np.concatenate(v) if v[0].ndim else np.stack(v) for k, v in outputs.items()}
        np.savez(args.save_outputs, **stacked)  # type: ignore[arg-type]
        report["saved_outputs"] = str(args.save_outputs)
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        print(_text(report))
    return 0


def _run_in_service(
    args: argparse.Namespace, keys: dict[str, str], outputs: dict[str, list[Any]]
) -> dict[str, Any]:
    """The service runs the chain as its own account; we send frames and collect results."""
    import itertools

    from edge_runtime.service.client import ServiceClient, service_socket

    if args.device_dir is not None:
        raise UsageError("give either --device-dir (direct) or --service (the device service), not both")
    path = service_socket(args.service)
    if path is None:
        raise UsageError(
            "give --device-dir DIR, or --service SOCKET for the device service (none runs at the default socket)"
        )
    chain_path = Path(args.chain)
    try:
        text = chain_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"chain file not found: {chain_path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read chain file {chain_path}: {exc}") from None

    def frames_for(names: list[str]) -> Any:
        unknown = sorted(set(keys) - set(names))
        if unknown:
            raise UsageError(f"--input-key: {unknown[0]!r} is not a chain input (inputs: {', '.join(names)})")
        frames = iter_frames(args.input, names, keys)
        return frames if args.limit is None else itertools.islice(frames, args.limit)

    results, final = ServiceClient(path).run_chain(text, chain_path.name, frames_for)
    for result in results:
        if args.save_outputs:
            for key, value in result.items():
                outputs.setdefault(key, []).append(value)
    return dict(final["report"])


def _run_here(
    args: argparse.Namespace, keys: dict[str, str], outputs: dict[str, list[Any]]
) -> dict[str, Any]:
    import itertools

    from edge_runtime.chain import Chain

    with Chain.from_file(args.chain, args.device_dir) as chain:
        names = sorted(chain.input_types)
        unknown = sorted(set(keys) - set(names))
        if unknown:
            raise UsageError(f"--input-key: {unknown[0]!r} is not a chain input (inputs: {', '.join(names)})")
        frames = iter_frames(args.input, names, keys)
        if args.limit is not None:
            frames = itertools.islice(frames, args.limit)
        for result in chain.run_many(frames):
            if args.save_outputs:
                for key, value in result.items():
                    outputs.setdefault(key, []).append(value)
        report = {
            "chain": chain.spec.name,
            "processes": {p: s for p, s in chain.processes.items()},
            **chain.stats.report(),
        }
    return report


def _text(report: dict[str, Any]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f} ms"

    fps = report["throughput_fps"]
    lines = [
        f"chain {report['chain']}: {report['frames']} frames, "
        f"{'-' if fps is None else f'{fps:.1f}'} frames/s end to end "
        f"(p50 {ms(report['end_to_end']['p50_ms'])}, p99 {ms(report['end_to_end']['p99_ms'])})"
    ]
    for process, stages in report["processes"].items():
        lines.append(f"  process {process}: {', '.join(stages)}")
    for stage, s in report["stages"].items():
        lines.append(
            f"  stage {stage:<16} p50 {ms(s['p50_ms']):>10}  p99 {ms(s['p99_ms']):>10}  ({s['frames']} frames)"
        )
    if "saved_outputs" in report:
        lines.append(f"outputs written to {report['saved_outputs']}")
    return "\n".join(lines)


def _check_sample_file(path: Path) -> None:
    """Sizes, compression ratio and array headers of an input file, checked before numpy inflates it."""
    from edgemart.core.model_safety import check_sample_file

    try:
        with open(path, "rb") as fp:
            check_sample_file(fp, name=path.name)
    except UsageError as exc:
        raise UsageError(f"{path}: refused: {exc.message}") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror}") from None
