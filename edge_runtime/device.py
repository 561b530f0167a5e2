# Why this is one module: the Device object holds the directory lock, keys and sealed state that enrollment, install, license checks, reservations and the licensed model all use under that one lock; splitting it means passing the lock around (next layout step: move enrollment and install into their own modules).
"""One device directory: keys, enrollment, license installation, enforcement and the licensed model.

Every license decision happens here, before any content key is unwrapped; refusals are opaque to the
caller and recorded precisely in DIR/audit.log and as signed "refused" usage records."""

from __future__ import annotations

import functools
import json
import os
import re
import stat
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, NoReturn, cast

import numpy as np
from cryptography.hazmat.primitives.asymmetric import x25519

import drm
from drm._canonical import FormatError
from drm.keys import private_key_to_pem, x25519_from_pem
from drm.license import LICENSE_TYP
from edge_runtime.anchor import ANCHOR_CONFIG, Anchor, TpmAnchor, tpm_from_config
from edge_runtime.anchor import load_config as load_anchor_config
from edge_runtime.backends import Backend, TensorSpec, open_sealed_backend
from edge_runtime.ledger import (
    DEFAULT_POLICY,
    RELEASE,
    RESERVE,
    Ledger,
    Policy,
    State,
    StateProblem,
    replay_run_counters,
    reservation_detail,
)
from edgemart.core import fileio

KEY_FILES = ("sign.key", "kem.key", "pqkem.key")
REQUIRED_FILES = ("sign.key", "kem.key", "device.crt", "state.key")
BUDGET_DIR = (
    "budgets"  # DIR/budgets/<license_id>.grant: the store's latest budget grant for a metered license
)
MAX_GRANT_BYTES = 16 * 1024
# DIR/activations/<license_id>.act: the store-signed seat activation that lets this device run a fleet license.
ACTIVATION_DIR = "activations"
MAX_ACTIVATION_BYTES = 16 * 1024
FLEET_DIR = "fleet"  # DIR/fleet/<fleet_key_id>.key: X25519 PKCS#8 PEM, 0600, one per fleet the device is in
MAX_FLEET_KEY_BYTES = 16 * 1024
_FLEET_KEY_ID = re.compile(r"^[0-9a-f]{32}\Z")


