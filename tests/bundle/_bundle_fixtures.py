"""Fixtures for firmware bundles: a store PKI, two real corpus models sealed with drm, production
licenses for given devices or a fleet key, and helpers that lay out the `bundle build` input dirs."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519

import drm
from drm.bundle import generate_builder_key

NOW = int(time.time())

CHAIN_YAML = b"""stages:
  - name: digits
    model: {listing: digits-mlp}
  - name: faces
    model: {listing: face-detect}
"""

DIGITS_CARD = """---
license: CC-BY-4.0
datasets:
  - uci/optdigits
---
# digits-mlp

A 64-64-32-10 MLP trained on the UCI optdigits set.
"""

FACE_CARD = """---
license: Apache-2.0
base_model: google/mediapipe-blazeface
---
# face-detect

BlazeFace short-range face detector.
"""


@dataclass
class Model:
    listing: str
    target: str
    plain: bytes
    cek: bytes
    sealed: bytes

    @property
    def build_hash(self) -> str:
        return drm.sha256_tag(self.plain)


@dataclass
class Pki:
    authority: drm.Authority
    issuer: drm.Issuer

    @property
    def root_pem(self) -> bytes:
        return drm.cert_to_pem(self.authority.cert)


@pytest.fixture(scope="session")
def pki() -> Pki:
    authority = drm.Authority.generate(now=NOW - 3600)
    return Pki(authority, authority.issue_issuer(now=NOW - 3600))


@pytest.fixture(scope="session")
def other_pki() -> Pki:
    authority = drm.Authority.generate(now=NOW - 3600, name="another store")
    return Pki(authority, authority.issue_issuer(now=NOW - 3600))


@pytest.fixture(scope="session")
def models(corpus: Path) -> dict[str, Model]:
    out = {}
    for listing, target, path in (
        ("digits-mlp", "onnx-fp32", corpus / "models/digits/digits_mlp_base.onnx"),
        ("face-detect", "coral-edgetpu", corpus / "models/mediapipe/face_detection_short_range.tflite"),
    ):
        plain = path.read_bytes()
        cek = drm.generate_content_key()
        out[listing] = Model(listing, target, plain, cek, drm.seal(plain, key=cek, target=target))
    return out


@pytest.fixture(scope="session")
def builder_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("builder")
    private_pem, public_pem = generate_builder_key()
    (d / "builder.pem").write_bytes(private_pem)
    (d / "builder.pub.pem").write_bytes(public_pem)
    return d / "builder.pem", d / "builder.pub.pem"


def device_license(
    pki: Pki, model: Model, cert_pem: bytes, *, days: float | None = None, now: int = NOW
) -> bytes:
    """A production license for one device, from its certificate (as the store would issue it)."""
    cert = drm.cert_from_bytes(cert_pem)
    return drm.issue_license(
        issuer=pki.issuer,
        cek=model.cek,
        recipient=drm.cert_kem_keys(cert),
        kind="production",
        listing=model.listing,
        build_hash=model.build_hash,
        target=model.target,
        now=now,
        days=days,
        max_runs=None,
        device_id=drm.cert_device_id(cert),
    )


def fleet_license(
    pki: Pki, model: Model, fleet_key: x25519.X25519PrivateKey, *, seats: int | None = None
) -> bytes:
    raw = fleet_key.public_key().public_bytes_raw()
    return drm.issue_license(
        issuer=pki.issuer,
        cek=model.cek,
        recipient=drm.KemKeys(x25519=raw, mlkem768=None),
        kind="production",
        listing=model.listing,
        build_hash=model.build_hash,
        target=model.target,
        now=NOW,
        days=None,
        max_runs=None,
        fleet_key_id=drm.key_id(raw),
        seats=seats,
    )


def seat_activation(
    pki: Pki, license_token: bytes, device_id: str, seat: int = 1, *, now: int = NOW
) -> bytes:
    """The store's signed activation of ``seat`` of a fleet license for one device (drm.metering)."""
    claims = drm.LicenseClaims.from_dict(drm.parse_envelope(license_token, "edgemart-license/1")[0])
    assert claims.fleet_key_id is not None
    return drm.sign_activation(
        pki.issuer, drm.Activation(device_id, claims.license_id, claims.fleet_key_id, seat, now)
    )


def keys_cert_pem(keys: drm.DeviceKeys) -> bytes:
    return drm.cert_to_pem(keys.self_signed_cert(now=NOW - 3600))


def lay_out_inputs(
    root: Path, models: dict[str, Model], licenses: list[bytes], *, chains: bool = True, cards: bool = True
) -> dict[str, Path]:
    """Write the input directories `bundle build` reads; file names are arbitrary on purpose."""
    dirs = {name: root / name for name in ("licenses", "builds", "chains", "cards")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    for i, m in enumerate(models.values()):
        (dirs["builds"] / f"model-{i}.emdl").write_bytes(m.sealed)
    for i, token in enumerate(licenses):
        (dirs["licenses"] / f"seat-{i}.lic").write_bytes(token)
    if chains:
        (dirs["chains"] / "pipeline.yaml").write_bytes(CHAIN_YAML)
    if cards:
        (dirs["cards"] / "digits-mlp.md").write_text(DIGITS_CARD)
        (dirs["cards"] / "face-detect.md").write_text(FACE_CARD)
    return dirs


def build_args(dirs: dict[str, Path], out: Path, key: Path, *extra: str) -> list[str]:
    return [
        "bundle",
        "build",
        "--licenses",
        str(dirs["licenses"]),
        "--builds",
        str(dirs["builds"]),
        "--chains",
        str(dirs["chains"]),
        "--cards",
        str(dirs["cards"]),
        "--signing-key",
        str(key),
        "--out",
        str(out),
        *extra,
    ]
