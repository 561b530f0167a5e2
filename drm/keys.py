# Why this is one module: the PKI: keys, certificates, CSRs and their validation rules (FORMAT.md §5) in one place.
"""Keys and X.509 certificates: the store's root CA, its license-issuer key, device identities.

Every signature is Ed25519 (pinned; a certificate with any other algorithm is refused).
Key ids are SHA-256 of the public key's DER SubjectPublicKeyInfo (or raw bytes for KEM keys)."""

from __future__ import annotations

import datetime as _dt
import hashlib
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa, mlkem, x25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from drm._canonical import FormatError
from edgemart.core.errors import LicenseRefused, UsageError

# Private arc for edgemart's certificate extensions and key purposes (see docs/FORMAT.md).
_ARC = "1.3.6.1.4.1.59999.7"
OID_X25519_KEM = ObjectIdentifier(_ARC + ".1")  # raw 32-byte X25519 public key
OID_MLKEM768_KEM = ObjectIdentifier(_ARC + ".2")  # raw ML-KEM-768 encapsulation key (hybrid suite)
OID_MLDSA65_COSIGN = ObjectIdentifier(_ARC + ".3")  # raw ML-DSA-65 public key (issuer co-signature)
EKU_LICENSE_ISSUER = ObjectIdentifier(_ARC + ".10")
EKU_DEVICE = ObjectIdentifier(_ARC + ".11")
EKU_BUNDLE_SIGNER = ObjectIdentifier(_ARC + ".12")
MAX_CERT_BYTES = 16 * 1024
# The extensions verify_cert acts on; any other extension marked critical makes a certificate unusable (RFC 5280).
_UNDERSTOOD_EXTENSIONS = frozenset(
    {
        x509.oid.ExtensionOID.BASIC_CONSTRAINTS,
        x509.oid.ExtensionOID.EXTENDED_KEY_USAGE,
        OID_X25519_KEM,
        OID_MLKEM768_KEM,
        OID_MLDSA65_COSIGN,
    }
)
_ED25519_SIG_OID = ObjectIdentifier("1.3.101.112")
# AlgorithmIdentifier{id-Ed25519} (no parameters) then BIT STRING of 65 bytes with 0 unused bits.
_ED25519_SIGNATURE_TRAILER = bytes.fromhex("300506032b6570") + bytes.fromhex("034100")
_ED25519_ALG_ID = b"\x30\x05\x06\x03\x2b\x65\x70"  # AlgorithmIdentifier{id-Ed25519}, no parameters


def key_id(public_key: ed25519.Ed25519PublicKey | bytes) -> str:
    """Stable id of a public key: first 16 bytes of SHA-256 over its SPKI DER (or raw bytes), hex."""
    if isinstance(public_key, (bytes, bytearray)):
        raw = bytes(public_key)
    else:
        raw = public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    return hashlib.sha256(raw).hexdigest()[:32]


def _utc(ts: int) -> _dt.datetime:
    return _dt.datetime.fromtimestamp(ts, tz=_dt.UTC)


def _name(cn: str, org: str = "edgemart") -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )


