"""`edgemart licenses ...` through register() on a test parser, with the composition root's error mapping."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pytest

from edgemart.core.errors import EdgemartError
from licenses import cli


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="edgemart")
    cli.register(parser.add_subparsers(dest="command", required=True))
    try:
        args = parser.parse_args(argv)
        code = args.func(args)
    except EdgemartError as err:  # what edgemart/cli.py does
        print(err.diagnostics(), file=__import__("sys").stderr)
        code = err.exit_code
    out, err_text = capsys.readouterr()
    return code, out, err_text


@pytest.fixture()
def workdir():
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


def test_cli_module_imports_only_stdlib_and_the_base() -> None:
    source = Path(cli.__file__).read_text()
    top = [line.split()[1] for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert top and all(
        name.split(".")[0] in {"__future__", "argparse", "json", "sys", "pathlib", "drm"}
        or name.startswith("edgemart.core")
        for name in top
    ), top


def test_index_add_then_check(corpus, workdir, capsys) -> None:
    base = str(corpus / "models/digits/digits_mlp_base.onnx")
    index = str(workdir / "idx")
    code, out, _ = run(
        [
            "licenses",
            "index",
            "add",
            base,
            "--name",
            "digits-base",
            "--license",
            "cc-by-4.0",
            "--index",
            index,
        ],
        capsys,
    )
    assert code == 0 and "digits-base" in out

    finetuned = str(corpus / "models/digits/digits_mlp_finetuned.onnx")
    code, out, err = run(["licenses", "check", finetuned, "--license", "MIT", "--index", index], capsys)
    assert code == 1
    assert "undeclared_derivative" in out and "digits-base" in err

    card = workdir / "card.md"
    card.write_text("---\nlicense: mit\nbase_model: digits-base\n---\n")
    code, out, _ = run(
        ["licenses", "check", finetuned, "--card", str(card), "--index", index, "--json"], capsys
    )
    assert code == 0
    decision = json.loads(out)
    assert decision["outcome"] == "allow_with_obligations"
    assert decision["lineage"][0]["name"] == "digits-base"


def test_check_allow_text_output(corpus, capsys) -> None:
    model = str(corpus / "models/digits/digits_mlp_independent.onnx")
    code, out, _ = run(["licenses", "check", model, "--license", "Apache-2.0"], capsys)
    assert code == 0 and out.startswith("decision: allow")


def test_check_blocks_without_license(corpus, capsys) -> None:
    code, _, err = run(
        ["licenses", "check", str(corpus / "models/digits/digits_mlp_independent.onnx")], capsys
    )
    assert code == 1 and "declare a license" in err


def test_bad_input_exits_2(corpus, workdir, capsys) -> None:
    garbage = workdir / "model.bin"
    garbage.write_bytes(b"not a model at all")
    code, _, err = run(["licenses", "check", str(garbage), "--license", "MIT"], capsys)
    assert code == 2 and "unrecognized model format" in err

    card = workdir / "bad.md"
    card.write_text("---\nlicense: [mit\n---\n")
    model = str(corpus / "models/digits/digits_mlp_base.onnx")
    code, _, err = run(["licenses", "check", model, "--card", str(card)], capsys)
    assert code == 2 and "malformed YAML" in err

    code, _, err = run(["licenses", "check", str(workdir / "missing.onnx"), "--license", "MIT"], capsys)
    assert code == 2 and "not found" in err

    code, _, err = run(
        [
            "licenses",
            "index",
            "add",
            model,
            "--name",
            "x",
            "--license",
            "Foo-9",
            "--index",
            str(workdir / "i"),
        ],
        capsys,
    )
    assert code == 2 and "unknown license Foo-9" in err


def test_importing_the_cli_loads_no_heavy_dependency() -> None:
    import subprocess
    import sys

    code = (
        "import sys; import licenses.cli; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'numpy', 'scipy', 'onnx', 'yaml', 'flask'}))"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "[]"


def _fixed_only_model() -> bytes:
    """A 'model' whose only constant is a DFT basis: nothing learned in it."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from licenses._zoo import dft_basis

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "dft"], ["y"])],
        "stft",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [numpy_helper.from_array(np.ascontiguousarray(dft_basis().T), "dft")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_index_add_refuses_a_model_with_no_learned_tensor(workdir, capsys) -> None:
    model = workdir / "stft.onnx"
    model.write_bytes(_fixed_only_model())
    argv = [
        "licenses",
        "index",
        "add",
        str(model),
        "--name",
        "stft",
        "--license",
        "MIT",
        "--index",
        str(workdir / "i"),
    ]
    code, out, err = run(argv, capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "no learned tensor found" in err and "1 fixed-by-construction" in err and "--allow-empty" in err
    code, out, _ = run([*argv, "--allow-empty"], capsys)
    assert code == 0 and "0 learned tensors" in out


def test_index_add_reports_what_it_found(workdir, capsys) -> None:
    from licenses import _zoo as Z

    model = workdir / "vad.onnx"
    model.write_bytes(Z.vad_streaming_if(Z.train_vad(0)))
    code, out, _ = run(
        [
            "licenses",
            "index",
            "add",
            str(model),
            "--name",
            "vad",
            "--license",
            "MIT",
            "--index",
            str(workdir / "i"),
        ],
        capsys,
    )
    assert code == 0
    assert "8 learned tensors, 17,440 parameters, onnx stored as float32, in 3 graph(s)" in out
    assert "4 fixed-by-construction tensors ignored" in out
    code, out, _ = run(
        [
            "licenses",
            "index",
            "add",
            str(model),
            "--name",
            "vad2",
            "--license",
            "MIT",
            "--index",
            str(workdir / "j"),
            "--json",
        ],
        capsys,
    )
    found = json.loads(out)["found"]
    assert found["learned_tensors"] == 8 and found["locations"] == [
        "graph/If.else_branch",
        "graph/If.then_branch",
    ]
