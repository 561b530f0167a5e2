"""Regenerate the known-answer vectors in this directory (docs/FORMAT.md §14 defines every field).

    .venv/bin/python tests/vectors/make_vectors.py [FILE ...]     # all files, or only the named ones

Byte-identical every run: container.json, canonical.json, usage_log.json, model_safety.json and the PKCS#11
entries of at_rest.json (fixed keys, nonces and IVs; Ed25519 is deterministic). New bytes every run, so they
carry every private key needed to check them: certificates.json and license.json (fresh root, issuer and
device keys, certificate serials, HPKE encapsulations, hedged ML-DSA-65 signatures), at_rest.json `keywrap`
and `state` (random GCM nonces), bundle.json (fresh root, issuer and device keys and the license's HPKE
encapsulation, hence the license, manifest, signature and archive bytes; the builder key and the sealed build
are fixed) and metering.json (fresh root and issuer keys). Naming files regenerates only those, so an
unrelated change does not rewrite the random ones; certificates.json and license.json are always written
together (they describe one PKI). tests/drm/test_drm_vectors.py checks every file against the code and
against from-the-spec decoders. All keys here are test-only."""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import NameOID

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

import drm  # noqa: E402
import drm.bundle  # noqa: E402
from drm._canonical import b64e, dumps  # noqa: E402
from drm.envelope import sign_envelope  # noqa: E402
from drm.keys import OID_MLKEM768_KEM, OID_X25519_KEM, _builder, _name  # noqa: E402
from drm.license import LICENSE_TYP  # noqa: E402
from drm.revocation import REVOCATION_TYP  # noqa: E402

NOW = 1_760_000_000
CEK = bytes(range(32))
NONCE_PREFIX = bytes.fromhex("0001020304050607")
MAGIC = b"\x89EMDL\r\n\x1a"


def plaintext(n: int) -> bytes:
    return bytes((i * 7 + 3) % 251 for i in range(n))


def _pem(key: Any) -> str:
    return key.private_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _cert_pem(cert: x509.Certificate) -> str:
    return drm.cert_to_pem(cert).decode()


# ------------------------------------------------------------------------------------------ containers


