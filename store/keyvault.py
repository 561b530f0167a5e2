"""The store's key vault: root CA, license issuer (Ed25519 + ML-DSA-65) and the key-encryption key.

``DirectoryKeyVault`` owns what every backend shares: the signing keys as files in one directory (0700, files
0600, written atomically), created under a lock, never silently re-rooted, the issuer renewed before expiry.
``FileKeyVault`` stores them as they are, plus kek.key; ``store.keyvault_pkcs11`` seals them under a token's KEK.
Content keys exist at rest only wrapped under the KEK. Crypto lives in ``drm``; this module only does file I/O."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Protocol, Self, runtime_checkable

import drm
from drm.keywrap import generate_kek, unwrap_key, wrap_key
from edgemart.core.errors import ConflictError, UsageError
from edgemart.core.fileio import atomic_write, locked

ROOT_FILES = ("root.key", "root.crt")
ISSUER_FILES = ("issuer.key", "issuer.crt", "issuer-pq.key")
# The drm key files holding private keys (the .crt files are public).
PRIVATE_FILES = ("root.key", "issuer.key", "issuer-pq.key")
KEK_FILE = "kek.key"
# Re-issue the issuer certificate when it would expire within this many seconds.
ISSUER_RENEW_MARGIN = 30 * 86400


@runtime_checkable
class KeyVault(Protocol):
    """Where the store's signing keys and its key-encryption key live (file, HSM, cloud KMS...)."""

    def ensure(self, now: int) -> KeyVault: ...

    def authority(self) -> drm.Authority: ...

    def issuer(self) -> drm.Issuer: ...

    def wrap_cek(self, cek: bytes, build_hash: str) -> bytes: ...

    def unwrap_cek(self, wrapped: bytes, build_hash: str) -> bytes: ...


