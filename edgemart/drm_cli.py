"""`edgemart drm ...`: offline key generation, sealing of a model file and license issuing.

Module top imports only stdlib and drm.errors; drm and store.keyvault load inside the handlers."""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Any

from edgemart.core.errors import LicenseRefused, NotFoundError, UsageError
from edgemart.core.output import emit

_LISTING = re.compile(r"[^A-Za-z0-9._:\-]+")


def register(subparsers: Any) -> None:
    """Add the ``drm`` command group to an argparse subparsers object."""
    drm_p = subparsers.add_parser("drm", help="keys, sealed containers and licenses (offline)")
    sub = drm_p.add_subparsers(dest="drm_command", required=True)

    p = sub.add_parser("keygen", help="create the store's root CA, license issuer and key-encryption key")
    p.add_argument("--out", required=True, metavar="DIR", help="key directory (created 0700)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("seal", help="encrypt a model file into an .emdl container")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--out", required=True, metavar="FILE.emdl")
    p.add_argument("--key-dir", required=True, metavar="DIR", help="key directory from `drm keygen`")
    p.add_argument(
        "--target", default=None, help="target id recorded in the header (default from the file type)"
    )
    p.add_argument("--chunk-size", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_seal)

    p = sub.add_parser("issue", help="issue a license for a sealed build to one device")
    p.add_argument("--build", required=True, metavar="FILE.emdl")
    p.add_argument("--device-cert", required=True, metavar="CERT")
    p.add_argument("--issuer-dir", required=True, metavar="DIR")
    p.add_argument("--days", required=True, type=float, metavar="D")
    p.add_argument("--max-runs", required=True, type=int, metavar="N")
    p.add_argument("--out", required=True, metavar="LICENSE")
    p.add_argument("--kind", choices=("eval", "production"), default="eval")
    p.add_argument(
        "--listing", default=None, metavar="NAME", help="listing id (default: the build file's name)"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_issue)


def _atomic_write(path: Path, produce: Any, mode: int = 0o644) -> None:
    """Call ``produce(file)`` on a temp file beside ``path``; rename on success, delete on any failure."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise NotFoundError(f"output directory {parent} does not exist")
    from edgemart.core.fileio import atomic_write

    atomic_write(path, produce, mode=mode)


def _media_type(path: Path, head: bytes) -> tuple[str, str]:
    """(media type, default target) from the file's magic bytes."""
    if head[4:8] == b"TFL3":
        return "application/vnd.tflite", "tflite"
    if path.suffix.lower() == ".onnx":
        return "application/vnd.onnx", "onnx-fp32"
    return "application/octet-stream", "raw"


def cmd_keygen(args: argparse.Namespace) -> int:
    from store.keyvault import FileKeyVault

    vault = FileKeyVault(args.out).ensure(int(time.time()))
    issuer = vault.issuer()
    obj = {"dir": str(Path(args.out).resolve()), "issuer_kid": issuer.kid, "pq": issuer.pq_key is not None}
    emit(args, obj, f"key directory ready: {obj['dir']} (issuer {issuer.kid})")
    return 0


def _wrapped_path(key_dir: Path, build_hash: str) -> Path:
    return key_dir / "ceks" / (build_hash.split(":", 1)[1] + ".wrapped")