def spec_seal(
    header: dict[str, Any] | bytes,
    plain: bytes,
    *,
    key: bytes = CEK,
    prefix: bytes = NONCE_PREFIX,
    chunk_size: int = 4096,
    version: int = 1,
    magic: bytes = MAGIC,
) -> bytes:
    """A container written from docs/FORMAT.md §3 alone, so refusal vectors can hold what drm.seal refuses."""
    body = header if isinstance(header, bytes) else dumps(header)
    head = magic + bytes([version]) + struct.pack(">I", len(body)) + body
    digest = hashlib.sha256(head).digest()
    n = max(1, -(-len(plain) // chunk_size))
    out = [head]
    for i in range(n):
        aad = digest + struct.pack(">IB", i, 1 if i == n - 1 else 0)
        out.append(
            AESGCM(key).encrypt(
                prefix + struct.pack(">I", i), plain[i * chunk_size : (i + 1) * chunk_size], aad
            )
        )
    return b"".join(out)


def _header(plain: bytes, **over: Any) -> dict[str, Any]:
    h = {
        "aead": "AES-256-GCM",
        "build_hash": drm.sha256_tag(plain),
        "chunk_size": 4096,
        "media_type": "application/vnd.onnx",
        "nonce_prefix": b64e(NONCE_PREFIX),
        "plaintext_len": len(plain),
        "target": "arm-cpu",
        "v": 1,
    }
    h.update(over)
    return {k: v for k, v in h.items() if v is not None}


def container_vectors() -> dict:
    cases = []
    for name, n in (("empty", 0), ("three-chunks", 2 * 4096 + 100)):
        data = plaintext(n)
        sealed = drm.seal(
            data,
            key=CEK,
            target="arm-cpu",
            media_type="application/vnd.onnx",
            chunk_size=4096,
            nonce_prefix=NONCE_PREFIX,
        )
        head_len = drm.header_size(sealed[:13])
        cases.append(
            {
                "name": name,
                "key": CEK.hex(),
                "nonce_prefix": NONCE_PREFIX.hex(),
                "chunk_size": 4096,
                "target": "arm-cpu",
                "media_type": "application/vnd.onnx",
                "plaintext": data.hex(),
                "header_json": sealed[13:head_len].decode(),
                "header_sha256": drm.sha256_tag(sealed[:head_len]),
                "sealed": sealed.hex(),
            }
        )
    data = plaintext(2 * 4096 + 100)
    good = spec_seal(_header(data), data)
    assert good.hex() == cases[1]["sealed"]
    hl = drm.header_size(good[:13])
    chunk = [good[hl : hl + 4112], good[hl + 4112 : hl + 8224], good[hl + 8224 :]]
    head = good[:hl]
    other = plaintext(100)[::-1]
    flipped = bytearray(good)
    flipped[hl + 5000] ^= 1
    header_flip = bytearray(good)
    header_flip[13 + 20] ^= 0x01  # a byte inside the header JSON, still canonical-looking
    refusals: list[tuple[str, bytes, str | None, str]] = [
        ("bad-magic", b"\x89EMDX" + good[5:], None, "magic is not 89 45 4D 44 4C 0D 0A 1A"),
        ("version-2", spec_seal(_header(data), data, version=2), None, "unknown container version"),
        ("header-len-over-limit", good[:9] + struct.pack(">I", 16385) + good[13:], None, "header_len > 16384"),
        ("header-len-zero", good[:9] + struct.pack(">I", 0) + good[13:], None, "empty header is not JSON"),
        ("header-not-canonical", spec_seal(dumps(_header(data)).replace(b",", b", ", 1), data), None,
         "header JSON is not canonical (white space)"),
        ("header-extra-member", spec_seal(_header(data, extra="x"), data), None, "header has an unknown member"),
        ("header-missing-member", spec_seal(_header(data, media_type=None), data), None, "header lacks media_type"),
        ("aead-not-pinned", spec_seal(_header(data, aead="AES-128-GCM"), data), None,
         "aead names another algorithm (refused before decrypting)"),
        ("chunk-size-too-small", spec_seal(_header(data, chunk_size=4095), data, chunk_size=4095), None,
         "chunk_size < 4096"),
        ("chunk-size-too-large", spec_seal(_header(data, chunk_size=16 * 1024 * 1024 + 1), data,
                                           chunk_size=16 * 1024 * 1024 + 1), None, "chunk_size > 16777216"),
        ("header-v-2", spec_seal(_header(data, v=2), data), None, "header member v is not 1"),
        ("nonce-prefix-7-bytes", spec_seal(_header(data, nonce_prefix=b64e(NONCE_PREFIX[:7])), data,
                                           prefix=NONCE_PREFIX[:7] + b"\0"), None, "nonce_prefix is not 8 bytes"),
        ("target-trailing-newline", spec_seal(_header(data, target="arm-cpu\n"), data), None,
         "target does not match its pattern"),
        ("media-type-upper-case", spec_seal(_header(data, media_type="Application/ONNX"), data), None,
         "media_type does not match its pattern"),
        ("header-byte-flipped", bytes(header_flip), None, "a header byte changed (header digest in every AAD)"),
        ("ciphertext-bit-flipped", bytes(flipped), None, "a ciphertext bit changed"),
        ("wrong-key", spec_seal(_header(data), data, key=bytes(32)), None, "sealed under another key"),
        ("truncated-last-chunk", good[:-1], None, "length differs from 13 + hl + plaintext_len + 16 n_chunks"),
        ("dropped-last-chunk", head + chunk[0] + chunk[1], None, "last chunk missing"),
        ("trailing-byte", good + b"\0", None, "bytes after the last chunk"),
        ("chunks-swapped", head + chunk[1] + chunk[0] + chunk[2], None, "chunk index is in nonce and AAD"),
        ("build-hash-mismatch", spec_seal(_header(data, build_hash=drm.sha256_tag(other)), data), None,
         "a CEK holder sealed other content under this build hash"),
        ("expected-build-hash", good, drm.sha256_tag(other), "the license names another build hash"),
    ]  # fmt: skip
    out = []
    for name, sealed, expected, reason in refusals:
        try:
            drm.open_sealed(sealed, key=CEK, expected_build_hash=expected)
        except drm.IntegrityError:
            pass
        else:
            raise AssertionError(f"container refusal vector {name} opens")
        out.append(
            {
                "name": name,
                "key": CEK.hex(),
                "expected_build_hash": expected,
                "sealed": sealed.hex(),
                "reason": reason,
            }
        )
    return {
        "description": "sealed containers (docs/FORMAT.md §3): fixed key and nonce prefix; refusals MUST fail",
        "cases": cases,
        "refusals": out,
    }


FLEET_LICENSE_ID = "lic_fleet_bundle_vector"


def _fleet_bundle_parts(
    pki: Pki, files: list[tuple[str, bytes]], claims: drm.LicenseClaims, lic_path: str, build_hash: str
) -> tuple[list[tuple[str, bytes]], list[drm.bundle.LicenseEntry], list[tuple[str, Any, str, str]]]:
    """The bundle's files plus a 2-seat fleet license for the same build and seat 1 activated for the
    device (docs/FORMAT.md §19.1 `activations/`); and the seat refusals (name, edit of the files, match, why)."""
    from drm.bundle import LicenseEntry, activation_member_name

    device_id, other_id = pki.classic_device.device_id, pki.device.device_id
    raw = pki.fleet.public_key().public_bytes_raw()
    fleet_id = drm.key_id(raw)
    fleet_token = drm.issue_license(
        issuer=pki.classic, cek=CEK, recipient=drm.KemKeys(raw, None), kind="production", listing="vector-listing",
        build_hash=build_hash, target="arm-cpu", now=NOW - 60, days=None, max_runs=None, fleet_key_id=fleet_id,
        license_id=FLEET_LICENSE_ID, seats=2,
    )  # fmt: skip
    fleet_claims = drm.LicenseClaims.from_dict(drm.parse_envelope(fleet_token, LICENSE_TYP)[0])
    fleet_path = f"licenses/{FLEET_LICENSE_ID}.lic"
    stranger = pki.other_root.issue_issuer(now=NOW - 86400, pq=False)

    def act(
        device: str, seat: int = 1, lid: str = FLEET_LICENSE_ID, issuer: drm.Issuer = pki.classic
    ) -> bytes:
        return drm.sign_activation(issuer, drm.Activation(device, lid, fleet_id, seat, NOW - 30))

    act_path = activation_member_name(FLEET_LICENSE_ID, device_id)
    fleet_files = files + [(fleet_path, fleet_token), (act_path, act(device_id))]
    licenses = [
        LicenseEntry.from_claims(lic_path, claims),
        LicenseEntry.from_claims(fleet_path, fleet_claims),
    ]

    def swap(data: bytes, name: str = act_path) -> Any:
        return lambda fs: [f for f in fs if f[0] != act_path] + [(name, data)]

    other_path = activation_member_name(FLEET_LICENSE_ID, other_id)
    seat_cases = [
        ("activation-named-for-another-device", swap(act(device_id), other_path), "holds the activation of",
         "the device's activation filed under another device's name (a builder re-signed the manifest)"),
        ("activation-seat-past-count", swap(act(device_id, seat=3)), "seat 3 of a 2-seat license",
         "seat 3 of the fleet license's signed 2 seats"),
        ("activation-license-not-in-bundle", swap(act(device_id, lid="lic_absent"),
         activation_member_name("lic_absent", device_id)), "is not in the bundle",
         "an activation of a license the bundle does not carry"),
        ("activation-of-device-license", swap(act(device_id, lid="lic_bundle_vector"),
         activation_member_name("lic_bundle_vector", device_id)), "not an activation of the fleet key",
         "an activation naming the device-bound license"),
        ("activation-foreign-issuer", swap(act(device_id, issuer=stranger)), "does not verify against the root",
         "signed by an issuer of another root"),
        ("activation-seat-twice", lambda fs: fs + [(other_path, act(other_id, seat=1))], "held by two devices",
         "seat 1 activated for two devices"),
    ]  # fmt: skip
    return fleet_files, licenses, seat_cases


def _fleet_bundle_vector(pki: Pki, members: list[tuple[str, bytes]], pub: ed25519.Ed25519PublicKey) -> dict:
    archive = _tar(members)
    verified = drm.verify_bundle(archive, now=NOW, root=pki.root, builder_key=pub)
    acts = [
        {"license_id": a.license_id, "device_id": a.device_id, "seat": a.seat}
        for a in verified.activations.values()
    ]
    assert acts == [{"license_id": FLEET_LICENSE_ID, "device_id": pki.classic_device.device_id, "seat": 1}]
    return {
        "description": "a bundle with a device-bound and a 2-seat fleet license for one build, and seat 1 of the "
        "fleet license activated for device_id (member activations/<license_id>.<device_id>.act, §19.1); verify "
        "like `bundle.archive`, then expect `activations`",
        "archive": archive.hex(),
        "member_names": [n for n, _ in members],
        "activations": acts,
    }


# ------------------------------------------------------------------------------------------ canonical JSON


def canonical_vectors() -> dict:
    values = [
        {"b": 1, "a": [True, False, None]},
        {"\ufb33": 1, "\U0001f600": 2, "a": 'é\u2028\x7f\x1f\n"\\/'},
        [9007199254740991, -9007199254740991, 0, "", {}],
    ]
    good = [{"value_json": json.dumps(v), "canonical": dumps(v).decode()} for v in values]
    good.append({"value_json": "[" * 16 + "1" + "]" * 16, "canonical": "[" * 16 + "1" + "]" * 16})
    good.append({"value_json": "[" * 17 + "]" * 17, "canonical": "[" * 17 + "]" * 17})
    bad = [
        ('{"a":1,"a":2}', "duplicate member name"),
        ('{"a":1,"a":1}', "duplicate member name (same value)"),
        ('{"b":1,"a":2}', "members not sorted"),
        ('{"a": 1}', "white space outside a string"),
        ('{"a":1}\n', "trailing white space"),
        ("\ufeff{}", "byte order mark"),
        ("1.0", "fraction"),
        ("1e3", "exponent"),
        ("-0", "negative zero"),
        ("01", "leading zero"),
        ("9007199254740992", "integer above 2^53 - 1"),
        ("-9007199254740992", "integer below -(2^53 - 1)"),
        ("12345678901234567", "more than 16 digits"),
        ("NaN", "non-standard constant"),
        ('"\\u0041"', "escape of a character that is written literally"),
        ('"\\u001F"', "upper-case hex in an escape"),
        ('"\\u000a"', "\\u escape where \\n is required"),
        ('"\\/"', "escaped solidus"),
        ('"\\ud800"', "lone surrogate"),
        ('"\x01"', "raw control character in a string"),
        ("[" * 17 + "1" + "]" * 17, "a value at depth 17"),
        ("[" * 18 + "]" * 18, "a container at depth 17"),
    ]
    for text, _ in bad:
        try:
            drm._canonical.loads(text.encode(), max_size=1 << 16, what="vector")
        except drm.FormatError:
            continue
        raise AssertionError(f"canonical vector {text!r} is accepted")
    raw_bad = [("22ff22", "not UTF-8"), ("22eda08022", "UTF-8 encoded surrogate")]
    return {
        "description": "canonical JSON (docs/FORMAT.md §2): value_json parses to a value whose canonical bytes are "
        "`canonical`; every `rejected` text and `rejected_hex` byte string MUST fail to parse",
        "canonical": good,
        "rejected": [{"json": t, "reason": r} for t, r in bad],
        "rejected_hex": [{"hex": h, "reason": r} for h, r in raw_bad],
    }


# ------------------------------------------------------------------------------------------ PKI


class Pki:
    """One root, a hybrid (Ed25519 + ML-DSA-65) issuer, an Ed25519-only issuer and devices, shared by the files."""

    def __init__(self) -> None:
        self.authority = drm.Authority.generate(now=NOW - 86400)
        self.issuer = self.authority.issue_issuer(now=NOW - 86400)
        self.classic = self.authority.issue_issuer(now=NOW - 86400, pq=False, name="edgemart issuer ed25519")
        self.device = drm.DeviceKeys.generate()
        self.csr = self.device.csr()
        self.device_cert = self.authority.issue_device_cert(self.csr, now=NOW - 3600)
        self.classic_device = drm.DeviceKeys.generate(pq=False)
        self.fleet = x25519.X25519PrivateKey.generate()
        self.other_root = drm.Authority.generate(now=NOW - 86400)  # same names, another key

    @property
    def root(self) -> x509.Certificate:
        return self.authority.cert


PURPOSES = {
    "license-issuer": drm.EKU_LICENSE_ISSUER,
    "device": drm.EKU_DEVICE,
    "bundle-signer": drm.EKU_BUNDLE_SIGNER,
}


def _ee(
    pki: Pki,
    *,
    name: x509.Name | None = None,
    issuer_name: x509.Name | None = None,
    sign_with: ed25519.Ed25519PrivateKey | None = None,
    ca: bool | None = False,
    eku: list[x509.ObjectIdentifier] | None = None,
    critical_extra: bool = False,
    days: int = 30,
    now: int = NOW - 3600,
) -> x509.Certificate:
    key = pki.device.sign
    b = _builder(name or _name(pki.device.device_id, org="edgemart device"), issuer_name or pki.root.subject,
                 key.public_key(), now, days)  # fmt: skip
    if ca is not None:
        b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    if eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    if critical_extra:
        b = b.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.59999.7.99"), b"\x05\x00"),
            critical=True,
        )
    return b.sign(sign_with or pki.authority.key, None)


def _unused_bits_cert(pki: Pki) -> bytes:
    """The device certificate re-encoded with one unused bit declared in its signature BIT STRING (same bits)."""
    for _ in range(256):
        cert = _ee(pki, eku=[drm.EKU_DEVICE])
        if cert.signature[-1] & 1 == 0:
            der = bytearray(cert.public_bytes(serialization.Encoding.DER))
            der[len(der) - 64 - 1] = 0x01
            return bytes(der)
    raise AssertionError("no signature ending in a 0 bit")


def certificate_vectors(pki: Pki) -> dict:
    printable = x509.name._ASN1Type.PrintableString  # type: ignore[attr-defined]
    lookalike = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgemart", _type=printable),
            x509.NameAttribute(NameOID.COMMON_NAME, "edgemart store root", _type=printable),
        ]
    )
    self_signed = pki.device.self_signed_cert(now=NOW - 3600)
    nb = int(pki.device_cert.not_valid_before_utc.timestamp())
    na = int(pki.device_cert.not_valid_after_utc.timestamp())
    checks: list[tuple[str, bytes | x509.Certificate, str, int, bool, str]] = [
        ("store-issued-device", pki.device_cert, "device", NOW, True, "issued by the root from the CSR below"),
        ("device-at-not-before", pki.device_cert, "device", nb, True, "validity bounds are inclusive"),
        ("device-at-not-after", pki.device_cert, "device", na, True, "validity bounds are inclusive"),
        ("device-before-not-before", pki.device_cert, "device", nb - 1, False, "not yet valid"),
        ("device-after-not-after", pki.device_cert, "device", na + 1, False, "expired"),
        ("hybrid-issuer", pki.issuer.cert, "license-issuer", NOW, True, "issuer with ML-DSA-65 extension"),
        ("hybrid-issuer-as-bundle-signer", pki.issuer.cert, "bundle-signer", NOW, True, "issuer EKUs: .10 and .12"),
        ("classic-issuer", pki.classic.cert, "license-issuer", NOW, True, "Ed25519-only issuer"),
        ("device-as-issuer", pki.device_cert, "license-issuer", NOW, False, "EKU lacks license-issuer"),
        ("issuer-as-device", pki.issuer.cert, "device", NOW, False, "EKU lacks device"),
        ("root-as-end-entity", pki.root, "license-issuer", NOW, False, "a CA certificate (and no EKU)"),
        ("self-signed-device", self_signed, "device", NOW, False, "not issued by the pinned root"),
        ("other-root-same-names", _ee(pki, eku=[drm.EKU_DEVICE], sign_with=pki.other_root.key), "device", NOW, False,
         "issuer name matches but the signature is from another key"),
        ("lookalike-issuer-name", _ee(pki, eku=[drm.EKU_DEVICE], issuer_name=lookalike), "device", NOW, False,
         "issuer name equal as text but encoded as PrintableString, not the root's DER"),
        ("ca-true", _ee(pki, eku=[drm.EKU_DEVICE], ca=True), "device", NOW, False, "BasicConstraints cA = TRUE"),
        ("no-basic-constraints", _ee(pki, eku=[drm.EKU_DEVICE], ca=None), "device", NOW, False,
         "BasicConstraints missing"),
        ("no-eku", _ee(pki, eku=None), "device", NOW, False, "ExtendedKeyUsage missing"),
        ("unknown-critical-extension", _ee(pki, eku=[drm.EKU_DEVICE], critical_extra=True), "device", NOW, False,
         "an extension the verifier does not process is marked critical"),
        ("signature-unused-bits", _unused_bits_cert(pki), "device", NOW, False,
         "signature BIT STRING declares 1 unused bit (non-canonical outer encoding)"),
    ]  # fmt: skip
    out = []
    for name, cert, purpose, now, ok, reason in checks:
        der = cert if isinstance(cert, bytes) else cert.public_bytes(serialization.Encoding.DER)
        try:
            drm.verify_cert(drm.cert_from_bytes(der), pki.root, now=now, purpose=PURPOSES[purpose])
            accepted = True
        except drm.LicenseRefused:
            accepted = False
        assert accepted == ok, name
        out.append({"name": name, "cert_der": der.hex(), "purpose": purpose, "now": now,
                    "expect": "accept" if ok else "refuse", "reason": reason})  # fmt: skip
    files = pki.device.to_files()
    kem = pki.device.kem_public()
    assert drm.cert_kem_keys(pki.device_cert) == kem
    # CSRs the store must refuse: a bad signature, one without the X25519 key extension, a bad ML-KEM key.
    csr_der = x509.load_pem_x509_csr(pki.csr).public_bytes(serialization.Encoding.DER)
    bad_sig = bytearray(csr_der)
    bad_sig[-1] ^= 1
    no_kem = x509.CertificateSigningRequestBuilder().subject_name(_name("x", org="edgemart device"))
    no_kem_der = no_kem.sign(pki.device.sign, None).public_bytes(serialization.Encoding.DER)
    # An ML-KEM-768 key of the right length whose first 12-bit coefficient is q = 3329 (FIPS 203 §7.2).
    bad_ek = bytearray(kem.mlkem768 or b"")
    bad_ek[0], bad_ek[1] = 3329 & 0xFF, (bad_ek[1] & 0xF0) | (3329 >> 8)
    bad_mlkem_der = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_name(pki.device.device_id, org="edgemart device"))
        .add_extension(x509.UnrecognizedExtension(OID_X25519_KEM, kem.x25519 or b""), critical=False)
        .add_extension(x509.UnrecognizedExtension(OID_MLKEM768_KEM, bytes(bad_ek)), critical=False)
        .sign(pki.device.sign, None)
        .public_bytes(serialization.Encoding.DER)
    )
    for der in (bytes(bad_sig), no_kem_der, bad_mlkem_der):
        try:
            pki.authority.issue_device_cert(der, now=NOW)
        except drm.UsageError:
            continue
        raise AssertionError("a CSR refusal vector was certified")
    return {
        "description": "certificates (docs/FORMAT.md §5): validate each `checks` entry against root_cert_pem "
        "for `purpose` at `now`; the device's keys, CSR and store-issued certificate",
        "root_cert_pem": _cert_pem(pki.root),
        "root_key_pem": _pem(pki.authority.key),
        "issuer_cert_pem": _cert_pem(pki.issuer.cert),
        "classic_issuer_cert_pem": _cert_pem(pki.classic.cert),
        "device": {
            "sign_key_pem": files["sign.key"].decode(),
            "kem_key_pem": files["kem.key"].decode(),
            "mlkem768_seed": files["pqkem.key"].hex(),
            "device_id": pki.device.device_id,
            "x25519_public": kem.x25519.hex(),  # type: ignore[union-attr]
            "mlkem768_public": kem.mlkem768.hex(),  # type: ignore[union-attr]
            "csr_pem": pki.csr.decode(),
            "store_issued_cert_pem": _cert_pem(pki.device_cert),
            "self_signed_cert_pem": _cert_pem(self_signed),
        },
        "csr_refusals": [
            {
                "name": "bad-signature",
                "csr_der": bytes(bad_sig).hex(),
                "reason": "CSR self-signature invalid",
            },
            {
                "name": "no-x25519-extension",
                "csr_der": no_kem_der.hex(),
                "reason": "CSR lacks the X25519 key",
            },
            {
                "name": "mlkem768-coefficient-out-of-range",
                "csr_der": bad_mlkem_der.hex(),
                "reason": "the ML-KEM-768 key (1184 bytes) fails the FIPS 203 modulus check: coefficient 0 is 3329",
            },
        ],
        "checks": out,
    }


