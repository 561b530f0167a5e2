"""Fixtures for edge_runtime tests: a store-side license factory built directly on drm, and fresh devices."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

# Without a package marker in tests/, pytest puts tests/ on sys.path and tests/edge_runtime (or tests/drm)
# would shadow the real packages as namespace packages. Put the project root first.
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
for _name in ("drm", "edge_runtime"):
    if _name in sys.modules and getattr(sys.modules[_name], "__file__", None) is None:
        del sys.modules[_name]

import drm  # noqa: E402
from drm.envelope import sign_envelope  # noqa: E402
from drm.license import LICENSE_TYP, LicenseClaims, new_license_id, wrap_cek  # noqa: E402
from edge_runtime.device import refusal_category  # noqa: E402

NOW = int(time.time())
DAY = 86400


@dataclass
class SealedBuild:
    container: bytes
    cek: bytes
    build_hash: str
    target: str
    plaintext: bytes


class LicenseFactory:
    """What the store does for a device, using drm only: seal builds, issue licenses and revocation lists."""

    def __init__(self, now: int = NOW) -> None:
        self.now = now
        self.authority = drm.Authority.generate(now=now - DAY)
        self.issuer = self.authority.issue_issuer(now=now - DAY)
        self.root_pem = drm.cert_to_pem(self.authority.cert)

    def seal(self, model: bytes, *, target: str) -> SealedBuild:
        cek = drm.generate_content_key()
        container = drm.seal(model, key=cek, target=target)
        return SealedBuild(container, cek, "sha256:" + hashlib.sha256(model).hexdigest(), target, model)

    def license(
        self,
        device,
        build: SealedBuild,
        *,
        now: int = NOW,
        days: float | None = 7,
        max_runs: int | None = 100,
        listing: str = "test-listing",
        device_id: str | None = None,
        recipient: drm.KemKeys | None = None,
        offline: dict[str, int] | None = None,
    ) -> bytes:
        return drm.issue_license(
            offline=offline,
            issuer=self.issuer,
            cek=build.cek,
            recipient=recipient or device.keys.kem_public(),
            kind="eval",
            listing=listing,
            build_hash=build.build_hash,
            target=build.target,
            now=now,
            days=days,
            max_runs=max_runs,
            device_id=device_id or device.device_id,
        )

    def future_license(
        self, device, build: SealedBuild, *, starts: int, now: int = NOW, days: int = 7
    ) -> bytes:
        """A license issued now whose window opens later (e.g. a subscription that starts next week)."""
        lid = new_license_id()
        claims = LicenseClaims(
            license_id=lid,
            kind="eval",
            listing="test-listing",
            build_hash=build.build_hash,
            target=build.target,
            device_id=device.device_id,
            fleet_key_id=None,
            not_before=starts,
            not_after=starts + days * DAY,
            max_runs=10,
            issued_at=now,
            issuer_kid=self.issuer.kid,
            wrapped_cek=wrap_cek(
                build.cek,
                device.keys.kem_public(),
                license_id=lid,
                build_hash=build.build_hash,
                binding_id=device.device_id,
            ),
        )
        return sign_envelope(LICENSE_TYP, claims.to_dict(), self.issuer)

    def grant(
        self, device, license_token: bytes, *, runs_until: int, seq: int, now: int = NOW, hours: int = 24
    ) -> bytes:
        """A budget grant as the store signs it at a check-in."""
        claims = drm.LicenseClaims.from_dict(drm.parse_envelope(license_token, LICENSE_TYP)[0])
        return drm.sign_budget_grant(
            self.issuer,
            drm.BudgetGrant(device.device_id, claims.license_id, runs_until, now + hours * 3600, now, seq),
        )

    def revocations(self, *, version: int, revoked: list[str], now: int = NOW) -> bytes:
        return drm.sign_revocation_list(self.issuer, version=version, issued_at=now, revoked=revoked)


@pytest.fixture(autouse=True)
def anchor_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep rollback anchors inside the test's temp dir, never in ~/.local/state."""
    path = tmp_path / "anchors"
    monkeypatch.setenv("EDGEMART_ANCHOR_DIR", str(path))
    return path


@pytest.fixture(scope="session")
def factory() -> LicenseFactory:
    return LicenseFactory()


@pytest.fixture
def device(tmp_path: Path, factory: LicenseFactory):
    from edge_runtime import Device

    return Device.init(tmp_path / "device", trust=factory.root_pem, now=NOW)


@pytest.fixture(scope="session")
def digits_build(factory: LicenseFactory, digits_base: Path) -> SealedBuild:
    return factory.seal(digits_base.read_bytes(), target="onnx-fp32")


@pytest.fixture(scope="session")
def blazeface_model(corpus: Path) -> Path:
    return corpus / "models" / "mediapipe" / "face_detection_short_range.tflite"


@pytest.fixture(scope="session")
def blazeface_data(corpus: Path) -> Path:
    # face_detection_front and _short_range are one file (same sha256); the corpus ships one sample set for both.
    return corpus / "data" / "mediapipe" / "face_detection_front.npz"


@pytest.fixture(scope="session")
def blazeface_build(factory: LicenseFactory, blazeface_model: Path) -> SealedBuild:
    return factory.seal(blazeface_model.read_bytes(), target="coral-edgetpu")


def _audit_reasons(device) -> list[str]:
    path = device.dir / "audit.log"
    return [json.loads(line)["reason"] for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def audit_reasons():
    """reasons(device) -> the precise refusal reasons recorded in DIR/audit.log, oldest first."""
    return _audit_reasons


@pytest.fixture
def refused(audit_reasons):
    """refused(device, action, reason_part): the action raises the opaque LicenseRefused and the audit log
    holds the precise reason."""

    def check(device, action, reason_part: str) -> drm.LicenseRefused:
        with pytest.raises(drm.LicenseRefused) as info:
            action()
        category = refusal_category(info.value.reason)
        assert str(info.value) == f"license refused: {category} (details in {device.dir / 'audit.log'})"
        assert reason_part in info.value.reason, info.value.reason
        assert reason_part in audit_reasons(device)[-1]
        return info.value

    return check


@pytest.fixture(scope="session")
def now() -> int:
    return NOW


@pytest.fixture
def build_file(tmp_path: Path):
    """write(build) -> path of its container in the test's temp dir."""

    def write(build: SealedBuild, name: str = "build.emdl") -> Path:
        path = tmp_path / name
        path.write_bytes(build.container)
        return path

    return write
