"""`edgemart licenses ...` through register() on a test parser, with the composition root's error mapping."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pytest

from drm.errors import EdgemartError
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


def test_cli_module_imports_only_stdlib_and_drm() -> None:
    source = Path(cli.__file__).read_text()
    top = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert all(
        line.split()[1].split(".")[0] in {"__future__", "argparse", "json", "sys", "pathlib", "drm"}
        for line in top
    )


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