class DirectoryKeyVault:
    """Base of the backends keeping the root CA and issuer as files in one directory.

    Subclasses decide how a private key file is stored (``_stored_name``, ``_seal``, ``_unseal``) and own
    the KEK (``_ensure_kek`` and the two content-key calls)."""

    # Appended to "... missing" when a key file is absent: how to create the vault.
    missing_hint = "run `edgemart drm keygen`"

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._authority: drm.Authority | None = None
        self._issuer: drm.Issuer | None = None

    # ------------------------------------------------------------------ backend hooks

    def _stored_name(self, name: str) -> str:
        """The file name on disk for drm's key file ``name``."""
        return name

    def _seal(self, name: str, data: bytes) -> bytes:
        """The bytes written for drm's key file ``name`` (called under the ensure lock only)."""
        return data

    def _unseal(self, name: str, stored: bytes) -> bytes:
        """Inverse of ``_seal``."""
        return stored

    def _ensure_kek(self) -> None:
        """Create the key-encryption key if it does not exist yet (called under the ensure lock)."""
        raise NotImplementedError

    def wrap_cek(self, cek: bytes, build_hash: str) -> bytes:
        raise NotImplementedError

    def unwrap_cek(self, wrapped: bytes, build_hash: str) -> bytes:
        raise NotImplementedError

    # ------------------------------------------------------------------ creation

    def _locked(self) -> contextlib.AbstractContextManager[int]:
        # Several store workers may call ensure() at once; only one may create keys.
        return locked(self.directory / ".lock")

    def _exists(self, name: str) -> bool:
        return (self.directory / self._stored_name(name)).is_file()

    def ensure(self, now: int) -> Self:
        """Create whatever keys are missing (and renew an issuer certificate close to expiry).

        A vault with some root files but not all is refused rather than silently re-rooted:
        a new root would orphan every enrolled device."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        with self._locked():
            have_root = [self._exists(n) for n in ROOT_FILES]
            if any(have_root) and not all(have_root):
                raise ConflictError(
                    f"key vault {self.directory}: {self._stored_name('root.key')} and root.crt must both exist"
                )
            if not any(have_root):
                if any(self._exists(n) for n in ISSUER_FILES):
                    raise ConflictError(
                        f"key vault {self.directory}: issuer keys present but the root is missing"
                    )
                self._write(drm.Authority.generate(now=now).to_files())
            authority = self._load_authority()
            if self._issuer_needs_issuing(authority, now):
                self._write(authority.issue_issuer(now=now).to_files())
            self._ensure_kek()
            self._authority = authority
            self._issuer = None
        return self

    def _issuer_needs_issuing(self, authority: drm.Authority, now: int) -> bool:
        have = [self._exists(n) for n in ISSUER_FILES[:2]]
        if not any(have):
            return True
        if not all(have):
            raise ConflictError(
                f"key vault {self.directory}: {self._stored_name('issuer.key')} and issuer.crt must both exist"
            )
        issuer = self._load_issuer()
        if issuer.cert.not_valid_after_utc.timestamp() <= now + ISSUER_RENEW_MARGIN:
            return True
        try:
            drm.verify_cert(issuer.cert, authority.cert, now=now, purpose=drm.EKU_LICENSE_ISSUER)
        except drm.LicenseRefused as exc:
            raise ConflictError(
                f"key vault {self.directory}: issuer certificate invalid ({exc.reason})"
            ) from None
        return False

    def _write(self, files: dict[str, bytes]) -> None:
        for name, data in files.items():
            atomic_write(self.directory / self._stored_name(name), self._seal(name, data))

    # ------------------------------------------------------------------ loading

    def _read_raw(self, name: str) -> bytes:
        """The stored bytes of ``name`` (a file name on disk)."""
        try:
            return (self.directory / name).read_bytes()
        except FileNotFoundError:
            raise UsageError(f"key vault {self.directory}: {name} missing ({self.missing_hint})") from None

    def _read(self, name: str) -> bytes:
        return self._unseal(name, self._read_raw(self._stored_name(name)))

    def _load_authority(self) -> drm.Authority:
        return drm.Authority.from_files({n: self._read(n) for n in ROOT_FILES})

    def _load_issuer(self) -> drm.Issuer:
        files = {n: self._read(n) for n in ISSUER_FILES[:2]}
        if self._exists("issuer-pq.key"):
            files["issuer-pq.key"] = self._read("issuer-pq.key")
        return drm.Issuer.from_files(files)

    def authority(self) -> drm.Authority:
        if self._authority is None:
            self._authority = self._load_authority()
        return self._authority

    def issuer(self) -> drm.Issuer:
        if self._issuer is None:
            self._issuer = self._load_issuer()
        return self._issuer

    def root_cert_pem(self) -> bytes:
        return drm.cert_to_pem(self.authority().cert)


class FileKeyVault(DirectoryKeyVault):
    """Key vault backed by a directory (the layout ``edgemart drm keygen --out DIR`` writes)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        super().__init__(directory)
        self._kek: bytes | None = None

    def _ensure_kek(self) -> None:
        if not self._exists(KEK_FILE):
            self._write({KEK_FILE: generate_kek()})
        self._kek = None

    def _kek_bytes(self) -> bytes:
        if self._kek is None:
            kek = self._read(KEK_FILE)
            if len(kek) != 32:
                raise UsageError(f"key vault {self.directory}: kek.key must hold 32 bytes")
            self._kek = kek
        return self._kek

    # ------------------------------------------------------------------ content keys

    def wrap_cek(self, cek: bytes, build_hash: str) -> bytes:
        """AES-256-GCM under kek.key with AAD binding ``build_hash``; see docs/FORMAT.md (key wrapping)."""
        return wrap_key(self._kek_bytes(), cek, build_hash=build_hash)

    def unwrap_cek(self, wrapped: bytes, build_hash: str) -> bytes:
        """The content key; IntegrityError if ``wrapped`` was tampered with or belongs to another build."""
        return unwrap_key(self._kek_bytes(), wrapped, build_hash=build_hash)
