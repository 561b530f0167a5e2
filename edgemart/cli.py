"""The `edgemart` command: maps command groups to the package that owns them and errors to exit codes.

Only the group named on the command line is imported, so `edgemart device ...` never loads
flask, onnx or the packagers on a dev board."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from edgemart.core.errors import EdgemartError, LicenseRefused
from edgemart.core.progress import clear_all

# group -> (module providing register(subparsers), one-line help)
GROUPS: dict[str, tuple[str, str]] = {
    "store": ("store.cli", "run the store server, create users"),
    "seller": ("store.cli", "upload models to a store"),
    "device": ("edge_runtime.cli", "device side: init, enroll, fetch, eval, run chains, sync usage"),
    "package": ("packagers.cli", "quantize and package a model for a target, offline"),
    "licenses": ("licenses.cli", "license-compliance check and open-model index"),
    "drm": ("edgemart.drm_cli", "offline key generation, sealing and license issuing"),
    "bundle": ("edgemart.bundle_cli", "firmware bundles: build, verify, install"),
    "bench": ("edgemart.bench_cli", "run the benchmarks in bench/ side by side"),
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) instead of a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def build_parser(group: str | None) -> argparse.ArgumentParser:
    parser = _Parser(prog="edgemart", description="A store for ML model IP aimed at edge devices.")
    parser.add_argument("--version", action="version", version="edgemart 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    if group is None:  # top-level help: list the groups without importing any of them
        for name, (_, help_text) in GROUPS.items():
            sub.add_parser(name, help=help_text, add_help=False)
    else:
        importlib.import_module(GROUPS[group][0]).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    group = next((a for a in args_list if not a.startswith("-")), None)
    if group is not None and group not in GROUPS:
        sys.stderr.write(f"edgemart: error: unknown command {group!r} (choose from {', '.join(GROUPS)})\n")
        return 2
    try:
        return _run(group, args_list)
    finally:
        clear_all()  # a progress line still drawn must not run into what the shell prints next


def _run(group: str | None, args_list: list[str]) -> int:
    try:
        parser = build_parser(group)
        args = parser.parse_args(args_list)
        func = getattr(args, "func", None)
        if func is None:
            if group is None:
                parser.print_help()
                return 0 if not args_list else 2
            parser.parse_args([group, "--help"])
            return 2
        return int(func(args) or 0)
    except LicenseRefused as exc:
        _error(f"edgemart: {exc.message}")
        return exc.exit_code
    except EdgemartError as exc:
        _error(f"edgemart: {'refused' if exc.exit_code == 1 else 'error'}: {exc.diagnostics()}")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("edgemart: interrupted\n")
        return 130
    except BrokenPipeError:
        return 0
    except OSError as exc:
        # File-system problems on user-supplied paths are bad input, not crashes.
        _error(f"edgemart: error: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
        return 2
    except Exception as exc:  # noqa: BLE001 - last resort: one line, full trace only on request
        if os.environ.get("EDGEMART_DEBUG"):
            raise
        _error(
            f"edgemart: internal error: {exc.__class__.__name__}: {exc} (set EDGEMART_DEBUG=1 for a trace)"
        )
        return 70


def _error(line: str) -> None:
    """The one error line, on a clean line of stderr (any progress line wiped first)."""
    clear_all()
    sys.stderr.write(line + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
