"""The hostile-input suite, as a seller account attacks the store (SQLite+files and PostgreSQL+S3 alike):
models that point at the store's own files, bombs in models and sample archives, control bytes in text.

Each is refused with a 4xx naming what is wrong, before any listing, build or blob exists; the server stays
up; the planted secret is found in no blob and no database row."""

from __future__ import annotations

import io
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests import hostile_models as hm


@pytest.fixture
def secret_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The store process's working directory holds a key file at the path the models point at."""
    hm.plant_secret(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def zip_bomb() -> bytes:
    """About 1 MB of .npz that inflates to 1.1 GB of float32 zeros (one honest .npy member)."""
    count = 1_100_000_000 // 4
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (count,)})
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as member:
            member.write(header.getvalue())
            chunk, left = bytes(64 << 20), count * 4
            while left > 0:
                member.write(chunk[: min(left, len(chunk))])
                left -= len(chunk)
    return out.getvalue()


def _leaked_anywhere(store) -> list[str]:  # type: ignore[no-untyped-def]
    """Blob keys and table rows that contain the planted secret (or its first half)."""
    needles = (hm.SECRET, hm.SECRET[:32])
    hits = [key for key in store.ctx.blobs.list() if any(n in store.ctx.blobs.get(key) for n in needles)]
    for path in store.data_dir.rglob("*"):
        if path.is_file() and any(n in path.read_bytes() for n in needles):
            hits.append(str(path))
    return hits


def _refused(store, response, field: str, words: str) -> None:  # type: ignore[no-untyped-def]
    assert response.status_code == 422, (response.status_code, response.data[:400])
    problems = response.json["error"]["problems"]
    assert any(p["field"] == field and words in p["message"] for p in problems), problems


@pytest.mark.parametrize("case", sorted(hm.ONNX_CASES))
def test_hostile_onnx_upload_is_refused_before_anything_exists(store, secret_cwd, case):
    build, words = hm.ONNX_CASES[case]
    before = store.counts()
    r = store.upload("sally", build(), name=f"hostile {case}", targets="onnx-fp32,arm-cpu,fpga-xint8")
    _refused(store, r, "model", words)
    assert store.counts() == before
    assert not _leaked_anywhere(store)


@pytest.mark.parametrize("case", sorted(hm.TFLITE_CASES))
def test_hostile_tflite_upload_is_refused(store, corpus, case):
    build, words = hm.TFLITE_CASES[case]
    base = (corpus / "models" / "mediapipe" / "face_detection_front.tflite").read_bytes()
    before = store.counts()
    r = store.upload(
        "sally", build(base), name=f"hostile {case}", targets="coral-edgetpu", filename="m.tflite"
    )
    _refused(store, r, "model", words)
    assert store.counts() == before


def test_the_exfiltration_upload_leaks_nothing_and_the_store_carries_on(store, secret_cwd, digits_base):
    """The reported attack end to end: refused at upload, nothing of it stored, the next honest upload works."""
    before = store.counts()
    r = store.upload("sally", hm.exfil_gemm_bias(), name="innocent mlp", targets="onnx-fp32,arm-cpu")
    _refused(store, r, "model", "external data")
    assert "kek" not in r.get_data(as_text=True)  # the refusal does not echo the target path either
    assert store.counts() == before and not _leaked_anywhere(store)
    ok = store.upload("sally", digits_base, name="innocent mlp", targets="onnx-fp32")
    assert ok.status_code == 202, ok.json
    store.wait()
    assert not _leaked_anywhere(store)


@pytest.mark.parametrize("cap, words", [(None, "inflates to"), (4 << 30, "compresses")])
def test_zip_bombed_calibration_is_refused_without_inflating(store, digits_base, zip_bomb, cap, words):
    """Refused on the declared size (default cap) or, with a cap above it, on the compression ratio."""
    assert len(zip_bomb) < 1_200_000
    if cap is not None:
        store.ctx.config["MAX_SAMPLE_BYTES"] = cap
    before = store.counts()
    tracemalloc.start()
    try:
        started = time.monotonic()
        r = store.upload("sally", digits_base, name="bomb", targets="arm-cpu", calibration=zip_bomb)
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    _refused(store, r, "calibration", words)
    assert store.counts() == before
    # Python-side peak while handling the request: the upload buffers, never the 1.1 GB the archive declares.
    assert peak < 64 << 20, peak
    print(f"zip bomb refused in {elapsed:.2f} s, peak traced memory {peak / 2**20:.1f} MiB")


def test_sample_archive_over_the_configured_size_is_refused(store, digits_base):
    store.ctx.config["MAX_SAMPLE_BYTES"] = 64 * 1024
    x = np.random.default_rng(0).random((400, 64)).astype(np.float32)  # ~100 KB, incompressible
    raw = io.BytesIO()
    np.savez_compressed(raw, x=x)
    before = store.counts()
    r = store.upload("sally", digits_base, name="big", targets="arm-cpu", calibration=raw.getvalue())
    _refused(store, r, "calibration", "inflates to")
    assert store.counts() == before


def test_array_header_claiming_more_than_its_member_is_refused(store, digits_base):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (1 << 36,)}
    )
    raw = io.BytesIO()
    with zipfile.ZipFile(raw, "w") as archive:
        archive.writestr("x.npy", header.getvalue() + bytes(64))
    r = store.upload("sally", digits_base, name="liar", targets="arm-cpu", calibration=raw.getvalue())
    _refused(store, r, "calibration", "declares shape")


@pytest.mark.parametrize(
    "name, code",
    [
        ("nul\x00byte", "U+0000"),
        ("bell\x07", "U+0007"),
        ("esc\x1b[31mred", "U+001B"),
        ("del\x7f", "U+007F"),
        ("c1\x85middle", "U+0085"),
        ("evil\u202egnp.onnx", "U+202E"),
        ("tab\tname", "U+0009"),
    ],
)
def test_control_characters_in_a_name_are_refused(store, digits_base, name, code):
    before = store.counts()
    r = store.upload("sally", digits_base, name=name)
    _refused(store, r, "name", code)
    assert store.counts() == before


def test_control_characters_in_license_and_card(store, digits_base):
    r = store.upload("sally", digits_base, name="lic", license="MIT\x00")
    _refused(store, r, "license", "U+0000")
    card = "---\nlicense: mit\n---\n# Card\n\tindented\r\nline\x00 hidden"
    r = store.upload("sally", digits_base, name="card", card=card)
    _refused(store, r, "card", "U+0000")
    fine = "---\nlicense: mit\n---\n# Card\n\tindented line\r\nwindows line\n"
    assert store.upload("sally", digits_base, name="card", card=fine).status_code == 202


def test_names_are_nfc_normalised(store, digits_base):
    r = store.upload("sally", digits_base, name="Cafe\u0301 model")
    assert r.status_code == 202, r.json
    assert r.json["listing"]["name"] == "Caf\u00e9 model"


def test_model_caps_are_store_configuration(store, digits_base):
    store.ctx.config["MODEL_MAX_TENSOR_BYTES"] = 4096  # the digits MLP has a 64x128 float32 weight
    before = store.counts()
    r = store.upload("sally", digits_base, name="capped")
    _refused(store, r, "model", "4096-byte limit per tensor")
    assert store.counts() == before
