# Why this is one module: reading a bundle archive and verifying it are one pass over untrusted bytes (bounded tar and gzip reader, then every manifest, signature, member and license check, in the order BUNDLE.md gives).
"""Bundle verification: read a bundle archive (tar or gzip'd tar) safely from bytes or a stream and verify it
offline against its signed manifest, the pinned builder key and the store root (docs/BUNDLE.md).

Pure: bytes (or a readable stream) and ``now`` in, a VerifiedBundle or one BundleInvalid naming the first
problem out. Installing a verified bundle on a device lives in edge_runtime.bundle."""

from __future__ import annotations

import io
import json
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519

from drm._canonical import FormatError, sha256_tag
from drm.bundle import (
    BLOCK,
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    DEFAULT_LIMITS,
    MANIFEST_NAME,
    MLBOM_NAME,
    NOTICE_NAME,
    SIGNATURE_NAME,
    BundleInvalid,
    BundleLimits,
    LicenseEntry,
    Manifest,
    check_member_name,
    encode_tar_header,
    parse_tar_header,
    read_activation_token,
    read_license_token,
    verify_manifest_signature,
)
from drm.container import read_header
from drm.license import LicenseClaims, verify_license
from drm.metering import MAX_METERING_BYTES, Activation, verify_activation
from edgemart.core.errors import LicenseRefused, UsageError

_GZIP_MAGIC = b"\x1f\x8b"
_READ_CHUNK = 1024 * 1024
_ZERO_BLOCK = bytes(BLOCK)


@dataclass(frozen=True)
class Member:
    name: str
    data: bytes


# --------------------------------------------------------------------------- byte sources


class _Source:
    """A bounded byte reader over the raw file, transparently gunzipping a gzip'd bundle."""

    def __init__(self, raw: BinaryIO, limits: BundleLimits) -> None:
        self._raw = raw
        # Tar overhead on top of member data: a header block and up to one padding block per member,
        # the end marker and a record's worth of trailing zeros some tar writers add.
        self._cap = limits.max_total_bytes + (limits.max_members + 2) * 2 * BLOCK + 20 * BLOCK
        self._produced = 0
        self._buffer = bytearray()
        head = raw.read(10)
        self.gzipped = head[:2] == _GZIP_MAGIC
        if self.gzipped:
            if len(head) < 10:
                raise BundleInvalid("bundle is truncated (gzip header)")
            if head[2] != 8:
                raise BundleInvalid("gzip: compression method is not deflate")
            if head[3] != 0:
                raise BundleInvalid(
                    "gzip: header flags set (name, comment or extra field); bundles carry none"
                )
            if head[4:8] != b"\0\0\0\0":
                raise BundleInvalid("gzip: header mtime is not 0")
            self._inflate: Any = zlib.decompressobj(wbits=-15)
            self._crc = 0
            self._eof = False
        else:
            self._buffer += head

    def _fill(self, n: int) -> None:
        while len(self._buffer) < n:
            if not self.gzipped:
                chunk = self._raw.read(max(n - len(self._buffer), _READ_CHUNK))
                if not chunk:
                    return
                self._buffer += chunk
                continue
            if self._eof:
                return
            want = n - len(self._buffer)
            compressed = self._inflate.unconsumed_tail or self._raw.read(64 * 1024)
            if not compressed:
                raise BundleInvalid("bundle is truncated (gzip stream ends early)")
            try:
                out = self._inflate.decompress(compressed, max(want, 64 * 1024))
            except zlib.error:
                raise BundleInvalid("gzip: compressed data is corrupt") from None
            self._produced += len(out)
            if self._produced > self._cap:
                raise BundleInvalid(
                    f"gzip: decompresses to more than {self._cap} bytes (limit; a gzip bomb?)"
                )
            self._crc = zlib.crc32(out, self._crc)
            self._buffer += out
            if self._inflate.eof:
                self._finish_gzip()

    def _finish_gzip(self) -> None:
        self._eof = True
        trailer = self._inflate.unused_data + self._raw.read(9)
        if len(trailer) < 8:
            raise BundleInvalid("bundle is truncated (gzip trailer)")
        if len(trailer) > 8:
            raise BundleInvalid("gzip: data after the end of the gzip stream")
        if int.from_bytes(trailer[:4], "little") != self._crc:
            raise BundleInvalid("gzip: CRC mismatch")
        if int.from_bytes(trailer[4:], "little") != self._produced & 0xFFFFFFFF:
            raise BundleInvalid("gzip: length mismatch")

    def read(self, n: int) -> bytes:
        self._fill(n)
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out


