"""The hostile-input suite through the offline entry points a seller or buyer runs: `licenses check`,
`licenses index add`, `package` and the device backends. Each refuses with exit 2 and one line naming the
tensor; nothing is read from the working directory and no output is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgemart.cli import main
from edgemart.core.model_safety import UnsafeModel
from tests import hostile_models as hm


@pytest.fixture
def secret_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    hm.plant_secret(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _one_line_refusal(capsys: pytest.CaptureFixture[str], code: int, words: str) -> None:
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    lines = [line for line in err.strip().splitlines() if not line.startswith("[")]  # progress lines aside
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == lines[0]  # the refusal is the last thing printed


@pytest.mark.parametrize("case", sorted(hm.ONNX_CASES))
def test_licenses_check_refuses(case, secret_cwd, capsys):
    build, words = hm.ONNX_CASES[case]
    (secret_cwd / "m.onnx").write_bytes(build())
    _one_line_refusal(capsys, main(["licenses", "check", "m.onnx", "--license", "MIT", "--json"]), words)


@pytest.mark.parametrize("case", ["gemm_bias_exfiltration", "if_branch", "huge_declared_tensor"])
def test_licenses_index_add_refuses_and_writes_no_entry(case, secret_cwd, capsys):
    build, words = hm.ONNX_CASES[case]
    (secret_cwd / "m.onnx").write_bytes(build())
    index = secret_cwd / "index"
    code = main(
        ["licenses", "index", "add", "m.onnx", "--name", "x", "--license", "MIT", "--index", str(index)]
    )
    _one_line_refusal(capsys, code, words)
    assert not index.exists() or not any(index.rglob("*.npz"))


@pytest.mark.parametrize("case", sorted(hm.ONNX_CASES))
@pytest.mark.parametrize("target", ["onnx-fp32", "arm-cpu"])
def test_package_refuses_and_writes_nothing(case, target, secret_cwd, capsys):
    build, words = hm.ONNX_CASES[case]
    (secret_cwd / "m.onnx").write_bytes(build())
    out = secret_cwd / "out"
    _one_line_refusal(capsys, main(["package", "m.onnx", "--target", target, "--out", str(out)]), words)
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("case", sorted(hm.TFLITE_CASES))
def test_tflite_cases_through_the_cli(case, corpus, secret_cwd, capsys):
    build, words = hm.TFLITE_CASES[case]
    base = (corpus / "models" / "mediapipe" / "face_detection_front.tflite").read_bytes()
    (secret_cwd / "m.tflite").write_bytes(build(base))
    _one_line_refusal(capsys, main(["licenses", "check", "m.tflite", "--license", "MIT"]), words)
    _one_line_refusal(capsys, main(["package", "m.tflite", "--target", "coral-edgetpu", "--out", "o"]), words)


@pytest.mark.parametrize("case", sorted(hm.ONNX_CASES))
def test_device_backend_refuses_a_hostile_build(case, secret_cwd):
    """A build is only opened after the walk, so a sealed hostile model never reaches onnxruntime."""
    from edge_runtime.backends import open_backend

    build, words = hm.ONNX_CASES[case]
    with pytest.raises(UnsafeModel, match=None) as err:
        open_backend(bytearray(build()), target="onnx-fp32")
    assert words in err.value.message


def _bomb(path: Path) -> Path:
    """A small .npz whose one member declares 400 MB of zeros (fast to build: 100 MB of zeros per MB)."""
    import io
    import zipfile

    import numpy as np

    count = 100_000_000
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (count,)})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as member:
            member.write(header.getvalue())
            chunk = bytes(16 << 20)
            for _ in range(count * 4 // len(chunk)):
                member.write(chunk)
            member.write(bytes(count * 4 % len(chunk)))
    return path


def test_device_eval_and_chain_inputs_refuse_a_zip_bomb(tmp_path, capsys):
    """The buyer's side reads .npz too: `device eval --data` and chain inputs check before inflating."""
    from edge_runtime.chain.cli import _check_sample_file
    from edge_runtime.cli import _load_npz
    from edgemart.core.errors import UsageError

    bomb = _bomb(tmp_path / "bomb.npz")
    assert bomb.stat().st_size < 2_000_000
    with pytest.raises(UsageError, match="inflates to|compresses"):
        _load_npz(bomb, "--data")
    with pytest.raises(UsageError, match="refused"):
        _check_sample_file(bomb)
    liar = tmp_path / "liar.npy"
    import numpy as np

    np.save(liar, np.zeros(4, np.float32))
    raw = liar.read_bytes().replace(b"(4,)", b"(400000000,)".ljust(4))
    liar.write_bytes(raw)
    with pytest.raises(UsageError):
        _load_npz(liar, "--data")