def private_key_to_pem(key: ed25519.Ed25519PrivateKey | x25519.X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def private_key_from_pem(pem: bytes, kind: Any, *, what: str = "key") -> Any:
    """Load an unencrypted PKCS#8 PEM private key of exactly ``kind``; UsageError naming ``what`` otherwise."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise UsageError(f"{what}: not an unencrypted PEM private key") from None
    if not isinstance(key, kind):
        algorithm = "Ed25519" if kind is ed25519.Ed25519PrivateKey else "X25519"
        raise UsageError(f"{what}: expected an {algorithm} private key")
    return key


def ed25519_from_pem(pem: bytes, *, what: str = "key") -> ed25519.Ed25519PrivateKey:
    return private_key_from_pem(pem, ed25519.Ed25519PrivateKey, what=what)


def x25519_from_pem(pem: bytes, *, what: str = "key") -> x25519.X25519PrivateKey:
    return private_key_from_pem(pem, x25519.X25519PrivateKey, what=what)


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def cert_from_bytes(data: bytes) -> x509.Certificate:
    """Load a certificate from PEM or DER, bounded in size; FormatError on garbage."""
    if not isinstance(data, (bytes, bytearray)):
        raise FormatError("certificate must be bytes")
    data = bytes(data)
    if len(data) > MAX_CERT_BYTES:
        raise FormatError("certificate too large")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except (ValueError, x509.InvalidVersion):
        raise FormatError("not an X.509 certificate") from None


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key, now: int, days: int
) -> x509.CertificateBuilder:  # type: ignore[no-untyped-def]
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(now - 300))
        .not_valid_after(_utc(now + days * 86400))
    )


def _check_pair(key: ed25519.Ed25519PrivateKey, cert: x509.Certificate, what: str) -> None:
    if not isinstance(cert.public_key(), ed25519.Ed25519PublicKey) or key_id(cert.public_key()) != key_id(  # type: ignore[arg-type]
        key.public_key()
    ):
        raise UsageError(f"{what} key does not match its certificate")


@dataclass
class Authority:
    """The store's root CA (signs issuer and device certificates)."""

    key: ed25519.Ed25519PrivateKey
    cert: x509.Certificate

    @classmethod
    def generate(cls, *, now: int, name: str = "edgemart store root", days: int = 3650) -> Authority:
        key = ed25519.Ed25519PrivateKey.generate()
        subj = _name(name)
        cert = (
            _builder(subj, subj, key.public_key(), now, days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, None)
        )
        return cls(key, cert)

    def issue_issuer(
        self, *, now: int, days: int = 1825, name: str = "edgemart license issuer", pq: bool = True
    ) -> Issuer:
        """A license-signing key certified by this CA, with an ML-DSA-65 co-signing key when ``pq``."""
        key = ed25519.Ed25519PrivateKey.generate()
        pq_key = mldsa.MLDSA65PrivateKey.generate() if pq else None
        b = _builder(_name(name), self.cert.subject, key.public_key(), now, days)
        b = b.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        b = b.add_extension(x509.ExtendedKeyUsage([EKU_LICENSE_ISSUER, EKU_BUNDLE_SIGNER]), critical=False)
        if pq_key is not None:
            b = b.add_extension(
                x509.UnrecognizedExtension(OID_MLDSA65_COSIGN, pq_key.public_key().public_bytes_raw()),
                critical=False,
            )
        return Issuer(key, b.sign(self.key, None), pq_key)

    def issue_device_cert(self, csr_pem: bytes, *, now: int, days: int = 825) -> x509.Certificate:
        """Certify a device from its CSR; the device id is derived from its key, never taken from the CSR."""
        try:
            csr = (
                x509.load_pem_x509_csr(csr_pem)
                if csr_pem.lstrip().startswith(b"-----")
                else x509.load_der_x509_csr(csr_pem)
            )
        except ValueError:
            raise UsageError("not a certificate signing request (PEM or DER)") from None
        pub = csr.public_key()
        if not isinstance(pub, ed25519.Ed25519PublicKey):
            raise UsageError("device CSR must use an Ed25519 key")
        if not csr.is_signature_valid:
            raise UsageError("device CSR signature is invalid")
        kem = _kem_keys_from(csr.extensions)
        if kem.x25519 is None:
            raise UsageError("device CSR lacks its X25519 key-agreement key")
        return device_certificate(
            pub, kem, issuer_name=self.cert.subject, sign_with=self.key, now=now, days=days
        )

    def to_files(self) -> dict[str, bytes]:
        """``root.key`` (PKCS#8 PEM) and ``root.crt`` (PEM), as the key vault stores them."""
        return {"root.key": private_key_to_pem(self.key), "root.crt": cert_to_pem(self.cert)}

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> Authority:
        try:
            key = ed25519_from_pem(files["root.key"])
            cert = cert_from_bytes(files["root.crt"])
        except KeyError as exc:
            raise UsageError(f"authority key file {exc.args[0]} missing") from None
        _check_pair(key, cert, "root")
        return cls(key, cert)


@dataclass(frozen=True)
class KemKeys:
    x25519: bytes | None
    mlkem768: bytes | None


def _kem_keys_from(extensions: x509.Extensions) -> KemKeys:
    found: dict[ObjectIdentifier, bytes] = {}
    for ext in extensions:
        if isinstance(ext.value, x509.UnrecognizedExtension):
            found[ext.oid] = ext.value.value
    x = found.get(OID_X25519_KEM)
    m = found.get(OID_MLKEM768_KEM)
    if x is not None and len(x) != 32:
        raise UsageError("X25519 key extension has the wrong length")
    if m is not None:
        mlkem768_public_key(m)
    return KemKeys(x, m)


def mlkem768_public_key(raw: bytes) -> mlkem.MLKEM768PublicKey:
    """An ML-KEM-768 encapsulation key after the FIPS 203 §7.2 input checks: 1184 bytes and every 12-bit
    coefficient < q = 3329 (ByteEncode12(ByteDecode12(ek)) = ek). UsageError otherwise, so a bad key is
    refused where it enters (a CSR, a certificate), not when a content key is wrapped to it."""
    if len(raw) != 1184:
        raise UsageError("ML-KEM-768 key extension has the wrong length")
    try:
        return mlkem.MLKEM768PublicKey.from_public_bytes(bytes(raw))
    except ValueError:  # the backend runs the modulus check (its message only mentions the length)
        raise UsageError(
            "ML-KEM-768 key fails the FIPS 203 encapsulation-key check (a coefficient is not below q = 3329)"
        ) from None


def device_certificate(
    pub: ed25519.Ed25519PublicKey,
    kem: KemKeys,
    *,
    issuer_name: x509.Name | None,
    sign_with: ed25519.Ed25519PrivateKey,
    now: int,
    days: int,
) -> x509.Certificate:
    subj = _name(key_id(pub), org="edgemart device")
    b = _builder(subj, issuer_name or subj, pub, now, days)
    b = b.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    b = b.add_extension(x509.ExtendedKeyUsage([EKU_DEVICE]), critical=False)
    if kem.x25519 is not None:
        b = b.add_extension(x509.UnrecognizedExtension(OID_X25519_KEM, kem.x25519), critical=False)
    if kem.mlkem768 is not None:
        b = b.add_extension(x509.UnrecognizedExtension(OID_MLKEM768_KEM, kem.mlkem768), critical=False)
    return b.sign(sign_with, None)


@dataclass
class Issuer:
    """The store's license-signing identity: Ed25519 key + its certificate (+ optional ML-DSA-65 key)."""

    key: ed25519.Ed25519PrivateKey
    cert: x509.Certificate
    pq_key: mldsa.MLDSA65PrivateKey | None = None

    @property
    def kid(self) -> str:
        return key_id(self.key.public_key())

    def to_files(self) -> dict[str, bytes]:
        """``issuer.key`` (PKCS#8 PEM), ``issuer.crt`` (PEM) and ``issuer-pq.key`` (32-byte ML-DSA-65 seed)."""
        files = {"issuer.key": private_key_to_pem(self.key), "issuer.crt": cert_to_pem(self.cert)}
        if self.pq_key is not None:
            files["issuer-pq.key"] = self.pq_key.private_bytes_raw()
        return files

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> Issuer:
        try:
            key = ed25519_from_pem(files["issuer.key"])
            cert = cert_from_bytes(files["issuer.crt"])
        except KeyError as exc:
            raise UsageError(f"issuer key file {exc.args[0]} missing") from None
        _check_pair(key, cert, "issuer")
        seed = files.get("issuer-pq.key")
        pq_key = None
        if seed is not None:
            try:
                pq_key = mldsa.MLDSA65PrivateKey.from_seed_bytes(seed)
            except ValueError:
                raise UsageError("issuer-pq.key is not a 32-byte ML-DSA-65 seed") from None
        cert_pq = cert_mldsa_key(cert)
        mine = None if pq_key is None else pq_key.public_key().public_bytes_raw()
        theirs = None if cert_pq is None else cert_pq.public_bytes_raw()
        if mine != theirs:
            raise UsageError("issuer-pq.key does not match the ML-DSA-65 key in issuer.crt")
        return cls(key, cert, pq_key)


@dataclass
class DeviceKeys:
    """A device's own keys, generated on the device; the private halves never leave it."""

    sign: ed25519.Ed25519PrivateKey
    kem: x25519.X25519PrivateKey
    pq_kem: mlkem.MLKEM768PrivateKey | None = None

    @classmethod
    def generate(cls, *, pq: bool = True) -> DeviceKeys:
        return cls(
            ed25519.Ed25519PrivateKey.generate(),
            x25519.X25519PrivateKey.generate(),
            mlkem.MLKEM768PrivateKey.generate() if pq else None,
        )

    @property
    def device_id(self) -> str:
        return key_id(self.sign.public_key())

    def kem_public(self) -> KemKeys:
        return KemKeys(
            self.kem.public_key().public_bytes_raw(),
            self.pq_kem.public_key().public_bytes_raw() if self.pq_kem is not None else None,
        )

    def csr(self) -> bytes:
        kem = self.kem_public()
        b = x509.CertificateSigningRequestBuilder().subject_name(_name(self.device_id, org="edgemart device"))
        b = b.add_extension(x509.UnrecognizedExtension(OID_X25519_KEM, kem.x25519), critical=False)  # type: ignore[arg-type]
        if kem.mlkem768 is not None:
            b = b.add_extension(x509.UnrecognizedExtension(OID_MLKEM768_KEM, kem.mlkem768), critical=False)
        return b.sign(self.sign, None).public_bytes(serialization.Encoding.PEM)

    def self_signed_cert(self, *, now: int, days: int = 825) -> x509.Certificate:
        return device_certificate(
            self.sign.public_key(),
            self.kem_public(),
            issuer_name=None,
            sign_with=self.sign,
            now=now,
            days=days,
        )

    def to_files(self) -> dict[str, bytes]:
        """Private key files (PEM / raw seed) the device stores 0600 in its own directory."""
        files = {"sign.key": private_key_to_pem(self.sign), "kem.key": private_key_to_pem(self.kem)}
        if self.pq_kem is not None:
            files["pqkem.key"] = self.pq_kem.private_bytes_raw()
        return files

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> DeviceKeys:
        try:
            pq = files.get("pqkem.key")
            return cls(
                ed25519_from_pem(files["sign.key"]),
                x25519_from_pem(files["kem.key"]),
                mlkem.MLKEM768PrivateKey.from_seed_bytes(pq) if pq else None,
            )
        except KeyError as exc:
            raise UsageError(f"device key file {exc.args[0]} missing") from None
        except ValueError:
            raise UsageError("device key files are corrupt") from None


# --------------------------------------------------------------------------- verification


def cert_device_id(cert: x509.Certificate) -> str:
    pub = cert.public_key()
    if not isinstance(pub, ed25519.Ed25519PublicKey):
        raise LicenseRefused(reason="certificate key is not Ed25519")
    return key_id(pub)


def cert_kem_keys(cert: x509.Certificate) -> KemKeys:
    return _kem_keys_from(cert.extensions)


def cert_mldsa_key(cert: x509.Certificate) -> mldsa.MLDSA65PublicKey | None:
    """The issuer's ML-DSA-65 co-signing key from its certificate extension, if any."""
    try:
        for ext in cert.extensions:
            if ext.oid == OID_MLDSA65_COSIGN and isinstance(ext.value, x509.UnrecognizedExtension):
                return mldsa.MLDSA65PublicKey.from_public_bytes(ext.value.value)
    except ValueError:
        raise FormatError("ML-DSA-65 key extension is malformed") from None
    return None


def verify_cert(
    cert: x509.Certificate, root: x509.Certificate, *, now: int, purpose: ObjectIdentifier
) -> None:
    """Check ``cert`` was issued by the pinned ``root`` for ``purpose`` and is valid at ``now``.

    Only a direct child of the root is accepted (no intermediates). Raises LicenseRefused (opaque)
    with the precise reason attached."""
    try:
        _verify_cert(cert, root, now=now, purpose=purpose)
    except (ValueError, UnsupportedAlgorithm):
        # Lazily parsed fields of a malformed certificate (names, extensions, keys).
        raise LicenseRefused(reason="certificate is malformed") from None


def _verify_cert(
    cert: x509.Certificate, root: x509.Certificate, *, now: int, purpose: ObjectIdentifier
) -> None:
    if cert.signature_algorithm_oid != _ED25519_SIG_OID:
        raise LicenseRefused(reason="certificate signature algorithm is not Ed25519")
    # The signature does not cover its own algorithm identifier and BIT STRING header, and the parser
    # tolerates variants of both (e.g. nonzero unused bits): accept exactly one encoding of them.
    der = cert.public_bytes(serialization.Encoding.DER)
    if not der.endswith(_ED25519_SIGNATURE_TRAILER + cert.signature) or len(cert.signature) != 64:
        raise LicenseRefused(reason="certificate signature has a non-canonical encoding")
    # Names are compared as DER bytes: equal-looking names in other string types are other names.
    if cert.issuer.public_bytes() != root.subject.public_bytes():
        raise LicenseRefused(reason="certificate was not issued by the pinned root")
    root_pub = root.public_key()
    if not isinstance(root_pub, ed25519.Ed25519PublicKey):
        raise LicenseRefused(reason="pinned root key is not Ed25519")
    try:
        root_pub.verify(cert.signature, cert.tbs_certificate_bytes)
    except InvalidSignature:
        raise LicenseRefused(reason="certificate signature does not verify under the pinned root") from None
    # Only certificates the root signed get this far: everything below parses our own encoding.
    for c in (cert, root):
        if not (c.not_valid_before_utc.timestamp() <= now <= c.not_valid_after_utc.timestamp()):
            raise LicenseRefused(reason="certificate expired or not yet valid")
    for ext in cert.extensions:
        if ext.critical and ext.oid not in _UNDERSTOOD_EXTENSIONS:
            raise LicenseRefused(
                reason=f"certificate has an unknown critical extension {ext.oid.dotted_string}"
            )
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise LicenseRefused(reason="certificate lacks basic constraints or key purpose") from None
    if bc.ca:
        raise LicenseRefused(reason="a CA certificate cannot be used as an end-entity")
    if purpose not in eku:
        raise LicenseRefused(reason="certificate is not authorized for this purpose")
    if not isinstance(cert.public_key(), ed25519.Ed25519PublicKey):
        raise LicenseRefused(reason="certificate key is not Ed25519")


__all__ = [
    "Authority",
    "DeviceKeys",
    "EKU_BUNDLE_SIGNER",
    "EKU_DEVICE",
    "EKU_LICENSE_ISSUER",
    "ExtendedKeyUsageOID",
    "Issuer",
    "KemKeys",
    "cert_device_id",
    "cert_from_bytes",
    "cert_kem_keys",
    "cert_mldsa_key",
    "cert_to_pem",
    "key_id",
    "verify_cert",
]
