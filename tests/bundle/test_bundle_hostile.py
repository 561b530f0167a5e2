"""Hostile archives: the reader refuses each with a precise reason before anything is trusted or written."""

from __future__ import annotations

import io
import tarfile
import zlib
from pathlib import Path

import pytest

import drm
from drm.bundle import BLOCK, TAR_END, BundleInvalid, BundleLimits, encode_tar_header, iter_archive, iter_gzip
from edge_runtime.bundle import read_bundle
from edgemart.cli import main

BUILD = "builds/" + "ab" * 32 + ".emdl"


def raw_header(name: str, size: int, *, typeflag: bytes = b"0", linkname: str = "", mtime: int = 0) -> bytes:
    """A ustar header with arbitrary fields and a correct checksum (what an attacker can write)."""
    head = bytearray(encode_tar_header("NOTICE", 0))
    head[0:100] = name.encode().ljust(100, b"\0")[:100]
    head[124:136] = format(size, "011o").encode() + b"\0"
    head[136:148] = format(mtime, "011o").encode() + b"\0"
    head[156:157] = typeflag
    head[157:257] = linkname.encode().ljust(100, b"\0")
    head[148:156] = b" " * 8
    head[148:156] = format(sum(head), "06o").encode() + b"\0 "
    return bytes(head)


def member(name: str, data: bytes, **kw: object) -> bytes:
    return raw_header(name, len(data), **kw) + data + b"\0" * (-len(data) % BLOCK)  # type: ignore[arg-type]


def tarfile_archive(*infos: tuple[tarfile.TarInfo, bytes | None], fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for info, data in infos:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def info(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, linkname: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.size, ti.linkname, ti.mode = kind, size, linkname, 0o644
    return ti


def refused(blob: bytes, match: str, limits: BundleLimits | None = None) -> None:
    with pytest.raises(BundleInvalid, match=match):
        read_bundle(blob, limits) if limits else read_bundle(blob)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("../../etc/passwd", "parent-directory"),
        ("builds/../../../tmp/x", "parent-directory"),
        ("/etc/passwd", "absolute"),
        ("etc/cron.d/evil", "not allowed"),
        ("builds/evil.sh", "not allowed"),
    ],
)
def test_path_traversal_and_unknown_names(name: str, reason: str) -> None:
    refused(member(name, b"pwned") + TAR_END, reason)


def test_path_traversal_from_tarfile() -> None:
    refused(tarfile_archive((info("../evil", size=3), b"abc")), "parent-directory")


@pytest.mark.parametrize(
    ("kind", "linkname", "what"),
    [
        (tarfile.SYMTYPE, "/etc/passwd", "symbolic link -> /etc/passwd"),
        (tarfile.LNKTYPE, "manifest.json", "hard link -> manifest.json"),
        (tarfile.CHRTYPE, "", "character device"),
        (tarfile.BLKTYPE, "", "block device"),
        (tarfile.FIFOTYPE, "", "fifo"),
        (tarfile.DIRTYPE, "", "directory"),
    ],
)
def test_links_devices_fifos_directories(kind: bytes, linkname: str, what: str) -> None:
    blob = tarfile_archive((info(BUILD, kind, linkname=linkname), None))
    refused(blob, f"is a {what}")


def test_pax_headers_refused() -> None:
    ti = info("NOTICE", size=1)
    ti.pax_headers = {"path": "../../etc/passwd"}
    refused(tarfile_archive((ti, b"x"), fmt=tarfile.PAX_FORMAT), "pax extended header")


def test_gnu_format_is_not_a_bundle() -> None:
    blob = tarfile_archive((info("NOTICE", size=1), b"x"), fmt=tarfile.GNU_FORMAT)
    with pytest.raises(drm.UsageError, match="no POSIX tar header"):
        read_bundle(blob)


def test_huge_declared_size_refused_before_reading() -> None:
    # Declares 8 GiB but carries nothing: refused on the header, without allocating or waiting for data.
    refused(raw_header("manifest.json", 8 * 1024**3 - 1), "declares 8589934591 bytes")
    limits = BundleLimits(max_member_bytes=1000, max_total_bytes=1500)
    refused(member("manifest.json", b"a" * 900) + member("NOTICE", b"b" * 900) + TAR_END, "in total", limits)


def test_member_count_limit() -> None:
    names = ["manifest.json", "manifest.sig", "NOTICE", "mlbom.cdx.json"]
    blob = b"".join(member(n, b"") for n in names) + TAR_END
    refused(blob, "more than 3 members", BundleLimits(max_members=3))


def test_gzip_bomb_stops_at_the_cap() -> None:
    # A few hundred KB of gzip that would inflate to 200 MB of zeros after the end marker.
    limits = BundleLimits(max_members=4, max_total_bytes=64 * 1024)
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [deflate.compress(member("NOTICE", b"hi") + TAR_END)]
    zeros = bytes(1024 * 1024)
    for _ in range(200):
        parts.append(deflate.compress(zeros))
    parts.append(deflate.flush())
    bomb = b"".join(parts)
    assert len(bomb) < 400 * 1024
    with pytest.raises(BundleInvalid, match="gzip bomb"):
        read_bundle(bomb, limits)


def test_gzip_with_name_or_mtime_refused() -> None:
    import gzip

    tar = member("NOTICE", b"hi") + TAR_END
    refused(gzip.compress(tar, mtime=12345), "mtime")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="bundle.tar", mode="wb", fileobj=buf, mtime=0) as fh:
        fh.write(tar)
    refused(buf.getvalue(), "flags")


def test_gzip_truncated_or_trailing_data() -> None:
    gz = b"".join(iter_gzip(iter_archive([("NOTICE", b"hello")])))
    refused(gz[:-4], "truncated")
    refused(gz + b"junk", "after the end of the gzip stream")
    bad = bytearray(gz)
    bad[len(gz) // 2] ^= 0xFF
    with pytest.raises(BundleInvalid, match="gzip"):
        read_bundle(bytes(bad))


def test_duplicate_member() -> None:
    refused(member("NOTICE", b"a") + member("NOTICE", b"b") + TAR_END, "duplicate member 'NOTICE'")


def test_non_canonical_header_fields() -> None:
    refused(member("NOTICE", b"a", mtime=1700000000) + TAR_END, "not canonical")


def test_truncation_and_trailing_garbage() -> None:
    good = member("NOTICE", b"abc") + TAR_END
    assert [m.name for m in read_bundle(good)] == ["NOTICE"]
    assert read_bundle(good + bytes(BLOCK * 18))[0].data == b"abc"  # record padding of zeros is fine
    refused(good[:700], "truncated")
    refused(good[: BLOCK + 2], "truncated")
    refused(good[: 2 * BLOCK], "truncated")
    refused(good + b"\x01", "after the end-of-archive marker")
    padded = bytearray(good)
    padded[BLOCK + 10] = 1
    refused(bytes(padded), "non-zero padding")


def test_cli_refuses_hostile_archive_with_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.tar"
    path.write_bytes(tarfile_archive((info(BUILD, tarfile.SYMTYPE, linkname="/etc/shadow"), None)))
    assert main(["bundle", "verify", str(path)]) == 1
    assert "symbolic link -> /etc/shadow" in capsys.readouterr().err
    path.write_bytes(b"this is not a bundle at all" * 40)
    assert main(["bundle", "verify", str(path)]) == 2
    assert main(["bundle", "verify", str(tmp_path / "missing.tar")]) == 2