def cmd_seal(args: argparse.Namespace) -> int:
    import hashlib

    import drm
    from edgemart.core.fileio import atomic_write
    from store.keyvault import FileKeyVault

    model, out = Path(args.model), Path(args.out)
    if not model.is_file():
        raise NotFoundError(f"model file {model} not found")
    vault = FileKeyVault(args.key_dir)
    vault.authority()  # fail early with a clear message if the key dir is not set up
    size = model.stat().st_size
    hasher = hashlib.sha256()
    with model.open("rb") as fh:
        head = fh.read(8)
        hasher.update(head)
        for block in iter(lambda: fh.read(1 << 20), b""):
            hasher.update(block)
    build_hash = "sha256:" + hasher.hexdigest()
    media_type, default_target = _media_type(model, head)
    target = args.target or default_target

    # One CEK per build. Resealing the same bytes reuses its CEK so licenses already issued stay valid.
    wrapped_path = _wrapped_path(Path(args.key_dir), build_hash)
    if wrapped_path.is_file():
        cek = vault.unwrap_cek(wrapped_path.read_bytes(), build_hash)
    else:
        cek = drm.generate_content_key()
        wrapped_path.parent.mkdir(mode=0o700, exist_ok=True)
        atomic_write(wrapped_path, vault.wrap_cek(cek, build_hash))

    def produce(dst: Any) -> None:
        with model.open("rb") as src:
            drm.seal_stream(
                src,
                dst,
                key=cek,
                plaintext_len=size,
                build_hash=build_hash,
                target=target,
                media_type=media_type,
                chunk_size=args.chunk_size,
            )
            if src.read(1):
                raise UsageError(f"{model} grew while it was being sealed")

    _atomic_write(out, produce)
    obj = {"build_hash": build_hash, "target": target, "out": str(out), "plaintext_len": size}
    emit(args, obj, f"sealed {model} -> {out} ({build_hash}, target {target})")
    return 0


def _read_header(path: Path) -> Any:
    import drm

    if not path.is_file():
        raise NotFoundError(f"build file {path} not found")
    with path.open("rb") as fh:
        prefix = fh.read(drm.container.PREFIX_SIZE)
        need = drm.header_size(prefix)
        return drm.read_header(prefix + fh.read(need - len(prefix)))


def _device_cert(path: Path, root: Any, now: int) -> Any:
    """A device certificate issued by our root, or a self-signed one from `device init` (self-signature checked)."""
    import drm

    if not path.is_file():
        raise NotFoundError(f"device certificate {path} not found")
    cert = drm.cert_from_bytes(path.read_bytes())
    if cert.issuer == root.subject:
        anchor = root
    elif cert.issuer == cert.subject:
        anchor = cert  # self-signed: proves possession of the device key, nothing more
    else:
        raise UsageError("device certificate is neither from this store's root nor self-signed")
    try:
        drm.verify_cert(cert, anchor, now=now, purpose=drm.EKU_DEVICE)
    except LicenseRefused as exc:
        raise UsageError(f"device certificate rejected: {exc.reason}") from None
    return cert


def cmd_issue(args: argparse.Namespace) -> int:
    import drm
    from store.keyvault import FileKeyVault

    now = int(time.time())
    if args.days <= 0 or args.max_runs < 0:
        raise UsageError("--days must be > 0 and --max-runs >= 0")
    vault = FileKeyVault(args.issuer_dir)
    header = _read_header(Path(args.build))
    cert = _device_cert(Path(args.device_cert), vault.authority().cert, now)
    kem = drm.cert_kem_keys(cert)
    device_id = drm.cert_device_id(cert)
    wrapped_path = _wrapped_path(Path(args.issuer_dir), header.build_hash)
    if not wrapped_path.is_file():
        raise NotFoundError(
            f"no content key for {header.build_hash} in {args.issuer_dir} (was it sealed there?)"
        )
    cek = vault.unwrap_cek(wrapped_path.read_bytes(), header.build_hash)
    listing = args.listing or _LISTING.sub("-", Path(args.build).stem)[:128] or "listing"
    token = drm.issue_license(
        issuer=vault.issuer(),
        cek=cek,
        recipient=kem,
        kind=args.kind,
        listing=listing,
        build_hash=header.build_hash,
        target=header.target,
        now=now,
        days=args.days,
        max_runs=args.max_runs,
        device_id=device_id,
    )
    claims = drm.license.LicenseClaims.from_dict(drm.parse_envelope(token, drm.license.LICENSE_TYP)[0])
    _atomic_write(Path(args.out), lambda fh: fh.write(token))
    obj = {
        "license_id": claims.license_id,
        "device_id": device_id,
        "build_hash": header.build_hash,
        "not_after": claims.not_after,
        "max_runs": claims.max_runs,
        "out": str(args.out),
    }
    emit(args, obj, f"issued {claims.license_id} for device {device_id} -> {args.out}")
    return 0
