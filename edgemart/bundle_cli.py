# Why this is one module: the builder's commands (build, verify, install, buy, fetch, fleet-keygen) share argument parsing, input reading and the atomic output; the store calls live in store.client.
"""`edgemart bundle`: build, verify and install signed, reproducible firmware bundles; make builder keys.

Only stdlib and drm.errors at module top; drm, edge_runtime and licenses load inside the handlers.
The format itself lives in drm.bundle (spec: docs/BUNDLE.md)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from edgemart.core.errors import EdgemartError, UsageError
from edgemart.core.output import emit

DEFAULT_KEY_ENV = "EDGEMART_BUNDLE_KEY"
_MAX_INPUT_BYTES = 1024**3


def register(subparsers: Any) -> None:
    group = subparsers.add_parser("bundle", help="firmware bundles: build, verify, install")
    sub = group.add_subparsers(dest="bundle_command", metavar="SUBCOMMAND", parser_class=type(group))

    keygen = sub.add_parser("keygen", help="create a builder signing key (Ed25519 PEM) and its .pub.pem")
    keygen.add_argument("--out", required=True, type=Path, metavar="KEY.pem")
    keygen.set_defaults(func=_keygen)

    fleet_keygen = sub.add_parser(
        "fleet-keygen",
        help="create a fleet's X25519 key (PEM, 0600) and its .pub.pem: buy seats for the .pub.pem,"
        " install the private key on the fleet's devices with `edgemart device add-fleet-key`",
    )
    fleet_keygen.add_argument("--out", required=True, type=Path, metavar="KEY.pem")
    fleet_keygen.add_argument("--json", action="store_true")
    fleet_keygen.set_defaults(func=_fleet_keygen)

    build = sub.add_parser(
        "build", help="write a signed, reproducible bundle from production licenses and builds"
    )
    build.add_argument("--licenses", required=True, type=Path, metavar="DIR", help="license tokens (*.lic)")
    build.add_argument("--builds", required=True, type=Path, metavar="DIR", help="sealed builds (*.emdl)")
    build.add_argument("--out", required=True, type=Path, metavar="BUNDLE", help="*.tar, or *.tar.gz / *.tgz")
    build.add_argument("--chains", type=Path, metavar="DIR", help="slot-chain files to ship")
    build.add_argument("--cards", type=Path, metavar="DIR", help="model cards named <listing>.md")
    build.add_argument(
        "--signing-key", type=Path, metavar="KEY.pem", help=f"builder key (default: ${DEFAULT_KEY_ENV})"
    )
    build.add_argument(
        "--root", type=Path, metavar="ROOT.crt", help="also verify every license against this root"
    )
    build.add_argument(
        "--release",
        metavar="FLEET:VERSION",
        help="the bundle's signed release: devices refuse a lower VERSION of FLEET than the one installed",
    )
    build.add_argument(
        "--allow-downgrade-from",
        type=int,
        metavar="N",
        help="with --release: this bundle may replace installed releases of FLEET up to N (a signed downgrade)",
    )
    build.add_argument(
        "--activations",
        type=Path,
        metavar="DIR",
        help="seat activation tokens (*.act) to ship: each device installs its own and runs the fleet license",
    )
    build.add_argument(
        "--activate-devices",
        type=Path,
        metavar="FILE",
        help="draw one seat activation per device id listed in FILE (one 32-hex id a line, # comments) from"
        " the store's seat pool of every fleet license (needs --store and --token); past the seats: no bundle",
    )
    build.add_argument("--store", help="with --activate-devices: the store URL")
    build.add_argument(
        "--token", default=os.environ.get("EDGEMART_TOKEN"), help="API token (or $EDGEMART_TOKEN)"
    )
    build.add_argument("--compress", choices=("auto", "none", "gzip"), default="auto")
    build.add_argument("--now", type=int, metavar="UNIX", help="time for license validity checks")
    build.add_argument("--json", action="store_true")
    build.set_defaults(func=_build)

    verify = sub.add_parser("verify", help="check a bundle offline: signature, hashes, licenses")
    verify.add_argument("bundle", type=Path, metavar="BUNDLE")
    verify.add_argument(
        "--root", type=Path, metavar="ROOT.crt", help="pinned store root for license signatures"
    )
    verify.add_argument("--builder-key", type=Path, metavar="KEY.pub.pem", help="pinned builder public key")
    verify.add_argument("--now", type=int, metavar="UNIX")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(func=_verify)

    buy = sub.add_parser(
        "buy", help="buy production seats on a store: for a fleet key (with --seats) or device certificates"
    )
    buy.add_argument("listing", help="the listing id (slug)")
    buy.add_argument("--target", required=True, help="the build's target, e.g. arm-cpu")
    kind = buy.add_mutually_exclusive_group(required=True)
    kind.add_argument("--fleet-key", type=Path, metavar="FLEET.pub.pem", help="the fleet's X25519 public key")
    kind.add_argument(
        "--device-cert",
        type=Path,
        action="append",
        metavar="DEVICE.crt",
        help="a device certificate (repeat)",
    )
    buy.add_argument("--seats", type=int, help="seats for a fleet key")
    buy.add_argument(
        "--version", type=int, metavar="V", help="a listed version of the listing (default: the newest)"
    )
    _store_args(buy)
    buy.add_argument("--json", action="store_true")
    buy.set_defaults(func=_buy)

    fetch = sub.add_parser(
        "fetch", help="download your production licenses, their sealed builds, cards and the store root"
    )
    fetch.add_argument("--out", required=True, type=Path, metavar="DIR", help="the inputs for `bundle build`")
    fetch.add_argument("--license", action="append", metavar="ID", help="only these licenses (repeat)")
    fetch.add_argument("--listing", help="only licenses of this listing")
    _store_args(fetch)
    fetch.add_argument("--json", action="store_true")
    fetch.set_defaults(func=_fetch)

    install = sub.add_parser("install", help="verify, then install this device's builds and licenses")
    install.add_argument("bundle", type=Path, metavar="BUNDLE")
    install.add_argument("--device-dir", required=True, type=Path, metavar="DIR")
    install.add_argument("--builder-key", type=Path, metavar="KEY.pub.pem", help="pinned builder public key")
    install.add_argument("--now", type=int, metavar="UNIX")
    install.add_argument("--json", action="store_true")
    install.set_defaults(func=_install)


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, help="store URL, e.g. https://store.example")
    p.add_argument("--token", default=os.environ.get("EDGEMART_TOKEN"), help="API token (or $EDGEMART_TOKEN)")


# --------------------------------------------------------------------------- helpers


def _read(path: Path, what: str, limit: int = _MAX_INPUT_BYTES) -> bytes:
    if not path.is_file():
        raise UsageError(f"{what} {path} is not a file")
    if path.stat().st_size > limit:
        raise UsageError(f"{what} {path} is larger than {limit} bytes")
    return path.read_bytes()


def _input_dir(path: Path, what: str) -> list[Path]:
    """Regular files of an input directory in name order; symlinks and subdirectories are refused."""
    if not path.is_dir():
        raise UsageError(f"{what} directory {path} does not exist")
    files = []
    for entry in sorted(path.iterdir(), key=lambda p: p.name.encode("utf-8")):
        if entry.name.startswith("."):
            continue
        if entry.is_symlink() or not entry.is_file():
            raise UsageError(f"{what} directory holds {entry.name!r}, which is not a regular file")
        files.append(entry)
    return files


def _now(args: argparse.Namespace) -> int:
    return int(args.now) if args.now is not None else int(time.time())


def _atomic_write_chunks(out: Path, chunks: Any) -> str:
    """Write to a temp file beside ``out`` then rename; returns the sha256 tag of what was written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    from edgemart.core.fileio import atomic_write

    def produce(fh: Any) -> None:
        for chunk in chunks:
            digest.update(chunk)
            fh.write(chunk)

    atomic_write(out, produce, mode=0o644)
    return "sha256:" + digest.hexdigest()