# ------------------------------------------------------------------------------------------ licenses


def license_vectors(pki: Pki) -> dict:
    device, classic = pki.device, pki.classic_device
    build_hash = drm.sha256_tag(plaintext(2 * 4096 + 100))
    other_hash = drm.sha256_tag(b"other")
    common = {"listing": "vector-listing", "build_hash": build_hash, "target": "arm-cpu", "now": NOW}
    token = drm.issue_license(
        issuer=pki.issuer,
        cek=CEK,
        recipient=device.kem_public(),
        kind="eval",
        days=30,
        max_runs=10,
        device_id=device.device_id,
        license_id="lic_vector_0001",
        **common,
    )
    token_x25519 = drm.issue_license(
        issuer=pki.issuer,
        cek=CEK,
        recipient=classic.kem_public(),
        kind="production",
        days=365,
        max_runs=None,
        device_id=classic.device_id,
        license_id="lic_vector_0002",
        **common,
    )
    fleet_raw = pki.fleet.public_key().public_bytes_raw()
    fleet_id = drm.key_id(fleet_raw)
    token_fleet = drm.issue_license(
        issuer=pki.issuer,
        cek=CEK,
        recipient=drm.KemKeys(fleet_raw, None),
        kind="production",
        days=None,
        max_runs=None,
        fleet_key_id=fleet_id,
        license_id="lic_vector_fleet",
        **common,
    )
    token_classic_issuer = drm.issue_license(issuer=pki.classic, cek=CEK, recipient=device.kem_public(), kind="eval",
                                             days=30, max_runs=10, device_id=device.device_id,
                                             license_id="lic_vector_0003", **common)  # fmt: skip
    # A license naming its listing version (the optional `version` claim); the others have none, as every
    # license issued before listings had versions.
    token_versioned = drm.issue_license(
        issuer=pki.issuer,
        cek=CEK,
        recipient=classic.kem_public(),
        kind="eval",
        version=2,
        days=30,
        max_runs=10,
        device_id=classic.device_id,
        license_id="lic_vector_0004",
        **common,
    )
    revocation = drm.sign_revocation_list(
        pki.issuer, version=7, issued_at=NOW, revoked=["lic_vector_0002", "lic_old"]
    )
    claims = json.loads(drm.parse_envelope(token, LICENSE_TYP)[1])

    def resign(issuer: drm.Issuer = pki.issuer, typ: str = LICENSE_TYP, **edit: Any) -> bytes:
        c = dict(claims)
        for k, v in edit.items():
            if v is _DROP:
                del c[k]
            else:
                c[k] = v
        return sign_envelope(typ, c, issuer)

    def env_edit(tok: bytes, fn: Callable[[dict[str, Any]], None]) -> bytes:
        e = json.loads(tok)
        fn(e)
        return dumps(e)

    def strip_pq(e: dict[str, Any]) -> None:
        del e["sig"]["ML-DSA-65"]

    def add_alg(e: dict[str, Any]) -> None:
        e["sig"]["HS256"] = b64e(bytes(32))

    def pq_on_classic(e: dict[str, Any]) -> None:
        e["sig"]["ML-DSA-65"] = b64e(bytes(3309))

    def pem_x5c(e: dict[str, Any]) -> None:
        e["x5c"] = [b64e(drm.cert_to_pem(pki.issuer.cert))]

    def two_certs(e: dict[str, Any]) -> None:
        e["x5c"] = e["x5c"] * 2

    def payload_flip(e: dict[str, Any]) -> None:
        body = bytearray(drm._canonical.b64d(e["payload"], what="p"))
        body[body.index(b"vector-listing")] ^= 0x20  # "Vector-listing": still canonical, signature fails
        e["payload"] = b64e(bytes(body))

    x25519_claims = json.loads(drm.parse_envelope(token_x25519, LICENSE_TYP)[1])
    dev = device.device_id
    base = {"device_id": dev, "fleet_key_ids": [], "build_hash": build_hash, "target": "arm-cpu", "revoked": [],
            "require_pq": False, "now": NOW}  # fmt: skip
    checks: list[tuple[str, bytes, dict[str, Any], bool, str]] = [
        ("hybrid-eval", token, {}, True, "the reference token"),
        ("hybrid-eval-require-pq", token, {"require_pq": True}, True, "co-signed by ML-DSA-65"),
        ("hybrid-eval-no-build-hash-given", token, {"build_hash": None}, True, "build check is optional"),
        ("fleet", token_fleet, {"device_id": None, "fleet_key_ids": [fleet_id]}, True, "fleet-bound license"),
        ("fleet-key-not-held", token_fleet, {"device_id": dev, "fleet_key_ids": []}, False, "fleet key not held"),
        ("classic-issuer", token_classic_issuer, {}, True, "Ed25519-only issuer, require_pq false"),
        ("classic-issuer-require-pq", token_classic_issuer, {"require_pq": True}, False, "require_pq true"),
        ("at-not-before", token, {"now": claims["not_before"]}, True, "not_before is inclusive"),
        ("before-not-before", token, {"now": claims["not_before"] - 1}, False, "not yet valid"),
        ("at-not-after", token, {"now": claims["not_after"]}, False, "not_after is exclusive"),
        ("wrong-device", token, {"device_id": classic.device_id}, False, "bound to another device"),
        ("no-device-given", token, {"device_id": None}, False, "device-bound, verifier has no device id"),
        ("other-build", token, {"build_hash": other_hash}, False, "license for another build"),
        ("container-target-differs", token, {"target": "x86-cpu"}, False,
         "the container header's target is not the license's (same build hash)"),
        ("no-target-given", token, {"target": None}, True, "without a container there is no target to compare"),
        ("revoked", token, {"revoked": ["lic_vector_0001"]}, False, "license id is revoked"),
        ("strip-ml-dsa", env_edit(token, strip_pq), {}, False, "co-signature stripped"),
        ("extra-sig-alg", env_edit(token, add_alg), {}, False, "sig names an algorithm outside the pinned set"),
        ("ml-dsa-on-classic-issuer", env_edit(token_classic_issuer, pq_on_classic), {}, False,
         "ML-DSA-65 member but the issuer has no ML-DSA key"),
        ("x5c-pem", env_edit(token, pem_x5c), {}, False, "x5c holds PEM, not DER"),
        ("x5c-two-certs", env_edit(token, two_certs), {}, False, "x5c must hold exactly one certificate"),
        ("payload-byte-changed", env_edit(token, payload_flip), {}, False, "Ed25519 signature fails"),
        ("not-canonical", token.replace(b'":', b'": ', 1), {}, False, "envelope is not canonical JSON"),
        ("revocation-as-license", revocation, {}, False, "typ is edgemart-revocation/1"),
        ("license-typ-signed-as-other", resign(typ="edgemart-license/2"), {}, False, "typ is not the expected one"),
        ("claims-extra-member", resign(extra=1), {}, False, "claims have an unknown member"),
        ("claims-null-member-omitted", resign(fleet_key_id=_DROP), {}, False, "null members MUST be present"),
        ("claims-both-bindings", resign(fleet_key_id="0" * 32), {}, False, "device_id and fleet_key_id both set"),
        ("claims-eval-never-expires", resign(not_after=None), {}, False, "eval license without not_after"),
        ("claims-empty-window", resign(not_after=claims["not_before"]), {}, False, "not_after <= not_before"),
        ("claims-v-2", resign(v=2), {}, False, "unknown claims version"),
        ("claims-max-runs-bool", resign(max_runs=True), {}, False, "true is not an integer"),
        ("claims-negative-max-runs", resign(max_runs=-1), {}, False, "max_runs < 0"),
        ("claims-kind-unknown", resign(kind="trial"), {}, False, "kind is not eval or production"),
        ("claims-license-id-newline", resign(license_id="lic_vector_0001\n"), {}, False, "id pattern"),
        ("claims-device-id-upper", resign(device_id=dev.upper()), {"device_id": dev.upper()}, False,
         "device_id must be lower-case hex"),
        ("claims-unknown-suite", resign(wrapped_cek={**claims["wrapped_cek"], "suite": "X448/HKDF-SHA512/AES-256-GCM"}),
         {}, False, "suite not registered"),
        ("claims-enc-wrong-length", resign(wrapped_cek={**claims["wrapped_cek"], "enc": x25519_claims["wrapped_cek"]["enc"]}), {}, False,
         "enc length is that of the other suite"),
        ("claims-issuer-kid-mismatch", resign(issuer_kid="0" * 32), {}, False, "issuer_kid is not the signer's"),
        ("claims-signed-by-classic-with-hybrid-kid", resign(issuer=pki.classic), {}, False,
         "issuer_kid names the hybrid issuer, signer is the classic one"),
    ]  # fmt: skip
    out = []
    for name, tok, over, ok, reason in checks:
        args = {**base, **over}
        try:
            drm.verify_license(tok, root=pki.root, now=args["now"], device_id=args["device_id"],
                               fleet_key_ids=frozenset(args["fleet_key_ids"]), build_hash=args["build_hash"],
                               revoked=frozenset(args["revoked"]), require_pq=args["require_pq"],
                               target=args["target"])  # fmt: skip
            accepted = True
        except drm.LicenseRefused:
            accepted = False
        assert accepted == ok, name
        out.append({"name": name, "token": tok.decode(), **args, "expect": "accept" if ok else "refuse",
                    "reason": reason})  # fmt: skip
    # Signed and valid, but the wrapped key was moved from another license: HPKE info no longer matches.
    moved = resign(license_id="lic_vector_moved")
    drm.verify_license(moved, root=pki.root, now=NOW, device_id=dev)
    rl_checks = []
    older = drm.sign_revocation_list(pki.issuer, version=6, issued_at=NOW - 10, revoked=["lic_old"])
    future = drm.sign_revocation_list(pki.issuer, version=8, issued_at=NOW + 301, revoked=[])
    edge = drm.sign_revocation_list(pki.issuer, version=8, issued_at=NOW + 300, revoked=[])
    unsorted = sign_envelope(
        REVOCATION_TYP, {"issued_at": NOW, "revoked": ["b", "a"], "v": 1, "version": 9}, pki.issuer
    )
    for name, tok, current, max_age, ok, reason in (
        ("current", revocation, 0, None, True, "fresh install"),
        ("same-version", revocation, 7, None, True, "equal version is a re-fetch"),
        ("downgrade", older, 7, None, False, "version 6 < held 7"),
        ("issued-in-the-future", future, 0, None, False, "issued_at > now + 300"),
        ("issued-at-skew-limit", edge, 0, None, True, "issued_at = now + 300"),
        ("stale", older, 0, 5, False, "issued_at < now - max_age"),
        ("unsorted", unsorted, 0, None, False, "revoked must be strictly ascending"),
        ("license-as-revocation", token, 0, None, False, "typ is edgemart-license/1"),
    ):
        try:
            drm.verify_revocation_list(tok, root=pki.root, now=NOW, current_version=current, max_age=max_age)
            accepted = True
        except drm.LicenseRefused:
            accepted = False
        assert accepted == ok, name
        rl_checks.append({"name": name, "token": tok.decode(), "now": NOW, "current_version": current,
                          "max_age": max_age, "expect": "accept" if ok else "refuse", "reason": reason})  # fmt: skip
    files = device.to_files()
    return {
        "description": "license tokens and revocation lists (docs/FORMAT.md §6-§9); HPKE and ML-DSA are "
        "randomized, so the private keys are given",
        "now": NOW,
        "root_cert_pem": _cert_pem(pki.root),
        "issuer": {
            k: (v.decode() if k != "issuer-pq.key" else v.hex()) for k, v in pki.issuer.to_files().items()
        },
        "classic_issuer": {k: v.decode() for k, v in pki.classic.to_files().items()},
        "expected_cek": CEK.hex(),
        "hybrid": {
            "token": token.decode(),
            "device_sign_key_pem": files["sign.key"].decode(),
            "device_kem_key_pem": files["kem.key"].decode(),
            "device_mlkem768_seed": files["pqkem.key"].hex(),
            "device_id": device.device_id,
            "build_hash": build_hash,
        },
        "x25519": {
            "token": token_x25519.decode(),
            "device_sign_key_pem": _pem(classic.sign),
            "device_kem_key_pem": _pem(classic.kem),
            "device_id": classic.device_id,
        },
        "fleet": {
            "token": token_fleet.decode(),
            "fleet_key_pem": _pem(pki.fleet),
            "fleet_public": fleet_raw.hex(),
            "fleet_key_id": fleet_id,
        },
        "classic_issuer_token": token_classic_issuer.decode(),
        "unwrap_refusals": [
            {"name": "wrapped-key-moved", "token": moved.decode(), "reason": "HPKE info binds license_id"}
        ],
        "versioned": {"token": token_versioned.decode(), "device_id": classic.device_id, "version": 2},
        "revocation": {"token": revocation.decode(), "version": 7, "revoked": ["lic_old", "lic_vector_0002"]},
        "checks": out,
        "revocation_checks": rl_checks,
    }


