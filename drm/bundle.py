# Why this is one module: the bundle format end to end (manifest, canonical encoding, signature, bounded tar reader and writer): one normative format, one module, like container.py.
"""Firmware bundle format: the signed manifest, the builder's signature and the tar member encoding.

Pure: bytes in, bytes or objects out; no files, no clocks. Reading and verifying whole archives lives in
drm.bundle_reader, installing them in edge_runtime.bundle, assembling them in edgemart.bundle_cli (spec:
docs/BUNDLE.md)."""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from drm._canonical import FormatError, b64d, b64e, dumps, exact_keys, field, loads, sha256_tag
from drm.envelope import parse_envelope, signed_message
from drm.keys import ed25519_from_pem, key_id
from drm.license import LICENSE_TYP, LicenseClaims
from drm.metering import ACTIVATION_TYP, Activation
from edgemart.core.errors import IntegrityError, UsageError

BUNDLE_FORMAT = "edgemart-bundle"
BUNDLE_VERSION = 1
SIG_TYP = "edgemart-bundle-sig/1"
SIG_ALG = "Ed25519"

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
MLBOM_NAME = "mlbom.cdx.json"
NOTICE_NAME = "NOTICE"

BLOCK = 512
_HASH = re.compile(r"^sha256:[0-9a-f]{64}\Z")
_STEM = r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,79}"
# Every member name a bundle may hold, with its rank in the one canonical member order.
_MEMBER_PATTERNS: tuple[tuple[int, re.Pattern[str]], ...] = (
    (0, re.compile(r"^manifest\.json\Z")),
    (1, re.compile(r"^manifest\.sig\Z")),
    (2, re.compile(r"^builds/[0-9a-f]{64}\.emdl\Z")),
    (3, re.compile(rf"^licenses/{_STEM}\.lic\Z")),
    (4, re.compile(rf"^activations/{_STEM}\.[0-9a-f]{{32}}\.act\Z")),
    (5, re.compile(rf"^chains/{_STEM}\Z")),
    (6, re.compile(r"^mlbom\.cdx\.json\Z")),
    (7, re.compile(r"^NOTICE\Z")),
)
TOP_LEVEL = (
    "manifest.json",
    "manifest.sig",
    "builds/",
    "licenses/",
    "activations/",
    "chains/",
    "mlbom.cdx.json",
    "NOTICE",
)


class BundleInvalid(IntegrityError):
    """The bundle fails verification; the message says precisely where and why."""

    code = "bundle_invalid"


@dataclass(frozen=True)
class BundleLimits:
    """Bounds a reader enforces before it allocates or reads anything (safe defaults)."""

    max_members: int = 1024
    max_member_bytes: int = 1024**3
    max_total_bytes: int = 4 * 1024**3
    max_manifest_bytes: int = 4 * 1024**2
    max_signature_bytes: int = 16 * 1024
    max_license_bytes: int = 64 * 1024


DEFAULT_LIMITS = BundleLimits()


# --------------------------------------------------------------------------- member names and order


def member_rank(name: str) -> int:
    """Rank of a member name in the canonical order; FormatError for a name a bundle may not hold."""
    for rank, pattern in _MEMBER_PATTERNS:
        if pattern.match(name):
            return rank
    raise FormatError(f"member name {name!r} is not allowed (allowed: {', '.join(TOP_LEVEL)})")