class _Prepended:
    """A reader that yields ``head`` and then the rest of ``raw`` (peeking without seek, so pipes work)."""

    def __init__(self, head: bytes, raw: BinaryIO) -> None:
        self._head, self._raw = head, raw

    def read(self, n: int) -> bytes:
        if self._head:
            out, self._head = self._head[:n], self._head[n:]
            return out + (self._raw.read(n - len(out)) if n > len(out) else b"")
        return self._raw.read(n)


# --------------------------------------------------------------------------- the tar reader


def iter_members(
    source: bytes | bytearray | BinaryIO, limits: BundleLimits = DEFAULT_LIMITS
) -> Iterator[Member]:
    """Yield the members of a bundle archive (tar or gzip'd tar) in archive order, refusing anything unsafe.

    Only regular files with allowed names; no links, devices, directories, pax or GNU extension headers;
    no duplicates; member, total and count limits checked before data is read; canonical headers only."""
    raw: BinaryIO = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray)) else source
    src = _Source(raw, limits)
    first = src.read(BLOCK)
    if not first:
        raise UsageError("not an edgemart bundle: the file is empty")
    if first != _ZERO_BLOCK and first[257:263] != b"ustar\0":
        # A short file with no tar magic is some other file, not a truncated bundle (exit 2, not 1).
        raise UsageError("not an edgemart bundle: no POSIX tar header at the start")
    seen: set[str] = set()
    total = 0
    index = 0
    block = first
    while True:
        if len(block) < BLOCK:
            raise BundleInvalid("bundle is truncated (ends without the end-of-archive marker)")
        if block == _ZERO_BLOCK:
            _check_end(src)
            return
        index += 1
        if index > limits.max_members:
            raise BundleInvalid(f"more than {limits.max_members} members (limit)")
        try:
            head = parse_tar_header(block, index)
        except FormatError as exc:
            raise BundleInvalid(exc.message) from None
        if head.typeflag not in (b"0", b"\0"):
            target = f" -> {head.linkname}" if head.linkname else ""
            raise BundleInvalid(
                f"member {head.name!r} is a {head.kind}{target}; only regular files are allowed"
            )
        try:
            check_member_name(head.name)
        except FormatError as exc:
            raise BundleInvalid(f"member {index}: {exc.message}") from None
        if head.name in seen:
            raise BundleInvalid(f"duplicate member {head.name!r}")
        seen.add(head.name)
        if head.size > limits.max_member_bytes:
            raise BundleInvalid(
                f"member {head.name!r} declares {head.size} bytes (limit {limits.max_member_bytes})"
            )
        total += head.size
        if total > limits.max_total_bytes:
            raise BundleInvalid(f"members declare more than {limits.max_total_bytes} bytes in total (limit)")
        if block != encode_tar_header(head.name, head.size):
            raise BundleInvalid(
                f"member {head.name!r}: header is not canonical (mode, owner, time or name fields)"
            )
        data = _read_exact(src, head.size, head.name)
        padding = src.read(-head.size % BLOCK)
        if len(padding) != -head.size % BLOCK:
            raise BundleInvalid(f"bundle is truncated (inside member {head.name!r})")
        if padding.strip(b"\0"):
            raise BundleInvalid(f"member {head.name!r}: non-zero padding after its data")
        yield Member(head.name, data)
        block = src.read(BLOCK)


