"""Known-answer vectors in tests/vectors (made by tests/vectors/make_vectors.py, specified in docs/FORMAT.md).

The container and usage-log checks include a from-the-spec decoder that uses only primitives,
so the document and the code cannot drift apart silently."""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import drm
from drm._canonical import dumps, loads

VECTORS = Path(__file__).resolve().parents[1] / "vectors"


def _load(name: str) -> dict:
    return json.loads((VECTORS / name).read_text())


def _spec_open(sealed: bytes, key: bytes) -> bytes:
    """docs/FORMAT.md §3, implemented from the text with nothing but AES-GCM and SHA-256."""
    assert sealed[:8] == b"\x89EMDL\r\n\x1a" and sealed[8] == 1
    (hlen,) = struct.unpack(">I", sealed[9:13])
    header = json.loads(sealed[13 : 13 + hlen])
    digest = hashlib.sha256(sealed[: 13 + hlen]).digest()
    prefix = bytes.fromhex(
        __import__("base64")
        .urlsafe_b64decode(header["nonce_prefix"] + "=" * (-len(header["nonce_prefix"]) % 4))
        .hex()
    )
    size, total = header["chunk_size"], header["plaintext_len"]
    n = max(1, -(-total // size))
    pos, out = 13 + hlen, b""
    for i in range(n):
        m = min(size, total - i * size)
        blob = sealed[pos : pos + m + 16]
        pos += m + 16
        aad = digest + struct.pack(">IB", i, 1 if i == n - 1 else 0)
        out += AESGCM(key).decrypt(prefix + struct.pack(">I", i), blob, aad)
    assert pos == len(sealed)
    assert "sha256:" + hashlib.sha256(out).hexdigest() == header["build_hash"]
    return out


@pytest.mark.parametrize("case", _load("container.json")["cases"], ids=lambda c: c["name"])
def test_container_vectors(case: dict) -> None:
    key, plain, sealed = (
        bytes.fromhex(case["key"]),
        bytes.fromhex(case["plaintext"]),
        bytes.fromhex(case["sealed"]),
    )
    assert _spec_open(sealed, key) == plain
    _, opened = drm.open_sealed(sealed, key=key)
    assert opened == plain
    again = drm.seal(
        plain,
        key=key,
        target=case["target"],
        media_type=case["media_type"],
        chunk_size=case["chunk_size"],
        nonce_prefix=bytes.fromhex(case["nonce_prefix"]),
    )
    assert again == sealed  # deterministic given key and nonce prefix
    assert sealed[13 : 13 + len(case["header_json"])].decode() == case["header_json"]


def test_canonical_vectors() -> None:
    vec = _load("canonical.json")
    for item in vec["canonical"]:
        assert dumps(json.loads(item["value_json"])) == item["canonical"].encode()
        loads(item["canonical"].encode(), max_size=1 << 16, what="vector")
    for item in vec["rejected"]:
        with pytest.raises(drm.FormatError):
            loads(item["json"].encode(), max_size=1 << 16, what="vector")
    for item in vec["rejected_hex"]:
        with pytest.raises(drm.FormatError):
            loads(bytes.fromhex(item["hex"]), max_size=1 << 16, what="vector")


def test_license_vectors() -> None:
    vec = _load("license.json")
    root = drm.cert_from_bytes(vec["root_cert_pem"].encode())
    now = vec["now"]
    hybrid = vec["hybrid"]
    keys = drm.DeviceKeys.from_files(
        {
            "sign.key": hybrid["device_sign_key_pem"].encode(),
            "kem.key": hybrid["device_kem_key_pem"].encode(),
            "pqkem.key": bytes.fromhex(hybrid["device_mlkem768_seed"]),
        }
    )
    assert isinstance(keys.pq_kem, mlkem.MLKEM768PrivateKey) and keys.device_id == hybrid["device_id"]
    v = drm.verify_license(
        hybrid["token"].encode(),
        root=root,
        now=now,
        device_id=keys.device_id,
        build_hash=hybrid["build_hash"],
        require_pq=True,
    )
    assert v.pq_verified and v.claims.license_id == "lic_vector_0001"
    assert v.claims.wrapped_cek["suite"] == "MLKEM768-X25519/HKDF-SHA256/AES-256-GCM"
    assert drm.unwrap_cek(v.claims, keys).hex() == vec["expected_cek"]

    classic = vec["x25519"]
    ckeys = drm.DeviceKeys.from_files(
        {
            "sign.key": classic["device_sign_key_pem"].encode(),
            "kem.key": classic["device_kem_key_pem"].encode(),
        }
    )
    c = drm.verify_license(classic["token"].encode(), root=root, now=now, device_id=ckeys.device_id).claims
    assert c.wrapped_cek["suite"].startswith("DHKEM-X25519") and c.max_runs is None and c.kind == "production"
    assert drm.unwrap_cek(c, ckeys).hex() == vec["expected_cek"]

    assert v.claims.version is None and c.version is None  # issued without the optional claim
    versioned = vec["versioned"]
    token = versioned["token"].encode()
    vc = drm.verify_license(token, root=root, now=now, device_id=ckeys.device_id).claims
    assert vc.version == versioned["version"] == 2 and vc.license_id == "lic_vector_0004"
    assert drm.unwrap_cek(vc, ckeys).hex() == vec["expected_cek"]

    rl = drm.verify_revocation_list(
        vec["revocation"]["token"].encode(), root=root, now=now, current_version=7
    )
    assert rl.version == 7 and sorted(rl.revoked) == vec["revocation"]["revoked"]
    with pytest.raises(drm.LicenseRefused):
        drm.verify_license(
            classic["token"].encode(), root=root, now=now, device_id=ckeys.device_id, revoked=rl.revoked
        )

    issuer = drm.Issuer.from_files(
        {k: (bytes.fromhex(v) if k == "issuer-pq.key" else v.encode()) for k, v in vec["issuer"].items()}
    )
    assert issuer.kid == v.claims.issuer_kid


def test_usage_log_vectors() -> None:
    vec = _load("usage_log.json")
    key = ed25519.Ed25519PrivateKey.from_private_bytes(bytes.fromhex(vec["device_sign_seed"]))
    pub_der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert hashlib.sha256(pub_der).hexdigest()[:32] == vec["device_id"]
    assert vec["genesis"] == drm.sha256_tag(b"edgemart-usage-genesis/1\x00" + vec["device_id"].encode())
    data = "\n".join(vec["lines"]).encode() + b"\n"
    report = drm.verify_log(data, key.public_key(), device_id=vec["device_id"])
    assert report.ok and len(report.records) == 4
    prev = None
    for seq, line in enumerate(vec["lines"]):  # Ed25519 is deterministic: the lines are reproducible
        rec = json.loads(line)["rec"]
        again = drm.make_record(
            key,
            prev_line=prev,
            seq=seq,
            device_id=rec["device_id"],
            t=rec["t"],
            event=rec["event"],
            license_id=rec["license_id"],
            build_hash=rec["build_hash"],
            runs=rec["runs"],
            detail=rec["detail"],
        )
        assert again.decode() == line
        key.public_key().verify(
            drm._canonical.b64d(json.loads(line)["sig"], what="sig"), b"edgemart-usage/1\x00" + dumps(rec)
        )
        prev = again


def test_at_rest_vectors() -> None:
    vec = _load("at_rest.json")
    kw = vec["keywrap"]
    assert (
        drm.unwrap_key(
            bytes.fromhex(kw["kek"]), bytes.fromhex(kw["wrapped"]), build_hash=kw["build_hash"]
        ).hex()
        == kw["cek"]
    )
    wrapped = bytes.fromhex(kw["wrapped"])
    assert (
        AESGCM(bytes.fromhex(kw["kek"]))
        .decrypt(wrapped[5:17], wrapped[17:], b"edgemart-cek-wrap/1\x00" + kw["build_hash"].encode())
        .hex()
        == kw["cek"]
    )
    st = vec["state"]
    assert (
        drm.open_state(bytes.fromhex(st["blob"]), key=bytes.fromhex(st["key"]), device_id=st["device_id"])
        == st["state"]
    )


# ------------------------------------------------------------------------------------------ issue #22 additions


@pytest.mark.parametrize("case", _load("container.json")["refusals"], ids=lambda c: c["name"])
def test_container_refusal_vectors(case: dict) -> None:
    with pytest.raises(drm.IntegrityError):
        drm.open_sealed(
            bytes.fromhex(case["sealed"]),
            key=bytes.fromhex(case["key"]),
            expected_build_hash=case["expected_build_hash"],
        )


def test_container_header_sha256_is_over_prefix_and_header() -> None:
    for case in _load("container.json")["cases"]:
        sealed = bytes.fromhex(case["sealed"])
        head = sealed[:13] + case["header_json"].encode()
        assert sealed[9:13] == struct.pack(">I", len(case["header_json"].encode()))
        assert "sha256:" + hashlib.sha256(head).hexdigest() == case["header_sha256"]


_PURPOSES = {
    "license-issuer": drm.EKU_LICENSE_ISSUER,
    "device": drm.EKU_DEVICE,
    "bundle-signer": drm.EKU_BUNDLE_SIGNER,
}


@pytest.mark.parametrize("case", _load("certificates.json")["checks"], ids=lambda c: c["name"])
def test_certificate_vectors(case: dict) -> None:
    root = drm.cert_from_bytes(_load("certificates.json")["root_cert_pem"].encode())
    der = bytes.fromhex(case["cert_der"])

    def check() -> None:
        drm.verify_cert(drm.cert_from_bytes(der), root, now=case["now"], purpose=_PURPOSES[case["purpose"]])

    if case["expect"] == "accept":
        check()
    else:
        with pytest.raises(drm.LicenseRefused):
            check()


def test_device_keys_csr_and_certificates() -> None:
    vec = _load("certificates.json")
    dev = vec["device"]
    keys = drm.DeviceKeys.from_files(
        {
            "sign.key": dev["sign_key_pem"].encode(),
            "kem.key": dev["kem_key_pem"].encode(),
            "pqkem.key": bytes.fromhex(dev["mlkem768_seed"]),
        }
    )
    assert keys.device_id == dev["device_id"]
    assert keys.kem_public() == drm.KemKeys(
        bytes.fromhex(dev["x25519_public"]), bytes.fromhex(dev["mlkem768_public"])
    )
    # FIPS 203 seed layout: d || z, 32 bytes each; the encapsulation key follows from it.
    assert mlkem.MLKEM768PrivateKey.from_seed_bytes(
        bytes.fromhex(dev["mlkem768_seed"])
    ).public_key().public_bytes_raw() == bytes.fromhex(dev["mlkem768_public"])
    for name in ("store_issued_cert_pem", "self_signed_cert_pem"):
        cert = drm.cert_from_bytes(dev[name].encode())
        assert drm.cert_device_id(cert) == dev["device_id"]
        assert drm.cert_kem_keys(cert) == keys.kem_public()
        # the private extensions hold the raw key as the extnValue OCTET STRING's contents
        raw = {
            e.oid.dotted_string: e.value.value
            for e in cert.extensions
            if e.oid.dotted_string.startswith("1.3.6.1.4.1.59999.7.")
        }
        assert raw == {
            "1.3.6.1.4.1.59999.7.1": bytes.fromhex(dev["x25519_public"]),
            "1.3.6.1.4.1.59999.7.2": bytes.fromhex(dev["mlkem768_public"]),
        }
    csr = x509.load_pem_x509_csr(dev["csr_pem"].encode())
    assert csr.is_signature_valid and drm.key_id(csr.public_key()) == dev["device_id"]  # type: ignore[arg-type]
    authority = drm.Authority.from_files(
        {"root.key": vec["root_key_pem"].encode(), "root.crt": vec["root_cert_pem"].encode()}
    )
    reissued = authority.issue_device_cert(dev["csr_pem"].encode(), now=_load("license.json")["now"])
    assert drm.cert_device_id(reissued) == dev["device_id"]
    for bad in vec["csr_refusals"]:
        with pytest.raises(drm.UsageError):
            authority.issue_device_cert(bytes.fromhex(bad["csr_der"]), now=_load("license.json")["now"])
    # From the text (FORMAT.md §5.1): ByteDecode12 of the first 1152 bytes has a coefficient >= q = 3329.
    (bad,) = [c for c in vec["csr_refusals"] if c["name"] == "mlkem768-coefficient-out-of-range"]
    csr = x509.load_der_x509_csr(bytes.fromhex(bad["csr_der"]))
    (ek,) = [e.value.value for e in csr.extensions if e.oid.dotted_string == "1.3.6.1.4.1.59999.7.2"]
    triples = [int.from_bytes(ek[i : i + 3], "little") for i in range(0, 1152, 3)]
    assert len(ek) == 1184 and max(max(t & 0xFFF, t >> 12) for t in triples) >= 3329


@pytest.mark.parametrize("case", _load("license.json")["checks"], ids=lambda c: c["name"])
def test_license_check_vectors(case: dict) -> None:
    root = drm.cert_from_bytes(_load("license.json")["root_cert_pem"].encode())

    def check() -> drm.VerifiedLicense:
        return drm.verify_license(
            case["token"].encode(),
            root=root,
            now=case["now"],
            device_id=case["device_id"],
            fleet_key_ids=frozenset(case["fleet_key_ids"]),
            build_hash=case["build_hash"],
            revoked=frozenset(case["revoked"]),
            require_pq=case["require_pq"],
            target=case["target"],
        )

    if case["expect"] == "accept":
        check()
    else:
        with pytest.raises(drm.LicenseRefused):
            check()


@pytest.mark.parametrize("case", _load("license.json")["revocation_checks"], ids=lambda c: c["name"])
def test_revocation_check_vectors(case: dict) -> None:
    root = drm.cert_from_bytes(_load("license.json")["root_cert_pem"].encode())

    def check() -> None:
        drm.verify_revocation_list(
            case["token"].encode(),
            root=root,
            now=case["now"],
            current_version=case["current_version"],
            max_age=case["max_age"],
        )

    if case["expect"] == "accept":
        check()
    else:
        with pytest.raises(drm.LicenseRefused):
            check()


# HPKE (RFC 9180) base mode, single shot, from the spec text with nothing but HMAC-SHA256 and AES-GCM.


def _hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()


def _hkdf_expand(prk: bytes, info: bytes, n: int) -> bytes:
    out, block, i = b"", b"", 1
    while len(out) < n:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        out, i = out + block, i + 1
    return out[:n]


def _hpke_open(kem_id: int, shared_secret: bytes, ciphertext: bytes, info: bytes) -> bytes:
    suite = b"HPKE" + struct.pack(">HHH", kem_id, 0x0001, 0x0002)

    def extract(salt: bytes, label: bytes, ikm: bytes) -> bytes:
        return _hkdf_extract(salt, b"HPKE-v1" + suite + label + ikm)

    def expand(prk: bytes, label: bytes, ctx: bytes, n: int) -> bytes:
        return _hkdf_expand(prk, struct.pack(">H", n) + b"HPKE-v1" + suite + label + ctx, n)

    ctx = b"\x00" + extract(b"", b"psk_id_hash", b"") + extract(b"", b"info_hash", info)
    secret = extract(shared_secret, b"secret", b"")
    return AESGCM(expand(secret, b"key", ctx, 32)).decrypt(
        expand(secret, b"base_nonce", ctx, 12), ciphertext, b""
    )


def _spec_unwrap(claims: dict, x25519_key: Any, mlkem_seed: bytes | None) -> bytes:
    """docs/FORMAT.md §8: the CEK from wrapped_cek with the recipient's private keys."""
    enc = drm._canonical.b64d(claims["wrapped_cek"]["enc"], what="enc")
    info = b"edgemart-cek/1\x00" + dumps(
        [claims["license_id"], claims["build_hash"], claims["device_id"] or claims["fleet_key_id"]]
    )
    pk_x = x25519_key.public_key().public_bytes_raw()
    if claims["wrapped_cek"]["suite"] == "DHKEM-X25519-HKDF-SHA256/HKDF-SHA256/AES-256-GCM":
        e = enc[:32]
        dh = x25519_key.exchange(x25519.X25519PublicKey.from_public_bytes(e))
        kem_suite = b"KEM" + struct.pack(">H", 0x0020)
        prk = _hkdf_extract(b"", b"HPKE-v1" + kem_suite + b"eae_prk" + dh)
        ss = _hkdf_expand(
            prk, struct.pack(">H", 32) + b"HPKE-v1" + kem_suite + b"shared_secret" + e + pk_x, 32
        )
        return _hpke_open(0x0020, ss, enc[32:], info)
    assert claims["wrapped_cek"]["suite"] == "MLKEM768-X25519/HKDF-SHA256/AES-256-GCM" and mlkem_seed
    ct_m, ct_x = enc[:1088], enc[1088:1120]
    ss_m = mlkem.MLKEM768PrivateKey.from_seed_bytes(mlkem_seed).decapsulate(ct_m)
    ss_x = x25519_key.exchange(x25519.X25519PublicKey.from_public_bytes(ct_x))
    ss = hashlib.sha3_256(ss_m + ss_x + ct_x + pk_x + b"\\.//^\\").digest()  # X-Wing combiner and label
    return _hpke_open(0x647A, ss, enc[1120:], info)


def test_hpke_unwrap_from_the_spec() -> None:
    vec = _load("license.json")
    for which, seed in (("hybrid", "device_mlkem768_seed"), ("x25519", None)):
        part = vec[which]
        claims = json.loads(drm.parse_envelope(part["token"].encode(), "edgemart-license/1")[1])
        kem = serialization.load_pem_private_key(part["device_kem_key_pem"].encode(), None)
        cek = _spec_unwrap(claims, kem, bytes.fromhex(part[seed]) if seed else None)
        assert cek.hex() == vec["expected_cek"]
    fleet = vec["fleet"]
    claims = json.loads(drm.parse_envelope(fleet["token"].encode(), "edgemart-license/1")[1])
    fleet_key = serialization.load_pem_private_key(fleet["fleet_key_pem"].encode(), None)
    assert _spec_unwrap(claims, fleet_key, None).hex() == vec["expected_cek"]


def test_fleet_and_classic_issuer_vectors() -> None:
    vec = _load("license.json")
    root = drm.cert_from_bytes(vec["root_cert_pem"].encode())
    fleet = vec["fleet"]
    key = drm.keys.x25519_from_pem(fleet["fleet_key_pem"].encode())
    assert drm.key_id(key.public_key().public_bytes_raw()) == fleet["fleet_key_id"]
    v = drm.verify_license(
        fleet["token"].encode(), root=root, now=vec["now"], fleet_key_ids=frozenset({fleet["fleet_key_id"]})
    )
    assert v.claims.device_id is None and v.claims.not_after is None
    assert drm.unwrap_cek(v.claims, key).hex() == vec["expected_cek"]
    classic = drm.Issuer.from_files({k: v.encode() for k, v in vec["classic_issuer"].items()})
    assert classic.pq_key is None
    c = drm.verify_license(
        vec["classic_issuer_token"].encode(), root=root, now=vec["now"], device_id=vec["hybrid"]["device_id"]
    )
    assert not c.pq_verified and c.claims.issuer_kid == classic.kid
    keys = drm.DeviceKeys.from_files(
        {
            "sign.key": vec["hybrid"]["device_sign_key_pem"].encode(),
            "kem.key": vec["hybrid"]["device_kem_key_pem"].encode(),
            "pqkem.key": bytes.fromhex(vec["hybrid"]["device_mlkem768_seed"]),
        }
    )
    for bad in vec["unwrap_refusals"]:
        moved = drm.verify_license(bad["token"].encode(), root=root, now=vec["now"], device_id=keys.device_id)
        with pytest.raises(drm.LicenseRefused):
            drm.unwrap_cek(moved.claims, keys)


def test_ml_dsa_is_pure_with_an_empty_context() -> None:
    vec = _load("license.json")
    env = json.loads(vec["hybrid"]["token"])
    issuer = drm.cert_from_bytes(drm._canonical.b64d(env["x5c"][0], what="x5c"))
    pq = drm.keys.cert_mldsa_key(issuer)
    assert pq is not None
    msg = b"edgemart-envelope/1\x00edgemart-license/1\x00" + drm._canonical.b64d(env["payload"], what="p")
    sig = drm._canonical.b64d(env["sig"]["ML-DSA-65"], what="sig")
    pq.verify(sig, msg, context=b"")
    with pytest.raises(InvalidSignature):
        pq.verify(sig, msg, context=b"edgemart")


def test_usage_log_refusal_and_continuation_vectors() -> None:
    vec = _load("usage_log.json")
    pub = ed25519.Ed25519PrivateKey.from_private_bytes(bytes.fromhex(vec["device_sign_seed"])).public_key()
    cont = vec["continuation"]
    report = drm.verify_log(
        ("\n".join(cont["lines"]) + "\n").encode(),
        pub,
        device_id=vec["device_id"],
        start_seq=cont["start_seq"],
        start_prev=cont["start_prev"],
    )
    assert report.ok
    for case in vec["refusals"]:
        data = ("\n".join(case["lines"]) + "\n").encode()
        report = drm.verify_log(data, pub, device_id=vec["device_id"], **case["options"])
        assert not report.ok and report.first_bad == case["first_bad"], case["name"]
        assert len(report.records) == case["valid_prefix"]


def test_at_rest_refusals_and_pkcs11_formats() -> None:
    vec = _load("at_rest.json")
    kw = vec["keywrap"]
    for bad in kw["refusals"]:
        with pytest.raises(drm.IntegrityError):
            drm.unwrap_key(
                bytes.fromhex(kw["kek"]), bytes.fromhex(bad["wrapped"]), build_hash=bad["build_hash"]
            )
    st = vec["state"]
    for bad in st["refusals"]:
        with pytest.raises(drm.IntegrityError):
            drm.open_state(
                bytes.fromhex(bad["blob"]), key=bytes.fromhex(st["key"]), device_id=bad["device_id"]
            )
    from store import keyvault_pkcs11 as p11

    w = vec["pkcs11_wrapped_cek"]
    blob = bytes.fromhex(w["wrapped"])
    assert blob[:5] == p11.CEK_WRAP_MAGIC and len(blob) == p11.CEK_WRAPPED_LEN
    assert (
        AESGCM(bytes.fromhex(w["kek"])).decrypt(blob[5:17], blob[17:], p11._cek_aad(w["build_hash"])).hex()
        == w["cek"]
    )
    s = vec["pkcs11_sealed_key_file"]
    blob = bytes.fromhex(s["sealed"])
    kek_id = bytes.fromhex(s["kek_id"])
    assert blob[:5] == p11.SEALED_MAGIC and blob[5:21] == kek_id
    aad = p11._sealed_aad(kek_id, s["name"])
    assert AESGCM(bytes.fromhex(s["kek"])).decrypt(blob[21:33], blob[33:], aad).decode() == s["file"]


@pytest.mark.parametrize("case", _load("model_safety.json")["cases"], ids=lambda c: c["name"])
def test_model_safety_vectors(case: dict) -> None:
    from edgemart.core.model_safety import UnsafeModel, check_model_bytes

    if case["expect"] == "accept":
        check_model_bytes(bytes.fromhex(case["model"]))
    else:
        with pytest.raises(UnsafeModel):
            check_model_bytes(bytes.fromhex(case["model"]))


# ------------------------------------------------------------------------------------------ bundles


def _spec_tar_header(name: str, size: int) -> bytes:
    """docs/BUNDLE.md "Archive": the one canonical ustar header, built from the text alone."""
    head = bytearray(512)
    head[0 : len(name)] = name.encode()
    for offset, width, value in ((100, 8, 0o644), (108, 8, 0), (116, 8, 0), (124, 12, size), (136, 12, 0),
                                 (329, 8, 0), (337, 8, 0)):  # fmt: skip
        head[offset : offset + width] = format(value, "o").rjust(width - 1, "0").encode() + b"\0"
    head[148:156], head[156], head[257:265] = b" " * 8, ord("0"), b"ustar\x0000"
    head[148:156] = format(sum(head), "06o").encode() + b"\0 "
    return bytes(head)


def test_bundle_vector_verifies() -> None:
    vec = _load("bundle.json")
    b = vec["bundle"]
    root = x509.load_pem_x509_certificate(vec["root_cert_pem"].encode())
    builder = ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(vec["builder_public_key"]))
    archive = bytes.fromhex(b["archive"])
    verified = drm.verify_bundle(archive, now=vec["now"], root=root, builder_key=builder)
    assert verified.builder_kid == vec["builder_kid"] and verified.builder_pinned
    assert verified.manifest.release is not None and verified.manifest.release.version == 3

    # From the text: the signature, the member headers, the member hashes and the build inside.
    manifest = b["manifest_json"].encode()
    assert dumps(loads(manifest, max_size=4 * 1024**2, what="manifest")) == manifest
    sig = json.loads(b["manifest_sig"])
    assert bytes.fromhex(b["signed_message"]) == b"edgemart-bundle-sig/1\x00" + manifest
    raw_sig = __import__("base64").urlsafe_b64decode(sig["sig"] + "==")
    builder.verify(raw_sig, bytes.fromhex(b["signed_message"]))
    assert sig["manifest"] == "sha256:" + hashlib.sha256(manifest).hexdigest()
    members = {}
    for m in b["members"]:
        header = archive[m["offset"] : m["offset"] + 512]
        assert header.hex() == m["header"] and header == _spec_tar_header(m["name"], m["size"])
        members[m["name"]] = archive[m["offset"] + 512 : m["offset"] + 512 + m["size"]]
    end = b["members"][-1]["offset"] + 512 + -(-b["members"][-1]["size"] // 512) * 512
    assert archive[end:] == bytes(1024)
    listed = json.loads(manifest)
    assert [m["name"] for m in b["members"]] == ["manifest.json", "manifest.sig"] + [
        f["path"] for f in listed["files"]
    ]
    for f in listed["files"]:
        assert f["size"] == len(members[f["path"]])
        assert f["sha256"] == "sha256:" + hashlib.sha256(members[f["path"]]).hexdigest()
    (entry,) = listed["builds"]
    assert _spec_open(members[entry["path"]], bytes.fromhex(b["cek"])) == bytes.fromhex(b["build_plaintext"])


@pytest.mark.parametrize("case", _load("bundle.json")["refusals"], ids=lambda c: c["name"])
def test_bundle_refusal_vectors(case: dict) -> None:
    vec = _load("bundle.json")
    root = x509.load_pem_x509_certificate(vec["root_cert_pem"].encode())
    builder = ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(vec["builder_public_key"]))
    with pytest.raises(drm.BundleInvalid) as caught:
        drm.verify_bundle(bytes.fromhex(case["archive"]), now=vec["now"], root=root, builder_key=builder)
    assert caught.value.message == case["message"]  # refused for the reason the vector names


def test_fleet_bundle_vector_carries_one_seat_activation() -> None:
    """§19.1 `activations/`: the member sits between licenses and chains, and verifying reports the seat."""
    vec = _load("bundle.json")
    fb = vec["fleet_bundle"]
    root = x509.load_pem_x509_certificate(vec["root_cert_pem"].encode())
    builder = ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(vec["builder_public_key"]))
    verified = drm.verify_bundle(bytes.fromhex(fb["archive"]), now=vec["now"], root=root, builder_key=builder)
    (act,) = fb["activations"]
    assert [
        {"license_id": a.license_id, "device_id": a.device_id, "seat": a.seat}
        for a in verified.activations.values()
    ] == fb["activations"]
    name = f"activations/{act['license_id']}.{act['device_id']}.act"
    names = fb["member_names"]
    assert [n for n in names if n.startswith("activations/")] == [name]
    assert max(i for i, n in enumerate(names) if n.startswith("licenses/")) < names.index(name)
    assert names.index(name) < names.index("mlbom.cdx.json")
    token = verified.members[name]
    assert drm.verify_activation(
        token, root=root, now=vec["now"], device_id=act["device_id"], license_id=act["license_id"],
        fleet_key_id=drm.parse_activation(token).fleet_key_id, seats=2,
    ).seat == 1  # fmt: skip