def _load_signing_key(path: Path | None) -> Any:
    from drm.bundle import load_builder_private_key

    if path is None:
        env = os.environ.get(DEFAULT_KEY_ENV)
        if not env:
            raise UsageError(
                f"no builder key: pass --signing-key KEY.pem or set ${DEFAULT_KEY_ENV} (make one with `edgemart bundle keygen --out KEY.pem`)"
            )
        path = Path(env)
    return load_builder_private_key(_read(path, "signing key", 64 * 1024))


def _load_root(path: Path | None) -> Any:
    if path is None:
        return None
    import drm

    return drm.cert_from_bytes(_read(path, "root certificate", 64 * 1024))


def _load_builder_key(path: Path | None) -> Any:
    if path is None:
        return None
    from drm.bundle import load_builder_public_key

    return load_builder_public_key(_read(path, "builder key", 64 * 1024))


# --------------------------------------------------------------------------- keygen


def _new_key_files(out: Path, private_pem: bytes, public_pem: bytes) -> Path:
    """Write KEY.pem (0600, never over an existing file) and KEY.pub.pem beside it; returns the .pub.pem path."""
    pub_path = out.with_name(
        out.name[: -len(".pem")] + ".pub.pem" if out.name.endswith(".pem") else out.name + ".pub.pem"
    )
    for p in (out, pub_path):
        if p.exists():
            raise UsageError(f"{p} already exists; refusing to overwrite a key")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem)
    pub_path.write_bytes(public_pem)
    return pub_path


