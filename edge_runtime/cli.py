# Why this is one module: every `edgemart device` command's argument parsing and output, each handler a few lines over Device, the service client and evaluation.
"""`edgemart device ...`: init, enroll, add-fleet-key, activate, fetch, install, eval, sync, verify-log, status; all
but init on a --device-dir directly or through the device service (--service SOCKET, or its default socket).

Only the standard library and drm.errors are imported at module level; handlers import the runtime."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
from pathlib import Path
from typing import Any

from edgemart.core.errors import UsageError
from edgemart.core.output import emit


def register(subparsers: Any) -> None:
    device = subparsers.add_parser(
        "device", help="on-device runtime: enroll, fetch, evaluate licensed models"
    )
    sub = device.add_subparsers(dest="device_command", metavar="COMMAND")
    sub.required = True

    def add(name: str, handler: Any, help_text: str, *, service: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "--device-dir",
            required=not service,
            type=Path,
            help="the device directory, used directly by this process (single-user boards)",
        )
        if service:
            p.add_argument(
                "--service",
                metavar="SOCKET",
                help="use the device service at this unix socket (default: $EDGEMART_DEVICE_SOCKET, else"
                " /run/edgemart-device/device.sock when the service runs)",
            )
        p.set_defaults(func=handler)
        return p

    p = add("init", _init, "offline: make the device keypairs and a self-signed certificate", service=False)
    p.add_argument("--trust", type=Path, help="pin this store root certificate (PEM/DER)")
    p.add_argument(
        "--anchor",
        choices=("file", "tpm"),
        default="file",
        help="rollback anchor: a sealed file outside the device dir (default) or a TPM 2.0 NV counter",
    )
    p.add_argument("--tpm-nv-index", default="0x01500e00", help="with --anchor tpm: the NV index to define")
    p.add_argument(
        "--tpm-tcti", help="with --anchor tpm: TCTI (default: $TPM2TOOLS_TCTI, else the kernel device)"
    )
    p.add_argument("--json", action="store_true")

    p = add("enroll", _enroll, "send a CSR to the store; store its certificate and pin its root")
    p.add_argument("--store", required=True, help="store URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--token", required=True, help="API token")
    p.add_argument("--name", help="a name for this device at the store")
    p.add_argument("--json", action="store_true")

    p = add(
        "add-fleet-key",
        _add_fleet_key,
        "install a fleet's X25519 private key (PEM) as DIR/fleet/<fleet key id>.key, 0600,"
        " so licenses bound to that fleet install and run here",
    )
    p.add_argument("key", type=Path, metavar="KEY.pem", help="the fleet's X25519 private key (PKCS#8 PEM)")
    p.add_argument("--json", action="store_true")

    p = add(
        "activate",
        _activate,
        "claim a seat of a fleet license for this device at the store (or install an activation token from"
        " a file with --activation); a fleet license runs only on an activated device",
    )
    p.add_argument("license_id", metavar="LICENSE_ID", nargs="?", help="the fleet license to activate")
    p.add_argument("--store", help="store URL (default: the one this device enrolled with)")
    p.add_argument("--token", help="API token of the license holder (default: the enrollment's)")
    p.add_argument(
        "--activation", type=Path, metavar="FILE.act", help="offline: install this activation token"
    )
    p.add_argument("--json", action="store_true")

    p = add("fetch", _fetch, "get an evaluation license and the encrypted build of a listing")
    p.add_argument("listing")
    p.add_argument("--target", required=True)
    p.add_argument(
        "--version", type=_version, metavar="V", help="a listed version of LISTING (default: the newest)"
    )
    p.add_argument("--json", action="store_true")

    p = add("install", _install, "sideload an encrypted build and its license")
    p.add_argument("--build", required=True, type=Path)
    p.add_argument("--license", required=True, type=Path)
    p.add_argument("--listing", help="name to install it under (default: the license's listing)")
    p.add_argument("--json", action="store_true")

    p = add("eval", _eval, "evaluate a licensed model on your data (accuracy, latency, memory)")
    p.add_argument("listing", nargs="?", help="an installed listing (or use --build and --license)")
    p.add_argument("--target", help="which installed build of LISTING (needed when several are fetched)")
    p.add_argument(
        "--version",
        type=_version,
        metavar="V",
        help="which installed version of LISTING (default: the newest fetched for the target)",
    )
    p.add_argument("--build", type=Path, help="sideload: encrypted build (.emdl)")
    p.add_argument("--license", type=Path, help="sideload: license file")
    p.add_argument(
        "--data",
        required=True,
        type=Path,
        help=".npz: one array per input (or x), optional labels y; or a .npy for a single-input model",
    )
    p.add_argument(
        "--state",
        action="append",
        default=[],
        metavar="IN=OUT",
        help="recurrent state: input IN gets output OUT of the step before (pairs like state/stateN, h0/hn "
        "are detected); the data then holds sequences, with an optional sequence_start array",
    )
    p.add_argument("--reference", type=Path, help=".npz of reference outputs keyed by output name")
    p.add_argument(
        "--compare",
        metavar="TARGET",
        help="also run this installed build of LISTING (e.g. onnx-fp32) on the same data and report both side"
        " by side with their agreement (text, --json, --html)",
    )
    p.add_argument("--save-outputs", type=Path, help="write the model outputs to this .npz")
    p.add_argument("--html", type=Path, help="write a self-contained HTML report here")
    p.add_argument("--batch-size", type=int, help="samples per call when the batch dimension is dynamic")
    p.add_argument("--warmup", type=int, default=3, help="warm-up calls (each is a licensed run; default 3)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true")

    p = add("sync", _sync, "upload the usage log to the store")
    p.add_argument("--json", action="store_true")

    p = add("verify-log", _verify_log, "verify the signed, hash-chained usage log offline")
    p.add_argument("--json", action="store_true")

    p = add("status", _status, "device id, licenses, runs left, expiry")
    p.add_argument("--json", action="store_true")

    importlib.import_module("edge_runtime.service.cli").register(sub)  # serve, install-service

    # Hook for the slot-chain runner (`device run`), owned by edge_runtime.chain.cli when present.
    if importlib.util.find_spec("edge_runtime.chain.cli") is not None:
        importlib.import_module("edge_runtime.chain.cli").register_run(sub)


def _version(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) < 2**31:
        raise argparse.ArgumentTypeError(f"a version is a positive integer, got {text!r}")
    return int(text)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"{what} {path} is a directory") from None


def _backend(args: argparse.Namespace, *, init: bool = False) -> Any:
    """The device the command talks to: this process on --device-dir, or the device service."""
    from edge_runtime.service.client import ServiceClient, service_socket

    explicit = args.service
    if args.device_dir is not None:
        if explicit:
            raise UsageError("give either --device-dir (direct) or --service (the device service), not both")
        from edge_runtime.device import Device

        return _open_or_init(args.device_dir) if init else Device.open(args.device_dir)
    path = service_socket(explicit)
    if path is None:
        raise UsageError(
            "give --device-dir DIR, or --service SOCKET for the device service (none runs at the default socket)"
        )
    return ServiceClient(path)


def _init(args: argparse.Namespace) -> int:
    from edge_runtime.anchor import TpmAnchor, parse_nv_index
    from edge_runtime.device import Device

    trust = _read(args.trust, "--trust") if args.trust else None
    tpm = TpmAnchor(parse_nv_index(args.tpm_nv_index), args.tpm_tcti) if args.anchor == "tpm" else None
    device = Device.init(args.device_dir, trust=trust, tpm=tpm)
    anchor = device.ledger.anchor.describe()
    emit(
        args,
        {
            "device_id": device.device_id,
            "device_dir": str(device.dir),
            "root_pinned": trust is not None,
            "anchor": anchor,
        },
        f"initialized device {device.device_id} in {device.dir}, rollback anchor: {anchor}"
        + ("" if trust else " (no store root pinned yet: enroll, or init with --trust)"),
    )
    return 0


def _open_or_init(directory: Path) -> Any:
    from edge_runtime.device import Device

    if not (directory / "sign.key").exists():
        return Device.init(directory)
    return Device.open(directory)


def _enroll(args: argparse.Namespace) -> int:
    device = _backend(args, init=True)
    result = device.enroll(args.store, args.token, name=args.name)
    emit(args, result, f"enrolled device {result['device_id']} with {result['store']}")
    return 0


def _add_fleet_key(args: argparse.Namespace) -> int:
    from edge_runtime.device import MAX_FLEET_KEY_BYTES

    device = _backend(args)
    if args.key.is_file() and args.key.stat().st_size > MAX_FLEET_KEY_BYTES:
        raise UsageError(f"fleet key {args.key} is larger than {MAX_FLEET_KEY_BYTES} bytes")
    result = device.add_fleet_key(_read(args.key, "fleet key"))
    emit(
        args,
        result,
        f"device {result['device_id']} holds fleet key {result['fleet_key_id']} in {result['path']} (0600)"
        + (" (replaced)" if result["replaced"] else "")
        + f"\n{args.key} is not needed on this device any more: keep it only where fleet keys are kept",
    )
    return 0


def _activate(args: argparse.Namespace) -> int:
    from edge_runtime.device import MAX_ACTIVATION_BYTES

    device = _backend(args)
    if args.activation is not None:
        if args.license_id is not None or args.store is not None:
            raise UsageError("give either --activation FILE (offline) or LICENSE_ID (online), not both")
        if args.activation.is_file() and args.activation.stat().st_size > MAX_ACTIVATION_BYTES:
            raise UsageError(f"{args.activation} is larger than {MAX_ACTIVATION_BYTES} bytes")
        result = device.install_activation(_read(args.activation, "--activation"))
    elif args.license_id is None:
        raise UsageError("give LICENSE_ID (online activation) or --activation FILE")
    else:
        result = device.activate(args.license_id, store=args.store, token=args.token)
    emit(
        args,
        result,
        f"device {result['device_id']} holds seat {result['seat']} of fleet license {result['license_id']}",
    )
    return 0


def _fetch(args: argparse.Namespace) -> int:
    entry = _backend(args).fetch(args.listing, args.target, version=args.version)
    emit(
        args,
        entry,
        f"installed {entry['listing']} version {entry['version']} ({entry['target']})"
        f" license {entry['license_id']}",
    )
    return 0


def _install(args: argparse.Namespace) -> int:
    entry = _backend(args).install(
        build=_read(args.build, "--build"), license=_read(args.license, "--license"), listing=args.listing
    )
    emit(args, entry, f"installed {entry['listing']} ({entry['target']}) license {entry['license_id']}")
    return 0


def _load_npz(path: Path, what: str) -> dict[str, Any]:
    """Arrays keyed by name from an .npz, or a lone .npy array as ``x`` (the single-input key)."""
    from edge_runtime.service.wire import load_arrays

    try:
        with open(path, "rb") as fp:
            return load_arrays(fp, f"{what} {path}", name=path.name)
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"{what} {path} is a directory") from None
    except OSError as exc:
        raise UsageError(f"{what} {path} is not a readable .npz or .npy file: {exc}") from None


def _eval(args: argparse.Namespace) -> int:
    from edge_runtime.evaluation.evaluate import ProgressBar
    from edge_runtime.evaluation.session import EvalRequest, run_eval

    sideload = args.build is not None or args.license is not None
    if sideload and (args.build is None or args.license is None):
        raise UsageError("sideload needs both --build and --license")
    if sideload == (args.listing is not None):
        raise UsageError("give either a LISTING or --build and --license")
    if sideload and (args.target or args.version):
        raise UsageError(
            "--target and --version pick an installed build of a LISTING; a sideloaded --build is one build"
        )
    if args.compare and (sideload or args.reference):
        raise UsageError(
            "--compare runs two installed builds of a LISTING; it takes no --build or --reference"
        )
    if args.compare and not args.target:
        raise UsageError("--compare needs --target: the build to compare with the --compare baseline")
    if args.compare and args.compare == args.target:
        raise UsageError(f"--compare {args.compare} is the --target itself; name another installed build")
    data = _load_npz(args.data, "--data")
    reference = _load_npz(args.reference, "--reference") if args.reference else None
    request = EvalRequest(
        listing=args.listing,
        target=args.target,
        version=args.version,
        compare=args.compare,
        warmup=args.warmup,
        batch_size=args.batch_size,
        state=tuple(args.state),
        single_array=args.data.suffix == ".npy",
        want_outputs=args.save_outputs is not None,
        want_html=args.html is not None,
    )
    device = _backend(args)
    if not hasattr(device, "open_model"):  # the device service: it reads the data we send it, nothing else
        if sideload:
            raise UsageError(
                "through the device service, install the build first (`edgemart device install`) and"
                " evaluate it by LISTING"
            )
        from edge_runtime.service.wire import encode_arrays as npz

        result = device.evaluate(request, npz(data), None if reference is None else npz(reference))
    else:
        result = run_eval(
            device,
            request,
            data,
            reference=reference,
            build_path=args.build,
            license_bytes=_read(args.license, "--license") if sideload else None,
            progress=None if args.quiet else ProgressBar,
        )
    if args.save_outputs:
        import numpy as np

        np.savez(args.save_outputs, **result.outputs)  # type: ignore[arg-type]
    if args.html:
        args.html.write_text(result.html or "", encoding="utf-8")
    emit(args, result.report, result.text + (f"\nhtml       {args.html}" if args.html else ""))
    return 0


def _sync(args: argparse.Namespace) -> int:
    result = _backend(args).sync()
    store = result["store"]
    emit(
        args,
        result,
        f"uploaded {result['uploaded']} usage records; store: ok={store.get('ok')}"
        f" accepted={store.get('accepted')}"
        + (f" first_bad={store.get('first_bad')} ({store.get('reason')})" if not store.get("ok") else ""),
    )
    return 0 if store.get("ok") else 1


def _verify_log(args: argparse.Namespace) -> int:
    result = _backend(args).verify_log()
    if result["ok"]:
        text = f"usage log OK: {result['records']} records " + json.dumps(result["events"], sort_keys=True)
    else:
        text = f"usage log BAD at line {result['first_bad']}: {result['reason']} ({result['records']} good records before it)"
    if not result["matches_state"]:
        text += f"\nstate: {result['state_problem']}"
    emit(args, result, text)
    return 0 if result["ok"] and result["matches_state"] else 1


def _status(args: argparse.Namespace) -> int:
    st = _backend(args).status()
    lines = [
        f"device     {st['device_id']}",
        f"cert       {st['certificate']}",
        f"root       {'pinned' if st['root_pinned'] else 'NOT pinned'}",
        f"store      {st['store'] or '-'}",
        f"anchor     {st['anchor']['where']}"
        + (
            " (protects against restoring the device dir alone, not a user who also restores the anchor file)"
            if st["anchor"]["kind"] == "file"
            else " (hardware monotonic counter: a restored state is refused)"
        ),
    ]
    state = st["state"]
    lines.append(
        f"state      {'ok' if state['ok'] else 'REFUSING: ' + state['problem']}"
        + (
            f" (generation {state['generation']}, {state['usage_records']} usage records)"
            if state["ok"]
            else ""
        )
    )
    if st.get("fleet_key_problem"):
        lines.append(f"fleet      PROBLEM: {st['fleet_key_problem']}")
    for kid in st.get("fleet_keys", []):
        lines.append(f"fleet      {kid}")
    for lic in st["licenses"]:
        if "error" in lic:
            lines.append(f"license    {lic['file']}: {lic['error']}")
            continue
        left = (
            "unlimited" if lic["max_runs"] is None else f"{lic['runs_left']} of {lic['max_runs']} runs left"
        )
        expiry = (
            "no expiry"
            if lic["expires"] is None
            else ("EXPIRED " if lic["expired"] else "expires ") + lic["expires"]
        )
        seat = ""
        if "seat" in lic:
            seat = f"  seat {lic['seat']}" if lic["seat"] else "  NOT ACTIVATED (edgemart device activate)"
        lines.append(
            f"license    {lic['license_id']}  {lic['listing']}  {lic['kind']}  {lic['target']}  {left}  {expiry}"
            + seat
        )
    if not st["licenses"]:
        lines.append("license    none installed")
    emit(args, st, "\n".join(lines))
    return 0
