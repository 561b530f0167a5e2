"""drm.bundle: tar member encoding, member names and order, manifest parsing, the builder signature."""

from __future__ import annotations

import gzip
import io
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import drm
from drm.bundle import (
    GZIP_HEADER,
    BuildEntry,
    BundleInvalid,
    FileEntry,
    Manifest,
    canonical_order,
    check_member_name,
    encode_tar_header,
    iter_archive,
    iter_gzip,
    load_builder_private_key,
    load_builder_public_key,
    make_manifest,
    parse_tar_header,
    sign_manifest,
    verify_manifest_signature,
)
from edge_runtime.bundle import read_bundle

MEMBERS = [("manifest.json", b"{}"), ("builds/" + "a" * 64 + ".emdl", b"x" * 1000), ("NOTICE", b"")]


def test_archive_reads_with_python_tarfile_as_plain_files() -> None:
    data = b"".join(iter_archive(MEMBERS))
    assert len(data) % 512 == 0
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        infos = tf.getmembers()
        assert [i.name for i in infos] == [n for n, _ in MEMBERS]
        for info, (_, payload) in zip(infos, MEMBERS, strict=True):
            assert info.isreg() and info.mode == 0o644 and info.mtime == 0
            assert (info.uid, info.gid, info.uname, info.gname) == (0, 0, "", "")
            assert not info.pax_headers
            assert tf.extractfile(info).read() == payload  # type: ignore[union-attr]


@pytest.mark.skipif(shutil.which("tar") is None, reason="no tar binary")
def test_archive_lists_with_system_tar() -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "b.tar"
        path.write_bytes(b"".join(iter_archive(MEMBERS)))
        out = subprocess.run(["tar", "-tf", str(path)], capture_output=True, text=True, check=True).stdout
        assert out.split() == [n for n, _ in MEMBERS]


def test_gzip_is_fixed_header_and_round_trips() -> None:
    tar = b"".join(iter_archive(MEMBERS))
    gz = b"".join(iter_gzip(iter_archive(MEMBERS)))
    assert gz.startswith(GZIP_HEADER)
    assert gzip.decompress(gz) == tar
    assert gz == b"".join(iter_gzip([tar]))  # chunking does not change the bytes
    assert [m.name for m in read_bundle(gz)] == [n for n, _ in MEMBERS]


def test_header_round_trip_and_checksum() -> None:
    head = encode_tar_header("licenses/lic_1.lic", 12345)
    parsed = parse_tar_header(head, 1)
    assert (parsed.name, parsed.size, parsed.typeflag) == ("licenses/lic_1.lic", 12345, b"0")
    bad = bytearray(head)
    bad[0] ^= 1
    with pytest.raises(drm.FormatError, match="checksum"):
        parse_tar_header(bytes(bad), 1)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("/etc/passwd", "absolute"),
        ("builds/../../etc/passwd", "parent-directory"),
        ("..", "parent-directory"),
        ("builds\\x.emdl", "backslash"),
        ("builds//x", "empty"),
        ("./manifest.json", "'.'"),
        ("etc/passwd", "not allowed"),
        ("builds/abc.emdl", "not allowed"),
        ("chains/.hidden", "not allowed"),
        ("chains/sub/dir", "not allowed"),
        ("manifest.json\n", "control character"),
    ],
)
def test_member_names_refused(name: str, reason: str) -> None:
    with pytest.raises(drm.FormatError, match=reason):
        check_member_name(name)


def test_canonical_order() -> None:
    names = ["NOTICE", "chains/b.yaml", "licenses/z.lic", "mlbom.cdx.json", "builds/" + "0" * 64 + ".emdl"]
    names += ["licenses/a.lic", "manifest.sig", "manifest.json", "chains/a.yaml"]
    assert canonical_order(names) == [
        "manifest.json",
        "manifest.sig",
        "builds/" + "0" * 64 + ".emdl",
        "licenses/a.lic",
        "licenses/z.lic",
        "chains/a.yaml",
        "chains/b.yaml",
        "mlbom.cdx.json",
        "NOTICE",
    ]


