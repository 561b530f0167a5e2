"""The KeyVault conformance suite: one set of checks run against every backend (files; PKCS#11 on SoftHSM2).

Each backend must: create its keys once and keep them (ensure is idempotent, also from racing threads), give
an authority and issuer that certify devices and sign licenses devices accept, and wrap content keys bound to
their build so that tampering or another build's hash is one IntegrityError; two vault objects (or two
processes) on the same storage must agree."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _softhsm_fixture import softhsm
from pkcs11 import Attribute

import drm
from store.keyvault import FileKeyVault, KeyVault

NOW = 1_760_000_000
H1 = "sha256:" + "11" * 32
H2 = "sha256:" + "22" * 32
REPO = Path(__file__).resolve().parents[2]

MakeVault = Callable[[Path], KeyVault]


@pytest.fixture(params=["file", "pkcs11"])
def backend(request: pytest.FixtureRequest) -> Iterator[tuple[str, MakeVault, dict[str, str]]]:
    """(name, a factory of vault objects on one backend's storage, how a second process builds the same)."""
    if request.param == "file":
        yield "file", FileKeyVault, {"kind": "file"}
        return
    hsm = softhsm()
    # A KEK label of its own per test: every test starts from a token without its KEK, as in production.
    kek_label = f"edgemart-kek-{uuid.uuid4().hex[:12]}"
    spec = {"kind": "pkcs11", "module": hsm.module, "token": hsm.token, "pin": hsm.pin, "kek": kek_label}
    yield "pkcs11", lambda d: hsm.vault(d, kek_label=kek_label), spec


@pytest.fixture()
def vault_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp) / "keys"


@pytest.fixture()
def make(backend: tuple[str, MakeVault, dict[str, str]]) -> MakeVault:
    return backend[1]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != ".lock"}


# ----------------------------------------------------------------------------- creation


def test_ensure_creates_once_and_is_idempotent(make: MakeVault, vault_dir: Path) -> None:
    vault = make(vault_dir).ensure(NOW)
    assert isinstance(vault, KeyVault)
    before = snapshot(vault_dir)
    root, kid = vault.authority().cert, vault.issuer().kid
    cek = drm.generate_content_key()
    wrapped = vault.wrap_cek(cek, H1)

    assert vault.ensure(NOW + 10) is vault
    assert make(vault_dir).ensure(NOW + 20).issuer().kid == kid
    assert snapshot(vault_dir) == before  # nothing rewritten
    assert vault.authority().cert == root and vault.issuer().kid == kid
    assert vault.unwrap_cek(wrapped, H1) == cek
    assert not [p for p in vault_dir.iterdir() if p.name.endswith(".tmp")]


def test_concurrent_ensure_from_threads_creates_one_root(
    backend: tuple[str, MakeVault, dict[str, str]], vault_dir: Path
) -> None:
    _, make, spec = backend
    vaults = [make(vault_dir) for _ in range(8)]
    start = threading.Barrier(len(vaults))
    errors: list[BaseException] = []

    def run(v: KeyVault) -> None:
        try:
            start.wait()
            v.ensure(NOW)
        except BaseException as exc:  # collected and re-raised by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(v,)) for v in vaults]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({drm.cert_to_pem(v.authority().cert) for v in vaults}) == 1
    assert len({v.issuer().kid for v in vaults}) == 1
    cek = drm.generate_content_key()
    wrapped = vaults[0].wrap_cek(cek, H1)
    assert all(v.unwrap_cek(wrapped, H1) == cek for v in vaults)  # one KEK too
    if spec["kind"] == "pkcs11":
        with softhsm().session() as session:
            assert len(list(session.get_objects({Attribute.LABEL: spec["kek"]}))) == 1


# ----------------------------------------------------------------------------- signing keys


def test_authority_and_issuer_certify_a_device_and_sign_a_license_it_accepts(
    make: MakeVault, vault_dir: Path
) -> None:
    vault = make(vault_dir).ensure(NOW)
    authority, issuer = vault.authority(), vault.issuer()
    drm.verify_cert(issuer.cert, authority.cert, now=NOW, purpose=drm.EKU_LICENSE_ISSUER)
    assert issuer.pq_key is not None  # licenses carry the ML-DSA-65 co-signature

    device = drm.DeviceKeys.generate()
    device_cert = authority.issue_device_cert(device.csr(), now=NOW)
    drm.verify_cert(device_cert, authority.cert, now=NOW, purpose=drm.EKU_DEVICE)
    assert drm.cert_device_id(device_cert) == device.device_id

    cek = vault.unwrap_cek(vault.wrap_cek(drm.generate_content_key(), H1), H1)
    token = drm.issue_license(
        issuer=issuer,
        cek=cek,
        recipient=drm.cert_kem_keys(device_cert),
        kind="eval",
        listing="digits-mlp",
        build_hash=H1,
        target="onnx-fp32",
        now=NOW,
        days=7,
        max_runs=10,
        device_id=device.device_id,
    )
    verified = drm.verify_license(
        token, root=authority.cert, now=NOW + 60, device_id=device.device_id, build_hash=H1, require_pq=True
    )
    assert verified.pq_verified and verified.claims.issuer_kid == issuer.kid
    assert drm.unwrap_cek(verified.claims, device) == cek

    # A license signed by this vault's issuer is refused under another vault's root.
    with tempfile.TemporaryDirectory() as other:
        stranger = make(Path(other) / "keys").ensure(NOW)
        with pytest.raises(drm.LicenseRefused):
            drm.verify_license(
                token, root=stranger.authority().cert, now=NOW + 60, device_id=device.device_id
            )


