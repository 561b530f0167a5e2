"""store.keyvault_pkcs11 on a real SoftHSM2 token: what an attacker with the disk (or the PIN) cannot get,
clear configuration errors, fork and thread safety, and the store running on it end to end."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from _softhsm_fixture import SoftHsm, softhsm
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from pkcs11 import Attribute, KeyType, ObjectClass

import drm
from store import keyvault_pkcs11
from store.keyvault import FileKeyVault
from store.keyvault_pkcs11 import CEK_WRAPPED_LEN, KEK_LABEL, Pkcs11KeyVault

NOW = 1_760_000_000
H1 = "sha256:" + "11" * 32
REPO = Path(__file__).resolve().parents[2]
SEALED = ("root.key.enc", "issuer.key.enc", "issuer-pq.key.enc")


@pytest.fixture(scope="session")
def hsm() -> SoftHsm:
    return softhsm()


@pytest.fixture()
def tmp() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="edgemart-p11-") as d:
        yield Path(d)


@pytest.fixture()
def vault(hsm: SoftHsm, tmp: Path) -> Pkcs11KeyVault:
    return hsm.vault(tmp / "keys").ensure(NOW)  # the default KEK label, as the store uses it


def kek_objects(session: Any, label: str = KEK_LABEL) -> list[pkcs11.SecretKey]:
    return list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label}))


# ----------------------------------------------------------------------------- the KEK stays in the token


def test_the_kek_cannot_be_read_or_exported(hsm: SoftHsm, vault: Pkcs11KeyVault) -> None:
    with hsm.session() as session:
        (kek,) = kek_objects(session)
        assert kek.key_type == KeyType.AES and kek[Attribute.VALUE_LEN] == 32
        assert kek[Attribute.TOKEN] and kek[Attribute.PRIVATE]
        assert kek[Attribute.SENSITIVE] and kek[Attribute.ALWAYS_SENSITIVE]
        assert not kek[Attribute.EXTRACTABLE] and kek[Attribute.NEVER_EXTRACTABLE]
        assert not kek[Attribute.WRAP] and not kek[Attribute.UNWRAP]
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            kek[Attribute.VALUE]  # noqa: B018 -- reading CKA_VALUE is the attack
        wrapper = session.generate_key(KeyType.AES, 256, store=False)
        with pytest.raises(pkcs11.exceptions.KeyUnextractable):
            wrapper.wrap_key(kek)
        with pytest.raises(pkcs11.exceptions.PKCS11Error):
            kek[Attribute.EXTRACTABLE] = True
        with pytest.raises(pkcs11.exceptions.PKCS11Error):
            kek.copy({Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: False})
        assert len(kek_objects(session)) == 1  # no copy appeared
    assert not (vault.directory / "kek.key").exists()


def test_a_weak_pre_provisioned_kek_is_refused(hsm: SoftHsm, tmp: Path) -> None:
    label = f"weak-kek-{uuid.uuid4().hex[:8]}"
    with hsm.session() as session:
        session.generate_key(
            KeyType.AES,
            256,
            label=label,
            id=os.urandom(16),
            store=True,
            template={Attribute.EXTRACTABLE: True},
        )
    with pytest.raises(drm.UsageError, match="sensitive and non-extractable"):
        hsm.vault(tmp / "keys", kek_label=label).ensure(NOW)


# ----------------------------------------------------------------------------- the key files are sealed


def test_private_key_files_on_disk_are_sealed(vault: Pkcs11KeyVault) -> None:
    d = vault.directory
    names = {p.name for p in d.iterdir() if not p.name.startswith(".")}
    assert names == {"root.crt", "issuer.crt", *SEALED}
    assert not {"root.key", "issuer.key", "issuer-pq.key", "kek.key"} & names
    secrets = [
        vault.authority().key.private_bytes_raw(),
        vault.issuer().key.private_bytes_raw(),
        vault.issuer().pq_key.private_bytes_raw(),  # type: ignore[union-attr]
    ]
    for name in SEALED:
        data = (d / name).read_bytes()
        assert data.startswith(b"EMKS\x01") and b"PRIVATE KEY" not in data
        with pytest.raises(ValueError):
            load_pem_private_key(data, password=None)
        assert not any(s in data for s in secrets)
    drm.cert_from_bytes((d / "root.crt").read_bytes())  # certificates stay clear
    assert (d / "root.crt").read_bytes() == vault.root_cert_pem()


def test_a_copy_of_the_directory_with_another_token_cannot_load_the_keys(
    hsm: SoftHsm, vault: Pkcs11KeyVault, tmp: Path
) -> None:
    stolen = tmp / "stolen"
    shutil.copytree(vault.directory, stolen)
    # The other token holds a KEK of its own (a store used it before): the ids differ.
    hsm.vault(tmp / "other-store", token=hsm.other_token).ensure(NOW)
    thief = hsm.vault(stolen, token=hsm.other_token)
    for attempt in (thief.authority, thief.issuer, lambda: thief.ensure(NOW)):
        with pytest.raises(drm.UsageError, match=r"sealed under KEK id .*\(another token\?\)"):
            attempt()
    # A token that never had the KEK: ensure() refuses instead of minting a KEK and re-rooting.
    label = f"edgemart-kek-{uuid.uuid4().hex[:8]}"
    with pytest.raises(drm.UsageError, match="holds no key labelled"):
        hsm.vault(stolen, token=hsm.other_token, kek_label=label).ensure(NOW)
    with hsm.session(hsm.other_token) as session:
        assert kek_objects(session, label) == []
    # The file vault reads nothing from it either.
    with pytest.raises(drm.UsageError, match="issuer.key missing"):
        FileKeyVault(stolen).issuer()
    with pytest.raises(drm.ConflictError):
        FileKeyVault(stolen).ensure(NOW)
    assert sorted(p.name for p in stolen.iterdir()) == sorted(p.name for p in vault.directory.iterdir())


def test_tampered_or_swapped_key_files_are_refused(hsm: SoftHsm, vault: Pkcs11KeyVault) -> None:
    d = vault.directory
    good = {n: (d / n).read_bytes() for n in SEALED}

    def fresh() -> Pkcs11KeyVault:
        return hsm.vault(d)

    flipped = bytearray(good["issuer.key.enc"])
    flipped[-20] ^= 0x01
    (d / "issuer.key.enc").write_bytes(bytes(flipped))
    with pytest.raises(drm.IntegrityError, match="issuer.key.enc fails authentication"):
        fresh().issuer()
    # A sealed root key moved into the issuer's place: same KEK, but the file name is bound.
    (d / "issuer.key.enc").write_bytes(good["root.key.enc"])
    with pytest.raises(drm.IntegrityError):
        fresh().issuer()
    # A forged KEK id in the header.
    forged = bytearray(good["issuer.key.enc"])
    forged[5] ^= 0x01
    (d / "issuer.key.enc").write_bytes(bytes(forged))
    with pytest.raises(drm.UsageError, match="sealed under KEK id"):
        fresh().issuer()
    (d / "issuer.key.enc").write_bytes(b"-----BEGIN PRIVATE KEY-----\n")
    with pytest.raises(drm.UsageError, match="not a sealed key file"):
        fresh().issuer()
    (d / "issuer.key.enc").write_bytes(good["issuer.key.enc"])
    assert fresh().issuer().kid == vault.issuer().kid


def test_a_file_vault_directory_is_not_taken_over(hsm: SoftHsm, tmp: Path) -> None:
    FileKeyVault(tmp / "keys").ensure(NOW)
    with pytest.raises(drm.ConflictError, match="holds a file key vault"):
        hsm.vault(tmp / "keys").ensure(NOW)


def test_a_file_vault_blob_does_not_unwrap_here(vault: Pkcs11KeyVault, tmp: Path) -> None:
    file_vault = FileKeyVault(tmp / "file-keys").ensure(NOW)
    cek = drm.generate_content_key()
    from_file, from_token = file_vault.wrap_cek(cek, H1), vault.wrap_cek(cek, H1)
    assert len(from_token) == len(from_file) == CEK_WRAPPED_LEN and from_token[:5] == b"EMKP\x01"
    with pytest.raises(drm.IntegrityError):
        vault.unwrap_cek(from_file, H1)
    with pytest.raises(drm.IntegrityError):
        file_vault.unwrap_cek(from_token, H1)


# ----------------------------------------------------------------------------- configuration errors


def test_wrong_pin_is_a_usage_error(hsm: SoftHsm, vault: Pkcs11KeyVault, tmp: Path) -> None:
    # In this process the token is already logged in: the vault must not ride on that login.
    with pytest.raises(drm.UsageError, match="PIN incorrect"):
        hsm.vault(vault.directory, pin="0000").authority()
    # A fresh process makes a real C_Login with the wrong PIN.
    code = (
        "import sys\nfrom store.keyvault_pkcs11 import Pkcs11KeyVault\nimport drm\n"
        "try:\n"
        f"    Pkcs11KeyVault({str(tmp / 'new')!r}, module={hsm.module!r}, token_label={hsm.token!r},"
        " pin='0000').ensure(0)\n"
        "except drm.UsageError as exc:\n    print(exc)\n    sys.exit(2)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert out.stdout.strip() == f"PKCS#11 token {hsm.token!r}: PIN incorrect (EDGEMART_PKCS11_PIN)"
    assert "Traceback" not in out.stderr


def test_missing_token_or_module_is_a_usage_error(hsm: SoftHsm, tmp: Path) -> None:
    with pytest.raises(drm.UsageError, match=r"token 'no-such-token' not found .*'edgemart-test'"):
        hsm.vault(tmp / "keys", token="no-such-token").ensure(NOW)
    missing = tmp / "libnothing.so"
    with pytest.raises(drm.UsageError, match="libnothing.so not found"):
        Pkcs11KeyVault(tmp / "keys", module=str(missing), token_label=hsm.token, pin=hsm.pin).ensure(NOW)
    missing.write_bytes(b"not a shared object")
    with pytest.raises(drm.UsageError, match="cannot be loaded"):
        Pkcs11KeyVault(tmp / "keys", module=str(missing), token_label=hsm.token, pin=hsm.pin).ensure(NOW)
    assert [p.name for p in (tmp / "keys").iterdir()] == [".lock"]  # no half-made vault left behind
    assert "pin" not in repr(hsm.vault(tmp / "keys")).lower()


def test_nothing_touches_the_token_before_first_use(hsm: SoftHsm, tmp: Path) -> None:
    Pkcs11KeyVault(tmp / "keys", module="/nonexistent.so", token_label="x", pin="y")  # lazy: no error yet
    assert not (tmp / "keys").exists()


# ----------------------------------------------------------------------------- processes and threads


def test_a_forked_worker_reopens_the_token(hsm: SoftHsm, vault: Pkcs11KeyVault) -> None:
    """gunicorn --preload: the master opened the token, then forks workers that use the same vault object."""
    cek = drm.generate_content_key()
    wrapped = vault.wrap_cek(cek, H1)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child reports through the pipe and never returns into pytest
        status = 1
        try:
            os.close(read_end)
            got = vault.unwrap_cek(wrapped, H1)
            os.write(write_end, got + vault.wrap_cek(got, H1) + vault.issuer().kid.encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert report[:32] == cek
    assert vault.unwrap_cek(report[32 : 32 + CEK_WRAPPED_LEN], H1) == cek
    assert report[32 + CEK_WRAPPED_LEN :].decode() == vault.issuer().kid
    assert vault.unwrap_cek(vault.wrap_cek(cek, H1), H1) == cek  # the parent's session survived the child


def test_threads_share_the_token_safely(hsm: SoftHsm, vault: Pkcs11KeyVault) -> None:
    others = [hsm.vault(vault.directory) for _ in range(3)]
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def work(v: Pkcs11KeyVault) -> None:
        try:
            start.wait()
            for i in range(25):
                cek = os.urandom(32)
                h = f"sha256:{i:064x}"
                assert v.unwrap_cek(v.wrap_cek(cek, h), h) == cek
        except BaseException as exc:  # re-raised by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=([vault, *others][i % 4],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_a_lost_session_is_reopened(hsm: SoftHsm, vault: Pkcs11KeyVault) -> None:
    cek = drm.generate_content_key()
    wrapped = vault.wrap_cek(cek, H1)
    conn = keyvault_pkcs11._connections[(hsm.module, hsm.token)]
    lost = conn.session
    with keyvault_pkcs11._lock:
        lost.close()  # C_Logout + C_CloseSession, as a token reset would
    assert vault.unwrap_cek(wrapped, H1) == cek
    assert keyvault_pkcs11._connections[(hsm.module, hsm.token)].session is not lost


# ----------------------------------------------------------------------------- the store on it


def test_the_store_runs_on_the_pkcs11_vault(hsm: SoftHsm, tmp: Path) -> None:
    from store import create_app

    app = create_app({"DATA_DIR": str(tmp / "data"), "WORKER": "none", **hsm.store_config()})
    ctx = app.extensions["edgemart"]
    try:
        client = app.test_client()
        assert client.get("/healthz").get_json() == {"ok": True}
        assert isinstance(ctx.vault, Pkcs11KeyVault)
        root = client.get("/api/v1/root.crt")
        assert root.status_code == 200 and root.data == ctx.vault.root_cert_pem()
        keys = tmp / "data" / "keys"
        assert {"root.key.enc", "issuer.key.enc", "root.crt"} <= {p.name for p in keys.iterdir()}
        assert not (keys / "kek.key").exists()
        cek = drm.generate_content_key()
        assert ctx.vault.unwrap_cek(ctx.vault.wrap_cek(cek, H1), H1) == cek
    finally:
        ctx.close()
    # A restart (a new app on the same data dir) keeps the same root.
    again = create_app({"DATA_DIR": str(tmp / "data"), "WORKER": "none", **hsm.store_config()})
    try:
        assert again.extensions["edgemart"].vault.root_cert_pem() == root.data
    finally:
        again.extensions["edgemart"].close()


def test_the_store_refuses_a_wrong_pin_at_start(hsm: SoftHsm, tmp: Path) -> None:
    from store import create_app

    with pytest.raises(drm.UsageError, match="PIN incorrect"):
        create_app({"DATA_DIR": str(tmp / "data"), "WORKER": "none", **hsm.store_config(), "PKCS11_PIN": "0"})


# docs/FORMAT.md §13 (PKCS#11 vault) test vector: computed here with `cryptography` from the spec alone,
# then opened by the token; and the token's own output opened by `cryptography` under the same known KEK.
VECTOR_KEK = bytes(range(32))
VECTOR_IV = bytes.fromhex("000102030405060708090a0b")
VECTOR_CEK = bytes.fromhex("11" * 32)
VECTOR_BUILD = "sha256:" + "ab" * 32
VECTOR_WRAPPED = (
    "454d4b5001000102030405060708090a0b"
    "5613c70ad4f4d30a9c50869aa0f8697c92c79625e16a4e6d2976f4940c7811a3"
    "54b372846785f8f0a4b93af05d04cdb3"
)


def _spec_wrap(kek: bytes, iv: bytes, cek: bytes, build_hash: str) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aad = b"EMKP\x01" + b"edgemart-cek-wrap/1\x00" + build_hash.encode("ascii")
    return b"EMKP\x01" + iv + AESGCM(kek).encrypt(iv, cek, aad)


def test_format_vector_for_pkcs11_wrapped_content_keys(hsm: SoftHsm, tmp: Path) -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    wrapped = _spec_wrap(VECTOR_KEK, VECTOR_IV, VECTOR_CEK, VECTOR_BUILD)
    assert wrapped.hex() == VECTOR_WRAPPED, wrapped.hex()  # the vector printed in docs/FORMAT.md
    label = "edgemart-vector-kek"
    with hsm.session() as session:  # provision a KEK of known value (only a test would ever do this)
        for old in session.get_objects({pkcs11.Attribute.LABEL: label}):
            old.destroy()
        session.create_object(
            {
                pkcs11.Attribute.CLASS: pkcs11.ObjectClass.SECRET_KEY,
                pkcs11.Attribute.KEY_TYPE: pkcs11.KeyType.AES,
                pkcs11.Attribute.VALUE: VECTOR_KEK,
                pkcs11.Attribute.LABEL: label,
                pkcs11.Attribute.ID: b"vector-kek-id-16",
                pkcs11.Attribute.TOKEN: True,
                pkcs11.Attribute.PRIVATE: True,
                pkcs11.Attribute.SENSITIVE: True,
                pkcs11.Attribute.EXTRACTABLE: False,
                pkcs11.Attribute.ENCRYPT: True,
                pkcs11.Attribute.DECRYPT: True,
            }
        )
    v = hsm.vault(tmp / "keys", kek_label=label)
    assert v.unwrap_cek(bytes.fromhex(VECTOR_WRAPPED), VECTOR_BUILD) == VECTOR_CEK
    ours = v.wrap_cek(VECTOR_CEK, VECTOR_BUILD)
    iv, body = ours[5:17], ours[17:]
    aad = b"EMKP\x01" + b"edgemart-cek-wrap/1\x00" + VECTOR_BUILD.encode()
    assert ours[:5] == b"EMKP\x01" and AESGCM(VECTOR_KEK).decrypt(iv, body, aad) == VECTOR_CEK