def _read_exact(src: _Source, size: int, name: str) -> bytes:
    parts: list[bytes] = []
    remaining = size
    while remaining:
        piece = src.read(min(remaining, _READ_CHUNK))
        if not piece:
            raise BundleInvalid(f"bundle is truncated (inside member {name!r})")
        parts.append(piece)
        remaining -= len(piece)
    return b"".join(parts)


def _check_end(src: _Source) -> None:
    second = src.read(BLOCK)
    if len(second) < BLOCK:
        raise BundleInvalid("bundle is truncated (incomplete end-of-archive marker)")
    if second != _ZERO_BLOCK:
        raise BundleInvalid("malformed end-of-archive marker")
    while True:
        rest = src.read(_READ_CHUNK)
        if not rest:
            return
        if rest.strip(b"\0"):
            raise BundleInvalid("data after the end-of-archive marker")


def read_bundle(source: bytes | bytearray | BinaryIO, limits: BundleLimits = DEFAULT_LIMITS) -> list[Member]:
    """Every member of a bundle, in archive order (see iter_members)."""
    return list(iter_members(source, limits))


# --------------------------------------------------------------------------- verification


@dataclass
class VerifiedBundle:
    """A bundle whose every check passed: the manifest, member bytes and each license's claims."""

    manifest: Manifest
    members: dict[str, bytes]
    claims: dict[str, LicenseClaims]
    builder_kid: str
    builder_pinned: bool
    licenses_trusted: bool
    gzipped: bool = False
    warnings: list[str] = field(default_factory=list)
    # (license_id, device_id) -> the seat activation the bundle carries for that device (§18.2, §19.7).
    activations: dict[tuple[str, str], Activation] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        return {
            "ok": True,
            "format": f"{BUNDLE_FORMAT}/{BUNDLE_VERSION}",
            "builder": {"kid": self.builder_kid, "pinned": self.builder_pinned},
            "licenses_trusted": self.licenses_trusted,
            "files": [f.to_dict() for f in self.manifest.files],
            "builds": [b.to_dict() for b in self.manifest.builds],
            "licenses": [lic.to_dict() for lic in self.manifest.licenses],
            "activations": [
                {"license_id": a.license_id, "device_id": a.device_id, "seat": a.seat}
                for a in self.activations.values()
            ],
            "warnings": list(self.warnings),
        }