def test_an_issuer_near_expiry_is_renewed_under_the_same_root(make: MakeVault, vault_dir: Path) -> None:
    vault = make(vault_dir).ensure(NOW)
    root, old = vault.authority().cert, vault.issuer().kid
    later = int(vault.issuer().cert.not_valid_after_utc.timestamp()) - 86400
    renewed = make(vault_dir).ensure(later)
    assert renewed.issuer().kid != old and renewed.authority().cert == root
    drm.verify_cert(renewed.issuer().cert, root, now=later, purpose=drm.EKU_LICENSE_ISSUER)


def test_a_half_present_root_is_refused_not_rerooted(
    backend: tuple[str, MakeVault, dict[str, str]], vault_dir: Path
) -> None:
    make = backend[1]
    make(vault_dir).ensure(NOW)
    (vault_dir / "root.crt").unlink()
    with pytest.raises(drm.ConflictError):
        make(vault_dir).ensure(NOW)
    assert not (vault_dir / "root.crt").exists()


# ----------------------------------------------------------------------------- content keys


def test_wrap_unwrap_round_trip(make: MakeVault, vault_dir: Path) -> None:
    vault = make(vault_dir).ensure(NOW)
    for _ in range(3):
        cek = drm.generate_content_key()
        wrapped = vault.wrap_cek(cek, H1)
        assert cek not in wrapped
        assert vault.unwrap_cek(wrapped, H1) == cek
        assert vault.wrap_cek(cek, H1) != wrapped  # fresh IV each time
    with pytest.raises(drm.UsageError):
        vault.wrap_cek(b"short", H1)
    with pytest.raises(drm.UsageError):
        vault.wrap_cek(drm.generate_content_key(), "sha256:é")


def test_wrong_build_hash_and_every_bit_flip_are_integrity_errors(make: MakeVault, vault_dir: Path) -> None:
    vault = make(vault_dir).ensure(NOW)
    cek = drm.generate_content_key()
    wrapped = vault.wrap_cek(cek, H1)
    with pytest.raises(drm.IntegrityError):
        vault.unwrap_cek(wrapped, H2)
    with pytest.raises(drm.IntegrityError):
        vault.unwrap_cek(wrapped, H1 + "0")
    for bit in range(len(wrapped) * 8):
        flipped = bytearray(wrapped)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(drm.IntegrityError):
            vault.unwrap_cek(bytes(flipped), H1)
    for bad in (b"", wrapped[:-1], wrapped + b"\x00", bytes(len(wrapped))):
        with pytest.raises(drm.IntegrityError):
            vault.unwrap_cek(bad, H1)
    assert vault.unwrap_cek(wrapped, H1) == cek  # the failures left the vault usable


def test_another_vaults_kek_cannot_unwrap(
    backend: tuple[str, MakeVault, dict[str, str]], vault_dir: Path
) -> None:
    _, make, spec = backend
    wrapped = make(vault_dir).ensure(NOW).wrap_cek(drm.generate_content_key(), H1)
    with tempfile.TemporaryDirectory() as other:
        if spec["kind"] == "file":
            stranger: KeyVault = FileKeyVault(Path(other) / "keys").ensure(NOW)
        else:  # the same token, another KEK
            stranger = softhsm().vault(Path(other) / "keys", kek_label=f"edgemart-kek-{uuid.uuid4().hex}")
            stranger.ensure(NOW)
        with pytest.raises(drm.IntegrityError):
            stranger.unwrap_cek(wrapped, H1)


# ----------------------------------------------------------------------------- shared storage


def test_two_vault_objects_on_the_same_storage_agree(make: MakeVault, vault_dir: Path) -> None:
    a = make(vault_dir).ensure(NOW)
    b = make(vault_dir)  # no ensure: a second worker just reads
    assert b.issuer().kid == a.issuer().kid and b.authority().cert == a.authority().cert
    pq_a, pq_b = a.issuer().pq_key, b.issuer().pq_key
    assert pq_a is not None and pq_b is not None
    assert pq_a.public_key().public_bytes_raw() == pq_b.public_key().public_bytes_raw()
    cek = drm.generate_content_key()
    assert b.unwrap_cek(a.wrap_cek(cek, H1), H1) == cek
    assert a.unwrap_cek(b.wrap_cek(cek, H2), H2) == cek


SECOND_PROCESS = """
import json, sys
spec = json.loads(sys.argv[1])
if spec["kind"] == "file":
    from store.keyvault import FileKeyVault
    vault = FileKeyVault(spec["dir"])
else:
    from store.keyvault_pkcs11 import Pkcs11KeyVault
    vault = Pkcs11KeyVault(spec["dir"], module=spec["module"], token_label=spec["token"], pin=spec["pin"],
                           kek_label=spec["kek"])
cek = vault.unwrap_cek(bytes.fromhex(spec["wrapped"]), spec["hash"])
print(json.dumps({"cek": cek.hex(), "kid": vault.issuer().kid, "rewrapped": vault.wrap_cek(cek, spec["hash"]).hex()}))
"""


def test_a_key_wrapped_in_one_process_unwraps_in_another(
    backend: tuple[str, MakeVault, dict[str, str]], vault_dir: Path
) -> None:
    _, make, spec = backend
    vault = make(vault_dir).ensure(NOW)
    cek = drm.generate_content_key()
    args = {**spec, "dir": str(vault_dir), "wrapped": vault.wrap_cek(cek, H1).hex(), "hash": H1}
    out = subprocess.run(
        [sys.executable, "-c", SECOND_PROCESS, json.dumps(args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    seen = json.loads(out.stdout)
    assert seen["cek"] == cek.hex() and seen["kid"] == vault.issuer().kid
    assert vault.unwrap_cek(bytes.fromhex(seen["rewrapped"]), H1) == cek