def _iso(t: int | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _parse_claims(token: bytes) -> drm.LicenseClaims:
    """Structural parse of a license (no trust decision), for ids and display."""
    return _parse_claims_of(bytes(token))


@functools.lru_cache(maxsize=64)
def _parse_claims_of(token: bytes) -> drm.LicenseClaims:
    # A pure function of the bytes (frozen result), so a device opening the same license again in one
    # process does not re-parse and re-canonicalize its ~6 KB envelope. Errors are not cached.
    payload, _, _ = drm.parse_envelope(token, LICENSE_TYP)
    return drm.LicenseClaims.from_dict(payload)


# What the caller is told about a refusal: a category it can act on, never which check or byte failed (that
# would be an oracle for forging licenses). The precise reason goes to DIR/audit.log. First match wins.
_REFUSAL_CATEGORIES = (
    ("run cap", "run cap reached"),
    ("offline budget", "offline budget used up: check in with `edgemart device sync`"),
    ("is revoked", "license revoked"),
    ("revocation list", "revocation list missing or invalid (run `edgemart device sync`)"),
    ("clock rollback", "device clock went back"),
    ("license has expired", "license expired"),
    ("not yet valid", "license not yet valid"),
    ("another device", "wrong device"),
    ("fleet key", "wrong device"),
    ("seat activation", "no seat activated for this device (run `edgemart device activate`)"),
    ("unwrap failed", "wrong device"),
    ("another build", "license is for another build"),
    ("integrity check", "build damaged or not the licensed one"),
)


def refusal_category(reason: str) -> str:
    """The one-line category of a refusal reason (see _REFUSAL_CATEGORIES); device-state problems and every
    verification failure (signatures, certificates, malformed tokens) share one category each."""
    for needle, category in _REFUSAL_CATEGORIES:
        if needle in reason:
            return category
    if any(w in reason for w in ("state", "usage log", "anchor", "ledger")):
        return "device state cannot be trusted"
    return "license could not be verified"


def fleet_key_id_of(key: x25519.X25519PrivateKey) -> str:
    """The id licenses name a fleet by: drm.key_id of the raw X25519 public key."""
    return drm.key_id(key.public_key().public_bytes_raw())


def read_fleet_key(path: Path) -> x25519.X25519PrivateKey:
    """Load one fleet key file, refusing (UsageError) anything but a private regular file holding the X25519
    key its name announces. A fleet key opens every build of its fleet, so a key file that group or others
    can read is refused rather than used: it may already have leaked, and quietly tightening it would hide
    that (`edgemart device add-fleet-key` or chmod 600 repairs it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise drm.UsageError(f"fleet key {path} does not exist") from None
    except OSError as exc:
        raise drm.UsageError(
            f"fleet key {path} cannot be opened (a symbolic link?): {exc.strerror}"
        ) from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise drm.UsageError(f"fleet key {path} is not a regular file")
        if info.st_mode & 0o077:
            raise drm.UsageError(
                f"fleet key {path} is accessible to group or others (mode {stat.S_IMODE(info.st_mode):04o});"
                f" a fleet key unlocks every build of its fleet: run `chmod 600 {path}` if it cannot have"
                " leaked, or re-install it with `edgemart device add-fleet-key`"
            )
        pem = fh.read(MAX_FLEET_KEY_BYTES + 1)
    if len(pem) > MAX_FLEET_KEY_BYTES:
        raise drm.UsageError(f"fleet key {path} is larger than {MAX_FLEET_KEY_BYTES} bytes")
    key = x25519_from_pem(pem, what=f"fleet key {path}")
    kid = fleet_key_id_of(key)
    if path.name != f"{kid}.key":
        raise drm.UsageError(f"{path} holds the key of fleet {kid}, not {path.stem}")
    return key


def read_fleet_keys(directory: Path) -> dict[str, x25519.X25519PrivateKey]:
    """Every fleet key a device directory holds (DIR/fleet/*.key), by fleet key id; each checked by
    read_fleet_key, so one bad file is reported rather than skipped."""
    folder = directory / FLEET_DIR
    if not folder.is_dir():
        return {}
    return {path.stem: read_fleet_key(path) for path in sorted(folder.glob("*.key"))}


MAX_CACHED_VERIFICATIONS = 64


def _verification_key(token: bytes, root_tag: str) -> str:
    """What a cached license verification is bound to: the exact token bytes and the pinned root (hex SHA-256
    of its PEM)."""
    return f"{drm.sha256_tag(bytes(token))[7:]}:{root_tag}"


def _cached_verification(st: State, key: str, trusted: int) -> bool:
    """Whether the state holds a verification of this token under this root that still applies: made at
    the current revocation version and with the certificate chain valid at ``trusted`` (fail closed: any
    doubt means verifying again)."""
    entry = st.verified.get(key)
    return (
        entry is not None
        and entry["rv"] == st.revocation_version
        and entry["first"] <= trusted <= entry["last"]
    )


def _remember_verification(
    st: State, key: str, verified: drm.VerifiedLicense, root: Any, trusted: int
) -> dict[str, int]:
    first, last = drm.chain_window(verified, root)
    entry = {"rv": st.revocation_version, "first": first, "last": last, "at": trusted}
    st.verified[key] = entry
    while len(st.verified) > MAX_CACHED_VERIFICATIONS:
        del st.verified[min(st.verified, key=lambda k: st.verified[k]["at"])]
    return dict(entry)


class Device:
    """A device directory (see the layout in the project brief / docs)."""

    def __init__(
        self,
        directory: Path,
        keys: drm.DeviceKeys,
        state_key: bytes,
        *,
        anchor_dir: Path | None = None,
        policy: Policy = DEFAULT_POLICY,
        anchor: Anchor | None = None,
    ) -> None:
        self.dir = directory
        self.keys = keys
        self.policy = policy
        if anchor is None:
            cfg = load_anchor_config(directory)
            anchor = None if cfg is None else cast(Anchor, tpm_from_config(cfg))
        self.ledger = Ledger(
            directory,
            device_id=keys.device_id,
            sign_key=keys.sign,
            state_key=state_key,
            anchor_dir=anchor_dir,
            anchor=anchor,
            policy=policy,
        )
        self._revocation_file = os.fspath(directory / "revocation.bin")  # stat()ed on every run
        self._revocation_cache: tuple[tuple[int, int, int, int], drm.RevocationList] | None = None
        self._root_cache: tuple[tuple[int, int, int, int], Any, str] | None = None
        self._device_id = keys.device_id  # derived from the signing key, which a Device never changes
        # Content keys this process unwrapped, by everything the unwrap reads (see _unwrap).
        self._ceks: dict[tuple[Any, ...], bytes] = {}
        # License verifications made here and not yet in the sealed state: merged into every state this
        # device loads, so the next commit (the first run's reservation) persists them; no extra write.
        self._verified_pending: dict[str, dict[str, int]] = {}

    @property
    def device_id(self) -> str:
        return self._device_id

    @property
    def audit_path(self) -> Path:
        return self.ledger.audit_path

    # ------------------------------------------------------------------ init / open

    @classmethod
    def init(
        cls,
        directory: str | os.PathLike[str],
        *,
        trust: bytes | None = None,
        now: int | None = None,
        anchor_dir: Path | None = None,
        pq: bool = True,
        tpm: TpmAnchor | None = None,
    ) -> Device:
        """Make the device's keypairs here (0600 files in a 0700 dir), a self-signed certificate and the
        initial sealed state. Refuses to overwrite existing keys. With ``tpm``, a TPM 2.0 NV counter is the
        rollback anchor (DIR/anchor.json names it; the sealed state remembers it too)."""
        d = Path(directory)
        now = int(time.time()) if now is None else now
        root = None
        if trust is not None:
            try:
                root = drm.cert_from_bytes(trust)
            except FormatError as exc:
                raise drm.UsageError(f"--trust: {exc.message}") from None
        d.mkdir(parents=True, exist_ok=True, mode=fileio.PRIVATE_DIR)
        os.chmod(d, fileio.PRIVATE_DIR)
        existing = [n for n in (*KEY_FILES, "state.key", "state.bin") if (d / n).exists()]
        if existing:
            raise drm.UsageError(
                f"{d} already holds device keys ({', '.join(existing)}); refusing to overwrite them"
            )
        keys = drm.DeviceKeys.generate(pq=pq)
        for name, data in keys.to_files().items():
            fileio.create_private(d / name, data)
        state_key = os.urandom(32)
        fileio.create_private(d / "state.key", state_key)
        fileio.atomic_write(d / "device.crt", drm.cert_to_pem(keys.self_signed_cert(now=now)), mode=0o644)
        if root is not None:
            fileio.atomic_write(d / "root.crt", drm.cert_to_pem(root), mode=0o644)
        (d / "licenses").mkdir(mode=fileio.PRIVATE_DIR, exist_ok=True)
        (d / "builds").mkdir(mode=fileio.PRIVATE_DIR, exist_ok=True)
        if tpm is not None:
            cfg = {"kind": "tpm", "nv_index": f"{tpm.nv_index:#010x}", "tcti": tpm.tcti}
            fileio.atomic_write(d / ANCHOR_CONFIG, json.dumps(cfg, sort_keys=True).encode(), mode=0o644)
        device = cls(d, keys, state_key, anchor_dir=anchor_dir, anchor=cast(Anchor | None, tpm))
        device.ledger.create(now=now)
        return device

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        *,
        anchor_dir: Path | None = None,
        policy: Policy = DEFAULT_POLICY,
    ) -> Device:
        d = Path(directory)
        if not d.is_dir():
            raise drm.UsageError(
                f"device directory {d} does not exist: run `edgemart device init --device-dir {d}`"
            )
        missing = [n for n in REQUIRED_FILES if not (d / n).is_file()]
        if missing:
            raise drm.UsageError(
                f"{d} is not an initialized device directory (missing {', '.join(missing)}):"
                f" run `edgemart device init --device-dir {d}`"
            )
        files = {n: (d / n).read_bytes() for n in KEY_FILES if (d / n).is_file()}
        keys = drm.DeviceKeys.from_files(files)
        state_key = (d / "state.key").read_bytes()
        if len(state_key) != 32:
            raise drm.UsageError(f"{d / 'state.key'} is corrupt (expected 32 bytes)")
        cert = drm.cert_from_bytes((d / "device.crt").read_bytes())
        if drm.cert_device_id(cert) != keys.device_id:
            raise drm.UsageError(f"{d / 'device.crt'} does not belong to this device's signing key")
        return cls(d, keys, state_key, anchor_dir=anchor_dir, policy=policy)

    # ------------------------------------------------------------------ small accessors

    def certificate(self) -> Any:
        return drm.cert_from_bytes((self.dir / "device.crt").read_bytes())

    def root(self) -> Any:
        """The pinned store root; parsed again only when DIR/root.crt changed (inode, size, mtime, ctime)."""
        path = self.dir / "root.crt"
        try:
            info = os.stat(path)
        except OSError:
            info = None
        if info is None or not stat.S_ISREG(info.st_mode):
            raise drm.UsageError(
                f"{self.dir} has no pinned store root: run `edgemart device enroll` or `device init --trust ROOT.crt`"
            )
        key = (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        cached = self._root_cache
        if cached is None or cached[0] != key:
            cert = drm.cert_from_bytes(path.read_bytes())
            cached = self._root_cache = (key, cert, drm.sha256_tag(drm.cert_to_pem(cert))[7:])
        return cached[1]

    def _unwrap(self, claims: drm.LicenseClaims, recipient: Any) -> bytes:
        """drm.unwrap_cek, remembered for this process: the unwrap is a pure function of the wrapped key, the
        binding it is bound to and the private key, so a license opened again (after every license check has
        passed again) skips the KEM decapsulation. The cache adds no exposure: the private key that recovers
        the content key is in this process's memory already."""
        key = (
            claims.fleet_key_id,
            claims.license_id,
            claims.build_hash,
            claims.binding_id,
            tuple(sorted(claims.wrapped_cek.items())),
        )
        cek = self._ceks.get(key)
        if cek is None:
            cek = drm.unwrap_cek(claims, recipient)
            if len(self._ceks) >= 64:
                self._ceks.pop(next(iter(self._ceks)))
            self._ceks[key] = cek
        return cek

    def _root_tag(self, root: Any) -> str:
        """Hex SHA-256 of the root's PEM (what cached verifications are bound to)."""
        cached = self._root_cache
        if cached is not None and cached[1] is root:
            return cached[2]
        return drm.sha256_tag(drm.cert_to_pem(root))[7:]

    def _store(self) -> Any:
        from edge_runtime._store_client import StoreClient

        path = self.dir / "store.json"
        if not path.is_file():
            raise drm.UsageError(
                f"{self.dir} is not enrolled with a store: run `edgemart device enroll` first"
            )
        cfg = json.loads(path.read_text())
        return StoreClient(cfg["url"], cfg.get("token"))

    # ------------------------------------------------------------------ fleet keys

    def fleet_key_ids(self) -> frozenset[str]:
        """Ids of the fleet keys this device holds in DIR/fleet (every file checked: see read_fleet_key)."""
        return frozenset(read_fleet_keys(self.dir))

    def _fleet_key(self, fleet_key_id: str) -> x25519.X25519PrivateKey | None:
        """The private key of one fleet, or None when the device does not hold it."""
        if not _FLEET_KEY_ID.match(fleet_key_id):
            return None
        path = self.dir / FLEET_DIR / f"{fleet_key_id}.key"
        if not os.path.lexists(path):
            return None
        return read_fleet_key(path)

    def add_fleet_key(self, pem: bytes) -> dict[str, Any]:
        """Install a fleet's X25519 private key as DIR/fleet/<fleet_key_id>.key (0600 in a 0700 directory,
        atomically; re-serialized, so nothing but the key is kept). Adding a key already held rewrites it
        0600, which also repairs a file whose mode read_fleet_key refuses."""
        if len(pem) > MAX_FLEET_KEY_BYTES:
            raise drm.UsageError(f"a fleet key file is at most {MAX_FLEET_KEY_BYTES} bytes")
        key = x25519_from_pem(pem, what="fleet key")
        kid = fleet_key_id_of(key)
        folder = self.dir / FLEET_DIR
        folder.mkdir(mode=fileio.PRIVATE_DIR, exist_ok=True)
        os.chmod(folder, fileio.PRIVATE_DIR)
        path = folder / f"{kid}.key"
        held = os.path.lexists(path)
        if held and (path.is_symlink() or not path.is_file()):
            raise drm.UsageError(f"{path} exists and is not a regular file; remove it first")
        fileio.atomic_write(path, private_key_to_pem(key), mode=fileio.PRIVATE_FILE)
        return {"device_id": self.device_id, "fleet_key_id": kid, "path": str(path), "replaced": held}

    def installed(self) -> dict[str, dict[str, Any]]:
        path = self.dir / "installed.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def installed_entry(
        self, listing: str, target: str | None = None, version: int | None = None
    ) -> dict[str, Any]:
        """The installed build of ``listing`` for ``target``; without a target, the only one installed.
        Without ``version``, the newest version installed for that target; older ones stay openable by it."""
        table = self.installed()
        if listing not in table:
            known = ", ".join(sorted(table)) or "none"
            raise drm.NotFoundError(
                f"listing {listing!r} is not installed on this device (installed: {known})"
            )
        builds = table[listing].get("builds") or {table[listing]["target"]: table[listing]}
        if version is not None:
            versions = table[listing].get("versions") or {}
            if str(version) not in versions:
                raise drm.NotFoundError(
                    f"listing {listing!r} has no version {version} on this device (installed: "
                    f"{', '.join(sorted(versions, key=int)) or 'none'}); fetch it with"
                    f" `edgemart device fetch {listing} --version {version} --target T`"
                )
            builds = versions[str(version)]
        if target is None:
            if len(builds) > 1:
                raise drm.UsageError(
                    f"listing {listing!r} has builds for {', '.join(sorted(builds))} on this device:"
                    " choose one with --target"
                )
            return dict(next(iter(builds.values())))
        if target not in builds:
            raise drm.NotFoundError(
                f"listing {listing!r} has no {target} build on this device (installed: {', '.join(sorted(builds))});"
                f" fetch it with `edgemart device fetch {listing} --target {target}`"
            )
        return dict(builds[target])

    @staticmethod
    def _clock(now: int | None) -> int:
        return int(time.time()) if now is None else int(now)

    # ------------------------------------------------------------------ refusals

    def _refuse(
        self, st: State | None, reason: str, *, t: int, license_id: str = "", build_hash: str = ""
    ) -> NoReturn:
        self.ledger.record_refusal(st, t=t, license_id=license_id, build_hash=build_hash, reason=reason)
        raise drm.LicenseRefused(
            f"license refused: {refusal_category(reason)} (details in {self.audit_path})", reason=reason
        )

    def _refuse_license(
        self, st: State | None, claims: drm.LicenseClaims, reason: str, *, t: int
    ) -> NoReturn:
        """_refuse for a verified license: the record names its id and build."""
        self._refuse(st, reason, t=t, license_id=claims.license_id, build_hash=claims.build_hash)

    def _load_state(self, clock: int, *, license_id: str = "", build_hash: str = "") -> State:
        """Load the ledger and apply the clock-rollback rule; refusals are recorded."""
        try:
            st, _ = self.ledger.load()
        except StateProblem as problem:
            self._refuse(None, problem.reason, t=clock, license_id=license_id, build_hash=build_hash)
        self._verified_pending = {k: v for k, v in self._verified_pending.items() if k not in st.verified}
        st.verified.update((k, dict(v)) for k, v in self._verified_pending.items())
        if clock < st.clock_hwm - self.policy.clock_tolerance:
            st.rollbacks += 1
            self._refuse(
                st,
                f"clock rollback: system clock {_iso(clock)} is behind the trusted high-water mark"
                f" {_iso(st.clock_hwm)} by more than {self.policy.clock_tolerance}s",
                t=max(st.hwm, clock),
                license_id=license_id,
                build_hash=build_hash,
            )
        return st

    def _revocation_key(self) -> tuple[int, int, int, int] | None:
        """Identity of DIR/revocation.bin as the file system sees it (None when absent): any write, copy or
        touch changes it (ctime cannot be set back by the user), so an unchanged key means an unchanged list."""
        try:
            info = os.stat(self._revocation_file)
        except FileNotFoundError:
            return None
        return (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)

    def _revoked(self, st: State, trusted: int, *, license_id: str, build_hash: str) -> frozenset[str]:
        """The current revocation set; never accepts a list older than the version the state has seen."""
        path = self.dir / "revocation.bin"
        key = self._revocation_key()
        if key is None:
            if st.revocation_version > 0:
                self._refuse(
                    st,
                    f"revocation list missing but version {st.revocation_version} was seen",
                    t=trusted,
                    license_id=license_id,
                    build_hash=build_hash,
                )
            return frozenset()
        cached = self._revocation_cache
        if cached is not None and cached[0] == key and cached[1].version >= st.revocation_version:
            rl = cached[1]
        else:
            try:
                rl = drm.verify_revocation_list(
                    path.read_bytes(), root=self.root(), now=trusted, current_version=st.revocation_version
                )
            except drm.LicenseRefused as exc:
                self._refuse(
                    st,
                    f"revocation list rejected: {exc.reason}",
                    t=trusted,
                    license_id=license_id,
                    build_hash=build_hash,
                )
            self._revocation_cache = (key, rl)
        st.revocation_version = max(st.revocation_version, rl.version)
        return rl.revoked

    def _verify_locked(
        self, token: bytes, *, build_hash: str | None, clock: int, target: str | None = None
    ) -> tuple[drm.LicenseClaims, State, int]:
        """All license checks except the run cap, with the device lock held; ``build_hash`` and ``target`` are
        the container header's when the build is at hand. Returns (claims, state, trusted now)."""
        try:
            claims0 = _parse_claims(token)
            lid, issued_at = claims0.license_id, claims0.issued_at
        except FormatError as exc:
            st = self._load_state(clock)
            self._refuse(
                st, f"malformed license: {exc.message}", t=max(clock, st.hwm), build_hash=build_hash or ""
            )
        st = self._load_state(clock, license_id=lid, build_hash=build_hash or "")
        trusted = max(clock, st.hwm, issued_at)
        revoked = self._revoked(st, trusted, license_id=lid, build_hash=build_hash or "")
        # Only the key the license names is read: a device-bound license never touches DIR/fleet.
        fleet = claims0.fleet_key_id
        held = frozenset({fleet}) if fleet is not None and self._fleet_key(fleet) is not None else frozenset()
        root = self.root()
        uses = {
            "device_id": self.device_id,
            "fleet_key_ids": held,
            "build_hash": build_hash,
            "target": target,
            "revoked": revoked,
        }
        cache_key = _verification_key(token, self._root_tag(root))
        try:
            if _cached_verification(st, cache_key, trusted):
                # The signatures were verified for these exact bytes under this root and revocation version;
                # what depends on this use is checked now, as verify_license would.
                drm.check_claims(claims0, now=trusted, **uses)  # type: ignore[arg-type]
                return claims0, st, trusted
            verified = drm.verify_license(token, root=root, now=trusted, **uses)  # type: ignore[arg-type]
        except drm.LicenseRefused as exc:
            self._refuse(st, exc.reason, t=max(clock, st.hwm), license_id=lid, build_hash=build_hash or "")
        self._verified_pending[cache_key] = _remember_verification(st, cache_key, verified, root, trusted)
        return verified.claims, st, trusted

    def _check_cap(self, st: State, claims: drm.LicenseClaims, trusted: int) -> tuple[int, int] | None:
        """Refuse when the run cap or the offline budget is used up; returns the budget (see _budget)."""
        used = st.runs.get(claims.license_id, 0)
        if claims.max_runs is not None and used >= claims.max_runs:
            self._refuse_license(
                st, claims, f"run cap exhausted: {used} of {claims.max_runs} runs used", t=trusted
            )
        budget = self._budget(st, claims, trusted)
        if budget is not None:
            self._check_budget_time(st, claims, budget, trusted)
            if used >= budget[0]:
                self._refuse_license(
                    st,
                    claims,
                    f"offline budget used up: the run counter is at {used}, the budget allows {budget[0]}",
                    t=trusted,
                )
        return budget

    def _check_budget_time(
        self, st: State, claims: drm.LicenseClaims, budget: tuple[int, int], trusted: int
    ) -> None:
        if trusted >= budget[1]:
            self._refuse_license(st, claims, f"offline budget expired at {_iso(budget[1])}", t=trusted)

    def _budget(self, st: State, claims: drm.LicenseClaims, trusted: int) -> tuple[int, int] | None:
        """(counter limit, deadline) a metered license runs on offline; None for a license without an offline
        budget. The license's own budget holds until the store signs a grant at a check-in; a grant made after
        more usage records than this log holds belongs to a later state (this one was restored) and is
        ignored, so a restore never keeps the newer grant with the older counters."""
        if claims.offline is None:
            return None
        lid = claims.license_id
        budget = (claims.offline["runs"], claims.issued_at + claims.offline["hours"] * 3600)
        path = self.dir / BUDGET_DIR / f"{lid}.grant"
        if not path.is_file():
            return budget
        try:
            with open(path, "rb") as fh:
                token = fh.read(MAX_GRANT_BYTES + 1)
            grant = drm.verify_budget_grant(
                token, root=self.root(), now=trusted, device_id=self.device_id, license_id=lid
            )
        except drm.LicenseRefused as exc:
            self.ledger.audit(t=trusted, license_id=lid, reason=exc.reason, event="grant-ignored")
            return budget
        if grant.seq > st.log_seq:
            self.ledger.audit(
                t=trusted,
                license_id=lid,
                reason=f"budget grant made after {grant.seq} usage records; this state holds {st.log_seq}"
                " (restored from an older copy?)",
                event="grant-ignored",
            )
            return budget
        return grant.runs_until, grant.not_after

    def install_budget_grant(self, token: bytes, *, now: int | None = None) -> dict[str, Any]:
        """Keep a budget grant from a check-in (verified for this device; the newest one wins)."""
        if len(token) > MAX_GRANT_BYTES:
            raise drm.UsageError("budget grant too large")
        clock = self._clock(now)
        try:
            payload, _, _ = drm.parse_envelope(token, "edgemart-budget/1")
            lid = drm.BudgetGrant.from_dict(payload).license_id
            grant = drm.verify_budget_grant(
                token, root=self.root(), now=clock + 86400, device_id=self.device_id, license_id=lid
            )
        except (FormatError, drm.LicenseRefused) as exc:
            reason = exc.reason if isinstance(exc, drm.LicenseRefused) else exc.message
            raise drm.UsageError(f"the store sent a budget grant this device refuses: {reason}") from None
        folder = self.dir / BUDGET_DIR
        folder.mkdir(mode=fileio.PRIVATE_DIR, exist_ok=True)
        path = folder / f"{grant.license_id}.grant"
        with fileio.locked(self.ledger.lock_path):
            if path.is_file():
                try:
                    held = drm.BudgetGrant.from_dict(
                        drm.parse_envelope(path.read_bytes(), "edgemart-budget/1")[0]
                    )
                    if held.issued_at > grant.issued_at:
                        return {"license_id": lid, "runs_until": held.runs_until, "updated": False}
                except FormatError:
                    pass
            fileio.atomic_write(path, bytes(token))
        return {
            "license_id": lid,
            "runs_until": grant.runs_until,
            "not_after": _iso(grant.not_after),
            "updated": True,
        }

    # ------------------------------------------------------------------ seat activations

    def _check_activation(self, st: State, claims: drm.LicenseClaims, trusted: int) -> None:
        """A fleet license runs only on a device holding a store-signed activation of one of its seats, for this
        device, this license and its fleet key (seat <= the signed seat count), not revoked; refused otherwise."""
        lid = claims.license_id
        if claims.fleet_key_id is None:
            return
        if drm.seat_revocation_entry(lid, self.device_id) in self._revoked(
            st, trusted, license_id=lid, build_hash=claims.build_hash
        ):
            self._refuse_license(
                st, claims, f"the seat activation of this device on {lid} is revoked", t=trusted
            )
        path = self.dir / ACTIVATION_DIR / f"{lid}.act"
        try:
            with open(path, "rb") as fh:
                token = fh.read(MAX_ACTIVATION_BYTES + 1)
        except FileNotFoundError:
            self._refuse_license(
                st, claims, f"no seat activation for this device on fleet license {lid}", t=trusted
            )
        except OSError as exc:
            self._refuse_license(st, claims, f"seat activation unreadable: {exc.strerror}", t=trusted)
        if len(token) > MAX_ACTIVATION_BYTES:
            self._refuse_license(st, claims, "seat activation too large", t=trusted)
        try:
            drm.verify_activation(
                token,
                root=self.root(),
                now=trusted,
                device_id=self.device_id,
                license_id=lid,
                fleet_key_id=claims.fleet_key_id,
                seats=claims.seats,
            )
        except drm.LicenseRefused as exc:
            self._refuse_license(st, claims, f"seat activation refused: {exc.reason}", t=trusted)

    def _held_seat(self, license_id: str) -> int | None:
        """For display: the seat DIR/activations/<license_id>.act names for this device (None: none held). The
        run-time check (_check_activation) verifies it; this only parses."""
        try:
            with open(self.dir / ACTIVATION_DIR / f"{license_id}.act", "rb") as fh:
                act = drm.parse_activation(fh.read(MAX_ACTIVATION_BYTES + 1))
        except (OSError, FormatError):
            return None
        return act.seat if act.device_id == self.device_id and act.license_id == license_id else None

    def install_activation(self, token: bytes, *, now: int | None = None) -> dict[str, Any]:
        """Keep a seat activation (from the store, or from a bundle) as DIR/activations/<license_id>.act after
        verifying it is signed under the pinned root and names this device; the run-time check
        (_check_activation) compares it with the license. UsageError for one this device refuses."""
        if len(token) > MAX_ACTIVATION_BYTES:
            raise drm.UsageError("seat activation too large")
        clock = self._clock(now)
        try:
            act = drm.parse_activation(bytes(token))
            drm.verify_activation(
                bytes(token),
                root=self.root(),
                now=clock + 86400,
                device_id=self.device_id,
                license_id=act.license_id,
                fleet_key_id=act.fleet_key_id,
                seats=None,
            )
        except (FormatError, drm.LicenseRefused) as exc:
            reason = exc.reason if isinstance(exc, drm.LicenseRefused) else exc.message
            raise drm.UsageError(f"seat activation refused by this device: {reason}") from None
        folder = self.dir / ACTIVATION_DIR
        folder.mkdir(mode=fileio.PRIVATE_DIR, exist_ok=True)
        with fileio.locked(self.ledger.lock_path):
            fileio.atomic_write(folder / f"{act.license_id}.act", bytes(token))
        return {
            "device_id": self.device_id,
            "license_id": act.license_id,
            "fleet_key_id": act.fleet_key_id,
            "seat": act.seat,
        }

    def activate(
        self, license_id: str, *, store: str | None = None, token: str | None = None, now: int | None = None
    ) -> dict[str, Any]:
        """Online activation: ask the store for a seat of fleet license ``license_id`` for this device
        (POST /api/v1/licenses/<id>/activations; idempotent, 409 when every seat is taken) and keep the token.
        ``store``/``token`` default to the enrollment's DIR/store.json (the license holder's token is needed)."""
        from edge_runtime._store_client import StoreClient

        if not isinstance(license_id, str) or not re.match(r"^[A-Za-z0-9._:\-]{1,128}\Z", license_id):
            raise drm.UsageError("license id has invalid characters or length")
        if store is not None:
            client = StoreClient(store, token)
        else:
            client = self._store()
            if token is not None:
                client = StoreClient(client.base, token)
        answer = client.post_json(f"/api/v1/licenses/{license_id}/activations", {"device_id": self.device_id})
        try:
            blob = str(answer["activation"]).encode()
        except (KeyError, TypeError):
            raise drm.UsageError("store activation answer lacks the activation token") from None
        result = self.install_activation(blob, now=now)
        if result["license_id"] != license_id:
            raise drm.UsageError("the store sent an activation for another license")
        return result

    # ------------------------------------------------------------------ enrollment and installation

    def enroll(
        self, store_url: str, token: str, *, name: str | None = None, now: int | None = None
    ) -> dict[str, Any]:
        """Send a CSR; store the store-issued certificate and pin the store root. Private keys stay here."""
        from edge_runtime._store_client import StoreClient

        client = StoreClient(store_url, token)
        body: dict[str, Any] = {"csr": self.keys.csr().decode()}
        if name:
            body["name"] = name
        resp = client.post_json("/api/v1/devices/enroll", body)
        try:
            cert = drm.cert_from_bytes(str(resp["certificate"]).encode())
            root = drm.cert_from_bytes(str(resp["root"]).encode())
        except (KeyError, TypeError, FormatError):
            raise drm.UsageError("store enrollment answer lacks a valid certificate and root") from None
        pinned = self.dir / "root.crt"
        if pinned.is_file() and drm.cert_to_pem(drm.cert_from_bytes(pinned.read_bytes())) != drm.cert_to_pem(
            root
        ):
            raise drm.ForbiddenError(
                f"the store's root differs from the root pinned in {pinned}; refusing to re-pin"
            )
        if drm.cert_device_id(cert) != self.device_id or drm.cert_kem_keys(cert) != self.keys.kem_public():
            raise drm.ForbiddenError("the store issued a certificate for other keys than this device's")
        try:
            drm.verify_cert(cert, root, now=self._clock(now), purpose=drm.EKU_DEVICE)
        except drm.LicenseRefused as exc:
            raise drm.ForbiddenError(f"store-issued device certificate is invalid: {exc.reason}") from None
        fileio.atomic_write(self.dir / "device.crt", drm.cert_to_pem(cert), mode=0o644)
        fileio.atomic_write(pinned, drm.cert_to_pem(root), mode=0o644)
        store_cfg = {"url": store_url, "token": token, "device_id": self.device_id}
        fileio.atomic_write(self.dir / "store.json", json.dumps(store_cfg, indent=2).encode())
        return {"device_id": self.device_id, "store": store_url, "issuer": cert.issuer.rfc4514_string()}

    def install(
        self, *, build: bytes, license: bytes, listing: str | None = None, now: int | None = None
    ) -> dict[str, Any]:
        """Sideload an encrypted build and its license after verifying the license for this device and build."""
        try:
            header = drm.read_header(bytes(build[: 64 * 1024]))
        except FormatError as exc:
            raise drm.UsageError(f"build is not an edgemart container: {exc.message}") from None
        if len(license) > self.policy.max_license_bytes:
            raise drm.UsageError("license file too large")
        clock = self._clock(now)
        with fileio.locked(self.ledger.lock_path):
            claims, _, _ = self._verify_locked(
                license, build_hash=header.build_hash, clock=clock, target=header.target
            )
        hexdigest = claims.build_hash.split(":", 1)[1]
        build_rel, lic_rel = f"builds/{hexdigest}.emdl", f"licenses/{claims.license_id}.lic"
        for sub in ("builds", "licenses"):
            (self.dir / sub).mkdir(mode=fileio.PRIVATE_DIR, exist_ok=True)
        fileio.atomic_write(self.dir / build_rel, bytes(build))
        fileio.atomic_write(self.dir / lic_rel, bytes(license))
        # Licenses from before listings had versions name none: those listings' only version was 1.
        version = claims.version or 1
        entry: dict[str, Any] = {
            "target": claims.target,
            "version": version,
            "license_id": claims.license_id,
            "build_hash": claims.build_hash,
            "build": build_rel,
            "license": lic_rel,
            "kind": claims.kind,
        }
        with fileio.locked(self.ledger.lock_path):
            table = self.installed()
            name = listing or claims.listing
            # Per target, the newest version installed is the default; every target and version fetched
            # stays openable by --target and --version.
            held = table.get(name, {})
            builds = dict(held.get("builds") or {})
            if int(builds.get(claims.target, {}).get("version") or 1) <= version:
                builds[claims.target] = entry
            versions = {k: dict(v) for k, v in (held.get("versions") or {}).items()}
            versions.setdefault(str(version), {})[claims.target] = entry
            table[name] = {**entry, "builds": builds, "versions": versions}
            fileio.atomic_write(
                self.dir / "installed.json", json.dumps(table, indent=2, sort_keys=True).encode()
            )
        return {"listing": listing or claims.listing, **entry}

    def check_bundle_release(self, release: Any, *, now: int | None = None) -> None:
        """Refuse (Refusal, recorded in the audit log) a bundle release below the one installed for its fleet,
        unless its signed allow_downgrade_from reaches the installed version."""
        clock = self._clock(now)
        with fileio.locked(self.ledger.lock_path):
            st = self._load_state(clock)
        held = st.bundles.get(release.fleet)
        if held is None or release.version >= held:
            return
        allow = release.allow_downgrade_from
        if allow is not None and allow >= held:
            return
        reason = (
            f"bundle release {release.version} of fleet {release.fleet!r} is older than the installed release"
            f" {held}" + ("" if allow is None else f" (its downgrade allowance reaches only {allow})")
        )
        self.ledger.audit(t=max(clock, st.hwm), license_id="", reason=reason, event="bundle-refused")
        raise drm.Refusal(f"{reason}: refusing to roll the device back")

    def record_bundle_release(self, release: Any, *, now: int | None = None) -> None:
        """Make the installed release of the bundle's fleet durable (a signed sync record, anchor, state)."""
        from edge_runtime.ledger import bundle_detail

        clock = self._clock(now)
        with fileio.locked(self.ledger.lock_path):
            st = self._load_state(clock)
            st.bundles[release.fleet] = release.version
            self.ledger.commit(
                st, event="sync", t=max(clock, st.hwm), detail=bundle_detail(release.fleet, release.version)
            )

    def install_revocations(self, blob: bytes, *, now: int | None = None) -> dict[str, Any]:
        """Install a signed revocation list; an older version than the one already seen is refused."""
        clock = self._clock(now)
        with fileio.locked(self.ledger.lock_path):
            st = self._load_state(clock)
            trusted = max(clock, st.hwm)
            try:
                rl = drm.verify_revocation_list(
                    blob, root=self.root(), now=trusted, current_version=st.revocation_version
                )
            except drm.LicenseRefused as exc:
                self._refuse(st, f"revocation list rejected: {exc.reason}", t=trusted)
            if rl.version == st.revocation_version and (self.dir / "revocation.bin").is_file():
                return {"version": rl.version, "revoked": len(rl.revoked), "updated": False}
            fileio.atomic_write(self.dir / "revocation.bin", blob, mode=0o644)
            _invalidate_fast_paths()  # every model open in this process re-checks before its next run
            st.revocation_version = rl.version
            self.ledger.commit(st, event="sync", t=trusted, detail=f"revocation list version {rl.version}")
        return {"version": rl.version, "revoked": len(rl.revoked), "updated": True}

    def fetch(
        self, listing: str, target: str, *, version: int | None = None, now: int | None = None
    ) -> dict[str, Any]:
        """Get an evaluation license and the encrypted build from the store (of the newest listed version
        with a ``target`` build, unless ``version`` pins one); record them in installed.json."""
        client = self._store()
        body: dict[str, Any] = {"device_id": self.device_id, "target": target}
        if version is not None:
            body["version"] = version
        resp = client.post_json(f"/api/v1/listings/{listing}/eval-license", body)
        try:
            token = str(resp["license"]).encode()
            build_hash = str(resp["build_hash"])
            build_url = str(resp.get("build_url") or f"/api/v1/builds/{build_hash.split(':', 1)[-1]}")
        except (KeyError, TypeError):
            raise drm.UsageError("store eval-license answer lacks license / build_hash") from None
        build = client.request("GET", build_url)
        self._fetch_revocations(client, now=now)
        entry = self.install(build=build, license=token, listing=listing, now=now)
        if entry["build_hash"] != build_hash:
            raise drm.UsageError("store sent a build whose hash differs from the license's")
        return entry

    def _fetch_revocations(self, client: Any, *, now: int | None) -> dict[str, Any] | None:
        try:
            blob = client.request("GET", "/api/v1/revocations")
        except drm.NotFoundError:
            return None  # the store publishes no list yet
        return self.install_revocations(blob, now=now)

    def sync(self, *, now: int | None = None) -> dict[str, Any]:
        """Upload usage.log; return the store's verdict. Also picks up a newer revocation list."""
        client = self._store()
        log = self.ledger.log_path.read_bytes() if self.ledger.log_path.is_file() else b""
        try:
            verdict = client.post_bytes(
                f"/api/v1/devices/{self.device_id}/usage", log, "application/x-ndjson"
            )
        except drm.ConflictError:
            # A fork: the store revoked this device's licenses; take the list that says so, then report.
            self._fetch_revocations(client, now=now)
            raise
        revocations = self._fetch_revocations(client, now=now)
        budgets = [self.install_budget_grant(str(t).encode(), now=now) for t in verdict.pop("budgets", [])]
        clock = self._clock(now)
        records = log.count(b"\n")
        with fileio.locked(self.ledger.lock_path):
            st = self._load_state(clock)
            self.ledger.commit(
                st,
                event="sync",
                t=max(clock, st.hwm),
                detail=f"uploaded {records} records; store ok={verdict.get('ok')}",
            )
        return {"uploaded": records, "store": verdict, "revocations": revocations, "budgets": budgets}

    # ------------------------------------------------------------------ models

    def open_model(
        self,
        *,
        build_path: str | os.PathLike[str] | None = None,
        license_bytes: bytes | None = None,
        listing: str | None = None,
        target: str | None = None,
        version: int | None = None,
        now: int | None = None,
        build: bytes | bytearray | memoryview | None = None,
    ) -> LicensedModel:
        """Verify the license (before any key is unwrapped), decrypt the build in memory and open a backend.

        The build is an installed ``listing`` (one with builds for several targets needs ``target`` to say
        which), a container file (``build_path`` + ``license_bytes``), or a container already in memory
        (``build`` + ``license_bytes``, e.g. received over the network: it is read in place, never copied)."""
        started = time.perf_counter()
        if build is not None:
            if build_path is not None or listing is not None:
                raise drm.UsageError("open_model takes one of build, build_path or listing")
            if license_bytes is None:
                raise drm.UsageError("open_model needs license_bytes with build")
            if len(license_bytes) > self.policy.max_license_bytes:
                raise drm.UsageError("license file too large")
            return self._open_build(
                memoryview(build).cast("B"), None, license_bytes, now=now, started=started
            )
        if listing is not None and build_path is None and license_bytes is None:
            entry = self.installed_entry(listing, target, version)
            build_path = self.dir / entry["build"]
            license_bytes = (self.dir / entry["license"]).read_bytes()
        if build_path is None or license_bytes is None:
            raise drm.UsageError("open_model needs a listing, or both build_path and license_bytes")
        path = Path(build_path)
        if len(license_bytes) > self.policy.max_license_bytes:
            raise drm.UsageError("license file too large")
        # One open of the build for the whole call: its header routes the license checks, then the chunks are
        # read one at a time as they are decrypted (a build that fits in the first read is not read again).
        try:
            fh = open(path, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise drm.UsageError(f"build file {path} does not exist") from None
        with fh:
            return self._open_build(fh, path, license_bytes, now=now, started=started)

    def _open_build(
        self,
        fh: BinaryIO | memoryview,
        path: Path | None,
        license_bytes: bytes,
        *,
        now: int | None,
        started: float,
    ) -> LicensedModel:
        """``fh``: the open build file (``path``), or the container itself in memory (``path`` None)."""
        if isinstance(fh, memoryview):
            size, container, label = len(fh), fh, "the build"
        else:
            info = os.fstat(fh.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise drm.UsageError(f"build file {path} does not exist")
            size, container, label = info.st_size, memoryview(fh.read(64 * 1024)), f"build file {path}"
        if size > self.policy.max_build_bytes:
            raise drm.UsageError(f"{label} exceeds the {self.policy.max_build_bytes}-byte limit")
        clock = self._clock(now)
        try:
            header = drm.read_header(bytes(container[: 64 * 1024]))
        except FormatError as exc:
            raise drm.UsageError(f"{label} is not an edgemart container: {exc.message}") from None
        with fileio.locked(self.ledger.lock_path):
            claims, st, trusted = self._verify_locked(
                license_bytes, build_hash=header.build_hash, clock=clock, target=header.target
            )
            self._check_cap(st, claims, trusted)
            self._check_activation(st, claims, trusted)
            recipient: drm.DeviceKeys | x25519.X25519PrivateKey | None = self.keys
            if claims.fleet_key_id is not None:
                recipient = self._fleet_key(claims.fleet_key_id)
            try:
                if recipient is None:  # the fleet key file went away since the license was verified
                    raise drm.LicenseRefused(
                        reason="license is bound to a fleet key this device does not hold"
                    )
                cek = self._unwrap(claims, recipient)
            except drm.LicenseRefused as exc:
                self._refuse_license(st, claims, exc.reason, t=trusted)
        try:
            # One pass: decrypt into the bytes the backend reads, safety walk, then the backend opens while
            # the build hash is checked beside it; nothing comes back unless every check passed.
            source: memoryview | BinaryIO = container
            if len(container) != size and not isinstance(fh, memoryview):
                fh.seek(0)
                source = fh
            backend = open_sealed_backend(source, key=cek, build_hash=claims.build_hash, target=claims.target)
        except drm.IntegrityError:
            with fileio.locked(self.ledger.lock_path):
                st = self._load_state(clock, license_id=claims.license_id, build_hash=claims.build_hash)
                self._refuse_license(
                    st,
                    claims,
                    "build failed its integrity check (tampered, truncated or swapped container)",
                    t=max(clock, st.hwm),
                )
        return LicensedModel(self, claims, backend, load_seconds=time.perf_counter() - started, now=now)

    # ------------------------------------------------------------------ the run path (called by _RunMeter)

    def _admit_slow(self, meter: _RunMeter, clock: int) -> None:
        """With the device lock held: every per-run check against the durable state, and a new reservation
        when ``meter`` has none left. Called for the first run, when a reservation is used up, and whenever
        the in-memory checks of the fast path do not all pass (so the refusal is judged and recorded here)."""
        claims = meter.claims
        lid, bh = claims.license_id, claims.build_hash
        with fileio.locked(self.ledger.lock_path):
            st = self._load_state(clock, license_id=lid, build_hash=bh)
            # This model may have seen a later clock than the state holds (hwms are persisted only when
            # reserving); a rollback below it is still a rollback.
            if clock < meter.clock_hwm - self.policy.clock_tolerance:
                st.rollbacks += 1
                self._refuse(
                    st,
                    f"clock rollback: system clock {_iso(clock)} is behind the trusted high-water mark"
                    f" {_iso(meter.clock_hwm)} by more than {self.policy.clock_tolerance}s",
                    t=max(st.hwm, meter.hwm, clock),
                    license_id=lid,
                    build_hash=bh,
                )
            trusted = max(clock, st.hwm, meter.hwm, claims.issued_at)
            if trusted < claims.not_before:
                self._refuse(st, "license is not yet valid", t=trusted, license_id=lid, build_hash=bh)
            if claims.not_after is not None and trusted >= claims.not_after:
                self._refuse(st, "license has expired", t=trusted, license_id=lid, build_hash=bh)
            revocation_key = self._revocation_key()
            revoked = self._revoked(st, trusted, license_id=lid, build_hash=bh)
            if lid in revoked:
                self._refuse(st, f"license {lid} is revoked", t=trusted, license_id=lid, build_hash=bh)
            if claims.fleet_key_id is not None and drm.seat_revocation_entry(lid, self.device_id) in revoked:
                self._refuse_license(
                    st, claims, f"the seat activation of this device on {lid} is revoked", t=trusted
                )
            if meter.budget_deadline is not None:
                self._check_budget_time(st, claims, (0, meter.budget_deadline), trusted)
            if meter.left == 0:
                budget = self._check_cap(st, claims, trusted)
                used = st.runs.get(lid, 0)
                block = self.policy.reserve_block
                if claims.max_runs is not None:
                    block = min(block, claims.max_runs - used)
                if budget is not None:
                    block = min(block, budget[0] - used)
                    meter.budget_deadline = budget[1]
                st.runs[lid] = used + block
                st.hwm = max(st.hwm, trusted)
                st.clock_hwm = max(st.clock_hwm, clock, meter.clock_hwm)
                # Durable (log record, anchor, state) before any run of the block is computed.
                st = self.ledger.commit(
                    st,
                    event="run",
                    t=trusted,
                    license_id=lid,
                    build_hash=bh,
                    runs=st.runs[lid],
                    detail=reservation_detail(RESERVE, block),
                )
                meter.left = block
            meter.revocation_key = revocation_key
            meter.hwm = max(meter.hwm, trusted, st.hwm)
            meter.clock_hwm = max(meter.clock_hwm, clock, st.clock_hwm)
            meter.left -= 1

    def _release(self, meter: _RunMeter, unused: int) -> None:
        """Give ``unused`` reserved runs back with one durable "release" record (only a live process can)."""
        claims = meter.claims
        lid = claims.license_id
        with fileio.locked(self.ledger.lock_path):
            try:
                st, _ = self.ledger.load()
            except StateProblem as problem:
                # The runs stay counted as used: a broken ledger never gains runs.
                self.ledger.audit(
                    t=meter.hwm,
                    license_id=lid,
                    reason=f"{unused} reserved runs not given back: {problem.reason}",
                    event="release-skipped",
                )
                return
            used = st.runs.get(lid, 0)
            if used < unused:
                self.ledger.audit(
                    t=meter.hwm,
                    license_id=lid,
                    reason=f"{unused} reserved runs not given back: the state counts only {used}",
                    event="release-skipped",
                )
                return
            st.runs[lid] = used - unused
            st.hwm = max(st.hwm, meter.hwm)
            st.clock_hwm = max(st.clock_hwm, meter.clock_hwm)
            self.ledger.commit(
                st,
                event="run",
                t=st.hwm,
                license_id=lid,
                build_hash=claims.build_hash,
                runs=st.runs[lid],
                detail=reservation_detail(RELEASE, unused),
            )

    # ------------------------------------------------------------------ reporting

    def runs_left(self, claims: drm.LicenseClaims) -> int | None:
        if claims.max_runs is None:
            return None
        with fileio.locked(self.ledger.lock_path):  # a load may roll the state forward: never beside a commit
            st, _ = self.ledger.load()
        return max(0, claims.max_runs - st.runs.get(claims.license_id, 0))

    def status(self, *, now: int | None = None) -> dict[str, Any]:
        cert = self.certificate()
        clock = self._clock(now)
        out: dict[str, Any] = {
            "device_id": self.device_id,
            "device_dir": str(self.dir),
            "certificate": "self-signed"
            if cert.issuer == cert.subject
            else f"issued by {cert.issuer.rfc4514_string()}",
            "root_pinned": (self.dir / "root.crt").is_file(),
            "anchor": {"kind": self.ledger.anchor.kind, "where": self.ledger.anchor.describe()},
            "store": json.loads((self.dir / "store.json").read_text())["url"]
            if (self.dir / "store.json").is_file()
            else None,
        }
        try:
            out["fleet_keys"] = sorted(self.fleet_key_ids())
        except drm.UsageError as exc:
            out["fleet_keys"], out["fleet_key_problem"] = [], exc.message
        try:
            st, _ = self.ledger.load()
            out["state"] = {
                "ok": True,
                "generation": st.generation,
                "usage_records": st.log_seq,
                "trusted_time": _iso(max(clock, st.hwm)),
                "revocation_version": st.revocation_version,
                "bundle_releases": dict(sorted(st.bundles.items())),
            }
        except StateProblem as problem:
            st = None
            out["state"] = {"ok": False, "problem": problem.reason}
        by_license = {
            b["license_id"]: name
            for name, e in self.installed().items()
            for b in [
                *(e.get("builds") or {e["target"]: e}).values(),
                *(x for v in (e.get("versions") or {}).values() for x in v.values()),
            ]
        }
        licenses: list[dict[str, Any]] = []
        for lic_path in sorted((self.dir / "licenses").glob("*.lic")):
            try:
                claims = _parse_claims(lic_path.read_bytes())
            except FormatError:
                licenses.append({"file": lic_path.name, "error": "unreadable license"})
                continue
            used = st.runs.get(claims.license_id, 0) if st else None
            trusted = max(clock, st.hwm) if st else clock
            expired = claims.not_after is not None and trusted >= claims.not_after
            licenses.append(
                {
                    "license_id": claims.license_id,
                    "listing": by_license.get(claims.license_id, claims.listing),
                    "kind": claims.kind,
                    "binding": f"fleet:{claims.fleet_key_id}" if claims.fleet_key_id else "device",
                    "target": claims.target,
                    "version": claims.version,
                    "build_hash": claims.build_hash,
                    "runs_used": used,
                    "max_runs": claims.max_runs,
                    "runs_left": None
                    if claims.max_runs is None or used is None
                    else max(0, claims.max_runs - used),
                    "expires": _iso(claims.not_after),
                    "expired": expired,
                }
            )
            if claims.fleet_key_id is not None:
                licenses[-1]["seat"] = self._held_seat(claims.license_id)
        out["licenses"] = licenses
        return out

    def verify_log(self) -> dict[str, Any]:
        data = self.ledger.log_path.read_bytes() if self.ledger.log_path.is_file() else b""
        report = drm.verify_log(data, self.keys.sign.public_key(), device_id=self.device_id)
        out = report.to_dict()
        out["device_id"] = self.device_id
        events: dict[str, int] = {}
        for rec in report.records:
            events[rec["event"]] = events.get(rec["event"], 0) + 1
        out["events"] = events
        counters, counter_problem = replay_run_counters(report.records)
        # Runs used per license as the store counts them: reserved minus released (runs reserved by a
        # model that is still open, or by a process that died, count as used).
        out["runs_by_license"] = dict(sorted(counters.items()))
        try:
            st, _ = self.ledger.load()
            out["matches_state"] = True
            out["state_records"] = st.log_seq
            if counter_problem is None and report.ok:
                differ = sorted(
                    lid for lid in set(counters) | set(st.runs) if counters.get(lid, 0) != st.runs.get(lid, 0)
                )
                if differ:
                    counter_problem = (
                        f"run counters of {', '.join(differ)} differ between state and usage log"
                    )
        except StateProblem as problem:
            out["matches_state"] = False
            out["state_problem"] = problem.reason
        if counter_problem is not None:
            out["matches_state"] = False
            out["state_problem"] = counter_problem
        return out


# Process-wide generations the run fast path compares with one integer read instead of a syscall: _FORKS
# changes in every forked child, _FAST_GEN in a forked child and whenever this process installs a revocation
# list (any Device instance), so every reservation held in memory is re-checked before its next run.
_FORKS = [0]
_FAST_GEN = [0]


def _invalidate_fast_paths() -> None:
    _FAST_GEN[0] += 1


def _after_fork_in_child() -> None:
    _FORKS[0] += 1
    _invalidate_fast_paths()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _RunMeter:
    """Counts one LicensedModel's runs against its reservation, in memory; holds no reference to the model, so
    a finalizer can give the unused runs back when the model is closed, collected or the interpreter exits.

    The fast path (a run inside the reservation, the clock within the second already seen) makes no syscall
    and no disk I/O: a lock, one clock read and four comparisons (runs left, clock rollback, fast-path
    generation; the validity window was checked for that clock already). When the clock moves on, the run
    is checked against the validity window and the revocation list is stat()ed (at most once a second: a
    list installed by another process takes effect within a second, one installed by this process at the next
    run). Anything it does not accept goes to Device._admit_slow, which re-checks against the durable state,
    takes a new reservation when this one is used up, and records a refusal precisely."""

    def __init__(self, device: Device, claims: drm.LicenseClaims, now: int | None) -> None:
        self.device = device
        self.claims = claims
        self.now = now  # injected clock for tests; None = system clock
        self.left = 0  # runs reserved durably and not yet used (lost if the process dies)
        self.hwm = 0  # trusted-time high-water mark this model has seen
        self.clock_hwm = 0  # highest clock reading this model has seen
        self.revocation_key: tuple[int, int, int, int] | None | str = "unchecked"
        self.budget_deadline: int | None = None  # the offline budget's deadline, for a metered license
        self.pid = os.getpid()
        self.fork = _FORKS[0]
        self.closed = False
        self._mutex = threading.Lock()
        # Armed by the slow path: runs are admitted without further checks while lo <= clock <= clock_hwm
        # and the fast-path generation is the one the slow path saw.
        self.lo, self.hi, self.gen = 1, 0, -1

    def _arm(self, gen: int) -> None:
        not_after = self.claims.not_after
        self.lo = self.clock_hwm - self.device.policy.clock_tolerance
        self.hi = not_after if not_after is not None else 1 << 62
        if self.budget_deadline is not None:  # past the offline budget's deadline only the slow path decides
            self.hi = min(self.hi, self.budget_deadline)
        self.gen = gen

    def _clock_moved_on(self, clock: int) -> bool:
        """The clock passed the highest reading seen: accept it if the license is still valid then and the
        revocation list is unchanged (the one syscall between reservations, once a second at most)."""
        if not self.clock_hwm < clock < self.hi or self.gen != _FAST_GEN[0]:
            return False
        if self.budget_deadline is not None and clock >= self.budget_deadline:
            return False
        if self.device._revocation_key() != self.revocation_key:
            return False
        self.clock_hwm = clock
        self.hwm = max(self.hwm, clock)
        self.lo = clock - self.device.policy.clock_tolerance
        return True

    def admit(self) -> None:
        """Check and count one run, before it is computed; raises the opaque LicenseRefused on refusal."""
        now = self.now
        clock = int(time.time()) if now is None else int(now)
        with self._mutex:
            if self.left > 0 and self.lo <= clock <= self.clock_hwm and self.gen == _FAST_GEN[0]:
                self.left -= 1
                return
            if self.closed:
                raise drm.UsageError("this model is closed")
            if self.fork != _FORKS[0]:
                # A forked child inherits the parent's in-memory reservation but must not use it (the parent
                # does): it reserves its own runs, and never gives back the parent's.
                self.fork, self.left = _FORKS[0], 0
            if self.left > 0 and self._clock_moved_on(clock):
                self.left -= 1
                return
            gen = _FAST_GEN[0]  # read before the checks: a revocation installed meanwhile re-arms nothing
            self.device._admit_slow(self, clock)
            self._arm(gen)

    def unused(self) -> int:
        return self.left if self.fork == _FORKS[0] else 0

    def release(self) -> None:
        """Give the unused part of the reservation back (idempotent; a no-op in a forked child)."""
        with self._mutex:
            if self.closed:
                return
            self.closed = True
            unused = self.unused()
            self.left = 0
            if unused > 0:
                self.device._release(self, unused)


class LicensedModel:
    """A decrypted model bound to its license. Each run()/batch call is checked and counted before computing:
    runs are taken from a reservation made durable before its first run is computed (see Policy.reserve_block);
    close() gives the unused part back."""

    def __init__(
        self,
        device: Device,
        claims: drm.LicenseClaims,
        backend: Backend,
        *,
        load_seconds: float,
        now: int | None,
    ) -> None:
        self._device = device
        self._claims = claims
        self._backend: Backend | None = backend
        self.inputs: list[TensorSpec] = list(backend.inputs)
        self.outputs: list[TensorSpec] = list(backend.outputs)
        self.license_id = claims.license_id
        self.build_hash = claims.build_hash
        self.target = claims.target
        self.listing = claims.listing
        self.backend_name = backend.name
        self.providers = list(getattr(backend, "providers", []))
        self.load_seconds = load_seconds
        self._meter = _RunMeter(device, claims, now)
        self._accepted: list[tuple[str, np.dtype[Any], tuple[int, ...]]] = []  # see _same_feeds
        # Also runs at interpreter exit (atexit) and when the model is collected without close().
        self._release = weakref.finalize(self, self._meter.release)

    @property
    def now(self) -> int | None:
        """Injected clock for tests; None = system clock."""
        return self._meter.now

    @now.setter
    def now(self, value: int | None) -> None:
        self._meter.now = value

    @property
    def claims(self) -> drm.LicenseClaims:
        return self._claims

    @property
    def max_runs(self) -> int | None:
        return self._claims.max_runs

    def runs_left(self) -> int | None:
        """Runs this model may still compute: those free under the cap plus its own unused reservation."""
        free = self._device.runs_left(self._claims)
        return None if free is None else free + self._meter.unused()

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Shape/dtype check against the model inputs; UsageError naming the input."""
        if not isinstance(feeds, dict):
            raise drm.UsageError("feeds must be a dict of input name -> numpy array")
        out: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            if spec.name not in feeds:
                raise drm.UsageError(
                    f"input {spec.name!r} is missing (model inputs: {[s.name for s in self.inputs]})"
                )
            value = np.asarray(feeds[spec.name])
            if value.dtype.name != spec.dtype:
                raise drm.UsageError(
                    f"input {spec.name!r}: dtype {value.dtype.name}, model expects {spec.dtype}"
                )
            if value.ndim != len(spec.shape) or any(
                want is not None and have != want for have, want in zip(value.shape, spec.shape, strict=False)
            ):
                want_text = "[" + ", ".join("?" if d is None else str(d) for d in spec.shape) + "]"
                raise drm.UsageError(
                    f"input {spec.name!r}: shape {list(value.shape)}, model expects {want_text}"
                )
            out[spec.name] = value
        extra = set(feeds) - {s.name for s in self.inputs}
        if extra:
            raise drm.UsageError(
                f"unknown input(s) {sorted(extra)} (model inputs: {[s.name for s in self.inputs]})"
            )
        self._accepted = [(name, value.dtype, value.shape) for name, value in out.items()]
        return out

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        backend = self._backend
        if backend is None:
            raise drm.UsageError("this model is closed")
        checked = feeds if self._same_feeds(feeds) else self.check_feeds(feeds)
        self._meter.admit()
        return backend.run(checked)

    def run_into(self, feeds: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """run(), writing the outputs named in ``out`` into those arrays (a chain stage hands views of its
        slots): the same checks and metering. Each must have its output's declared static shape and dtype."""
        backend = self._backend
        if backend is None:
            raise drm.UsageError("this model is closed")
        specs = {spec.name: spec for spec in backend.outputs}
        for name, target in out.items():
            spec = specs.get(name)
            if spec is None or None in spec.shape or tuple(target.shape) != spec.shape:
                raise drm.UsageError(
                    f"output {name!r} has no static shape {tuple(target.shape)} to write into"
                )
            if target.dtype.name != spec.dtype or not target.flags.c_contiguous or not target.flags.writeable:
                raise drm.UsageError(f"output {name!r} needs a writable C-contiguous {spec.dtype} array")
        checked = feeds if self._same_feeds(feeds) else self.check_feeds(feeds)
        self._meter.admit()
        return backend.run_into(checked, out)

    def _same_feeds(self, feeds: Any) -> bool:
        """True when ``feeds`` are numpy arrays of exactly the dtypes and shapes of feeds check_feeds already
        accepted (the check hoisted out of a run loop: a few comparisons instead of a full check)."""
        accepted = self._accepted
        if type(feeds) is not dict or len(feeds) != len(accepted):
            return False
        for name, dtype, shape in accepted:
            value = feeds.get(name)
            if type(value) is not np.ndarray or value.dtype is not dtype or value.shape != shape:
                return False
        return True

    def close(self) -> None:
        backend, self._backend = self._backend, None
        try:
            if backend is not None:
                backend.close()
        finally:
            self._release()

    def __enter__(self) -> LicensedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict[str, Any]:
        return {
            "license_id": self.license_id,
            "license_kind": self._claims.kind,
            "license_expires": _iso(self._claims.not_after),
            "max_runs": self._claims.max_runs,
            "listing": self.listing,
            "version": self._claims.version,
            "build_hash": self.build_hash,
            "target": self.target,
            "backend": self.backend_name,
            "providers": self.providers,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
        }


ProgressFn = Callable[[int, int], None]