def _keygen(args: argparse.Namespace) -> int:
    from drm.bundle import generate_builder_key, load_builder_public_key
    from drm.keys import key_id

    private_pem, public_pem = generate_builder_key()
    pub_path = _new_key_files(args.out, private_pem, public_pem)
    kid = key_id(load_builder_public_key(public_pem))
    sys.stdout.write(f"builder key {kid}: {args.out} (private, 0600) and {pub_path}\n")
    return 0


def _fleet_keygen(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import x25519

    from drm.keys import key_id, private_key_to_pem

    key = x25519.X25519PrivateKey.generate()
    public = key.public_key()
    public_pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pub_path = _new_key_files(args.out, private_key_to_pem(key), public_pem)
    kid = key_id(public.public_bytes_raw())
    emit(
        args,
        {"fleet_key_id": kid, "private_key": str(args.out), "public_key": str(pub_path)},
        f"fleet key {kid}: {args.out} (private, 0600) and {pub_path}\n"
        f"  buy seats: edgemart bundle buy LISTING --target T --fleet-key {pub_path} --seats N ...\n"
        f"  on each device: edgemart device add-fleet-key --device-dir DIR {args.out}",
    )
    return 0


# --------------------------------------------------------------------------- build


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def collect_inputs(
    licenses_dir: Path,
    builds_dir: Path,
    chains_dir: Path | None,
    cards_dir: Path | None,
) -> dict[str, Any]:
    """Read and cross-check the inputs: builds keyed by member name, licenses with claims, chains, cards."""
    import drm
    from drm.bundle import (
        BundleInvalid,
        build_member_name,
        check_member_name,
        license_member_name,
        read_license_token,
    )

    builds: dict[str, tuple[bytes, Any]] = {}
    for path in _input_dir(builds_dir, "--builds"):
        if path.suffix != ".emdl":
            raise UsageError(f"--builds holds {path.name!r}; expected only sealed builds (*.emdl)")
        data = _read(path, "build")
        header = drm.read_header(data[:65536])
        name = build_member_name(header.build_hash)
        if name in builds and builds[name][0] != data:
            raise UsageError(f"two different containers for build {header.build_hash} in --builds")
        builds[name] = (data, header)
    if not builds:
        raise UsageError(f"--builds directory {builds_dir} holds no *.emdl builds")

    licenses: dict[str, tuple[bytes, Any]] = {}
    for path in _input_dir(licenses_dir, "--licenses"):
        if path.suffix != ".lic":
            raise UsageError(f"--licenses holds {path.name!r}; expected only license tokens (*.lic)")
        token = _read(path, "license", 64 * 1024)
        try:
            claims = read_license_token(token, path.name)
        except BundleInvalid as exc:
            raise UsageError(exc.message) from None
        name = license_member_name(claims.license_id)
        if name in licenses and licenses[name][0] != token:
            raise UsageError(f"two different tokens for license {claims.license_id} in --licenses")
        licenses[name] = (token, claims)
    if not licenses:
        raise UsageError(f"--licenses directory {licenses_dir} holds no *.lic licenses")

    by_hash = {header.build_hash: header for _, header in builds.values()}
    for _, claims in licenses.values():
        found = by_hash.get(claims.build_hash)
        if found is None:
            raise UsageError(
                f"license {claims.license_id} is for build {claims.build_hash}, which is not in --builds"
            )
        if found.target != claims.target:
            raise UsageError(
                f"license {claims.license_id} is for target {claims.target}, its build is {found.target}"
            )
    licensed = {claims.build_hash for _, claims in licenses.values()}
    for _, header in builds.values():
        if header.build_hash not in licensed:
            raise UsageError(f"build {header.build_hash} has no license in --licenses")

    chains: dict[str, bytes] = {}
    if chains_dir is not None:
        for path in _input_dir(chains_dir, "--chains"):
            name = f"chains/{path.name}"
            try:
                check_member_name(name)
            except drm.FormatError as exc:
                raise UsageError(f"--chains: {exc.message}") from None
            chains[name] = _read(path, "chain file", 1024**2)

    cards: dict[str, dict[str, Any]] = {}
    listings = sorted({claims.listing for _, claims in licenses.values()})
    if cards_dir is not None:
        if not cards_dir.is_dir():
            raise UsageError(f"--cards directory {cards_dir} does not exist")
        for listing in listings:
            card = cards_dir / f"{listing}.md"
            if card.is_file():
                from licenses.card import parse_model_card

                try:
                    parsed = parse_model_card(_read(card, "model card", 1024**2).decode("utf-8"))
                except UnicodeDecodeError:
                    raise UsageError(f"model card {card} is not UTF-8") from None
                cards[listing] = {**parsed.raw, **parsed.to_dict()}
    return {"builds": builds, "licenses": licenses, "chains": chains, "cards": cards}


def _model_entries(inputs: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per (listing, build): lineage and license from the card, binding from the licenses."""
    per_build: dict[tuple[str, str], list[Any]] = {}
    for _, claims in inputs["licenses"].values():
        per_build.setdefault((claims.listing, claims.build_hash), []).append(claims)
    entries = []
    for (listing, build_hash), claim_list in sorted(per_build.items()):
        card = inputs["cards"].get(listing, {})
        claim_list.sort(key=lambda c: c.license_id)
        entries.append(
            {
                "listing": listing,
                "build_hash": build_hash,
                "target": claim_list[0].target,
                "license": str(card.get("license") or "NOASSERTION"),
                "base_model": _as_list(card.get("base_model")),
                "datasets": _as_list(card.get("datasets")),
                "seller": str(card.get("seller") or card.get("author") or ""),
                "name": str(card.get("model_name") or card.get("name") or listing),
                "card": card,
                "licenses": [
                    {
                        "license_id": c.license_id,
                        "kind": c.kind,
                        "binding": f"device:{c.device_id}" if c.device_id else f"fleet:{c.fleet_key_id}",
                        "not_before": c.not_before,
                        "not_after": c.not_after,
                    }
                    for c in claim_list
                ],
            }
        )
    return entries


def _lineage(model: dict[str, Any]) -> list[dict[str, Any]]:
    relation = model["card"].get("base_model_relation") or "declared in the model card"
    return [{"name": base, "relation": relation} for base in model["base_model"]]


def make_mlbom_bytes(models: list[dict[str, Any]], serial_seed: str) -> bytes:
    """CycloneDX ML-BOM (licenses.make_mlbom): one component per (listing, build), lineage from its card."""
    import licenses as lic_pkg

    components = [
        {
            "name": m["listing"],
            "version": m["build_hash"][7:19],
            "sha256": m["build_hash"][7:],
            "license": m["license"],
            "card": m["card"],
            "lineage": _lineage(m),
            "target": m["target"],
            "supplier": m["seller"],
        }
        for m in models
    ]
    bom = lic_pkg.make_mlbom(components, serial_seed=serial_seed)
    return (json.dumps(bom, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def make_notice_bytes(models: list[dict[str, Any]]) -> bytes:
    """NOTICE text (licenses.make_notice): each model's license, lineage and edgemart license ids."""
    import licenses as lic_pkg

    entries = []
    for m in models:
        seats = ", ".join(f"{x['license_id']} ({x['kind']}, {x['binding']})" for x in m["licenses"])
        attribution = m["card"].get("attribution") or m["seller"]
        entries.append(
            {
                "name": m["listing"],
                "version": m["build_hash"][7:19],
                "license": m["license"],
                "lineage": _lineage(m),
                "attribution": f"{attribution + '; ' if attribution else ''}target {m['target']}; edgemart licenses: {seats}",
            }
        )
    return lic_pkg.make_notice(entries).encode("utf-8")


def build_bundle(
    *,
    licenses_dir: Path,
    builds_dir: Path,
    out: Path,
    signing_key: Any,
    chains_dir: Path | None = None,
    cards_dir: Path | None = None,
    gzip: bool = False,
    root: Any = None,
    now: int | None = None,
    release: Any = None,
    activations: list[bytes] | None = None,
) -> dict[str, Any]:
    """Assemble, sign and write a bundle; the output depends only on the inputs' bytes and the key.
    ``activations`` are seat activation tokens to carry (each checked as a verifier would, before anything
    is written)."""
    import drm
    from drm.bundle import (
        MLBOM_NAME,
        NOTICE_NAME,
        BuildEntry,
        BundleInvalid,
        FileEntry,
        LicenseEntry,
        activation_member_name,
        iter_archive,
        iter_gzip,
        make_manifest,
        sign_manifest,
    )
    from drm.bundle_reader import check_activations

    inputs = collect_inputs(licenses_dir, builds_dir, chains_dir, cards_dir)
    if root is not None:
        at = now if now is not None else int(time.time())
        for _, (token, claims) in inputs["licenses"].items():
            fleet = frozenset({claims.fleet_key_id}) if claims.fleet_key_id else frozenset()
            try:
                drm.verify_license(token, root=root, now=at, device_id=claims.device_id, fleet_key_ids=fleet)
            except drm.LicenseRefused as exc:
                raise drm.Refusal(
                    f"license {claims.license_id} does not verify against --root: {exc.reason}"
                ) from None

    models = _model_entries(inputs)
    seed = hashlib.sha256(
        json.dumps(
            [[m["listing"], m["build_hash"], [x["license_id"] for x in m["licenses"]]] for m in models]
        ).encode()
    ).hexdigest()
    contents: dict[str, bytes] = {}
    contents.update({name: data for name, (data, _) in inputs["builds"].items()})
    contents.update({name: token for name, (token, _) in inputs["licenses"].items()})
    for token in activations or []:
        try:
            act = drm.parse_activation(token)
        except drm.FormatError as exc:
            raise UsageError(f"not a seat activation token: {exc.message}") from None
        name = activation_member_name(act.license_id, act.device_id)
        if contents.get(name, token) != token:
            raise UsageError(f"two different activations of device {act.device_id} on {act.license_id}")
        contents[name] = token
    contents.update(inputs["chains"])
    contents[MLBOM_NAME] = make_mlbom_bytes(models, seed)
    contents[NOTICE_NAME] = make_notice_bytes(models)

    manifest = make_manifest(
        [FileEntry(name, len(data), drm.sha256_tag(data)) for name, data in contents.items()],
        [
            BuildEntry(name, header.build_hash, header.target)
            for name, (_, header) in inputs["builds"].items()
        ],
        [LicenseEntry.from_claims(name, claims) for name, (_, claims) in inputs["licenses"].items()],
        release,
    )
    try:
        check_activations(
            contents,
            manifest,
            {name: claims for name, (_, claims) in inputs["licenses"].items()},
            root=root,
            now=now if now is not None else int(time.time()),
        )
    except BundleInvalid as exc:
        raise UsageError(f"seat activations: {exc.message}") from None
    manifest_bytes = manifest.to_bytes()
    contents["manifest.json"] = manifest_bytes
    contents["manifest.sig"] = sign_manifest(manifest_bytes, signing_key)
    chunks = iter_archive((name, contents[name]) for name in manifest.member_names())
    digest = _atomic_write_chunks(out, iter_gzip(chunks) if gzip else chunks)
    return {
        "ok": True,
        "bundle": str(out),
        "sha256": digest,
        "size": out.stat().st_size,
        "compression": "gzip" if gzip else "none",
        "builder_kid": drm.key_id(signing_key.public_key()),
        "builds": [b.to_dict() for b in manifest.builds],
        "licenses": [lic.to_dict() for lic in manifest.licenses],
        "chains": sorted(inputs["chains"]),
        "activations": sorted(n for n in contents if n.startswith("activations/")),
        "release": None if release is None else release.to_dict(),
        "models": [
            {"listing": m["listing"], "build_hash": m["build_hash"], "license": m["license"]} for m in models
        ],
    }


def _release_arg(text: str | None, allow: int | None) -> Any:
    """--release FLEET:VERSION [--allow-downgrade-from N] as a drm.bundle.Release (UsageError otherwise)."""
    from drm._canonical import FormatError
    from drm.bundle import parse_release

    if text is None:
        if allow is not None:
            raise UsageError("--allow-downgrade-from needs --release FLEET:VERSION")
        return None
    fleet, sep, version = text.rpartition(":")
    if not sep or not version.isdigit():
        raise UsageError(f"--release must be FLEET:VERSION (e.g. gate-cam:3), not {text!r}")
    obj: dict[str, Any] = {"fleet": fleet, "version": int(version)}
    if allow is not None:
        obj["allow_downgrade_from"] = allow
    try:
        return parse_release(obj)
    except FormatError as exc:
        raise UsageError(f"--release: {exc.message.removeprefix('manifest release: ')}") from None


def read_device_ids(path: Path) -> list[str]:
    """--activate-devices FILE: one device id (32 lower-case hex) a line; blank lines and # comments skipped."""
    ids: list[str] = []
    for n, line in enumerate(
        _read(path, "--activate-devices", 4 * 1024 * 1024).decode("utf-8", "replace").splitlines(), 1
    ):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if not re.match(r"^[0-9a-f]{32}\Z", text):
            raise UsageError(f"{path}:{n}: {text[:40]!r} is not a device id (32 lower-case hex characters)")
        if text in ids:
            raise UsageError(f"{path}:{n}: device {text} listed twice")
        ids.append(text)
    if not ids:
        raise UsageError(f"{path} lists no device ids")
    return ids


def draw_activations(client: Any, licenses_dir: Path, device_ids: list[str]) -> list[bytes]:
    """One seat activation per device for every fleet license in ``licenses_dir``, drawn from the store's seat
    pool (POST /api/v1/licenses/ID/activations: idempotent per device, so a retry draws nothing twice). More
    devices than a license's signed seats is refused before the store is asked; a 409 from the store (seats
    taken by devices outside the list) stops the build: the caller writes no bundle."""
    from drm.bundle import read_license_token

    fleet = []
    for path in _input_dir(licenses_dir, "--licenses"):
        if path.suffix == ".lic":
            claims = read_license_token(_read(path, "license", 64 * 1024), path.name)
            if claims.fleet_key_id is not None:
                fleet.append(claims)
    if not fleet:
        raise UsageError("--activate-devices: --licenses holds no fleet license to activate seats of")
    for claims in fleet:
        if claims.seats is not None and len(device_ids) > claims.seats:
            raise UsageError(
                f"--activate-devices lists {len(device_ids)} devices but fleet license {claims.license_id}"
                f" has {claims.seats} seat(s): no activation drawn, no bundle written"
            )
    tokens: list[bytes] = []
    for claims in fleet:
        for device_id in device_ids:
            try:
                answer = client.post_json(
                    f"/api/v1/licenses/{claims.license_id}/activations", {"device_id": device_id}
                )
            except EdgemartError as exc:
                raise type(exc)(
                    f"drawing the seat of device {device_id} on {claims.license_id} failed: {exc.message};"
                    " no bundle written",
                    code=exc.code,
                ) from None
            tokens.append(str(answer["activation"]).encode())
    return tokens


def _activation_inputs(args: argparse.Namespace) -> list[bytes]:
    tokens: list[bytes] = []
    if args.activations is not None:
        for path in _input_dir(args.activations, "--activations"):
            if path.suffix != ".act":
                raise UsageError(
                    f"--activations holds {path.name!r}; expected only activation tokens (*.act)"
                )
            tokens.append(_read(path, "activation", 16 * 1024))
    if args.activate_devices is not None:
        if not args.store:
            raise UsageError("--activate-devices needs --store URL (and --token)")
        device_ids = read_device_ids(args.activate_devices)
        tokens += draw_activations(_client(args), args.licenses, device_ids)
    elif args.store is not None:
        raise UsageError("--store goes with --activate-devices")
    return tokens


def _build(args: argparse.Namespace) -> int:
    gzip = args.compress == "gzip" or (
        args.compress == "auto" and (args.out.name.endswith(".tar.gz") or args.out.name.endswith(".tgz"))
    )
    activations = _activation_inputs(args)
    result = build_bundle(
        licenses_dir=args.licenses,
        builds_dir=args.builds,
        out=args.out,
        signing_key=_load_signing_key(args.signing_key),
        chains_dir=args.chains,
        cards_dir=args.cards,
        gzip=gzip,
        root=_load_root(args.root),
        now=args.now,
        release=_release_arg(args.release, args.allow_downgrade_from),
        activations=activations,
    )
    text = (
        f"wrote {result['bundle']} ({result['size']} bytes, {result['sha256']})\n"
        f"  {len(result['builds'])} build(s), {len(result['licenses'])} license(s), {len(result['chains'])} chain file(s), "
        f"{len(result['activations'])} seat activation(s); "
        f"signed by builder key {result['builder_kid']}"
    )
    emit(args, result, text)
    return 0


# --------------------------------------------------------------------------- verify


def _open_bundle(path: Path) -> Any:
    if not path.is_file():
        raise UsageError(f"bundle {path} is not a file")
    return path.open("rb")


def _verify(args: argparse.Namespace) -> int:
    from drm.bundle import BundleInvalid
    from edge_runtime.bundle import verify_bundle

    root = _load_root(args.root)
    builder_key = _load_builder_key(args.builder_key)
    with _open_bundle(args.bundle) as fh:
        try:
            verified = verify_bundle(fh, now=_now(args), root=root, builder_key=builder_key)
        except BundleInvalid as exc:
            if args.json:
                sys.stdout.write(
                    json.dumps({"ok": False, "bundle": str(args.bundle), "reason": exc.message}) + "\n"
                )
            raise
    report = verified.report()
    report["bundle"] = str(args.bundle)
    report["compression"] = "gzip" if verified.gzipped else "none"
    lines = [
        f"OK {args.bundle}: {len(report['files'])} files, {len(report['builds'])} build(s), "
        f"{len(report['licenses'])} license(s)",
        f"  builder key {verified.builder_kid} ({'pinned' if verified.builder_pinned else 'NOT pinned: pass --builder-key'})",
        f"  license signatures {'verified against --root' if root is not None else 'self-consistent only (pass --root to trust)'}",
    ]
    for lic in report["licenses"]:
        b = lic["binding"]
        lines.append(f"  {lic['path']}: {lic['kind']} {lic['listing']} -> {b['kind']} {b['id']}")
    for act in report["activations"]:
        lines.append(f"  seat {act['seat']} of {act['license_id']} activated for device {act['device_id']}")
    lines += [f"  warning: {w}" for w in report["warnings"]]
    emit(args, report, "\n".join(lines))
    return 0


# --------------------------------------------------------------------------- install


def _install(args: argparse.Namespace) -> int:
    from edge_runtime.bundle import install_bundle

    with _open_bundle(args.bundle) as fh:
        result = install_bundle(
            fh, args.device_dir, now=args.now, builder_key=_load_builder_key(args.builder_key)
        )
    lines = [f"installed {len(result['installed'])} model(s) on device {result['device_id']}"]
    lines += [f"  {i['listing']} ({i['target']}) license {i['license_id']}" for i in result["installed"]]
    lines += [f"  skipped {s['license_id']}: {s['reason']}" for s in result["skipped"]]
    emit(args, result, "\n".join(lines))
    return 0


__all__ = ["EdgemartError", "build_bundle", "collect_inputs", "register"]


# --------------------------------------------------------------------------- buying and fetching (a builder's CLI)


def _client(args: argparse.Namespace) -> Any:
    from store.client import StoreClient

    if not args.token:
        raise UsageError("--token is required (or set EDGEMART_TOKEN)")
    return StoreClient(args.store, args.token)


def _buy(args: argparse.Namespace) -> int:
    fleet_key_pem = device_cert_pems = None
    if args.fleet_key is not None:
        if args.seats is None:
            raise UsageError("--seats is required with --fleet-key")
        fleet_key_pem = _read(args.fleet_key, "--fleet-key", 64 * 1024).decode("utf-8", "replace")
    else:
        if args.seats is not None:
            raise UsageError("--seats goes with --fleet-key; device certificates are one seat each")
        device_cert_pems = [
            _read(p, "--device-cert", 64 * 1024).decode("utf-8", "replace") for p in args.device_cert
        ]
    listing = args.listing.strip()
    if not listing or "/" in listing:
        raise UsageError("listing must be a listing id such as my-model")
    items = _client(args).buy_production_licenses(
        listing,
        target=args.target,
        version=args.version,
        fleet_key_pem=fleet_key_pem,
        seats=args.seats,
        device_cert_pems=device_cert_pems,
    )
    emit(
        args,
        {"licenses": [{k: v for k, v in it.items() if k != "license"} for it in items]},
        "\n".join(
            f"{it['license_id']}  {it['listing']} v{it.get('version')}/{it['target']}  "
            + (
                f"fleet {it['fleet_key_id']} x{it['seats']}"
                if it.get("fleet_key_id")
                else f"device {it['device_id']}"
            )
            for it in items
        )
        + f"\nnext: edgemart bundle fetch --out inputs/ --listing {listing} --store {args.store}",
    )
    return 0


def _fetch(args: argparse.Namespace) -> int:
    """The inputs of `bundle build` from the store, into an empty --out (store.client.fetch_bundle_inputs)."""
    out: Path = args.out
    written = _client(args).fetch_bundle_inputs(out, license_ids=args.license, listing=args.listing)
    emit(
        args,
        {"out": str(out), **written},
        f"{len(written['licenses'])} license(s), {len(written['builds'])} build(s), {len(written['cards'])} "
        f"card(s) and root.crt in {out}\nnext: edgemart bundle build --licenses {out}/licenses --builds "
        f"{out}/builds --cards {out}/cards --root {out}/root.crt --signing-key builder.pem --out fleet.bundle",
    )
    return 0