_DROP = object()


# ------------------------------------------------------------------------------------------ usage log


def usage_log_vectors() -> dict:
    key = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))
    device_id = drm.key_id(key.public_key())
    lines: list[bytes] = []
    prev = None
    for seq, (event, runs, detail) in enumerate(
        [
            ("run", 64, "reserve:64"),
            ("run", 2, "release:62"),
            ("refused", 2, "license has expired"),
            ("sync", 2, ""),
        ]
    ):
        line = drm.make_record(key, prev_line=prev, seq=seq, device_id=device_id, t=NOW + seq, event=event,
                               license_id="lic_vector_0001", build_hash="sha256:" + "00" * 32, runs=runs,
                               detail=detail)  # fmt: skip
        lines.append(line)
        prev = line

    def signed(rec: dict[str, Any]) -> bytes:
        return dumps({"rec": rec, "sig": b64e(key.sign(b"edgemart-usage/1\x00" + dumps(rec)))})

    rec1 = json.loads(lines[1])["rec"]
    edited = dumps({"rec": {**rec1, "runs": 1}, "sig": json.loads(lines[1])["sig"]})
    other_key = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(32))
    foreign = drm.make_record(other_key, prev_line=lines[0], seq=1, device_id=device_id, t=NOW, event="run",
                              license_id="lic_vector_0001", build_hash="sha256:" + "00" * 32, runs=2)  # fmt: skip
    cases = [
        ("edited-record", [lines[0], edited, lines[2], lines[3]], {}, 1, "signature invalid"),
        ("removed-record", [lines[0], lines[2], lines[3]], {}, 1, "sequence gap"),
        ("reordered", [lines[0], lines[2], lines[1], lines[3]], {}, 1, "sequence gap"),
        ("re-signed-by-another-key", [lines[0], foreign], {}, 1, "signature invalid"),
        ("other-device-id", [signed({**json.loads(lines[0])["rec"], "device_id": "0" * 32})], {}, 0,
         "record names another device"),
        ("unknown-event", [signed({**json.loads(lines[0])["rec"], "event": "install"})], {}, 0, "unknown event"),
        ("prev-broken", [lines[0], signed({**rec1, "prev": drm.sha256_tag(b"x")})], {}, 1, "hash chain broken"),
        ("truncated-inside-last-line", [lines[0], lines[1][:-5]], {}, 1, "not valid JSON"),
        ("tail-truncation-against-anchor", lines[:2], {"min_records": 4}, 2, "fewer records than the anchor"),
        ("continuation-wrong-prev", lines[2:], {"start_seq": 2, "start_prev": drm.sha256_tag(lines[0])}, 0,
         "continuation does not follow the held record"),
        ("line-over-4096-bytes", [signed({**json.loads(lines[0])["rec"], "license_id": "l" * 128,
                                          "build_hash": "b" * 128, "detail": "\u20ac" * 256,
                                          "device_id": device_id + "x" * 3000})], {}, 0, "record too large"),
    ]  # fmt: skip
    refusals = []
    for name, ls, opts, first_bad, reason in cases:
        data = b"\n".join(ls) + b"\n"
        report = drm.verify_log(data, key.public_key(), device_id=device_id, **opts)
        assert not report.ok and report.first_bad == first_bad, (name, report)
        refusals.append({"name": name, "lines": [x.decode() for x in ls], "options": opts,
                         "first_bad": first_bad, "valid_prefix": len(report.records), "reason": reason})  # fmt: skip
    cont = drm.verify_log(b"\n".join(lines[2:]) + b"\n", key.public_key(), device_id=device_id, start_seq=2,
                          start_prev=drm.sha256_tag(lines[1]))  # fmt: skip
    assert cont.ok
    return {
        "description": "usage log (docs/FORMAT.md §11): Ed25519 is deterministic, so the lines are reproducible "
        "from the seed; each refusal's `first_bad` is the 0-based index of the first bad line",
        "device_sign_seed": bytes(range(32, 64)).hex(),
        "device_id": device_id,
        "genesis": drm.usagelog.genesis(device_id),
        "lines": [x.decode() for x in lines],
        "continuation": {
            "lines": [x.decode() for x in lines[2:]],
            "start_seq": 2,
            "start_prev": drm.sha256_tag(lines[1]),
        },  # fmt: skip
        "refusals": refusals,
    }


