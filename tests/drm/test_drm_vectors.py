"""Known-answer vectors in tests/vectors (made by tests/vectors/make_vectors.py, specified in docs/FORMAT.md).

The container and usage-log checks include a from-the-spec decoder that uses only primitives,
so the document and the code cannot drift apart silently."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, mlkem
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import drm
from drm._canonical import dumps, loads

VECTORS = Path(__file__).resolve().parents[1] / "vectors"


def _load(name: str) -> dict:
    return json.loads((VECTORS / name).read_text())


def _spec_open(sealed: bytes, key: bytes) -> bytes:
    """docs/FORMAT.md §1, implemented from the text with nothing but AES-GCM and SHA-256."""
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
    for raw in vec["rejected"]:
        with pytest.raises(drm.FormatError):
            loads(raw.encode(), max_size=1 << 16, what="vector")


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
    assert vc.version == versioned["version"] == 2 and vc.license_id == "lic_vector_0003"
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
