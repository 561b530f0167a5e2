"""The CLI contract: every command has --help; bad usage is one line and exit 2; groups load lazily."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from edgemart.cli import GROUPS, main

CONTRACT = [
    ["store", "serve"],
    ["store", "create-user"],
    ["seller", "upload"],
    ["device", "init"],
    ["device", "enroll"],
    ["device", "fetch"],
    ["device", "eval"],
    ["device", "run"],
    ["package"],
    ["licenses", "check"],
    ["licenses", "index", "add"],
    ["drm", "keygen"],
    ["drm", "seal"],
    ["drm", "issue"],
    ["bundle", "build"],
    ["bundle", "verify"],
    ["bench"],
]


def _commands(group: str) -> list[list[str]]:
    """Every leaf command of a group, found by walking the parsers it registers."""
    root = argparse.ArgumentParser()
    sub = root.add_subparsers()
    importlib.import_module(GROUPS[group][0]).register(sub)
    out: list[list[str]] = []

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            out.append(path)
        for action in subs:
            for name, child in action.choices.items():
                walk(child, [*path, name])

    walk(sub.choices[group], [group])
    return out


@pytest.mark.parametrize("command", CONTRACT, ids=" ".join)
def test_contract_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_every_registered_command_has_help(group: str, capsys: pytest.CaptureFixture[str]) -> None:
    for command in _commands(group):
        with pytest.raises(SystemExit) as exc:
            main([*command, "--help"])
        assert exc.value.code == 0, command
    capsys.readouterr()


@pytest.mark.parametrize(
    "argv",
    [["nonsense"], ["device", "eval", "--bogus-flag"], ["drm", "seal"], ["package", "m.onnx", "--target"]],
)
def test_bad_usage_is_one_line_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err and len(err.splitlines()) == 1, err
    assert "Traceback" not in err


def test_missing_file_is_bad_input_not_traceback(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "drm",
            "seal",
            str(tmp_path / "missing.onnx"),
            "--out",
            str(tmp_path / "x.emdl"),
            "--key-dir",
            str(tmp_path / "keys"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "x.emdl").exists()


def test_device_group_does_not_load_server_side_code() -> None:
    code = (
        "import sys\n"
        "from edgemart.cli import main\n"
        "try:\n    main(['device', '--help'])\nexcept SystemExit:\n    pass\n"
        "bad = sorted(m for m in ('flask', 'sqlalchemy', 'store', 'packagers', 'licenses', 'onnx') if m in sys.modules)\n"
        "print('LOADED=' + ','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "LOADED=", out