# ------------------------------------------------------------------------------------------ at rest


def at_rest_vectors() -> dict:
    kek = bytes(range(64, 96))
    build_hash = "sha256:" + "11" * 32
    state = {"high_water": NOW, "counters": {"lic_vector_0001": 2}}
    wrapped = drm.wrap_key(kek, CEK, build_hash=build_hash)
    blob = drm.seal_state(state, key=kek, device_id="vector-device")
    # PKCS#11 vault formats: AES-256-GCM with fixed IVs here (the token draws them at random).
    p11_kek, iv = bytes(range(32)), bytes(range(12))
    p11_hash = "sha256:" + "ab" * 32
    emkp = (
        b"EMKP\x01"
        + iv
        + AESGCM(p11_kek).encrypt(
            iv, b"\x11" * 32, b"EMKP\x01" + b"edgemart-cek-wrap/1\x00" + p11_hash.encode()
        )
    )
    kek_id = bytes(range(0xA0, 0xB0))
    key_file = b"-----BEGIN PRIVATE KEY-----\ntest-only\n-----END PRIVATE KEY-----\n"
    emks = (
        b"EMKS\x01"
        + kek_id
        + iv
        + AESGCM(p11_kek).encrypt(
            iv, key_file, b"EMKS\x01" + kek_id + b"edgemart-key-file/1\x00" + b"root.key"
        )
    )
    state_bad = bytearray(blob)
    state_bad[-1] ^= 1
    return {
        "description": "key wrapping at rest, device state sealing and the PKCS#11 vault's sealed formats "
        "(docs/FORMAT.md §12-§13); random nonces in keywrap/state: decrypt-only vectors",
        "keywrap": {"kek": kek.hex(), "build_hash": build_hash, "cek": CEK.hex(), "wrapped": wrapped.hex(),
                    "refusals": [{"name": "other-build-hash", "build_hash": "sha256:" + "22" * 32,
                                  "wrapped": wrapped.hex()},
                                 {"name": "magic", "build_hash": build_hash, "wrapped": ("454d4b5802" + wrapped[5:].hex())}]},
        "state": {
            "key": kek.hex(),
            "device_id": "vector-device",
            "state": state,
            "blob": blob.hex(),
            "refusals": [
                {"name": "other-device", "device_id": "vector-device-2", "blob": blob.hex()},
                {"name": "tag-flipped", "device_id": "vector-device", "blob": bytes(state_bad).hex()},
            ],
        },
        "pkcs11_wrapped_cek": {"kek": p11_kek.hex(), "iv": iv.hex(), "cek": (b"\x11" * 32).hex(),
                               "build_hash": p11_hash, "wrapped": emkp.hex()},
        "pkcs11_sealed_key_file": {"kek": p11_kek.hex(), "kek_id": kek_id.hex(), "iv": iv.hex(), "name": "root.key",
                                   "file": key_file.decode(), "sealed": emks.hex()},
    }  # fmt: skip


# ------------------------------------------------------------------------------------------ model safety


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _f(field: int, value: bytes | int) -> bytes:
    if isinstance(value, int):
        return _varint(field << 3) + _varint(value)
    return _varint(field << 3 | 2) + _varint(len(value)) + value


def _tensor(name: bytes, dims: list[int], *, location: int | None = None, external: bool = False) -> bytes:
    t = b"".join(_f(1, d) for d in dims) + _f(2, 1) + _f(8, name)  # dims, FLOAT, name
    if external:
        t += _f(13, _f(1, b"location") + _f(2, b"weights.bin"))  # StringStringEntryProto
    if location is not None:
        t += _f(14, location)
    return t


