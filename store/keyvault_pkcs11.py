# Why this is one module: the PKCS#11 backend of one interface (KeyVault): session handling and the wrap formats.
"""PKCS#11 key vault: the KEK is a non-extractable AES-256 key inside a token (HSM; SoftHSM2 in the tests).

Content keys are wrapped by AES-GCM computed in the token. The root CA and issuer private keys (Ed25519 and
ML-DSA-65, which tokens cannot hold as usable objects) stay files, sealed by the same token KEK, so a copy of
the directory without the token yields no key. Certificates stay clear. Layout and creation rules are
``DirectoryKeyVault``'s.

Formats (AES-256-GCM under the KEK, 16-byte tag; the 12-byte IV is fresh from os.urandom for every
encryption; ``‖`` is concatenation):

* Wrapped content key, 65 bytes:
  ``b"EMKP" ‖ 0x01 ‖ iv(12) ‖ ciphertext(32) ‖ tag(16)``,
  AAD = ``b"EMKP\\x01" ‖ b"edgemart-cek-wrap/1\\x00" ‖ build_hash (ASCII)``.
  The magic differs from the file vault's ``EMKW`` so a blob names the vault kind that made it.
* Sealed key file (``root.key.enc``, ``issuer.key.enc``, ``issuer-pq.key.enc``), 49 + len(plaintext) bytes:
  ``b"EMKS" ‖ 0x01 ‖ kek_id(16) ‖ iv(12) ‖ ciphertext ‖ tag(16)``,
  AAD = ``b"EMKS\\x01" ‖ kek_id ‖ b"edgemart-key-file/1\\x00" ‖ drm file name (ASCII, e.g. b"root.key")``.
  The plaintext is the drm file (PKCS#8 PEM, or the 32-byte ML-DSA-65 seed); ``kek_id`` is the KEK's
  CKA_ID, so a directory opened with another token fails with a clear message instead of a bad tag, and the
  file name in the AAD stops one sealed key from being passed off as another.

The KEK (label ``edgemart-kek`` unless configured) is generated in the token on first ``ensure`` of an empty
directory: CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE true; CKA_EXTRACTABLE, CKA_WRAP, CKA_UNWRAP, CKA_MODIFIABLE,
CKA_COPYABLE false; a random 16-byte CKA_ID. A pre-provisioned KEK must be AES-256, sensitive, non-extractable
and carry a 16-byte CKA_ID.

The module is loaded once per process (PKCS#11 login is per process, so vaults on one token share one
logged-in session); every call into it holds one lock (modules initialised without locking callbacks are not
thread-safe); a forked child (gunicorn worker) re-initialises the module before its first call."""

from __future__ import annotations

import hmac
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.mechanisms import GCMParams

from edgemart.core.errors import ConflictError, IntegrityError, UsageError
from store.keyvault import KEK_FILE, PRIVATE_FILES, DirectoryKeyVault

KEK_LABEL = "edgemart-kek"
SEALED_SUFFIX = ".enc"

CEK_WRAP_MAGIC = b"EMKP\x01"
CEK_LEN = 32
IV_LEN = 12
TAG_LEN = 16
CEK_WRAPPED_LEN = len(CEK_WRAP_MAGIC) + IV_LEN + CEK_LEN + TAG_LEN
_CEK_AAD = b"edgemart-cek-wrap/1\x00"

SEALED_MAGIC = b"EMKS\x01"
KEK_ID_LEN = 16
_SEALED_HEAD = len(SEALED_MAGIC) + KEK_ID_LEN
_SEALED_AAD = b"edgemart-key-file/1\x00"

T = TypeVar("T")

# The token's answer to a failed GCM tag check varies (SoftHSM 2.6: CKR_GENERAL_ERROR; the spec:
# CKR_ENCRYPTED_DATA_INVALID); all of them mean "does not open".
_DECRYPT_FAILED = (
    p11.GeneralError,
    p11.EncryptedDataInvalid,
    p11.EncryptedDataLenRange,
    p11.DataInvalid,
    p11.DataLenRange,
    p11.FunctionFailed,
)
# Errors after which the session is gone (token removed, logged out, module re-initialised): reconnect once.
_SESSION_LOST = (
    p11.SessionHandleInvalid,
    p11.SessionClosed,
    p11.DeviceRemoved,
    p11.TokenNotPresent,
    p11.UserNotLoggedIn,
    p11.KeyHandleInvalid,
    p11.ObjectHandleInvalid,
)