def _manifest() -> Manifest:
    h = "sha256:" + "1" * 64
    build = "builds/" + "1" * 64 + ".emdl"
    return make_manifest(
        [FileEntry("NOTICE", 3, h), FileEntry("mlbom.cdx.json", 2, h), FileEntry(build, 9, h)],
        [BuildEntry(build, h, "onnx-fp32")],
        [],
    )


def test_manifest_is_canonical_and_strict() -> None:
    m = _manifest()
    data = m.to_bytes()
    assert Manifest.from_bytes(data) == m
    assert m.member_names()[:3] == ["manifest.json", "manifest.sig", "builds/" + "1" * 64 + ".emdl"]
    with pytest.raises(drm.FormatError, match="canonical form"):
        Manifest.from_bytes(data.replace(b",", b", ", 1))
    swapped = data.replace(b'"path":"NOTICE"', b'"path":"NOTICF"')
    with pytest.raises(drm.FormatError):
        Manifest.from_bytes(swapped)
    with pytest.raises(drm.FormatError, match="version"):
        Manifest.from_bytes(data.replace(b'"v":1', b'"v":2'))


def test_signature_binds_manifest_and_key() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    other = ed25519.Ed25519PrivateKey.generate()
    data = _manifest().to_bytes()
    sig = sign_manifest(data, key)
    assert sign_manifest(data, key) == sig  # deterministic, so bundles reproduce
    check = verify_manifest_signature(data, sig, builder_key=key.public_key())
    assert check.pinned and check.kid == drm.key_id(key.public_key())
    assert not verify_manifest_signature(data, sig).pinned
    with pytest.raises(BundleInvalid, match="not the pinned key"):
        verify_manifest_signature(data, sig, builder_key=other.public_key())
    with pytest.raises(BundleInvalid, match="different manifest"):
        verify_manifest_signature(data.replace(b"onnx-fp32", b"onnx-fp33"), sig)
    forged = sig.replace(sig[sig.index(b'"sig":"') + 8 : sig.index(b'"sig":"') + 9], b"A")
    if forged != sig:
        with pytest.raises(BundleInvalid):
            verify_manifest_signature(data, forged)
    with pytest.raises(BundleInvalid, match="malformed"):
        verify_manifest_signature(data, b"not json")


def test_builder_key_pem_round_trip() -> None:
    from drm.bundle import generate_builder_key

    private_pem, public_pem = generate_builder_key()
    key = load_builder_private_key(private_pem)
    assert load_builder_public_key(public_pem).public_bytes_raw() == key.public_key().public_bytes_raw()
    assert load_builder_public_key(private_pem).public_bytes_raw() == key.public_key().public_bytes_raw()
    with pytest.raises(drm.UsageError):
        load_builder_private_key(public_pem)
    with pytest.raises(drm.UsageError):
        load_builder_public_key(b"garbage")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_reader_fuzz_random_bytes_only_edgemart_errors(blob: bytes) -> None:
    try:
        read_bundle(blob)
    except drm.EdgemartError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=3 * 512 + 1000 - 1), st.integers(min_value=1, max_value=255))
def test_reader_fuzz_flipped_archive_bytes(position: int, xor: int) -> None:
    data = bytearray(b"".join(iter_archive(MEMBERS)))
    position %= len(data)
    data[position] ^= xor
    try:
        members = read_bundle(bytes(data))
    except drm.EdgemartError:
        return
    # A flip the reader cannot see must be inside member data, which the manifest hashes catch.
    assert [m.name for m in members] == [n for n, _ in MEMBERS]
    assert [m.data for m in members] != [d for _, d in MEMBERS]


def test_fleet_keygen_writes_a_private_x25519_key_a_device_accepts(tmp_path, capsys) -> None:
    import json
    import stat

    from edge_runtime.device import Device
    from edgemart.cli import main

    out = tmp_path / "keys" / "fleet.pem"
    assert main(["bundle", "fleet-keygen", "--out", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert (tmp_path / "keys" / "fleet.pub.pem").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    device = Device.init(tmp_path / "dev")
    assert device.add_fleet_key(out.read_bytes())["fleet_key_id"] == doc["fleet_key_id"]
    assert main(["bundle", "fleet-keygen", "--out", str(out)]) == 2  # never overwrites a key