def _graph(*, tensors: list[bytes] = (), nodes: list[bytes] = (), name: bytes = b"g") -> bytes:  # type: ignore[assignment]
    return b"".join(_f(1, n) for n in nodes) + _f(2, name) + b"".join(_f(5, t) for t in tensors)


def _model(graph: bytes) -> bytes:
    return _f(1, 8) + _f(7, graph)  # ir_version 8, graph


def _if_node(branch: bytes) -> bytes:
    return _f(4, b"If") + _f(3, b"if0") + _f(5, _f(1, b"then_branch") + _f(6, branch) + _f(20, 5))


def _nested(depth: int) -> bytes:
    g = _graph(name=b"leaf")
    for _ in range(depth - 1):
        g = _graph(nodes=[_if_node(g)])
    return _model(g)


def _tflite(buffer_offset: int, buffer_size: int) -> bytes:
    """The smallest TFLite flatbuffer the check walks: one subgraph with no tensors, one buffer (offset, size).

    uoffsets point forward, so the layout is: root offset + "TFL3", the model's vtable and table, the two
    vectors, then the subgraph's and the buffer's vtables and tables."""
    u32, i32 = struct.Struct("<I").pack, struct.Struct("<i").pack
    vt_m, t_m = (
        8,
        8 + 14 + 2,
    )  # model vtable: vsize 14, tsize 12, fields 0..4 (subgraphs = slot 2, buffers = slot 4)
    v_sg, v_buf = t_m + 12, t_m + 20  # two one-element vectors of offsets
    vt_sg, t_sg = v_buf + 8, v_buf + 8 + 4  # subgraph: no fields
    vt_buf = t_sg + 4  # buffer vtable: vsize 10, tsize 24, data absent, offset at +8, size at +16
    t_buf = vt_buf + 10 + 2
    data = bytearray(u32(t_m) + b"TFL3")
    data += struct.pack("<7H", 14, 12, 0, 0, 4, 0, 8) + b"\0\0"
    data += i32(t_m - vt_m) + u32(v_sg - (t_m + 4)) + u32(v_buf - (t_m + 8))
    data += u32(1) + u32(t_sg - (v_sg + 4)) + u32(1) + u32(t_buf - (v_buf + 4))
    data += struct.pack("<HH", 4, 4) + i32(t_sg - vt_sg)
    data += struct.pack("<5H", 10, 24, 0, 8, 16) + b"\0\0"
    data += i32(t_buf - vt_buf) + b"\0" * 4 + struct.pack("<QQ", buffer_offset, buffer_size)
    assert len(data) == t_buf + 24
    return bytes(data)


def model_safety_vectors() -> dict:
    from edgemart.core.model_safety import UnsafeModel, check_model_bytes

    ok_model = _model(_graph(tensors=[_tensor(b"w", [4, 4])]))
    small = len(_tflite(0, 0))
    cases = [
        ("onnx-minimal", ok_model, True, "one 4x4 float initializer inside the file"),
        ("onnx-nested-16", _nested(16), True, "graphs nested 16 deep (main graph = 1)"),
        ("tflite-minimal", _tflite(0, 0), True, "one empty buffer"),
        ("tflite-buffer-inside", _tflite(8, small - 8), True, "buffer offset/size inside the file"),
        ("onnx-external-location", _model(_graph(tensors=[_tensor(b"w", [4], location=1)])), False,
         "data_location = EXTERNAL"),
        ("onnx-external-data-entry", _model(_graph(tensors=[_tensor(b"w", [4], external=True)])), False,
         "external_data entry"),
        ("onnx-external-in-subgraph", _model(_graph(nodes=[_if_node(_graph(tensors=[_tensor(b"w", [4], location=1)]))])),
         False, "external tensor inside an If branch"),
        ("onnx-nested-17", _nested(17), False, "graphs nested 17 deep"),
        ("onnx-tensor-over-1gib", _model(_graph(tensors=[_tensor(b"w", [1 << 28, 2])])), False,
         "declared 2^29 floats = 2 GiB > 1 GiB per tensor"),
        ("onnx-negative-dim", _model(_graph(tensors=[_tensor(b"w", [(1 << 64) - 1])])), False, "dimension -1"),
        ("onnx-rank-33", _model(_graph(tensors=[_tensor(b"w", [1] * 33)])), False, "rank 33 > 32"),
        ("onnx-group-wire-type", ok_model + _varint(9 << 3 | 3), False, "protobuf group (wire type 3)"),
        ("onnx-truncated", ok_model[:-3], False, "a field runs past its message"),
        ("empty", b"", False, "empty file"),
        ("tflite-buffer-outside", _tflite(small - 4, 64), False, "buffer offset + size beyond the file"),
        ("tflite-root-outside", b"\xff\xff\x00\x00TFL3", False, "root table offset outside the file"),
    ]  # fmt: skip
    out = []
    for name, data, ok, reason in cases:
        try:
            check_model_bytes(data)
            accepted = True
        except UnsafeModel:
            accepted = False
        assert accepted == ok, name
        out.append(
            {"name": name, "model": data.hex(), "expect": "accept" if ok else "refuse", "reason": reason}
        )
    return {
        "description": "model-safety check (docs/FORMAT.md §15) with the default limits: accept or refuse",
        "cases": out,
    }


# ------------------------------------------------------------------------------------------ bundles

BUILDER_SEED = bytes(range(0x40, 0x60))  # test-only builder key (Ed25519 private key bytes)


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    return b"".join(drm.bundle.iter_archive(members))


def _bundle_members(
    files: list[tuple[str, bytes]],
    builds: list[drm.bundle.BuildEntry],
    licenses: list[drm.bundle.LicenseEntry],
    release: drm.bundle.Release | None,
    key: ed25519.Ed25519PrivateKey,
) -> list[tuple[str, bytes]]:
    """The members of a bundle in archive order: manifest, signature, then the files as listed."""
    manifest = drm.bundle.make_manifest(
        [drm.bundle.FileEntry(p, len(d), drm.sha256_tag(d)) for p, d in files], builds, licenses, release
    )
    manifest_bytes = manifest.to_bytes()
    ordered = {p: d for p, d in files}
    return [
        (drm.bundle.MANIFEST_NAME, manifest_bytes),
        (drm.bundle.SIGNATURE_NAME, drm.bundle.sign_manifest(manifest_bytes, key)),
    ] + [(f.path, ordered[f.path]) for f in manifest.files]


