"""A firmware builder's whole job through the CLI against a running store (real HTTP): buy fleet seats
(`edgemart bundle buy`), fetch the inputs (`bundle fetch`), build and verify a signed bundle, put the fleet
key on a device, install the bundle and run the model with outputs equal to plain onnxruntime."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519

from tests.store.conftest import serve_http

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str, token: str | None = None, expect: int = 0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if token:
        env["EDGEMART_TOKEN"] = token
    done = subprocess.run(
        [sys.executable, "-m", "edgemart", *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == expect, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    return done


@pytest.fixture
def served(store):
    with serve_http(store.app) as url:
        yield store, url


def test_builder_buys_fetches_builds_and_a_fleet_device_runs_it(served, digits_base, digits_test, tmp_path):
    store, url = served
    assert (
        store.upload(
            "sally", digits_base, name="fleet model", targets="onnx-fp32", price_per_seat=125
        ).status_code
        == 202
    )
    store.wait()
    fleet = x25519.X25519PrivateKey.generate()
    (tmp_path / "fleet.pem").write_bytes(
        fleet.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    (tmp_path / "fleet.pub.pem").write_bytes(
        fleet.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    tok = store.tokens["bill"]

    bought = json.loads(
        _cli("bundle", "buy", "fleet-model", "--target", "onnx-fp32", "--fleet-key", str(tmp_path / "fleet.pub.pem"),
             "--seats", "40", "--store", url, "--json", token=tok).stdout
    )  # fmt: skip
    (lic,) = bought["licenses"]
    assert lic["seats"] == 40 and lic["fleet_key_id"] and "license" not in lic

    inputs = tmp_path / "inputs"
    fetched = json.loads(
        _cli("bundle", "fetch", "--out", str(inputs), "--store", url, "--json", token=tok).stdout
    )
    assert fetched["licenses"] == [lic["license_id"]] and len(fetched["builds"]) == 1
    assert (inputs / "root.crt").read_bytes() == store.ctx.root_cert_pem()

    # The factory provisions the board first; the bundle carries a seat activation drawn for its device id.
    device = tmp_path / "device"
    made = json.loads(
        _cli(
            "device", "init", "--device-dir", str(device), "--trust", str(inputs / "root.crt"), "--json"
        ).stdout
    )
    _cli("device", "add-fleet-key", "--device-dir", str(device), str(tmp_path / "fleet.pem"))
    (tmp_path / "devices.txt").write_text(made["device_id"] + "\n")

    _cli("bundle", "keygen", "--out", str(tmp_path / "builder.pem"))
    bundle = tmp_path / "fleet.bundle"
    _cli("bundle", "build", "--licenses", str(inputs / "licenses"), "--builds", str(inputs / "builds"),
         "--cards", str(inputs / "cards"), "--root", str(inputs / "root.crt"),
         "--signing-key", str(tmp_path / "builder.pem"), "--out", str(bundle),
         "--activate-devices", str(tmp_path / "devices.txt"), "--store", url, token=tok)  # fmt: skip
    _cli("bundle", "verify", str(bundle), "--root", str(inputs / "root.crt"),
         "--builder-key", str(tmp_path / "builder.pub.pem"))  # fmt: skip

    installed = json.loads(
        _cli("bundle", "install", str(bundle), "--device-dir", str(device), "--json").stdout
    )
    assert [(i["binding"], i["seat"]) for i in installed["installed"]] == [("fleet", 1)]
    out = tmp_path / "out.npz"
    _cli("device", "eval", "fleet-model", "--device-dir", str(device), "--data", str(digits_test),
         "--save-outputs", str(out), "--json")  # fmt: skip
    x = np.load(digits_test)["x"]
    sess = ort.InferenceSession(str(digits_base), providers=["CPUExecutionProvider"])
    expected = sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})
    got = np.load(out)
    first = got[sorted(got.files)[0]]
    assert any(np.array_equal(first, e) or np.allclose(first, e) for e in expected)


def test_builder_cli_errors_are_clean(served, tmp_path):
    store, url = served
    tok = store.tokens["bill"]
    r = _cli("bundle", "fetch", "--out", str(tmp_path / "o"), "--store", url, token=tok, expect=2)
    assert "no production licenses to fetch" in r.stderr and not (tmp_path / "o").exists()
    r = _cli("bundle", "buy", "nope", "--target", "onnx-fp32", "--fleet-key", str(tmp_path / "missing.pem"),
             "--seats", "1", "--store", url, token=tok, expect=2)  # fmt: skip
    assert "is not a file" in r.stderr
    (tmp_path / "k.pem").write_text("not a key")
    r = _cli("bundle", "buy", "nope", "--target", "onnx-fp32", "--fleet-key", str(tmp_path / "k.pem"),
             "--store", url, token=tok, expect=2)  # fmt: skip
    assert "--seats is required" in r.stderr
    r = _cli("bundle", "buy", "nope", "--target", "onnx-fp32", "--fleet-key", str(tmp_path / "k.pem"),
             "--seats", "1", "--store", url, token=store.tokens["bob"], expect=2)  # fmt: skip
    assert "builder" in r.stderr
    r = _cli("bundle", "fetch", "--out", str(tmp_path / "o"), "--store", url, expect=2)
    assert "--token is required" in r.stderr


def _card(title: str) -> str:
    return f"---\nlicense: MIT\ndatasets:\n  - uci/optdigits\n---\n# {title}\n\nDigits for the fleet.\n"


def test_fetch_writes_the_card_of_the_licensed_version(served, corpus, tmp_path):
    """#19: a license pinned to v1 gets v1's card, not the card of the listing's newer current version."""
    store, url = served
    digits = corpus / "models" / "digits"
    card_a, card_b = _card("Card A, version 1"), _card("Card B, version 2")
    r = store.upload("sally", digits / "digits_mlp_base.onnx", name="carded", card=card_a, price_per_seat=10)
    assert r.status_code == 202, r.json
    store.wait()
    r = store.client.post(
        "/api/v1/listings/carded/versions",
        data={"model": (io.BytesIO((digits / "digits_mlp_independent.onnx").read_bytes()), "model.onnx"),
              "card": (io.BytesIO(card_b.encode()), "README.md")},
        headers=store.auth("sally"),
        content_type="multipart/form-data",
    )  # fmt: skip
    assert r.status_code == 202, r.json
    store.wait()
    listing = store.client.get("/api/v1/listings/carded").json
    assert listing["version"] == 2 and listing["card"] == card_b
    assert [(v["number"], v["card"]) for v in listing["versions"]] == [(1, card_a), (2, card_b)]

    fleet = x25519.X25519PrivateKey.generate().public_key()
    (tmp_path / "fleet.pub.pem").write_bytes(
        fleet.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    tok = store.tokens["bill"]
    bought = json.loads(
        _cli("bundle", "buy", "carded", "--target", "onnx-fp32", "--fleet-key", str(tmp_path / "fleet.pub.pem"),
             "--seats", "2", "--version", "1", "--store", url, "--json", token=tok).stdout
    )  # fmt: skip
    (lic,) = bought["licenses"]
    assert lic["version"] == 1
    inputs = tmp_path / "inputs"
    fetched = json.loads(
        _cli("bundle", "fetch", "--out", str(inputs), "--listing", "carded", "--store", url, "--json",
             token=tok).stdout
    )  # fmt: skip
    assert fetched["cards"] == ["carded"]
    assert (inputs / "cards" / "carded.md").read_text() == card_a
    v1_build = listing["versions"][0]["builds"][0]["build_hash"]
    assert fetched["builds"] == [v1_build.split(":", 1)[1] + ".emdl"]