def verify_members(
    members: list[Member],
    *,
    now: int,
    root: x509.Certificate | None = None,
    builder_key: ed25519.Ed25519PublicKey | None = None,
    revoked: frozenset[str] = frozenset(),
    limits: BundleLimits = DEFAULT_LIMITS,
) -> VerifiedBundle:
    """Check a bundle's members offline; BundleInvalid names the first problem precisely.

    Order: manifest first and signed, member set and order, every size and hash, builds are sealed
    containers named after their build hash, each license agrees with its manifest entry and verifies
    (against ``root`` when given, at ``now``), and builds and licenses pair up."""
    if not members:
        raise BundleInvalid("bundle has no members")
    names = [m.name for m in members]
    if names[0] != MANIFEST_NAME:
        raise BundleInvalid(f"first member is {names[0]!r}, expected {MANIFEST_NAME} (members reordered?)")
    if len(names) < 2 or names[1] != SIGNATURE_NAME:
        got = repr(names[1]) if len(names) > 1 else "nothing"
        raise BundleInvalid(f"second member is {got}, expected {SIGNATURE_NAME}")
    manifest_bytes, sig_bytes = members[0].data, members[1].data
    try:
        manifest = Manifest.from_bytes(manifest_bytes, limits)
    except FormatError as exc:
        raise BundleInvalid(f"manifest.json is invalid: {exc.message}") from None
    sig = verify_manifest_signature(manifest_bytes, sig_bytes, builder_key=builder_key, limits=limits)

    expected = manifest.member_names()
    missing = [n for n in expected if n not in names]
    if missing:
        raise BundleInvalid(f"missing file {missing[0]!r} (listed in the manifest)")
    extra = [n for n in names if n not in expected]
    if extra:
        raise BundleInvalid(f"extra file {extra[0]!r} (not in the manifest)")
    # iter_members refuses duplicates, but a caller may hand members over directly.
    twice = sorted(n for n, count in Counter(names).items() if count > 1)
    if twice:
        raise BundleInvalid(f"duplicate member {twice[0]!r}")
    for position, (got, want) in enumerate(zip(names, expected, strict=True)):
        if got != want:
            raise BundleInvalid(f"member {position + 1} is {got!r}, expected {want!r} (members reordered)")
    data = {m.name: m.data for m in members}
    for entry in manifest.files:
        blob = data[entry.path]
        if len(blob) != entry.size:
            raise BundleInvalid(f"{entry.path}: size {len(blob)} does not match the manifest ({entry.size})")
        if sha256_tag(blob) != entry.sha256:
            raise BundleInvalid(f"{entry.path}: sha256 does not match the manifest")

    for build in manifest.builds:
        try:
            header = read_header(data[build.path][: 64 * 1024])
        except FormatError as exc:
            raise BundleInvalid(f"{build.path} is not a sealed build: {exc.message}") from None
        if header.build_hash != build.build_hash:
            raise BundleInvalid(f"{build.path}: container build hash differs from its name")
        if header.target != build.target:
            raise BundleInvalid(f"{build.path}: container target {header.target!r} differs from the manifest")

    claims: dict[str, LicenseClaims] = {}
    for lic_entry in manifest.licenses:
        token = data[lic_entry.path]
        if len(token) > limits.max_license_bytes:
            raise BundleInvalid(f"{lic_entry.path}: {len(token)} bytes exceeds the license limit")
        lic = read_license_token(token, lic_entry.path)
        _compare_entry(lic_entry, LicenseEntry.from_claims(lic_entry.path, lic))
        if root is not None:
            fleet = frozenset({lic.fleet_key_id}) if lic.fleet_key_id else frozenset()
            try:
                verify_license(
                    token, root=root, now=now, device_id=lic.device_id, fleet_key_ids=fleet, revoked=revoked
                )
            except LicenseRefused as exc:
                raise BundleInvalid(
                    f"{lic_entry.path}: license does not verify against the root: {exc.reason}"
                ) from None
        else:
            if now < lic.not_before:
                raise BundleInvalid(
                    f"{lic_entry.path}: license is not yet valid (not before {lic.not_before})"
                )
            if lic.not_after is not None and now >= lic.not_after:
                raise BundleInvalid(f"{lic_entry.path}: license expired at {lic.not_after}")
            if lic.license_id in revoked:
                raise BundleInvalid(f"{lic_entry.path}: license is revoked")
        claims[lic_entry.path] = lic

    activations = check_activations(data, manifest, claims, root=root, now=now)

    builds = {b.build_hash: b for b in manifest.builds}
    licensed = {c.build_hash for c in claims.values()}
    for path, lic in claims.items():
        paired = builds.get(lic.build_hash)
        if paired is None:
            raise BundleInvalid(f"{path}: its build {lic.build_hash} is not in the bundle")
        if paired.target != lic.target:
            raise BundleInvalid(
                f"{path}: license target {lic.target!r} differs from its build's {paired.target!r}"
            )
    for build in manifest.builds:
        if build.build_hash not in licensed:
            raise BundleInvalid(f"{build.path}: no license in the bundle covers this build")

    _check_mlbom(data[MLBOM_NAME], limits)
    try:
        data[NOTICE_NAME].decode("utf-8")
    except UnicodeDecodeError:
        raise BundleInvalid("NOTICE is not UTF-8 text") from None
    warnings = [
        f"{p}: {c.kind} license in a firmware bundle" for p, c in claims.items() if c.kind != "production"
    ]
    return VerifiedBundle(
        manifest,
        data,
        claims,
        sig.kid,
        sig.pinned,
        root is not None,
        warnings=warnings,
        activations=activations,
    )


