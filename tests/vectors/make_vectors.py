"""Regenerate the drm known-answer vectors in this directory (docs/FORMAT.md references them).

    .venv/bin/python tests/vectors/make_vectors.py

Deterministic vectors (container, canonical JSON, usage log) come out byte-identical every run;
the others embed fresh randomness (HPKE encapsulation, GCM nonces, certificate serials) and carry
the private keys a second implementation needs to check them. All keys here are test-only."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

import drm  # noqa: E402
from drm._canonical import dumps  # noqa: E402

NOW = 1_760_000_000
CEK = bytes(range(32))
NONCE_PREFIX = bytes.fromhex("0001020304050607")


def plaintext(n: int) -> bytes:
    return bytes((i * 7 + 3) % 251 for i in range(n))


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
    return {"description": "drm container: fixed key and nonce prefix", "cases": cases}


def canonical_vectors() -> dict:
    values = [
        {"b": 1, "a": [True, False, None]},
        {"\ufb33": 1, "\U0001f600": 2, "a": 'é\u2028\x7f\x1f\n"\\/'},
        [9007199254740991, -9007199254740991, 0, "", {}],
    ]
    good = [{"value_json": json.dumps(v), "canonical": dumps(v).decode()} for v in values]
    bad = [
        '{"a":1,"a":2}',
        '{"b":1,"a":2}',
        '{"a": 1}',
        "1.0",
        "-0",
        "9007199254740992",
        '"\\u0041"',
        '"\\ud800"',
    ]
    return {"description": "canonical JSON (RFC 8785 subset)", "canonical": good, "rejected": bad}


def _pem(key: object) -> str:
    return key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def license_vectors() -> dict:
    authority = drm.Authority.generate(now=NOW - 86400)
    issuer = authority.issue_issuer(now=NOW - 86400)
    device = drm.DeviceKeys.generate()
    build_hash = drm.sha256_tag(plaintext(2 * 4096 + 100))
    token = drm.issue_license(
        issuer=issuer,
        cek=CEK,
        recipient=device.kem_public(),
        kind="eval",
        listing="vector-listing",
        build_hash=build_hash,
        target="arm-cpu",
        now=NOW,
        days=30,
        max_runs=10,
        device_id=device.device_id,
        license_id="lic_vector_0001",
    )
    classic = drm.DeviceKeys.generate(pq=False)
    token_x25519 = drm.issue_license(
        issuer=issuer,
        cek=CEK,
        recipient=classic.kem_public(),
        kind="production",
        listing="vector-listing",
        build_hash=build_hash,
        target="arm-cpu",
        now=NOW,
        days=365,
        max_runs=None,
        device_id=classic.device_id,
        license_id="lic_vector_0002",
    )
    # A license naming its listing version (the optional `version` claim); the two above have none, as
    # every license issued before listings had versions.
    token_versioned = drm.issue_license(
        issuer=issuer,
        cek=CEK,
        recipient=classic.kem_public(),
        kind="eval",
        listing="vector-listing",
        build_hash=build_hash,
        target="arm-cpu",
        version=2,
        now=NOW,
        days=30,
        max_runs=10,
        device_id=classic.device_id,
        license_id="lic_vector_0003",
    )
    revocation = drm.sign_revocation_list(
        issuer, version=7, issued_at=NOW, revoked=["lic_vector_0002", "lic_old"]
    )
    files = device.to_files()
    return {
        "description": "license tokens, revocation list; HPKE is randomized so the private keys are given",
        "now": NOW,
        "root_cert_pem": drm.cert_to_pem(authority.cert).decode(),
        "issuer": {
            k: (v.decode() if k != "issuer-pq.key" else v.hex()) for k, v in issuer.to_files().items()
        },
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
        "versioned": {"token": token_versioned.decode(), "device_id": classic.device_id, "version": 2},
        "revocation": {"token": revocation.decode(), "version": 7, "revoked": ["lic_old", "lic_vector_0002"]},
    }


def usage_log_vectors() -> dict:
    key = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))
    device_id = drm.key_id(key.public_key())
    lines, prev = [], None
    for seq, (event, runs) in enumerate([("run", 1), ("run", 2), ("refused", 2), ("sync", 2)]):
        line = drm.make_record(
            key,
            prev_line=prev,
            seq=seq,
            device_id=device_id,
            t=NOW + seq,
            event=event,
            license_id="lic_vector_0001",
            build_hash="sha256:" + "00" * 32,
            runs=runs,
        )
        lines.append(line.decode())
        prev = line
    return {
        "description": "usage log: Ed25519 is deterministic, so the lines are reproducible",
        "device_sign_seed": bytes(range(32, 64)).hex(),
        "device_id": device_id,
        "genesis": drm.usagelog.genesis(device_id),
        "lines": lines,
    }


def at_rest_vectors() -> dict:
    kek = bytes(range(64, 96))
    build_hash = "sha256:" + "11" * 32
    state = {"high_water": NOW, "counters": {"lic_vector_0001": 2}}
    return {
        "description": "key wrapping at rest and device state sealing (random nonces: decrypt-only vectors)",
        "keywrap": {
            "kek": kek.hex(),
            "build_hash": build_hash,
            "cek": CEK.hex(),
            "wrapped": drm.wrap_key(kek, CEK, build_hash=build_hash).hex(),
        },
        "state": {
            "key": kek.hex(),
            "device_id": "vector-device",
            "state": state,
            "blob": drm.seal_state(state, key=kek, device_id="vector-device").hex(),
        },
    }


def main() -> None:
    outputs = {
        "container.json": container_vectors(),
        "canonical.json": canonical_vectors(),
        "license.json": license_vectors(),
        "usage_log.json": usage_log_vectors(),
        "at_rest.json": at_rest_vectors(),
    }
    for name, obj in outputs.items():
        (HERE / name).write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