def bundle_vectors(pki: Pki) -> dict:
    from drm.bundle import BuildEntry, LicenseEntry, Release

    builder = ed25519.Ed25519PrivateKey.from_private_bytes(BUILDER_SEED)
    other_builder = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(0x60, 0x80)))
    device = pki.classic_device
    plain = plaintext(100)
    build = drm.seal(plain, key=CEK, target="arm-cpu", media_type="application/vnd.onnx", chunk_size=4096,
                     nonce_prefix=NONCE_PREFIX)  # fmt: skip
    build_hash = drm.sha256_tag(plain)
    token = drm.issue_license(
        issuer=pki.classic, cek=CEK, recipient=device.kem_public(), kind="production", listing="vector-listing",
        build_hash=build_hash, target="arm-cpu", now=NOW - 60, days=None, max_runs=None,
        device_id=device.device_id, license_id="lic_bundle_vector",
    )  # fmt: skip
    claims = drm.LicenseClaims.from_dict(drm.parse_envelope(token, "edgemart-license/1")[0])
    build_path, lic_path = drm.bundle.build_member_name(build_hash), "licenses/lic_bundle_vector.lic"
    mlbom = dumps({"bomFormat": "CycloneDX", "components": [{"name": "vector-listing",
                   "type": "machine-learning-model"}], "specVersion": "1.6", "version": 1})  # fmt: skip
    notice = b"vector-listing: test model, license lic_bundle_vector\n"
    files = [(build_path, build), (lic_path, token), ("mlbom.cdx.json", mlbom), ("NOTICE", notice)]
    builds = [BuildEntry(build_path, build_hash, "arm-cpu")]
    licenses = [LicenseEntry.from_claims(lic_path, claims)]
    release = Release("vector-fleet", 3)
    members = _bundle_members(files, builds, licenses, release, builder)
    archive = _tar(members)
    pub = builder.public_key()

    def resign(
        ms: list[tuple[str, bytes]], key: ed25519.Ed25519PrivateKey = builder
    ) -> list[tuple[str, bytes]]:
        return [ms[0], (ms[1][0], drm.bundle.sign_manifest(ms[0][1], key))] + ms[2:]

    def replace(name: str, data: bytes) -> list[tuple[str, bytes]]:
        return [(n, data if n == name else d) for n, d in members]

    edited_manifest = members[0][1].replace(b'"version":3', b'"version":4')
    forged_sig = json.loads(members[1][1])
    forged_sig["sig"] = b64e(other_builder.sign(b"edgemart-bundle-sig/1\x00" + members[0][1]))
    target_files = [(build_path, drm.seal(plain, key=CEK, target="x86-cpu", media_type="application/vnd.onnx",
                     chunk_size=4096, nonce_prefix=NONCE_PREFIX))] + files[1:]  # fmt: skip
    symlink = bytearray(drm.bundle.encode_tar_header("chains/link", 0))
    symlink[156:157], symlink[157:168] = b"2", b"/etc/passwd"
    symlink[148:156] = b" " * 8
    symlink[148:156] = format(sum(symlink), "06o").encode() + b"\0 "
    mtime = bytearray(drm.bundle.encode_tar_header("NOTICE", len(notice)))
    mtime[136:148], mtime[148:156] = b"00000000001\0", b" " * 8
    mtime[148:156] = format(sum(mtime), "06o").encode() + b"\0 "
    many = [(f"chains/c{i:04d}", b"") for i in range(1025)]
    cases: list[tuple[str, bytes, bool, str, str]] = [
        ("edited-manifest", _tar(replace("manifest.json", edited_manifest)), False, "different manifest",
         "manifest.json changed after signing (release version 3 -> 4); manifest.sig unchanged"),
        ("wrong-signature", _tar(replace("manifest.sig", dumps(forged_sig))), False, "does not verify",
         "manifest.sig names the builder key but its signature was made by another key"),
        ("other-builder-key", _tar(resign(members, other_builder)), False, "not the pinned key",
         "validly re-signed by another builder key; the verifier pins builder_public_key"),
        ("member-hash-mismatch", _tar(replace("NOTICE", notice.upper())), False, "sha256 does not match",
         "NOTICE changed (same size) after the manifest listed its hash"),
        ("extra-member", _tar(members + [("chains/extra", b"x")]), False, "extra file",
         "a member the manifest does not list"),
        ("missing-member", _tar([m for m in members if m[0] != "NOTICE"]), False, "missing file",
         "a member the manifest lists is absent"),
        ("reordered-members", _tar(members[:2] + [members[3], members[2]] + members[4:]), False, "reordered",
         "the license member before the build member (canonical order: builds, licenses, ...)"),
        ("manifest-not-first", _tar([members[1], members[0]] + members[2:]), False, "first member",
         "manifest.sig before manifest.json"),
        ("path-traversal", _tar(members[:-1] + [("chains/../NOTICE", notice)]), False, "parent-directory",
         "a member name with a .. component"),
        ("absolute-path", _tar(members + [("/etc/passwd", b"")]), False, "absolute member path",
         "a member name starting with /"),
        ("symlink-member", _tar(members)[:-1024] + bytes(symlink) + drm.bundle.TAR_END, False, "symbolic link",
         "a symbolic-link member (only regular files are allowed)"),
        ("non-canonical-header", b"".join(
            [_tar(members[:-1])[:-1024], bytes(mtime), notice, drm.bundle.tar_padding(len(notice)),
             drm.bundle.TAR_END]), False, "not canonical", "NOTICE's header has mtime 1 instead of 0"),
        ("data-after-end", archive + b"\x01" + bytes(511), False, "after the end-of-archive",
         "a non-zero byte after the two zero blocks"),
        ("truncated", archive[:-1024], False, "truncated", "the end-of-archive marker is missing"),
        ("too-many-members", b"".join(drm.bundle.iter_gzip([_tar(members[:2] + many)])), False,
         "more than 1024 members", "gzip'd archive with 1027 members (max_members = 1024, counted before "
         "each member is read)"),
        ("container-target-differs", _tar(_bundle_members(target_files, [BuildEntry(build_path, build_hash,
         "x86-cpu")], licenses, release, builder)), False, "differs from its build",
         "the build's container header (and manifest entry) say x86-cpu, the license says arm-cpu"),
    ]  # fmt: skip
    fleet_files, fleet_licenses, seat_cases = _fleet_bundle_parts(pki, files, claims, lic_path, build_hash)
    fleet_members = _bundle_members(fleet_files, builds, fleet_licenses, release, builder)
    for name, edit, match, reason in seat_cases:
        edited = _bundle_members(edit(fleet_files), builds, fleet_licenses, release, builder)
        cases.append((name, _tar(edited), False, match, reason))
    out = []
    for name, data, ok, match, reason in cases:
        try:
            drm.verify_bundle(data, now=NOW, root=pki.root, builder_key=pub)
            message = ""
        except drm.BundleInvalid as exc:
            message = exc.message
        assert match in message and not ok, (name, message)
        out.append({"name": name, "archive": data.hex(), "expect": "refuse", "error": "bundle_invalid",
                    "message": message, "reason": reason})  # fmt: skip
    verified = drm.verify_bundle(archive, now=NOW, root=pki.root, builder_key=pub)
    assert verified.builder_pinned and verified.licenses_trusted
    offset, headers = 0, []
    for name, data in members:
        headers.append({"name": name, "size": len(data), "offset": offset,
                        "header": archive[offset : offset + 512].hex()})  # fmt: skip
        offset += 512 + len(data) + len(drm.bundle.tar_padding(len(data)))
    return {
        "description": "firmware bundles (docs/BUNDLE.md): verify `bundle.archive` at `now` against root_cert_pem "
        "and builder_public_key; every refusal MUST be refused (error bundle_invalid)",
        "now": NOW,
        "root_cert_pem": _cert_pem(pki.root),
        "builder_seed": BUILDER_SEED.hex(),
        "builder_public_key": pub.public_bytes_raw().hex(),
        "builder_kid": drm.key_id(pub),
        "device_id": device.device_id,
        "device_sign_key_pem": device.to_files()["sign.key"].decode(),
        "device_kem_key_pem": device.to_files()["kem.key"].decode(),
        "bundle": {
            "manifest_json": members[0][1].decode(),
            "manifest_sig": members[1][1].decode(),
            "signed_message": (b"edgemart-bundle-sig/1\x00" + members[0][1]).hex(),
            "members": headers,
            "build_plaintext": plain.hex(),
            "cek": CEK.hex(),
            "archive": archive.hex(),
        },
        "refusals": out,
        "fleet_bundle": _fleet_bundle_vector(pki, fleet_members, pub),
    }


# ------------------------------------------------------------------------------------------ metering


