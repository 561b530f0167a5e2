"""A license's signatures are verified once and the result kept in the sealed state, bound to the exact token
bytes, the pinned root and the revocation version; expiry, revocation, binding and the certificate chain's
validity are still checked on every open, and any doubt means verifying again (fail closed)."""

from __future__ import annotations

import numpy as np
import pytest

import drm
from edge_runtime import Device

DAY = 86400


@pytest.fixture
def verifications(monkeypatch):
    """Counts calls of drm.verify_license (the full signature verification)."""
    calls: list[bytes] = []
    real = drm.verify_license

    def counting(token, **kw):
        calls.append(bytes(token))
        return real(token, **kw)

    monkeypatch.setattr(drm, "verify_license", counting)
    return calls


def test_a_license_is_verified_once_per_device_and_the_result_survives_a_restart(
    device, factory, digits_build, build_file, now, verifications
):
    lic = factory.license(device, digits_build)
    path = build_file(digits_build)
    for _ in range(3):
        device.open_model(build_path=path, license_bytes=lic, now=now).close()
    assert len(verifications) == 1 and not device.ledger.load()[0].verified  # no write of its own...
    with device.open_model(build_path=path, license_bytes=lic, now=now) as model:
        model.run({"x": np.zeros((1, 64), np.float32)})
    assert len(device.ledger.load()[0].verified) == 1  # ...it is sealed with the next commit
    Device.open(device.dir).open_model(build_path=path, license_bytes=lic, now=now).close()
    assert len(verifications) == 1


def test_per_use_checks_still_run_on_a_cached_verification(
    device, factory, digits_build, build_file, now, refused, verifications
):
    lic = factory.license(device, digits_build, days=7)
    path = build_file(digits_build)
    device.open_model(build_path=path, license_bytes=lic, now=now).close()
    refused(
        device, lambda: device.open_model(build_path=path, license_bytes=lic, now=now + 8 * DAY), "expired"
    )
    other = factory.seal(b"not the licensed build" * 50, target="onnx-fp32")
    refused(
        device,
        lambda: device.open_model(
            build_path=build_file(other, "other.emdl"), license_bytes=lic, now=now + 8 * DAY
        ),
        "another build",
    )
    assert len(verifications) == 1


def test_a_new_revocation_version_or_another_root_invalidates_the_cache(
    device, factory, digits_build, build_file, now, refused, verifications
):
    lic = factory.license(device, digits_build)
    lid = drm.verify_license(
        lic, root=factory.authority.cert, now=now, device_id=device.device_id
    ).claims.license_id
    verifications.clear()
    path = build_file(digits_build)
    device.open_model(build_path=path, license_bytes=lic, now=now).close()
    device.install_revocations(factory.revocations(version=2, revoked=["lic_other"]), now=now)
    device.open_model(build_path=path, license_bytes=lic, now=now).close()
    assert len(verifications) == 2  # verified again under revocation version 2
    device.install_revocations(factory.revocations(version=3, revoked=[lid]), now=now)
    refused(device, lambda: device.open_model(build_path=path, license_bytes=lic, now=now), "revoked")
    # Another pinned root: the cached entry does not apply, and the token does not verify under it.
    (device.dir / "root.crt").write_bytes(drm.cert_to_pem(drm.Authority.generate(now=now - DAY).cert))
    (device.dir / "revocation.bin").unlink()
    st, _ = device.ledger.load()
    st.revocation_version = 0  # as on a fresh device pinned to the other root
    device.ledger.commit(st, event="sync", t=now, detail="test: another root")
    refused(device, lambda: device.open_model(build_path=path, license_bytes=lic, now=now), "")


def test_a_changed_token_byte_is_verified_again_and_refused(
    device, factory, digits_build, build_file, now, refused, verifications
):
    lic = factory.license(device, digits_build)
    path = build_file(digits_build)
    device.open_model(build_path=path, license_bytes=lic, now=now).close()
    # Flip a character of the Ed25519 signature: another token, so no cached verification applies to it.
    at = lic.index(b'"Ed25519":"') + len(b'"Ed25519":"') + 5
    forged = lic[:at] + (b"A" if lic[at : at + 1] != b"A" else b"B") + lic[at + 1 :]
    refused(device, lambda: device.open_model(build_path=path, license_bytes=forged, now=now), "")
    assert len(verifications) == 2


def test_a_chain_outside_its_validity_is_verified_again(
    device, factory, digits_build, build_file, now, verifications
):
    lic = factory.license(device, digits_build)
    path = build_file(digits_build)
    with device.open_model(build_path=path, license_bytes=lic, now=now) as model:
        model.run({"x": np.zeros((1, 64), np.float32)})
    st, _ = device.ledger.load()
    (entry,) = st.verified.values()
    assert entry["first"] <= now <= entry["last"]
    entry["last"] = now - 1  # as if the issuer certificate had expired by now
    device.ledger.commit(st, event="sync", t=now, detail="test: chain window passed")
    fresh = Device.open(device.dir)  # no verification pending in memory
    fresh.open_model(build_path=path, license_bytes=lic, now=now).close()
    assert len(verifications) == 2
