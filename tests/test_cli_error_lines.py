"""Every CLI error path ends in one line on stderr: the right exit code, no traceback, no prefix said twice
("model card: model card:") and no garbled path substitution ("sample file the calibration file")."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from edgemart.cli import main
from tests.store.conftest import make_store, serve_http


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def _repeated_phrase(line: str) -> str | None:
    """A run of 1-4 words said twice in a row ("model card: model card", "error: error")."""
    words = re.findall(r"[\w-]+", line.lower())
    for n in range(1, 5):
        for i in range(len(words) - 2 * n + 1):
            if words[i : i + n] == words[i + n : i + 2 * n] and not all(
                w.isdigit() for w in words[i : i + n]
            ):
                return " ".join(words[i : i + n])
    return None


def _check_one_line(code: int, err: str, expected: int) -> str:
    assert code == expected, err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("edgemart") and "Traceback" not in line, line
    assert _repeated_phrase(line) is None, line
    assert "sample file the" not in line, line
    return line


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli-errors")
    text = d / "notes.txt"
    text.write_text("hello\n")
    existing = d / "fleet.pem"
    existing.write_text("x")
    bad_card = d / "README.md"
    bad_card.write_text("---\nlicense: mit\n# never closed\n")
    device = d / "device"
    assert main(["device", "init", "--device-dir", str(device)]) == 0
    npy = d / "x.npy"
    np.save(npy, np.zeros((2, 64), np.float32))
    return {
        "dir": d,
        "text": text,
        "existing": existing,
        "bad_card": bad_card,
        "device": device,
        "npy": npy,
        "model": corpus / "models" / "digits" / "digits_mlp_base.onnx",
        "calibration": corpus / "data" / "digits" / "digits_calibration.npz",
    }


OFFLINE = [
    ("device eval, no device dir", ["device", "eval", "m", "--device-dir", "{dir}/none", "--data", "{npy}"], 2),
    ("device eval, listing not installed", ["device", "eval", "m", "--device-dir", "{device}", "--data", "{npy}"], 2),
    ("device eval, data not an array file", ["device", "eval", "m", "--device-dir", "{device}", "--data", "{text}"], 2),
    ("device eval, sideload with --target", ["device", "eval", "--build", "{text}", "--license", "{text}", "--target", "arm-cpu", "--device-dir", "{device}", "--data", "{npy}"], 2),
    ("device fetch, not enrolled", ["device", "fetch", "m", "--target", "arm-cpu", "--device-dir", "{device}"], 2),
    ("bundle verify, not a bundle", ["bundle", "verify", "{text}"], 2),
    ("bundle verify, missing", ["bundle", "verify", "{dir}/missing.tar"], 2),
    ("bundle fleet-keygen, key exists", ["bundle", "fleet-keygen", "--out", "{existing}"], 2),
    ("package, missing model", ["package", "{dir}/missing.onnx", "--target", "arm-cpu", "--out", "{dir}/o"], 2),
    ("package, unknown target", ["package", "{model}", "--target", "gpu", "--out", "{dir}/o"], 2),
    ("package, unknown option", ["package", "{model}", "--target", "arm-cpu", "--calibration", "{calibration}", "--option", "nope=1", "--out", "{dir}/o"], 2),
    ("package, calibration not npz", ["package", "{model}", "--target", "arm-cpu", "--calibration", "{text}", "--out", "{dir}/o"], 2),
    ("licenses check, missing model", ["licenses", "check", "{dir}/missing.onnx"], 2),
    ("seller upload, bad store URL", ["seller", "upload", "{model}", "--name", "x", "--license", "MIT", "--store", "nope", "--token", "t"], 2),
    ("seller upload, unknown flag", ["seller", "upload", "{model}", "--frobnicate"], 2),
]  # fmt: skip


@pytest.mark.parametrize("argv, code", [(a, c) for _, a, c in OFFLINE], ids=[n for n, _, _ in OFFLINE])
def test_offline_error_paths(files, capsys, argv: list[str], code: int) -> None:
    _check_one_line(*_run(capsys, [a.format(**files) for a in argv]), code)


def test_store_error_paths(files, capsys, tmp_path) -> None:
    st = make_store(tmp_path / "data")
    try:
        with serve_http(st.app) as url:
            base = [
                "seller",
                "upload",
                str(files["model"]),
                "--name",
                "x",
                "--license",
                "MIT",
                "--store",
                url,
            ]
            base += ["--token", st.tokens["sally"]]
            line = _check_one_line(*_run(capsys, [*base, "--card", str(files["bad_card"])]), 2)
            assert "model card" in line
            line = _check_one_line(*_run(capsys, [*base, "--calibration", str(files["text"])]), 2)
            assert "the calibration file" in line
            line = _check_one_line(*_run(capsys, [*base, "--token", "wrong"]), 2)
            device = ["device", "enroll", "--store", url, "--token", st.tokens["bob"]]
            assert main([*device, "--device-dir", str(files["dir"] / "bob")]) == 0
            capsys.readouterr()
            fetch = ["device", "fetch", "nope", "--target", "gpu", "--device-dir", str(files["dir"] / "bob")]
            line = _check_one_line(*_run(capsys, fetch), 2)
            assert "HTTP" not in line
    finally:
        st.ctx.close()