def check_activations(
    data: dict[str, bytes],
    manifest: Manifest,
    claims: dict[str, LicenseClaims],
    *,
    root: x509.Certificate | None,
    now: int,
) -> dict[tuple[str, str], Activation]:
    """Every activations/ member is a seat activation of a fleet license in the bundle, for the device its
    name announces, of a seat within the license's signed count, and (with a root) signed under it."""
    by_id = {c.license_id: c for c in claims.values()}
    out: dict[tuple[str, str], Activation] = {}
    seats_used: dict[str, set[int]] = {}
    for path in manifest.member_names():
        if not path.startswith("activations/"):
            continue
        token = data[path]
        if len(token) > MAX_METERING_BYTES:
            raise BundleInvalid(f"{path}: {len(token)} bytes exceeds the activation limit")
        act = read_activation_token(token, path)
        lic = by_id.get(act.license_id)
        if lic is None:
            raise BundleInvalid(f"{path}: its license {act.license_id} is not in the bundle")
        if lic.fleet_key_id is None or lic.fleet_key_id != act.fleet_key_id:
            raise BundleInvalid(
                f"{path}: not an activation of the fleet key the license {lic.license_id} names"
            )
        if lic.seats is not None and act.seat > lic.seats:
            raise BundleInvalid(f"{path}: seat {act.seat} of a {lic.seats}-seat license")
        if act.seat in seats_used.setdefault(act.license_id, set()):
            raise BundleInvalid(f"{path}: seat {act.seat} of {act.license_id} is held by two devices")
        seats_used[act.license_id].add(act.seat)
        if root is not None:
            try:
                verify_activation(
                    token,
                    root=root,
                    now=now,
                    device_id=act.device_id,
                    license_id=lic.license_id,
                    fleet_key_id=lic.fleet_key_id,
                    seats=lic.seats,
                )
            except LicenseRefused as exc:
                raise BundleInvalid(
                    f"{path}: activation does not verify against the root: {exc.reason}"
                ) from None
        out[(act.license_id, act.device_id)] = act
    return out


def _compare_entry(listed: LicenseEntry, actual: LicenseEntry) -> None:
    for name in LicenseEntry.__dataclass_fields__:
        if getattr(listed, name) != getattr(actual, name):
            raise BundleInvalid(f"{listed.path}: manifest {name} disagrees with the signed license")


def _check_mlbom(blob: bytes, limits: BundleLimits) -> None:
    if len(blob) > limits.max_manifest_bytes:
        raise BundleInvalid("mlbom.cdx.json exceeds the manifest size limit")
    try:
        doc = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise BundleInvalid("mlbom.cdx.json is not JSON") from None
    if not isinstance(doc, dict) or doc.get("bomFormat") != "CycloneDX":
        raise BundleInvalid("mlbom.cdx.json is not a CycloneDX document")


def verify_bundle(
    source: bytes | bytearray | BinaryIO,
    *,
    now: int,
    root: x509.Certificate | None = None,
    builder_key: ed25519.Ed25519PublicKey | None = None,
    revoked: frozenset[str] = frozenset(),
    limits: BundleLimits = DEFAULT_LIMITS,
) -> VerifiedBundle:
    """Read (safely) and verify a whole bundle; see iter_members and verify_members."""
    raw: BinaryIO = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray)) else source
    head = raw.read(2)
    members = read_bundle(_Prepended(head, raw), limits)  # type: ignore[arg-type]
    verified = verify_members(
        members, now=now, root=root, builder_key=builder_key, revoked=revoked, limits=limits
    )
    verified.gzipped = head == _GZIP_MAGIC
    return verified


__all__ = [
    "Member",
    "VerifiedBundle",
    "iter_members",
    "read_bundle",
    "verify_bundle",
    "verify_members",
]