# ------------------------------------------------------------------------------------------ metering


@pytest.mark.parametrize("case", _load("metering.json")["seat_revocation_entries"], ids=lambda c: c["name"])
def test_seat_revocation_entry_vectors(case: dict) -> None:
    if case["expect"] == "accept":
        entry = drm.seat_revocation_entry(case["license_id"], case["device_id"])
        assert entry == case["entry"] == f"seat:{case['license_id']}:{case['device_id']}"
    else:
        with pytest.raises(drm.FormatError):
            drm.seat_revocation_entry(case["license_id"], case["device_id"])


def test_seat_revocation_vector_revokes_one_devices_seat() -> None:
    vec = _load("metering.json")["seat_revocation"]
    rl = drm.verify_revocation_list(vec["token"].encode(), root=_metering_root(), now=vec["now"])
    assert sorted(rl.revoked) == vec["revoked"]
    for case in vec["cases"]:
        revoked = f"seat:{case['license_id']}:{case['device_id']}" in rl.revoked
        assert revoked == (case["expect"] == "refuse"), case
        assert case["license_id"] not in rl.revoked  # the license itself stays valid


def _metering_root() -> x509.Certificate:
    return x509.load_pem_x509_certificate(_load("metering.json")["root_cert_pem"].encode())


@pytest.mark.parametrize("case", _load("metering.json")["budget_checks"], ids=lambda c: c["name"])
def test_budget_grant_vectors(case: dict) -> None:
    def verify() -> drm.BudgetGrant:
        return drm.verify_budget_grant(
            case["token"].encode(),
            root=_metering_root(),
            now=case["now"],
            device_id=case["device_id"],
            license_id=case["license_id"],
        )

    if case["expect"] == "accept":
        assert verify().to_dict() == case["grant"]
    else:
        with pytest.raises(drm.LicenseRefused):
            verify()


@pytest.mark.parametrize("case", _load("metering.json")["activation_checks"], ids=lambda c: c["name"])
def test_activation_vectors(case: dict) -> None:
    def verify() -> drm.Activation:
        return drm.verify_activation(
            case["token"].encode(),
            root=_metering_root(),
            now=case["now"],
            device_id=case["device_id"],
            license_id=case["license_id"],
            fleet_key_id=case["fleet_key_id"],
            seats=case["seats"],
        )

    if case["expect"] == "accept":
        assert verify().to_dict() == case["activation"]
    else:
        with pytest.raises(drm.LicenseRefused):
            verify()


@pytest.mark.parametrize("case", _load("metering.json")["release_objects"], ids=lambda c: c["name"])
def test_bundle_release_object_vectors(case: dict) -> None:
    from drm.bundle import parse_release

    if case["expect"] == "accept":
        assert parse_release(case["release"]).to_dict() == case["release"]
    else:
        with pytest.raises(drm.FormatError):
            parse_release(case["release"])