def check_member_name(name: str) -> None:
    """Refuse unsafe or unknown member names with a precise reason."""
    if not name:
        raise FormatError("empty member name")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise FormatError(f"absolute member path {name!r}")
    if "\\" in name:
        raise FormatError(f"backslash in member path {name!r}")
    parts = name.split("/")
    if ".." in parts:
        raise FormatError(f"parent-directory component in member path {name!r}")
    if any(p in ("", ".") for p in parts):
        raise FormatError(f"empty or '.' component in member path {name!r}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise FormatError(f"control character in member path {name!r}")
    member_rank(name)


def canonical_order(names: list[str]) -> list[str]:
    """The one order members appear in: manifest.json, manifest.sig, builds, licenses, activations, chains,
    ML-BOM, NOTICE."""
    return sorted(names, key=lambda n: (member_rank(n), n.encode("utf-8")))


def build_member_name(build_hash: str) -> str:
    if not _HASH.match(build_hash):
        raise FormatError(f"build hash {build_hash!r} is not sha256:<hex>")
    return f"builds/{build_hash[7:]}.emdl"


def activation_member_name(license_id: str, device_id: str) -> str:
    """``activations/<license_id>.<device_id>.act``: a seat activation (docs/FORMAT.md §18.2) carried for one
    device of the fleet, so the device activates offline at install."""
    name = f"activations/{license_id}.{device_id}.act"
    try:
        check_member_name(name)
    except FormatError:
        raise UsageError(
            f"activation of {device_id!r} on {license_id!r} cannot name a bundle member"
        ) from None
    return name


def license_member_name(license_id: str) -> str:
    name = f"licenses/{license_id}.lic"
    try:
        check_member_name(name)
    except FormatError:
        raise UsageError(
            f"license id {license_id!r} cannot name a bundle member (allowed: A-Z a-z 0-9 . _ -)"
        ) from None
    return name


# --------------------------------------------------------------------------- tar member encoding (POSIX ustar)


def _octal(value: int, width: int) -> bytes:
    digits = format(value, "o")
    if len(digits) > width - 1:
        raise UsageError(f"value {value} does not fit a {width}-byte tar field")
    return digits.rjust(width - 1, "0").encode("ascii") + b"\0"


def encode_tar_header(name: str, size: int) -> bytes:
    """The canonical ustar header of a bundle member: regular file, mode 0644, owner 0/0, mtime 0, no names."""
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise UsageError(f"member name {name!r} longer than 100 bytes")
    head = bytearray(BLOCK)
    head[0 : len(raw)] = raw
    head[100:108] = _octal(0o644, 8)
    head[108:116] = _octal(0, 8)
    head[116:124] = _octal(0, 8)
    head[124:136] = _octal(size, 12)
    head[136:148] = _octal(0, 12)
    head[148:156] = b" " * 8
    head[156:157] = b"0"
    head[257:263] = b"ustar\0"
    head[263:265] = b"00"
    head[329:337] = _octal(0, 8)
    head[337:345] = _octal(0, 8)
    head[148:156] = format(sum(head), "06o").encode("ascii") + b"\0 "
    return bytes(head)


def tar_padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


TAR_END = b"\0" * (2 * BLOCK)
# gzip member header: deflate, no flags (no name/comment/extra), mtime 0, max compression, OS unknown.
GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"


def iter_archive(members: Iterable[tuple[str, bytes]]) -> Iterator[bytes]:
    """The archive bytes for members given in canonical order: header, data, zero padding; end marker."""
    for name, data in members:
        yield encode_tar_header(name, len(data))
        yield data
        yield tar_padding(len(data))
    yield TAR_END


def iter_gzip(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """gzip (RFC 1952) with a fixed header, so equal input gives equal bytes with a given zlib."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15, 9)
    crc, size = 0, 0
    yield GZIP_HEADER
    for chunk in chunks:
        crc = zlib.crc32(chunk, crc)
        size += len(chunk)
        out = deflate.compress(chunk)
        if out:
            yield out
    yield deflate.flush()
    yield struct.pack("<II", crc, size & 0xFFFFFFFF)


@dataclass(frozen=True)
class TarMemberHeader:
    """The fields of one ustar header block a bundle reader looks at."""

    name: str
    size: int
    typeflag: bytes
    linkname: str

    @property
    def kind(self) -> str:
        return {
            b"0": "regular file",
            b"\0": "regular file",
            b"1": "hard link",
            b"2": "symbolic link",
            b"3": "character device",
            b"4": "block device",
            b"5": "directory",
            b"6": "fifo",
            b"7": "contiguous file",
            b"x": "pax extended header",
            b"g": "pax global header",
            b"L": "GNU long name",
            b"K": "GNU long link name",
        }.get(self.typeflag, f"unknown type {self.typeflag!r}")


def _cstr(field_bytes: bytes, what: str) -> str:
    raw = field_bytes.split(b"\0", 1)[0]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"{what} is not UTF-8") from None


def parse_tar_header(block: bytes, index: int) -> TarMemberHeader:
    """Parse one 512-byte header (checksum, magic, size); FormatError with the member index on failure."""
    where = f"tar member {index}"
    if len(block) != BLOCK:
        raise FormatError(f"{where}: truncated header")
    stored = block[148:156]
    try:
        checksum = int(stored.replace(b"\0", b" ").strip() or b"-1", 8)
    except ValueError:
        raise FormatError(f"{where}: header checksum field is not octal") from None
    if checksum != sum(block[:148]) + 8 * 0x20 + sum(block[156:]):
        raise FormatError(f"{where}: header checksum mismatch")
    if block[257:265] != b"ustar\x0000":
        raise FormatError(f"{where}: not a POSIX ustar header")
    size_field = block[124:136]
    if size_field[0] & 0x80:
        raise FormatError(f"{where}: base-256 size field not allowed")
    try:
        size = int(size_field.replace(b"\0", b" ").strip() or b"0", 8)
    except ValueError:
        raise FormatError(f"{where}: size field is not octal") from None
    prefix = _cstr(block[345:500], f"{where} name prefix")
    name = _cstr(block[0:100], f"{where} name")
    full = f"{prefix}/{name}" if prefix else name
    return TarMemberHeader(full, size, block[156:157], _cstr(block[157:257], f"{where} link name"))


# --------------------------------------------------------------------------- the manifest


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class BuildEntry:
    path: str
    build_hash: str
    target: str

    def to_dict(self) -> dict[str, Any]:
        return {"build_hash": self.build_hash, "path": self.path, "target": self.target}


@dataclass(frozen=True)
class LicenseEntry:
    """What the manifest says about one license; it must agree with the signed token it names."""

    path: str
    license_id: str
    kind: str
    listing: str
    build_hash: str
    target: str
    binding_kind: str  # "device" | "fleet"
    binding_id: str
    not_before: int
    not_after: int | None
    max_runs: int | None
    issuer_kid: str

    @classmethod
    def from_claims(cls, path: str, claims: LicenseClaims) -> LicenseEntry:
        kind, ident = (
            ("device", claims.device_id) if claims.device_id is not None else ("fleet", claims.fleet_key_id)
        )
        return cls(
            path=path,
            license_id=claims.license_id,
            kind=claims.kind,
            listing=claims.listing,
            build_hash=claims.build_hash,
            target=claims.target,
            binding_kind=kind,
            binding_id=ident or "",
            not_before=claims.not_before,
            not_after=claims.not_after,
            max_runs=claims.max_runs,
            issuer_kid=claims.issuer_kid,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "binding": {"id": self.binding_id, "kind": self.binding_kind},
            "build_hash": self.build_hash,
            "issuer_kid": self.issuer_kid,
            "kind": self.kind,
            "license_id": self.license_id,
            "listing": self.listing,
            "max_runs": self.max_runs,
            "path": self.path,
            "target": self.target,
            "validity": {"not_after": self.not_after, "not_before": self.not_before},
        }


@dataclass(frozen=True)
class Release:
    """A bundle's place in its fleet's release line (signed with the manifest): devices refuse a ``version``
    lower than the one installed for ``fleet``, unless ``allow_downgrade_from`` (a version ≥ the installed
    one) says the builder meant this bundle to replace it."""

    fleet: str
    version: int
    allow_downgrade_from: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"fleet": self.fleet, "version": self.version}
        if self.allow_downgrade_from is not None:
            d["allow_downgrade_from"] = self.allow_downgrade_from
        return d


_RELEASE_FLEET = re.compile(r"^[A-Za-z0-9._\-]{1,64}\Z")
MAX_RELEASE_VERSION = 2**31 - 1


def parse_release(obj: Any) -> Release:
    what = "manifest release"
    exact_keys(obj, {"fleet", "version", "allow_downgrade_from"}, what=what, required={"fleet", "version"})
    fleet = field(obj, "fleet", str, what=what)
    if not _RELEASE_FLEET.match(fleet):
        raise FormatError("manifest release: fleet must be 1-64 of A-Z a-z 0-9 . _ -")
    version = field(obj, "version", int, what=what)
    # Optional members are absent, never null (as the license's optional claims): one encoding per release.
    allow = field(obj, "allow_downgrade_from", int, what=what) if "allow_downgrade_from" in obj else None
    for value in (version, allow):
        if value is not None and not 1 <= value <= MAX_RELEASE_VERSION:
            raise FormatError(f"manifest release: versions must be between 1 and {MAX_RELEASE_VERSION}")
    if allow is not None and allow <= version:
        raise FormatError("manifest release: allow_downgrade_from must be above the bundle's own version")
    return Release(fleet, version, allow)


@dataclass(frozen=True)
class Manifest:
    files: tuple[FileEntry, ...]
    builds: tuple[BuildEntry, ...]
    licenses: tuple[LicenseEntry, ...]
    release: Release | None = None  # absent from bundles built without --release (no anti-rollback)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "builds": [b.to_dict() for b in self.builds],
            "files": [f.to_dict() for f in self.files],
            "format": BUNDLE_FORMAT,
            "licenses": [lic.to_dict() for lic in self.licenses],
            "v": BUNDLE_VERSION,
        }
        if self.release is not None:
            d["release"] = self.release.to_dict()
        return d

    def to_bytes(self) -> bytes:
        """Canonical JSON; the builder's signature covers exactly these bytes."""
        data = dumps(self.to_dict())
        Manifest.from_bytes(data)  # refuse to sign what a verifier would reject
        return data

    def member_names(self) -> list[str]:
        """Every member the archive holds, in archive order."""
        return [MANIFEST_NAME, SIGNATURE_NAME] + [f.path for f in self.files]

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)

    @classmethod
    def from_bytes(cls, data: bytes, limits: BundleLimits = DEFAULT_LIMITS) -> Manifest:
        """Strict parse: canonical JSON, exact fields, canonical file order, consistent cross-references."""
        what = "manifest"
        obj = loads(data, max_size=limits.max_manifest_bytes, what=what)
        exact_keys(
            obj,
            {"builds", "files", "format", "licenses", "release", "v"},
            what=what,
            required={"builds", "files", "format", "licenses", "v"},
        )
        if field(obj, "format", str, what=what) != BUNDLE_FORMAT:
            raise FormatError("manifest: not an edgemart bundle manifest")
        if field(obj, "v", int, what=what) != BUNDLE_VERSION:
            raise FormatError(f"manifest: unsupported bundle format version {obj['v']}")
        files = tuple(_file_entry(f) for f in field(obj, "files", list, what=what))
        if len(files) > limits.max_members:
            raise FormatError(f"manifest: {len(files)} files exceed the limit of {limits.max_members}")
        paths = [f.path for f in files]
        if len(set(paths)) != len(paths):
            raise FormatError("manifest: a file is listed twice")
        for p in paths:
            if member_rank(p) < 2:
                raise FormatError(f"manifest: {p} cannot list itself")
        if canonical_order(paths) != paths:
            raise FormatError("manifest: files are not in canonical order")
        builds = tuple(_build_entry(b) for b in field(obj, "builds", list, what=what))
        licenses = tuple(_license_entry(lic) for lic in field(obj, "licenses", list, what=what))
        listed = set(paths)
        build_files = {p for p in paths if p.startswith("builds/")}
        license_files = {p for p in paths if p.startswith("licenses/")}
        if [b.path for b in builds] != sorted(build_files):
            raise FormatError("manifest: builds do not match the build files, one entry each in file order")
        if [lic.path for lic in licenses] != sorted(license_files):
            raise FormatError(
                "manifest: licenses do not match the license files, one entry each in file order"
            )
        for b in builds:
            if b.path != build_member_name(b.build_hash):
                raise FormatError(f"manifest: {b.path} is not named after its build hash")
        for lic in licenses:
            if lic.path != f"licenses/{lic.license_id}.lic":
                raise FormatError(f"manifest: {lic.path} is not named after its license id")
        for required in (MLBOM_NAME, NOTICE_NAME):
            if required not in listed:
                raise FormatError(f"manifest: {required} is not listed")
        release = parse_release(obj["release"]) if "release" in obj else None
        return cls(files, builds, licenses, release)


def _file_entry(obj: Any) -> FileEntry:
    what = "manifest file entry"
    exact_keys(obj, {"path", "sha256", "size"}, what=what)
    path = field(obj, "path", str, what=what)
    check_member_name(path)
    size = field(obj, "size", int, what=what)
    if size < 0:
        raise FormatError(f"manifest: negative size for {path}")
    digest = field(obj, "sha256", str, what=what)
    if not _HASH.match(digest):
        raise FormatError(f"manifest: sha256 of {path} is not sha256:<hex>")
    return FileEntry(path, size, digest)


def _build_entry(obj: Any) -> BuildEntry:
    what = "manifest build entry"
    exact_keys(obj, {"build_hash", "path", "target"}, what=what)
    target = field(obj, "target", str, what=what)
    if not 0 < len(target) <= 64:
        raise FormatError("manifest: build target empty or too long")
    return BuildEntry(field(obj, "path", str, what=what), field(obj, "build_hash", str, what=what), target)


def _license_entry(obj: Any) -> LicenseEntry:
    what = "manifest license entry"
    exact_keys(
        obj,
        {
            "binding",
            "build_hash",
            "issuer_kid",
            "kind",
            "license_id",
            "listing",
            "max_runs",
            "path",
            "target",
            "validity",
        },
        what=what,
    )
    binding = exact_keys(field(obj, "binding", dict, what=what), {"id", "kind"}, what="license binding")
    bkind = field(binding, "kind", str, what="license binding")
    if bkind not in ("device", "fleet"):
        raise FormatError("manifest: license binding kind must be device or fleet")
    validity = exact_keys(
        field(obj, "validity", dict, what=what), {"not_after", "not_before"}, what="validity"
    )
    strs = {
        k: field(obj, k, str, what=what)
        for k in ("build_hash", "issuer_kid", "kind", "license_id", "listing", "path", "target")
    }
    if not _HASH.match(strs["build_hash"]):
        raise FormatError("manifest: license build_hash is not sha256:<hex>")
    return LicenseEntry(
        binding_kind=bkind,
        binding_id=field(binding, "id", str, what="license binding"),
        not_before=field(validity, "not_before", int, what="validity"),
        not_after=field(validity, "not_after", (int, type(None)), what="validity"),
        max_runs=field(obj, "max_runs", (int, type(None)), what=what),
        **strs,
    )


def make_manifest(
    files: list[FileEntry],
    builds: list[BuildEntry],
    licenses: list[LicenseEntry],
    release: Release | None = None,
) -> Manifest:
    """A manifest with every list in canonical order (so equal inputs give equal bytes)."""
    ordered = {name: i for i, name in enumerate(canonical_order([f.path for f in files]))}
    return Manifest(
        tuple(sorted(files, key=lambda f: ordered[f.path])),
        tuple(sorted(builds, key=lambda b: b.path)),
        tuple(sorted(licenses, key=lambda lic: lic.path)),
        release,
    )


# --------------------------------------------------------------------------- the builder's signature


def _sig_message(manifest_bytes: bytes) -> bytes:
    return SIG_TYP.encode("ascii") + b"\0" + manifest_bytes


def sign_manifest(manifest_bytes: bytes, key: ed25519.Ed25519PrivateKey) -> bytes:
    """manifest.sig: canonical JSON naming the key and the manifest hash, with a deterministic Ed25519 signature."""
    pub = key.public_key()
    return dumps(
        {
            "alg": SIG_ALG,
            "kid": key_id(pub),
            "manifest": sha256_tag(manifest_bytes),
            "public_key": b64e(pub.public_bytes_raw()),
            "sig": b64e(key.sign(_sig_message(manifest_bytes))),
            "typ": SIG_TYP,
        }
    )


@dataclass(frozen=True)
class SignatureCheck:
    kid: str
    pinned: bool  # True when checked against a key the caller supplied, False when only self-consistent


def verify_manifest_signature(
    manifest_bytes: bytes,
    sig_bytes: bytes,
    *,
    builder_key: ed25519.Ed25519PublicKey | None = None,
    limits: BundleLimits = DEFAULT_LIMITS,
) -> SignatureCheck:
    """Check manifest.sig over the manifest bytes; with ``builder_key``, also that it is the pinned key."""
    what = "manifest.sig"
    try:
        obj = loads(sig_bytes, max_size=limits.max_signature_bytes, what=what)
        exact_keys(obj, {"alg", "kid", "manifest", "public_key", "sig", "typ"}, what=what)
        if field(obj, "typ", str, what=what) != SIG_TYP:
            raise FormatError("manifest.sig: wrong signature type")
        if field(obj, "alg", str, what=what) != SIG_ALG:  # pinned: the file never chooses the algorithm
            raise FormatError(f"manifest.sig: algorithm {obj['alg']!r} is not allowed")
        raw_pub = b64d(field(obj, "public_key", str, what=what), what="manifest.sig public_key", max_len=32)
        sig = b64d(field(obj, "sig", str, what=what), what="manifest.sig signature", max_len=64)
        if len(raw_pub) != 32 or len(sig) != 64:
            raise FormatError("manifest.sig: key or signature has the wrong length")
        kid = field(obj, "kid", str, what=what)
        manifest_hash = field(obj, "manifest", str, what=what)
    except FormatError as exc:
        raise BundleInvalid(f"manifest.sig is malformed: {exc.message}") from None
    pub = ed25519.Ed25519PublicKey.from_public_bytes(raw_pub)
    if kid != key_id(pub):
        raise BundleInvalid("manifest.sig: kid does not match its public key")
    if builder_key is not None and pub.public_bytes_raw() != builder_key.public_bytes_raw():
        raise BundleInvalid(
            f"manifest.sig: signed by builder key {kid}, not the pinned key {key_id(builder_key)}"
        )
    if manifest_hash != sha256_tag(manifest_bytes):
        raise BundleInvalid("manifest.sig: signature is for a different manifest (manifest.json was changed)")
    try:
        pub.verify(sig, _sig_message(manifest_bytes))
    except InvalidSignature:
        raise BundleInvalid("manifest.sig: Ed25519 signature does not verify") from None
    return SignatureCheck(kid, builder_key is not None)


# --------------------------------------------------------------------------- licenses inside a bundle


def _read_signed(token: bytes, typ: str, path: str, what: str) -> tuple[dict[str, Any], Any]:
    """Payload and issuer key of an envelope, its Ed25519 signature checked against the certificate it
    carries (integrity only: trust in the issuer comes from verifying against a pinned root)."""
    try:
        payload, body, cert = parse_envelope(token, typ)
        envelope = loads(token, max_size=DEFAULT_LIMITS.max_license_bytes, what=path)
        sig_obj = field(envelope, "sig", dict, what=path)
        sig = b64d(
            field(sig_obj, "Ed25519", str, what=f"{path} signature"), what=f"{path} signature", max_len=64
        )
    except FormatError as exc:
        raise BundleInvalid(f"{path} is not a valid {what}: {exc.message}") from None
    pub = cert.public_key()
    if not isinstance(pub, ed25519.Ed25519PublicKey):
        raise BundleInvalid(f"{path}: issuer key is not Ed25519")
    try:
        pub.verify(sig, signed_message(typ, body))
    except InvalidSignature:
        raise BundleInvalid(f"{path}: {what} signature does not verify") from None
    return payload, pub


def read_license_token(token: bytes, path: str) -> LicenseClaims:
    """Claims of a license token, with its Ed25519 signature checked against the certificate it carries.

    This is integrity only (the token was not altered since its issuer signed it); trust in the issuer
    comes from drm.verify_license against a pinned root."""
    payload, pub = _read_signed(token, LICENSE_TYP, path, "license token")
    try:
        claims = LicenseClaims.from_dict(payload)
    except FormatError as exc:
        raise BundleInvalid(f"{path} is not a valid license token: {exc.message}") from None
    if claims.issuer_kid != key_id(pub):
        raise BundleInvalid(f"{path}: issuer_kid does not match the signing certificate")
    return claims


def read_activation_token(token: bytes, path: str) -> Activation:
    """A seat activation carried in a bundle (§18.2), integrity-checked like read_license_token; it must be
    the one its member name announces (``activations/<license_id>.<device_id>.act``)."""
    payload, _ = _read_signed(token, ACTIVATION_TYP, path, "seat activation")
    try:
        act = Activation.from_dict(payload)
    except FormatError as exc:
        raise BundleInvalid(f"{path} is not a valid seat activation: {exc.message}") from None
    if path != f"activations/{act.license_id}.{act.device_id}.act":
        raise BundleInvalid(f"{path}: holds the activation of {act.device_id} on {act.license_id}")
    return act


# --------------------------------------------------------------------------- builder keys (plain Ed25519 PEM)


def generate_builder_key() -> tuple[bytes, bytes]:
    """A new builder signing key: (private PKCS#8 PEM, public SubjectPublicKeyInfo PEM)."""
    key = ed25519.Ed25519PrivateKey.generate()
    return builder_private_pem(key), builder_public_pem(key.public_key())


def builder_private_pem(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def builder_public_pem(pub: ed25519.Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_builder_private_key(pem: bytes) -> ed25519.Ed25519PrivateKey:
    return ed25519_from_pem(pem, what="builder key")


def load_builder_public_key(pem: bytes) -> ed25519.Ed25519PublicKey:
    """A builder public key from PEM (or the private key PEM, whose public half is taken)."""
    if b"PRIVATE KEY" in pem:
        return load_builder_private_key(pem).public_key()
    try:
        pub = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError):
        raise UsageError("builder key: not a PEM public key") from None
    if not isinstance(pub, ed25519.Ed25519PublicKey):
        raise UsageError("builder key: expected an Ed25519 public key")
    return pub


__all__ = [
    "BLOCK",
    "BUNDLE_FORMAT",
    "BUNDLE_VERSION",
    "DEFAULT_LIMITS",
    "MANIFEST_NAME",
    "MLBOM_NAME",
    "NOTICE_NAME",
    "SIGNATURE_NAME",
    "TAR_END",
    "BuildEntry",
    "BundleInvalid",
    "BundleLimits",
    "FileEntry",
    "GZIP_HEADER",
    "iter_archive",
    "iter_gzip",
    "LicenseEntry",
    "Manifest",
    "SignatureCheck",
    "TarMemberHeader",
    "build_member_name",
    "canonical_order",
    "check_member_name",
    "encode_tar_header",
    "generate_builder_key",
    "license_member_name",
    "activation_member_name",
    "read_activation_token",
    "load_builder_private_key",
    "load_builder_public_key",
    "make_manifest",
    "Release",
    "parse_release",
    "member_rank",
    "parse_tar_header",
    "read_license_token",
    "sign_manifest",
    "tar_padding",
    "verify_manifest_signature",
]