def metering_vectors(pki: Pki) -> dict:
    from drm.metering import ACTIVATION_TYP, BUDGET_TYP

    device_id, other_id = pki.device.device_id, pki.classic_device.device_id
    fleet_id = drm.key_id(pki.fleet.public_key().public_bytes_raw())
    lic, fleet_lic = "lic_metering_vector", "lic_fleet_vector"
    grant = {"device_id": device_id, "issued_at": NOW - 10, "license_id": lic, "not_after": NOW + 72 * 3600,
             "runs_until": 250, "seq": 17, "v": 1}  # fmt: skip
    act = {"device_id": device_id, "fleet_key_id": fleet_id, "issued_at": NOW - 10, "license_id": fleet_lic,
           "seat": 2, "v": 1}  # fmt: skip
    stranger = pki.other_root.issue_issuer(now=NOW - 86400, pq=False)
    good_grant = drm.sign_budget_grant(pki.classic, drm.BudgetGrant.from_dict(grant))
    good_act = drm.sign_activation(pki.classic, drm.Activation.from_dict(act))

    def g(**over: Any) -> bytes:
        body = {**grant, **over}
        return sign_envelope(BUDGET_TYP, {k: v for k, v in body.items() if v is not ...}, pki.classic)

    def a(**over: Any) -> bytes:
        body = {**act, **over}
        return sign_envelope(ACTIVATION_TYP, {k: v for k, v in body.items() if v is not ...}, pki.classic)

    budget: list[tuple[str, bytes, dict[str, Any], bool, str]] = [
        ("valid", good_grant, {}, True, "store-signed grant for this device and license"),
        ("valid-hybrid-issuer", drm.sign_budget_grant(pki.issuer, drm.BudgetGrant.from_dict(grant)), {}, True,
         "signed by the hybrid issuer: Ed25519 and ML-DSA-65"),
        ("valid-expired", good_grant, {"now": NOW + 73 * 3600}, True,
         "verification does not check not_after: the device compares it with trusted time when it runs"),
        ("issued-at-skew-limit", g(issued_at=NOW + 300), {}, True, "issued_at = now + 300 is accepted"),
        ("issued-in-future", g(issued_at=NOW + 301, not_after=NOW + 7200), {}, False, "issued_at > now + 300"),
        ("other-device", good_grant, {"device_id": other_id}, False, "device_id is not the verifier's"),
        ("other-license", good_grant, {"license_id": "lic_other"}, False, "license_id is not the verifier's"),
        ("empty-window", g(not_after=NOW - 10), {}, False, "not_after must be > issued_at"),
        ("extra-member", g(extra=1), {}, False, "exact-member rule"),
        ("missing-seq", g(seq=...), {}, False, "seq omitted"),
        ("version-2", g(v=2), {}, False, "v must be 1"),
        ("negative-runs", g(runs_until=-1), {}, False, "runs_until must be >= 0"),
        ("runs-at-2^53-1", g(runs_until=2**53 - 1), {}, True, "the largest integer canonical JSON allows"),
        ("boolean-seq", g(seq=True), {}, False, "true is not an integer"),
        ("device-id-uppercase", g(device_id=device_id.upper()), {"device_id": device_id.upper()}, False,
         "device_id must be 32 lower-case hex"),
        ("activation-as-grant", good_act, {}, False, "typ is edgemart-activation/1, not edgemart-budget/1"),
        ("foreign-issuer", drm.sign_budget_grant(stranger, drm.BudgetGrant.from_dict(grant)), {}, False,
         "issuer certificate not issued by the pinned root"),
    ]  # fmt: skip
    activation: list[tuple[str, bytes, dict[str, Any], bool, str]] = [
        ("valid", good_act, {}, True, "seat 2 of a 5-seat fleet license"),
        ("seat-equals-seats", good_act, {"seats": 2}, True, "seat = seats is accepted"),
        ("no-seats-claim", good_act, {"seats": None}, True, "a license without a seats claim does not bound seat"),
        ("seat-over-seats", good_act, {"seats": 1}, False, "seat 2 of a 1-seat license"),
        ("seat-zero", a(seat=0), {}, False, "seats count from 1"),
        ("other-device", good_act, {"device_id": other_id}, False, "device_id is not the verifier's"),
        ("other-license", good_act, {"license_id": "lic_other"}, False, "license_id differs"),
        ("other-fleet-key", good_act, {"fleet_key_id": "0" * 32}, False, "fleet_key_id differs"),
        ("issued-in-future", a(issued_at=NOW + 301), {}, False, "issued_at > now + 300"),
        ("extra-member", a(extra="x"), {}, False, "exact-member rule"),
        ("grant-as-activation", good_grant, {}, False, "typ is edgemart-budget/1"),
    ]  # fmt: skip
    budget_out, act_out = [], []
    for name, token, over, ok, reason in budget:
        case = {"name": name, "token": token.decode(), "now": NOW, "device_id": device_id, "license_id": lic,
                **over}  # fmt: skip
        try:
            got = drm.verify_budget_grant(token, root=pki.root, now=case["now"], device_id=case["device_id"],
                                          license_id=case["license_id"])  # fmt: skip
            accepted, result = True, got.to_dict()
        except drm.LicenseRefused:
            accepted, result = False, None
        assert accepted == ok, name
        budget_out.append({**case, "expect": "accept" if ok else "refuse", "grant": result, "reason": reason})
    for name, token, over, ok, reason in activation:
        case = {"name": name, "token": token.decode(), "now": NOW, "device_id": device_id,
                "license_id": fleet_lic, "fleet_key_id": fleet_id, "seats": 5, **over}  # fmt: skip
        try:
            got_act = drm.verify_activation(token, root=pki.root, now=case["now"], device_id=case["device_id"],
                                            license_id=case["license_id"], fleet_key_id=case["fleet_key_id"],
                                            seats=case["seats"])  # fmt: skip
            accepted, result = True, got_act.to_dict()
        except drm.LicenseRefused:
            accepted, result = False, None
        assert accepted == ok, name
        act_out.append(
            {**case, "expect": "accept" if ok else "refuse", "activation": result, "reason": reason}
        )
    releases: list[tuple[str, Any, bool, str]] = [
        ("fleet-and-version", {"fleet": "gate-cam", "version": 2}, True, "the minimal release"),
        ("with-allowance", {"allow_downgrade_from": 3, "fleet": "gate-cam", "version": 1}, True,
         "a signed downgrade allowance above the version"),
        ("max-version", {"fleet": "a" * 64, "version": 2**31 - 1}, True, "64-character fleet, version 2^31 - 1"),
        ("version-zero", {"fleet": "gate-cam", "version": 0}, False, "versions start at 1"),
        ("version-over-2^31", {"fleet": "gate-cam", "version": 2**31}, False, "versions are at most 2^31 - 1"),
        ("allowance-not-above", {"allow_downgrade_from": 2, "fleet": "gate-cam", "version": 2}, False,
         "allow_downgrade_from must exceed version"),
        ("allowance-null", {"allow_downgrade_from": None, "fleet": "gate-cam", "version": 2}, False,
         "optional members are absent, never null"),
        ("fleet-too-long", {"fleet": "a" * 65, "version": 1}, False, "fleet is 1..64 characters"),
        ("fleet-slash", {"fleet": "gate/cam", "version": 1}, False, "fleet characters are A-Z a-z 0-9 . _ -"),
        ("extra-member", {"fleet": "gate-cam", "notes": "", "version": 1}, False, "exact-member rule"),
        ("missing-version", {"fleet": "gate-cam"}, False, "version is required"),
    ]  # fmt: skip
    release_out = []
    for name, obj, ok, reason in releases:
        try:
            drm.bundle.parse_release(obj)
            accepted = True
        except drm.FormatError:
            accepted = False
        assert accepted == ok, name
        release_out.append(
            {"name": name, "release": obj, "expect": "accept" if ok else "refuse", "reason": reason}
        )
    rule = [
        ("first-release", None, {"fleet": "gate-cam", "version": 1}, True, "nothing installed for the fleet"),
        ("same-version", 2, {"fleet": "gate-cam", "version": 2}, True, "reinstalling the installed release"),
        ("upgrade", 2, {"fleet": "gate-cam", "version": 3}, True, "a higher version"),
        ("downgrade", 2, {"fleet": "gate-cam", "version": 1}, False, "a lower version without an allowance"),
        ("downgrade-allowed", 2, {"allow_downgrade_from": 2, "fleet": "gate-cam", "version": 1}, True,
         "allow_downgrade_from >= the installed version"),
        ("downgrade-allowance-too-low", 3, {"allow_downgrade_from": 2, "fleet": "gate-cam", "version": 1}, False,
         "allow_downgrade_from < the installed version"),
    ]  # fmt: skip
    entries: list[tuple[str, str, str, bool, str]] = [
        ("store-license-id", fleet_lic, device_id, True, "seat:<license_id>:<device_id>"),
        ("license-id-with-colon", "lic:a", device_id, True, "the device id is the last 32 characters"),
        ("longest", "l" * 90, device_id, True, "5 + 90 + 1 + 32 = 128 characters, the entry limit"),
        ("too-long", "l" * 91, device_id, False, "129 characters: longer than a revocation-list entry"),
        ("device-id-uppercase", fleet_lic, device_id.upper(), False, "device_id must be 32 lower-case hex"),
        ("license-id-slash", "lic/a", device_id, False, "the license_id rule of §7"),
    ]  # fmt: skip
    entry_out = []
    for name, lid, dev, ok, reason in entries:
        try:
            got_entry: str | None = drm.seat_revocation_entry(lid, dev)
        except drm.FormatError:
            got_entry = None
        assert (got_entry is not None) == ok, name
        entry_out.append({"name": name, "license_id": lid, "device_id": dev,
                          "expect": "accept" if ok else "refuse", "entry": got_entry, "reason": reason})  # fmt: skip
    seat_entry = drm.seat_revocation_entry(fleet_lic, device_id)
    seat_list = drm.sign_revocation_list(pki.classic, version=3, issued_at=NOW - 5, revoked=[seat_entry, lic])
    return {
        "description": "metering messages (docs/FORMAT.md §18): verify each budget grant and seat activation with "
        "root_cert_pem and the case's parameters; parse each bundle release; apply the release rule; form each "
        "seat revocation entry; verify seat_revocation.token and apply §18.2 use to its cases",
        "root_cert_pem": _cert_pem(pki.root),
        "seat_revocation_entries": entry_out,
        "seat_revocation": {
            "token": seat_list.decode(),
            "now": NOW,
            "revoked": sorted([seat_entry, lic]),
            "cases": [
                {
                    "license_id": fleet_lic,
                    "device_id": device_id,
                    "expect": "refuse",
                    "reason": "this device's activation of the fleet license is revoked",
                },
                {
                    "license_id": fleet_lic,
                    "device_id": other_id,
                    "expect": "accept",
                    "reason": "another device's activation of the same license is not",
                },
            ],
        },  # fmt: skip
        "budget_checks": budget_out,
        "activation_checks": act_out,
        "release_objects": release_out,
        "release_checks": [
            {
                "name": n,
                "installed": inst,
                "release": rel,
                "expect": "accept" if ok else "refuse",
                "reason": r,
            }
            for n, inst, rel, ok, r in rule
        ],
    }


def main(argv: list[str]) -> None:
    pki = Pki()
    makers: dict[str, Callable[[], dict]] = {
        "container.json": container_vectors,
        "canonical.json": canonical_vectors,
        "certificates.json": lambda: certificate_vectors(pki),
        "license.json": lambda: license_vectors(pki),
        "usage_log.json": usage_log_vectors,
        "at_rest.json": at_rest_vectors,
        "model_safety.json": model_safety_vectors,
        "bundle.json": lambda: bundle_vectors(pki),
        "metering.json": lambda: metering_vectors(pki),
    }
    wanted = {Path(a).name for a in argv} or set(makers)
    unknown = wanted - set(makers)
    if unknown:
        raise SystemExit(f"unknown vector file(s): {', '.join(sorted(unknown))} (known: {', '.join(makers)})")
    if wanted & {"certificates.json", "license.json"}:
        wanted |= {"certificates.json", "license.json"}
    outputs = {name: make() for name, make in makers.items() if name in wanted}
    for name, obj in outputs.items():
        (HERE / name).write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main(sys.argv[1:])