# Merged over python-pkcs11's defaults by generate_key(template=).
_KEK_TEMPLATE = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.ENCRYPT: True,
    Attribute.DECRYPT: True,
    Attribute.WRAP: False,
    Attribute.UNWRAP: False,
    Attribute.SIGN: False,
    Attribute.VERIFY: False,
    Attribute.DERIVE: False,
    Attribute.MODIFIABLE: False,
    Attribute.COPYABLE: False,
}


# ----------------------------------------------------------------------------- process-wide token state


@dataclass
class _Connection:
    """This process's logged-in session on one token, shared by every vault using that token."""

    pid: int
    pin: str  # the PIN that logged this process in (the token has one user PIN)
    session: Any = None  # None after the session was lost: log in again on next use
    keks: dict[str, Any] = field(default_factory=dict)


_lock = threading.RLock()
_libraries: dict[str, tuple[int, Any]] = {}  # module path -> (pid that initialised it, pkcs11.lib)
_connections: dict[tuple[str, str], _Connection] = {}


def _reset_lock_in_child() -> None:
    # A thread of the parent may have held the lock at fork time; the child has only the forking thread.
    global _lock
    _lock = threading.RLock()


os.register_at_fork(after_in_child=_reset_lock_in_child)


def _library(module: str) -> Any:
    """The loaded module, initialised in this process (call with ``_lock`` held)."""
    pid = os.getpid()
    known = _libraries.get(module)
    if known is not None:
        owner, lib = known
        if owner != pid:
            # Forked child: the parent's sessions are not ours (PKCS#11 requires C_Initialize again).
            try:
                lib.reinitialize()
            except p11.PKCS11Error as exc:
                raise UsageError(
                    f"PKCS#11 module {module}: re-initialising after fork failed ({type(exc).__name__})"
                ) from None
            _libraries[module] = (pid, lib)
        return lib
    if not Path(module).is_file():
        raise UsageError(f"PKCS#11 module {module} not found (EDGEMART_PKCS11_MODULE)")
    try:
        lib = pkcs11.lib(module)
    except p11.PKCS11Error as exc:
        raise UsageError(f"PKCS#11 module {module} cannot be loaded: {exc}") from None
    _libraries[module] = (pid, lib)
    return lib


def _find_token(lib: Any, module: str, label: str) -> Any:
    try:
        return lib.get_token(token_label=label)
    except p11.NoSuchToken:
        labels = sorted({t.label for t in lib.get_tokens()} - {""})
        raise UsageError(
            f"PKCS#11 token {label!r} not found in {module} "
            f"(initialised tokens: {', '.join(repr(x) for x in labels) or 'none'}; EDGEMART_PKCS11_TOKEN)"
        ) from None
    except p11.MultipleTokensReturned:
        raise UsageError(f"PKCS#11 module {module}: several tokens are labelled {label!r}") from None


def _login(token: Any, label: str, pin: str, *, pin_verified: bool) -> Any:
    try:
        return token.open(rw=True, user_pin=pin)
    except p11.UserAlreadyLoggedIn:
        # Login is per process: a session of ours that we lost track of is still logged in.
        if not pin_verified:
            raise UsageError(
                f"PKCS#11 token {label!r}: already logged in by another user of the module"
            ) from None
        return token.open(rw=True)
    except (p11.PinIncorrect, p11.PinInvalid, p11.PinLenRange):
        raise UsageError(f"PKCS#11 token {label!r}: PIN incorrect (EDGEMART_PKCS11_PIN)") from None
    except p11.PinLocked:
        raise UsageError(f"PKCS#11 token {label!r}: PIN locked") from None
    except p11.PinExpired:
        raise UsageError(f"PKCS#11 token {label!r}: PIN expired") from None
    except p11.UserPinNotInitialized:
        raise UsageError(f"PKCS#11 token {label!r}: the user PIN is not initialised") from None


def _connect(module: str, label: str, pin: str) -> _Connection:
    """This process's logged-in session on the token (call with ``_lock`` held)."""
    conn = _connections.get((module, label))
    if conn is not None and conn.pid == os.getpid():
        # The token has one user PIN and it logged this process in; any other PIN is wrong.
        if not hmac.compare_digest(conn.pin.encode(), pin.encode()):
            raise UsageError(f"PKCS#11 token {label!r}: PIN incorrect (EDGEMART_PKCS11_PIN)")
        if conn.session is not None:
            return conn
        pin_verified = True
    else:
        pin_verified = False  # first use in this process (or a forked child's first use)
    token = _find_token(_library(module), module, label)
    if Mechanism.AES_GCM not in token.slot.get_mechanisms():
        raise UsageError(f"PKCS#11 token {label!r} does not offer CKM_AES_GCM")
    conn = _Connection(os.getpid(), pin, _login(token, label, pin, pin_verified=pin_verified))
    _connections[(module, label)] = conn
    return conn


