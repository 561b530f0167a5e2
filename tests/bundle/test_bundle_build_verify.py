"""`edgemart bundle build` / `verify` on two real corpus models: contents, reproducibility, tamper cases."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
from _bundle_fixtures import (
    NOW,
    Model,
    Pki,
    build_args,
    device_license,
    keys_cert_pem,
    lay_out_inputs,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import drm
from drm.bundle import Manifest, iter_archive, load_builder_private_key, sign_manifest
from edge_runtime.bundle import Member, read_bundle, verify_bundle
from edgemart.cli import main


@pytest.fixture(scope="module")
def device_keys() -> drm.DeviceKeys:
    return drm.DeviceKeys.generate()


@pytest.fixture(scope="module")
def built(
    tmp_path_factory: pytest.TempPathFactory,
    pki: Pki,
    models: dict[str, Model],
    builder_key: tuple[Path, Path],
    device_keys: drm.DeviceKeys,
) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("built")
    cert = keys_cert_pem(device_keys)
    licenses = [device_license(pki, m, cert) for m in models.values()]
    dirs = lay_out_inputs(d / "in", models, licenses)
    (d / "root.crt").write_bytes(pki.root_pem)
    assert main(build_args(dirs, d / "bundle.tar", builder_key[0])) == 0
    assert main(build_args(dirs, d / "bundle.tar.gz", builder_key[0])) == 0
    return {**dirs, "tar": d / "bundle.tar", "gz": d / "bundle.tar.gz", "root": d / "root.crt", "dir": d}


def verify_cli(path: Path, *extra: str) -> int:
    return main(["bundle", "verify", str(path), "--now", str(NOW + 60), *extra])


def test_bundle_contents(built: dict[str, Path], models: dict[str, Model]) -> None:
    with tarfile.open(built["tar"]) as tf:
        names = tf.getnames()
        manifest = json.loads(tf.extractfile("manifest.json").read())  # type: ignore[union-attr]
        bom = json.loads(tf.extractfile("mlbom.cdx.json").read())  # type: ignore[union-attr]
        notice = tf.extractfile("NOTICE").read().decode()  # type: ignore[union-attr]
        infos = tf.getmembers()
    assert names[:2] == ["manifest.json", "manifest.sig"]
    assert names[-2:] == ["mlbom.cdx.json", "NOTICE"]
    assert "chains/pipeline.yaml" in names
    assert all(i.mtime == 0 and i.mode == 0o644 and i.uid == 0 and i.uname == "" for i in infos)
    assert {b["build_hash"] for b in manifest["builds"]} == {m.build_hash for m in models.values()}
    assert manifest["format"] == "edgemart-bundle" and manifest["v"] == 1
    for lic in manifest["licenses"]:
        assert lic["kind"] == "production" and lic["binding"]["kind"] == "device"
        assert lic["validity"]["not_after"] is None and lic["max_runs"] is None
    listed = {f["path"]: f for f in manifest["files"]}
    assert set(listed) == set(names[2:])
    assert bom["bomFormat"] == "CycloneDX"
    components = {c["name"]: c for c in bom["components"]}
    assert set(components) == {"digits-mlp", "face-detect"}
    assert components["digits-mlp"]["licenses"] == [{"expression": "CC-BY-4.0"}]
    assert components["face-detect"]["pedigree"]["ancestors"][0]["name"] == "google/mediapipe-blazeface"
    assert "CC-BY-4.0" in notice and "Apache-2.0" in notice and "google/mediapipe-blazeface" in notice


def test_verify_ok_text_and_json(built: dict[str, Path], builder_key: tuple[Path, Path], capsys) -> None:  # type: ignore[no-untyped-def]
    for path in (built["tar"], built["gz"]):
        assert verify_cli(path, "--root", str(built["root"]), "--builder-key", str(builder_key[1])) == 0
        assert "OK" in capsys.readouterr().out
        assert verify_cli(path, "--json") == 0
        report = json.loads(capsys.readouterr().out)
        assert report["ok"] and not report["builder"]["pinned"] and not report["licenses_trusted"]
        assert len(report["builds"]) == 2 and len(report["licenses"]) == 2


def test_reproducible_twice_and_from_other_directory_order(
    built: dict[str, Path], models: dict[str, Model], builder_key: tuple[Path, Path], tmp_path: Path
) -> None:
    for name in ("tar", "gz"):
        again = tmp_path / f"again-{built[name].name}"
        args = build_args(built, again, builder_key[0])
        assert main(args) == 0
        assert (
            hashlib.sha256(again.read_bytes()).digest() == hashlib.sha256(built[name].read_bytes()).digest()
        )
    # Same inputs under other file names, created in reverse order, with other mtimes and modes.
    other = {k: tmp_path / "elsewhere" / f"x-{k}" for k in ("licenses", "builds", "chains", "cards")}
    for key, target in other.items():
        target.mkdir(parents=True)
        files = sorted(built[key].iterdir(), reverse=True)
        for i, src in enumerate(files):
            dst = target / f"{len(files) - i:02d}-{src.name}"
            shutil.copyfile(src, dst)
            os.utime(dst, (1_000_000 + i, 1_000_000 + i))
            os.chmod(dst, 0o600)
    # Cards must keep their <listing>.md names; chain files keep theirs (they become member names).
    for src in built["cards"].iterdir():
        shutil.copyfile(src, other["cards"] / src.name)
    for f in other["chains"].iterdir():
        f.unlink()
    shutil.copyfile(built["chains"] / "pipeline.yaml", other["chains"] / "pipeline.yaml")
    moved = tmp_path / "moved.tar"
    assert main(build_args(other, moved, builder_key[0])) == 0
    assert moved.read_bytes() == built["tar"].read_bytes()


def _members(path: Path) -> list[Member]:
    return read_bundle(path.read_bytes())


def _write(path: Path, members: list[Member]) -> Path:
    path.write_bytes(b"".join(iter_archive((m.name, m.data) for m in members)))
    return path


def _expect_refusal(path: Path, reason: str, capsys, *extra: str) -> None:  # type: ignore[no-untyped-def]
    capsys.readouterr()
    assert verify_cli(path, *extra) == 1
    err = capsys.readouterr().err
    assert reason in err, err


def _flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x01
    return bytes(out)


def test_flipped_bytes_in_each_part_fail_with_reason(built: dict[str, Path], tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    members = _members(built["tar"])
    by_name = {m.name: i for i, m in enumerate(members)}
    build = next(m.name for m in members if m.name.startswith("builds/"))
    lic = next(m.name for m in members if m.name.startswith("licenses/"))
    for name, reason in ((build, f"{build}: sha256 does not match"), (lic, f"{lic}: sha256 does not match")):
        changed = list(members)
        i = by_name[name]
        changed[i] = Member(name, _flip(members[i].data, len(members[i].data) // 2))
        _expect_refusal(_write(tmp_path / "t.tar", changed), reason, capsys)
    # A manifest edit that keeps it well-formed: the signature no longer covers it.
    manifest = members[0].data
    at = manifest.index(b'"sha256":"sha256:') + 20
    edited = manifest[:at] + (b"0" if manifest[at : at + 1] != b"0" else b"1") + manifest[at + 1 :]
    _expect_refusal(
        _write(tmp_path / "m.tar", [Member("manifest.json", edited), *members[1:]]),
        "different manifest",
        capsys,
    )
    # A manifest edit that breaks it.
    _expect_refusal(
        _write(tmp_path / "m2.tar", [Member("manifest.json", manifest[:-1]), *members[1:]]),
        "manifest.json is invalid",
        capsys,
    )
    # The signature itself.
    sig = members[1].data
    at = sig.index(b'"sig":"') + 20
    forged = sig[:at] + (b"A" if sig[at : at + 1] != b"A" else b"B") + sig[at + 1 :]
    _expect_refusal(
        _write(tmp_path / "s.tar", [members[0], Member("manifest.sig", forged), *members[2:]]),
        "signature does not verify",
        capsys,
    )
    # Raw archive flips: a member header and the data of a member.
    raw = built["tar"].read_bytes()
    sig_header = 512 + -(-len(members[0].data) // 512) * 512
    build_data = sig_header + 512 + -(-len(members[1].data) // 512) * 512 + 512
    assert raw[sig_header : sig_header + 12] == b"manifest.sig"
    _expect_refusal(_write_raw(tmp_path / "h.tar", _flip(raw, sig_header + 10)), "checksum mismatch", capsys)
    _expect_refusal(
        _write_raw(tmp_path / "d.tar", _flip(raw, build_data + 1000)), "sha256 does not match", capsys
    )


def _write_raw(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_truncated_reordered_extra_missing(built: dict[str, Path], tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    raw = built["tar"].read_bytes()
    for cut in (len(raw) - 1024, len(raw) // 2, 600):
        _expect_refusal(_write_raw(tmp_path / "cut.tar", raw[:cut]), "truncated", capsys)
    gz = built["gz"].read_bytes()
    _expect_refusal(_write_raw(tmp_path / "cut.tar.gz", gz[: len(gz) // 2]), "truncated", capsys)

    members = _members(built["tar"])
    swapped = [members[0], members[1], members[3], members[2], *members[4:]]
    _expect_refusal(_write(tmp_path / "r.tar", swapped), "(members reordered)", capsys)
    _expect_refusal(
        _write(tmp_path / "r2.tar", [members[1], members[0], *members[2:]]),
        "first member is 'manifest.sig'",
        capsys,
    )

    extra = [*members[:-1], Member("chains/extra.yaml", b"stages: []\n"), members[-1]]
    _expect_refusal(_write(tmp_path / "e.tar", extra), "extra file 'chains/extra.yaml'", capsys)
    _expect_refusal(_write(tmp_path / "x.tar", members[:-1]), "missing file 'NOTICE'", capsys)
    chain = next(i for i, m in enumerate(members) if m.name.startswith("chains/"))
    grown = list(members)
    grown[chain] = Member(members[chain].name, members[chain].data + b"# more\n")
    _expect_refusal(_write(tmp_path / "g.tar", grown), "does not match the manifest", capsys)


def test_json_failure_prints_one_object(built: dict[str, Path], tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    members = _members(built["tar"])
    _write(tmp_path / "x.tar", members[:-1])
    capsys.readouterr()
    assert verify_cli(tmp_path / "x.tar", "--json") == 1
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert report["ok"] is False and "missing file 'NOTICE'" in report["reason"]
    assert "missing file 'NOTICE'" in out.err


def test_pinned_keys_and_roots(
    built: dict[str, Path],
    other_pki: Pki,
    tmp_path: Path,
    capsys,
    builder_key: tuple[Path, Path],  # type: ignore[no-untyped-def]
) -> None:
    other_builder = tmp_path / "other.pem"
    assert main(["bundle", "keygen", "--out", str(other_builder)]) == 0
    assert (tmp_path / "other.pub.pem").is_file()
    assert oct(other_builder.stat().st_mode & 0o777) == "0o600"
    _expect_refusal(
        built["tar"], "not the pinned key", capsys, "--builder-key", str(tmp_path / "other.pub.pem")
    )
    (tmp_path / "other-root.crt").write_bytes(other_pki.root_pem)
    _expect_refusal(
        built["tar"], "does not verify against the root", capsys, "--root", str(tmp_path / "other-root.crt")
    )

    # An attacker who rewrites and re-signs everything passes only without a pinned builder key.
    members = _members(built["tar"])
    attacker = load_builder_private_key(other_builder.read_bytes())
    resigned = [members[0], Member("manifest.sig", sign_manifest(members[0].data, attacker)), *members[2:]]
    _write(tmp_path / "resigned.tar", resigned)
    assert verify_cli(tmp_path / "resigned.tar") == 0
    _expect_refusal(
        tmp_path / "resigned.tar", "not the pinned key", capsys, "--builder-key", str(builder_key[1])
    )


def test_license_validity_and_pairing(
    pki: Pki,
    models: dict[str, Model],
    builder_key: tuple[Path, Path],
    tmp_path: Path,
    capsys,  # type: ignore[no-untyped-def]
) -> None:
    cert = keys_cert_pem(drm.DeviceKeys.generate())
    digits, face = models["digits-mlp"], models["face-detect"]
    short = [device_license(pki, digits, cert, days=1), device_license(pki, face, cert, days=1)]
    dirs = lay_out_inputs(tmp_path / "in", models, short)
    out = tmp_path / "short.tar"
    assert main(build_args(dirs, out, builder_key[0])) == 0
    assert verify_cli(out) == 0
    capsys.readouterr()
    assert main(["bundle", "verify", str(out), "--now", str(NOW + 2 * 86400)]) == 1
    assert "license expired" in capsys.readouterr().err

    # Build refuses inputs that do not pair up (exit 2, the reason on stderr).
    (dirs["licenses"] / "seat-1.lic").unlink()
    assert main(build_args(dirs, tmp_path / "bad.tar", builder_key[0])) == 2
    assert "has no license" in capsys.readouterr().err
    (dirs["builds"] / "model-1.emdl").unlink()
    (dirs["licenses"] / "seat-1.lic").write_bytes(short[1])
    assert main(build_args(dirs, tmp_path / "bad.tar", builder_key[0])) == 2
    assert "not in --builds" in capsys.readouterr().err

    # A bundle assembled by hand whose license names a build it does not carry is refused on verify.
    members = _members(out)
    manifest = Manifest.from_bytes(members[0].data)
    face_path = f"builds/{face.build_hash[7:]}.emdl"
    kept = [f for f in manifest.files if f.path != face_path]
    hand = Manifest(tuple(kept), tuple(b for b in manifest.builds if b.path != face_path), manifest.licenses)
    key = load_builder_private_key(builder_key[0].read_bytes())
    body = hand.to_bytes()
    rest = [m for m in members[2:] if m.name != face_path]
    _write(
        tmp_path / "hand.tar",
        [Member("manifest.json", body), Member("manifest.sig", sign_manifest(body, key)), *rest],
    )
    _expect_refusal(tmp_path / "hand.tar", "is not in the bundle", capsys)


def test_verify_api_reports(built: dict[str, Path], pki: Pki) -> None:
    with built["gz"].open("rb") as fh:
        verified = verify_bundle(fh, now=NOW + 60, root=pki.authority.cert)
    assert verified.gzipped and verified.licenses_trusted
    assert {c.kind for c in verified.claims.values()} == {"production"}
    assert verified.report()["ok"] is True


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_single_byte_flip_is_detected(built: dict[str, Path], data: st.DataObject) -> None:
    raw = built["tar"].read_bytes()
    position = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
    xor = data.draw(st.integers(min_value=1, max_value=255))
    flipped = bytearray(raw)
    flipped[position] ^= xor
    with pytest.raises(drm.EdgemartError):
        verify_bundle(bytes(flipped), now=NOW + 60)
