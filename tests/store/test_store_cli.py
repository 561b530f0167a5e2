"""`edgemart store create-user` and `edgemart seller upload` against a real HTTP server (werkzeug, in a thread)."""

from __future__ import annotations

import json
import sys
import threading

import pytest
from werkzeug.serving import make_server

import licenses
from edgemart.cli import main
from store import create_app


@pytest.fixture
def live(tmp_path):
    data = tmp_path / "data"
    app = create_app({"DATA_DIR": str(data), "JOB_POLL_SECONDS": 0.2})
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", data, app
    finally:
        server.shutdown()
        app.extensions["edgemart"].close()


def _token(capsys, *argv) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out.strip().splitlines()[-1].split()[-1]


def test_create_user_and_upload_with_wait(live, capsys, corpus, digits_calibration, tmp_path):
    url, data, _ = live
    token = _token(capsys, "store", "create-user", "sally", "--role", "seller", "--data-dir", str(data))
    assert token.startswith("emt_")
    assert main(["store", "create-user", "sally", "--role", "seller", "--data-dir", str(data)]) == 1  # exists
    capsys.readouterr()
    model = corpus / "models" / "digits" / "digits_mlp_base.onnx"
    code = main(
        [
            "seller",
            "upload",
            str(model),
            "--name",
            "digits",
            "--license",
            "MIT",
            "--targets",
            "arm-cpu,onnx-fp32",
            "--calibration",
            str(digits_calibration),
            "--store",
            url,
            "--token",
            token,
            "--wait",
            "--json",
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    doc = json.loads(out.out)
    assert doc["listing"] == "digits" and doc["results"]["arm-cpu"]["state"] == "done"

    # Bad input: exit 2 with every problem on one line.
    code = main(
        [
            "seller",
            "upload",
            str(digits_calibration),
            "--name",
            "",
            "--license",
            "MIT ANDD",
            "--targets",
            "nope",
            "--store",
            url,
            "--token",
            token,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "name is required" in err and "unknown target" in err and "model:" in err
    assert (
        main(
            [
                "seller",
                "upload",
                str(model),
                "--name",
                "x",
                "--license",
                "MIT",
                "--store",
                url,
                "--token",
                "bad",
            ]
        )
        == 2
    )
    assert (
        main(
            [
                "seller",
                "upload",
                str(tmp_path / "missing.onnx"),
                "--name",
                "x",
                "--license",
                "MIT",
                "--store",
                url,
                "--token",
                token,
            ]
        )
        == 2
    )


def test_upload_block_exits_1(live, capsys, corpus):
    url, data, _ = live
    token = _token(capsys, "store", "create-user", "sam", "--role", "seller", "--data-dir", str(data))
    digits = corpus / "models" / "digits"
    licenses.LicenseIndex(data / "license-index").add(
        (digits / "digits_mlp_base.onnx").read_bytes(), name="digits-mlp-base", license="CC-BY-4.0"
    )
    code = main(
        [
            "seller",
            "upload",
            str(digits / "digits_mlp_pruned.onnx"),
            "--name",
            "copy",
            "--license",
            "LicenseRef-Proprietary",
            "--targets",
            "onnx-fp32",
            "--store",
            url,
            "--token",
            token,
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "blocked" in err and "digits-mlp-base" in err


def test_unreachable_store(capsys, corpus):
    model = corpus / "models" / "digits" / "digits_mlp_base.onnx"
    code = main(
        [
            "seller",
            "upload",
            str(model),
            "--name",
            "x",
            "--license",
            "MIT",
            "--store",
            "http://127.0.0.1:9",
            "--token",
            "t",
        ]
    )
    assert code == 1 and "cannot reach" in capsys.readouterr().err


def test_cli_module_imports_no_flask():
    import subprocess

    code = "import sys, store.cli, store.client, store.keyvault; print('flask' in sys.modules, 'sqlalchemy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_upload_carries_price_terms_visibility_and_target_options(live, capsys, corpus, digits_calibration):
    url, data, app = live
    token = _token(capsys, "store", "create-user", "sid", "--role", "seller", "--data-dir", str(data))
    model = corpus / "models" / "digits" / "digits_mlp_base.onnx"
    base = ["seller", "upload", str(model), "--license", "MIT", "--store", url, "--token", token]
    code = main(
        [*base, "--name", "terms", "--targets", "arm-cpu,onnx-fp32", "--calibration", str(digits_calibration)]
        + ["--price", "250", "--visibility", "private", "--eval-days", "3", "--eval-runs", "77"]
        + ["--option", "arm-cpu:min_agreement=0.5", "--option", "latency_runs=3", "--wait", "--json"]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    from store.client import StoreClient

    listing = StoreClient(url, token).get_json("/api/v1/listings/terms")
    assert (listing["price_per_seat"], listing["visibility"]) == (250, "private")
    assert (listing["eval_days"], listing["eval_runs"]) == (3, 77)
    assert listing["target_options"] == {
        "arm-cpu": {"min_agreement": "0.5", "latency_runs": "3"},
        "onnx-fp32": {"latency_runs": "3"},
    }
    builds = {b["target"]: b for b in listing["builds"]}
    assert builds["arm-cpu"]["quality"]["thresholds"]["min_agreement"] == 0.5
    assert builds["arm-cpu"]["quality"]["latency"]["runs"] == 3
    assert builds["onnx-fp32"]["quality"]["thresholds"]["min_agreement"] != 0.5

    # A bad option is refused at upload (exit 2, one line), nothing is created.
    for option, words in (
        ("arm-cpu:nope=1", "unknown option 'nope' for target arm-cpu"),
        ("arm-cpu:min_agreement=lots", "must be a number"),
        ("gpu:x=1", "names target 'gpu'"),
        ("novalue", "[TARGET:]KEY=VALUE"),
    ):
        code = main([*base, "--name", "bad-options", "--targets", "arm-cpu", "--option", option])
        err = capsys.readouterr().err
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert StoreClient(url, token).get_json("/api/v1/listings?mine=1")["items"][0]["id"] == "terms"


def test_seller_unpublish_and_delete(live, capsys, corpus):
    url, data, _ = live
    token = _token(capsys, "store", "create-user", "sue", "--role", "seller", "--data-dir", str(data))
    model = corpus / "models" / "digits" / "digits_mlp_base.onnx"
    common = ["--store", url, "--token", token]
    argv = ["seller", "upload", str(model), "--name", "gone", "--license", "MIT", "--targets", "onnx-fp32"]
    assert main([*argv, *common, "--wait"]) == 0
    capsys.readouterr()
    assert main(["seller", "unpublish", "gone", *common]) == 0
    assert "unpublished gone" in capsys.readouterr().out
    assert main(["seller", "unpublish", "gone", *common]) == 1  # not listed any more
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "is unpublished" in err
    assert main(["seller", "delete", "gone", *common, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"deleted": "gone"}
    assert main(["seller", "delete", "gone", *common]) == 2  # no such listing