# ----------------------------------------------------------------------------- the vault


def _cek_aad(build_hash: str) -> bytes:
    if not isinstance(build_hash, str) or not build_hash.isascii():
        raise UsageError("build hash must be an ASCII string")
    return CEK_WRAP_MAGIC + _CEK_AAD + build_hash.encode("ascii")


def _sealed_aad(kek_id: bytes, name: str) -> bytes:
    return SEALED_MAGIC + kek_id + _SEALED_AAD + name.encode("ascii")


def _encrypt(kek: Any, plaintext: bytes, iv: bytes, aad: bytes) -> bytes:
    """ciphertext ‖ tag, computed by the token."""
    return bytes(kek.encrypt(plaintext, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(iv, aad)))


def _decrypt(kek: Any, sealed: bytes, iv: bytes, aad: bytes) -> bytes | None:
    """The plaintext, or None when the tag does not verify."""
    try:
        return bytes(kek.decrypt(sealed, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(iv, aad)))
    except _DECRYPT_FAILED:
        return None


class Pkcs11KeyVault(DirectoryKeyVault):
    """Key vault whose KEK lives in a PKCS#11 token; signing keys are files in ``directory`` sealed under it."""

    missing_hint = "start the store with KEY_VAULT=pkcs11 to create it"

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        module: str,
        token_label: str,
        pin: str,
        kek_label: str = KEK_LABEL,
    ) -> None:
        super().__init__(directory)
        self.module = str(module)
        self.token_label = token_label
        self.kek_label = kek_label
        self._pin = pin

    def __repr__(self) -> str:
        return (
            f"Pkcs11KeyVault({str(self.directory)!r}, module={self.module!r}, "
            f"token_label={self.token_label!r}, kek_label={self.kek_label!r})"
        )

    # ------------------------------------------------------------------ token access

    def _with_kek(self, what: str, op: Callable[[Any], T], *, create_kek: bool = False) -> T:
        """``op(kek)`` under the process lock; the token is opened lazily and reopened once if the session
        was lost. PKCS#11 errors become UsageError with ``what`` in the message."""
        for attempt in (1, 2):
            with _lock:
                try:
                    return op(
                        self._kek(_connect(self.module, self.token_label, self._pin), create=create_kek)
                    )
                except _SESSION_LOST:
                    conn = _connections.get((self.module, self.token_label))
                    if conn is not None:
                        conn.session = None
                        conn.keks.clear()
                    if attempt == 2:
                        raise UsageError(
                            f"PKCS#11 token {self.token_label!r}: session lost during {what}"
                        ) from None
                except p11.PKCS11Error as exc:
                    raise UsageError(
                        f"PKCS#11 token {self.token_label!r}: {what} failed ({type(exc).__name__})"
                    ) from exc
        raise AssertionError("unreachable")

    def _kek(self, conn: _Connection, *, create: bool) -> Any:
        kek = conn.keks.get(self.kek_label)
        if kek is not None:
            return kek
        query = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: self.kek_label}
        found = list(conn.session.get_objects(query))
        if len(found) > 1:
            raise ConflictError(
                f"PKCS#11 token {self.token_label!r}: several keys are labelled {self.kek_label!r}"
            )
        if found:
            kek = found[0]
            self._check_kek(kek)
        elif create:
            kek = conn.session.generate_key(
                KeyType.AES,
                256,
                label=self.kek_label,
                id=os.urandom(KEK_ID_LEN),
                store=True,
                template=_KEK_TEMPLATE,
            )
        else:
            raise UsageError(
                f"key vault {self.directory}: PKCS#11 token {self.token_label!r} holds no key labelled "
                f"{self.kek_label!r}; the keys here were sealed under another token's KEK"
            )
        conn.keks[self.kek_label] = kek
        return kek

    def _check_kek(self, kek: Any) -> None:
        """Refuse a pre-provisioned key that is weaker than the one ``ensure`` would generate."""
        wanted = (Attribute.KEY_TYPE, Attribute.VALUE_LEN, Attribute.SENSITIVE, Attribute.EXTRACTABLE)
        attrs = kek.get_attributes([*wanted, Attribute.ID])
        problems = []
        if attrs.get(Attribute.KEY_TYPE) != KeyType.AES or attrs.get(Attribute.VALUE_LEN) != 32:
            problems.append("is not AES-256")
        if attrs.get(Attribute.SENSITIVE) is not True or attrs.get(Attribute.EXTRACTABLE) is not False:
            problems.append("must be sensitive and non-extractable")
        if len(attrs.get(Attribute.ID) or b"") != KEK_ID_LEN:
            problems.append(f"needs a {KEK_ID_LEN}-byte CKA_ID")
        if problems:
            raise UsageError(
                f"PKCS#11 token {self.token_label!r}: key {self.kek_label!r} " + " and ".join(problems)
            )

    # ------------------------------------------------------------------ DirectoryKeyVault hooks

    def ensure(self, now: int) -> Pkcs11KeyVault:
        if (self.directory / KEK_FILE).is_file() or (self.directory / "root.key").is_file():
            raise ConflictError(
                f"key vault {self.directory} holds a file key vault (clear root.key / kek.key); "
                "KEY_VAULT=pkcs11 needs a directory of its own"
            )
        return super().ensure(now)

    def _stored_name(self, name: str) -> str:
        return name + SEALED_SUFFIX if name in PRIVATE_FILES else name

    def _ensure_kek(self) -> None:
        self._with_kek("finding the KEK", lambda kek: None, create_kek=True)

    def _seal(self, name: str, data: bytes) -> bytes:
        if name not in PRIVATE_FILES:
            return data

        def op(kek: Any) -> bytes:
            head = SEALED_MAGIC + bytes(kek[Attribute.ID])
            iv = os.urandom(IV_LEN)
            return head + iv + _encrypt(kek, data, iv, _sealed_aad(head[len(SEALED_MAGIC) :], name))

        # Only ensure() seals, under the directory lock; the first seal in an empty directory creates the
        # KEK when the token has none yet.
        return self._with_kek(f"sealing {name}", op, create_kek=True)

    def _unseal(self, name: str, stored: bytes) -> bytes:
        if name not in PRIVATE_FILES:
            return stored
        file = self._stored_name(name)
        if len(stored) < _SEALED_HEAD + IV_LEN + TAG_LEN or not stored.startswith(SEALED_MAGIC):
            raise UsageError(f"key vault {self.directory}: {file} is not a sealed key file")
        kek_id = stored[len(SEALED_MAGIC) : _SEALED_HEAD]
        iv = stored[_SEALED_HEAD : _SEALED_HEAD + IV_LEN]

        def op(kek: Any) -> bytes | None:
            mine = bytes(kek[Attribute.ID])
            if mine != kek_id:
                raise UsageError(
                    f"key vault {self.directory}: {file} was sealed under KEK id {kek_id.hex()}, but key "
                    f"{self.kek_label!r} in PKCS#11 token {self.token_label!r} has id {mine.hex()} "
                    "(another token?)"
                )
            return _decrypt(kek, stored[_SEALED_HEAD + IV_LEN :], iv, _sealed_aad(kek_id, name))

        plain = self._with_kek(f"opening {file}", op)
        if plain is None:
            raise IntegrityError(
                f"key vault {self.directory}: {file} fails authentication under the token's KEK (altered?)"
            )
        return plain

    # ------------------------------------------------------------------ content keys

    def wrap_cek(self, cek: bytes, build_hash: str) -> bytes:
        """AES-256-GCM in the token, AAD binding ``build_hash``; format in this module's docstring."""
        aad = _cek_aad(build_hash)
        if not isinstance(cek, (bytes, bytearray)) or len(cek) != CEK_LEN:
            raise UsageError("content key must be 32 bytes")
        iv = os.urandom(IV_LEN)
        body = self._with_kek("wrapping a content key", lambda kek: _encrypt(kek, bytes(cek), iv, aad))
        return CEK_WRAP_MAGIC + iv + body

    def unwrap_cek(self, wrapped: bytes, build_hash: str) -> bytes:
        """The content key; the one opaque IntegrityError for a wrong KEK, build hash or any tampering."""
        aad = _cek_aad(build_hash)
        if (
            not isinstance(wrapped, (bytes, bytearray))
            or len(wrapped) != CEK_WRAPPED_LEN
            or not wrapped.startswith(CEK_WRAP_MAGIC)
        ):
            raise IntegrityError()
        iv = bytes(wrapped[len(CEK_WRAP_MAGIC) : len(CEK_WRAP_MAGIC) + IV_LEN])
        body = bytes(wrapped[len(CEK_WRAP_MAGIC) + IV_LEN :])
        cek = self._with_kek("unwrapping a content key", lambda kek: _decrypt(kek, body, iv, aad))
        if cek is None or len(cek) != CEK_LEN:
            raise IntegrityError()
        return cek
