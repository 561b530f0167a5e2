"""`edgemart drm keygen|seal|issue` end to end on the real digits model, plus the refusals:
foreign or forged device certificates, and no partial output when sealing fails."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import drm
from edgemart.cli import main


@pytest.fixture()
def work() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict | None, str]:
    code = main(["drm", *argv])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip().startswith("{") else None), err


def _device(work: Path) -> tuple[drm.DeviceKeys, Path]:
    keys = drm.DeviceKeys.generate()
    cert = work / "device.crt"
    cert.write_bytes(drm.cert_to_pem(keys.self_signed_cert(now=int(time.time()))))
    return keys, cert


def _device_opens(keys: drm.DeviceKeys, kd: Path, lic: Path, build: Path) -> bytearray:
    root = drm.cert_from_bytes((kd / "root.crt").read_bytes())
    v = drm.verify_license(lic.read_bytes(), root=root, now=int(time.time()), device_id=keys.device_id)
    with build.open("rb") as fh:
        _, plain = drm.open_sealed(
            fh, key=drm.unwrap_cek(v.claims, keys), expected_build_hash=v.claims.build_hash
        )
    return plain


def test_keygen_seal_issue_open_with_a_self_signed_device(
    capsys: pytest.CaptureFixture[str], work: Path, digits_base: Path
) -> None:
    kd, build, lic = work / "kd", work / "d.emdl", work / "d.lic"
    assert _run(capsys, "keygen", "--out", str(kd), "--json")[0] == 0
    code, out, _ = _run(
        capsys,
        "seal",
        str(digits_base),
        "--out",
        str(build),
        "--key-dir",
        str(kd),
        "--json",
        "--chunk-size",
        "4096",
    )
    assert code == 0 and out is not None
    assert out["build_hash"] == drm.sha256_tag(digits_base.read_bytes()) and out["target"] == "onnx-fp32"
    assert digits_base.read_bytes()[:64] not in build.read_bytes()
    keys, cert = _device(work)
    code, out, _ = _run(
        capsys,
        "issue",
        "--build",
        str(build),
        "--device-cert",
        str(cert),
        "--issuer-dir",
        str(kd),
        "--days",
        "3",
        "--max-runs",
        "5",
        "--out",
        str(lic),
        "--json",
        "--listing",
        "digits",
    )
    assert code == 0 and out is not None and out["device_id"] == keys.device_id and out["max_runs"] == 5
    assert bytes(_device_opens(keys, kd, lic, build)) == digits_base.read_bytes()
    wrapped = list((kd / "ceks").iterdir())
    assert len(wrapped) == 1 and wrapped[0].stat().st_mode & 0o777 == 0o600


def test_a_store_issued_device_cert_is_accepted_and_reseal_keeps_the_cek(
    capsys: pytest.CaptureFixture[str], work: Path, digits_base: Path
) -> None:
    kd = work / "kd"
    _run(capsys, "keygen", "--out", str(kd))
    _run(capsys, "seal", str(digits_base), "--out", str(work / "a.emdl"), "--key-dir", str(kd))
    from store.keyvault import FileKeyVault

    keys = drm.DeviceKeys.generate()
    cert = work / "enrolled.crt"
    cert.write_bytes(
        drm.cert_to_pem(FileKeyVault(kd).authority().issue_device_cert(keys.csr(), now=int(time.time())))
    )
    lic = work / "a.lic"
    assert (
        _run(
            capsys,
            "issue",
            "--build",
            str(work / "a.emdl"),
            "--device-cert",
            str(cert),
            "--issuer-dir",
            str(kd),
            "--days",
            "1",
            "--max-runs",
            "1",
            "--out",
            str(lic),
        )[0]
        == 0
    )
    # Resealing the same bytes produces a new container under the same CEK: the license still opens it.
    _run(capsys, "seal", str(digits_base), "--out", str(work / "b.emdl"), "--key-dir", str(kd))
    assert (work / "a.emdl").read_bytes() != (work / "b.emdl").read_bytes()
    assert bytes(_device_opens(keys, kd, lic, work / "b.emdl")) == digits_base.read_bytes()


def test_foreign_and_forged_device_certs_are_refused(
    capsys: pytest.CaptureFixture[str], work: Path, digits_base: Path
) -> None:
    kd = work / "kd"
    _run(capsys, "keygen", "--out", str(kd))
    _run(capsys, "seal", str(digits_base), "--out", str(work / "d.emdl"), "--key-dir", str(kd))
    now = int(time.time())
    keys = drm.DeviceKeys.generate()
    impostor = drm.Authority.generate(now=now)  # same subject name as the real root
    certs = {
        "foreign": drm.cert_to_pem(impostor.issue_device_cert(keys.csr(), now=now)),
        "expired": drm.cert_to_pem(keys.self_signed_cert(now=now - 10 * 86400, days=1)),
    }
    good = keys.self_signed_cert(now=now)
    der = bytearray(
        good.public_bytes(__import__("cryptography").hazmat.primitives.serialization.Encoding.DER)
    )
    der[-5] ^= 1  # break the self-signature
    certs["forged"] = bytes(der)
    certs["garbage"] = b"not a certificate"
    for name, blob in certs.items():
        path = work / f"{name}.crt"
        path.write_bytes(blob)
        code, _, err = _run(
            capsys,
            "issue",
            "--build",
            str(work / "d.emdl"),
            "--device-cert",
            str(path),
            "--issuer-dir",
            str(kd),
            "--days",
            "1",
            "--max-runs",
            "1",
            "--out",
            str(work / "x.lic"),
        )
        assert code == 2, name
        assert err.startswith("edgemart: ") and err.count("\n") == 1
        assert not (work / "x.lic").exists()


def test_no_partial_container_when_sealing_fails(
    capsys: pytest.CaptureFixture[str], work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kd = work / "kd"
    _run(capsys, "keygen", "--out", str(kd))
    model = work / "m.onnx"
    model.write_bytes(b"\x08\x07" * 100_000)
    real = drm.seal_stream

    def failing(read, write, **kw):  # type: ignore[no-untyped-def]
        real(read, write, **kw)
        raise drm.UsageError("disk full")

    monkeypatch.setattr(drm, "seal_stream", failing)
    code, _, err = _run(capsys, "seal", str(model), "--out", str(work / "m.emdl"), "--key-dir", str(kd))
    assert code == 2 and "disk full" in err
    assert [
        p.name for p in work.iterdir() if p.name.startswith("m.emdl") or p.name.startswith(".m.emdl")
    ] == []


def test_usage_errors(capsys: pytest.CaptureFixture[str], work: Path, digits_base: Path) -> None:
    code, _, err = _run(
        capsys, "seal", str(digits_base), "--out", str(work / "x.emdl"), "--key-dir", str(work / "none")
    )
    assert code == 2 and "keygen" in err
    kd = work / "kd"
    _run(capsys, "keygen", "--out", str(kd))
    code, _, _ = _run(
        capsys, "seal", str(work / "missing.onnx"), "--out", str(work / "x.emdl"), "--key-dir", str(kd)
    )
    assert code == 2
    other = work / "other"
    _run(capsys, "keygen", "--out", str(other))
    _run(capsys, "seal", str(digits_base), "--out", str(work / "o.emdl"), "--key-dir", str(other))
    _, cert = _device(work)
    code, _, err = _run(
        capsys,
        "issue",
        "--build",
        str(work / "o.emdl"),
        "--device-cert",
        str(cert),
        "--issuer-dir",
        str(kd),
        "--days",
        "1",
        "--max-runs",
        "1",
        "--out",
        str(work / "o.lic"),
    )
    assert code == 2 and "no content key" in err
