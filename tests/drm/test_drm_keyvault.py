"""store.keyvault.FileKeyVault: permissions, persistence, content-key wrapping bound to the build,
refusal of inconsistent vaults. The KeyVault conformance checks run against every backend listed."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from drm_testkit import NOW

import drm
from store.keyvault import FileKeyVault, KeyVault

H1 = "sha256:" + "11" * 32
H2 = "sha256:" + "22" * 32


@pytest.fixture()
def vault_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp) / "keys"


@pytest.fixture(params=["file"])
def vault(request: pytest.FixtureRequest, vault_dir: Path) -> KeyVault:
    return FileKeyVault(vault_dir).ensure(NOW)


# ----------------------------------------------------------------------------- conformance (any backend)


def test_conformance_protocol_and_chain(vault: KeyVault) -> None:
    assert isinstance(vault, KeyVault)
    authority, issuer = vault.authority(), vault.issuer()
    drm.verify_cert(issuer.cert, authority.cert, now=NOW, purpose=drm.EKU_LICENSE_ISSUER)
    assert issuer.pq_key is not None  # licenses get the ML-DSA-65 co-signature


def test_conformance_wrap_binds_the_build_hash(vault: KeyVault) -> None:
    cek = drm.generate_content_key()
    wrapped = vault.wrap_cek(cek, H1)
    assert cek not in wrapped
    assert vault.unwrap_cek(wrapped, H1) == cek
    assert vault.wrap_cek(cek, H1) != wrapped  # fresh nonce each time
    with pytest.raises(drm.IntegrityError):
        vault.unwrap_cek(wrapped, H2)
    for i in range(len(wrapped)):
        flipped = bytearray(wrapped)
        flipped[i] ^= 0x01
        with pytest.raises(drm.IntegrityError):
            vault.unwrap_cek(bytes(flipped), H1)
    for bad in (b"", wrapped[:-1], wrapped + b"\x00"):
        with pytest.raises(drm.IntegrityError):
            vault.unwrap_cek(bad, H1)


def test_conformance_ensure_is_idempotent(vault: KeyVault) -> None:
    kid = vault.issuer().kid
    root = vault.authority().cert
    cek = drm.generate_content_key()
    wrapped = vault.wrap_cek(cek, H1)
    vault.ensure(NOW + 10)
    assert vault.issuer().kid == kid and vault.authority().cert == root
    assert vault.unwrap_cek(wrapped, H1) == cek


# ----------------------------------------------------------------------------- file backend


def test_files_are_private_and_complete(vault_dir: Path) -> None:
    FileKeyVault(vault_dir).ensure(NOW)
    assert stat.S_IMODE(vault_dir.stat().st_mode) == 0o700
    names = {p.name for p in vault_dir.iterdir() if not p.name.startswith(".")}
    assert names == {"root.key", "root.crt", "issuer.key", "issuer.crt", "issuer-pq.key", "kek.key"}
    for p in vault_dir.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert len((vault_dir / "kek.key").read_bytes()) == 32
    assert not [p for p in vault_dir.iterdir() if p.name.endswith(".tmp")]


def test_a_second_instance_reads_the_same_keys(vault_dir: Path) -> None:
    a = FileKeyVault(vault_dir).ensure(NOW)
    b = FileKeyVault(vault_dir)
    assert b.issuer().kid == a.issuer().kid
    assert (
        b.issuer().pq_key.public_key().public_bytes_raw() == a.issuer().pq_key.public_key().public_bytes_raw()
    )  # type: ignore[union-attr]
    cek = drm.generate_content_key()
    assert b.unwrap_cek(a.wrap_cek(cek, H1), H1) == cek


def test_another_vaults_kek_cannot_unwrap(vault_dir: Path) -> None:
    a = FileKeyVault(vault_dir).ensure(NOW)
    with tempfile.TemporaryDirectory() as other:
        b = FileKeyVault(other).ensure(NOW)
        with pytest.raises(drm.IntegrityError):
            b.unwrap_cek(a.wrap_cek(drm.generate_content_key(), H1), H1)


def test_a_missing_root_with_issuer_present_is_refused_not_rerooted(vault_dir: Path) -> None:
    FileKeyVault(vault_dir).ensure(NOW)
    (vault_dir / "root.key").unlink()
    with pytest.raises(drm.ConflictError):
        FileKeyVault(vault_dir).ensure(NOW)
    (vault_dir / "root.crt").unlink()
    with pytest.raises(drm.ConflictError):
        FileKeyVault(vault_dir).ensure(NOW)


def test_mismatched_key_files_are_refused(vault_dir: Path) -> None:
    FileKeyVault(vault_dir).ensure(NOW)
    with tempfile.TemporaryDirectory() as other:
        FileKeyVault(other).ensure(NOW)
        (vault_dir / "issuer-pq.key").write_bytes((Path(other) / "issuer-pq.key").read_bytes())
        with pytest.raises(drm.UsageError, match="ML-DSA"):
            FileKeyVault(vault_dir).issuer()
        (vault_dir / "issuer.key").write_bytes((Path(other) / "issuer.key").read_bytes())
        with pytest.raises(drm.UsageError, match="does not match"):
            FileKeyVault(vault_dir).issuer()


def test_an_issuer_near_expiry_is_renewed_by_ensure(vault_dir: Path) -> None:
    v = FileKeyVault(vault_dir).ensure(NOW)
    old = v.issuer().kid
    later = int(v.issuer().cert.not_valid_after_utc.timestamp()) - 86400
    assert v.ensure(later).issuer().kid != old


def test_missing_vault_gives_a_clear_usage_error(vault_dir: Path) -> None:
    with pytest.raises(drm.UsageError, match="keygen"):
        FileKeyVault(vault_dir).issuer()


def test_keyvault_import_does_not_pull_in_flask() -> None:
    code = "import sys, store.keyvault; assert 'flask' not in sys.modules and 'sqlalchemy' not in sys.modules"
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2], env={**os.environ}
    )
