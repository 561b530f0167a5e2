"""`make demo`: the whole flow once, on the embedded default (SQLite + files), with a real corpus model.

Seller uploads → compliance gate → arm-cpu int8 packaging → sealed build → device enrolls →
eval license → on-device eval with a JSON and HTML report. Every step goes through the CLI."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = [sys.executable, "-m", "edgemart"]


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def cli(*args: str, expect: tuple[int, ...] = (0,), capture: bool = True) -> subprocess.CompletedProcess[str]:
    shown = " ".join(a if len(a) < 60 else a[:20] + "…" for a in args)
    print(f"$ edgemart {shown}", flush=True)
    proc = subprocess.run([*BIN, *args], text=True, capture_output=capture)
    if capture:
        if proc.stdout.strip():
            print(proc.stdout.rstrip())
        # Progress bars redraw with \r; show only their final state.
        err = [ln.split("\r")[-1] for ln in proc.stderr.split("\n")]
        err = [ln for ln in err if ln.strip()]
        if err:
            print("\n".join(err))
    if proc.returncode not in expect:
        raise SystemExit(f"demo: step failed (exit {proc.returncode}, expected {expect})")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"demo: the store exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise SystemExit("demo: the store did not become healthy")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--corpus", default=os.environ.get("EDGEMART_CORPUS", str(Path.home() / ".cache/edgemart-corpus"))
    )
    ap.add_argument("--out", default="demo-out")
    a = ap.parse_args(argv)
    corpus = Path(a.corpus)
    if not (corpus / "manifest.json").is_file():
        raise SystemExit(
            f"demo: corpus not found at {corpus}; run `make corpus` (needs ../shared beside this checkout)"
        )
    out = Path(a.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    data_dir, device_dir = out / "store-data", out / "device"
    out.mkdir(parents=True)
    digits = corpus / "models" / "digits"
    t_start = time.monotonic()

    step("1. Store: an open-model index entry and three users (embedded default: SQLite + files)")
    cli(
        "licenses",
        "index",
        "add",
        str(digits / "digits_mlp_base.onnx"),
        "--name",
        "digits-mlp-base",
        "--license",
        "CC-BY-4.0",
        "--index",
        str(data_dir / "license-index"),
    )
    tokens = {}
    for name, role in (("sally", "seller"), ("bob", "buyer"), ("ada", "admin")):
        proc = cli("store", "create-user", name, "--role", role, "--data-dir", str(data_dir))
        tokens[role] = proc.stdout.strip().splitlines()[-1].split()[-1]

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    step(f"2. Start the store at {url}")
    log = open(out / "store.log", "wb")
    server = subprocess.Popen(
        [*BIN, "store", "serve", "--data-dir", str(data_dir), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_healthy(url, server)
        print("store is up")

        step(
            "3. Compliance gate: an undeclared derivative of an indexed open model is blocked, with evidence"
        )
        cli(
            "seller",
            "upload",
            str(digits / "digits_mlp_pruned.onnx"),
            "--name",
            "digits-pruned-copy",
            "--license",
            "LicenseRef-Proprietary",
            "--targets",
            "arm-cpu",
            "--store",
            url,
            "--token",
            tokens["seller"],
            expect=(1,),
        )

        step(
            "4. Seller uploads a declared fine-tune (CC-BY-4.0 base) → allowed with obligations → arm-cpu int8 packaging"
        )
        card = out / "digits-card.md"
        card.write_text(
            "---\nlicense: cc-by-4.0\nbase_model: digits-mlp-base\ndatasets: [uci-optdigits]\n---\n"
            "# Digits MLP, fine-tuned\nAn 8x8 handwritten digit classifier.\n"
        )
        cli(
            "seller",
            "upload",
            str(digits / "digits_mlp_finetuned.onnx"),
            "--name",
            "digits-mlp",
            "--license",
            "CC-BY-4.0",
            "--card",
            str(card),
            "--targets",
            "arm-cpu,onnx-fp32",
            "--calibration",
            str(corpus / "data/digits/digits_calibration.npz"),
            "--store",
            url,
            "--token",
            tokens["seller"],
            "--wait",
        )

        step("5. Buyer's dev board: keys made on the device, certificate from the store")
        cli("device", "init", "--device-dir", str(device_dir))
        cli("device", "enroll", "--store", url, "--token", tokens["buyer"], "--device-dir", str(device_dir))

        step(
            "6. Evaluation license (bound to this device and build; expiry + run cap) and the encrypted build"
        )
        cli("device", "fetch", "digits-mlp", "--target", "arm-cpu", "--device-dir", str(device_dir))

        step("7. On-device eval: verify, decrypt in memory, run on the buyer's data")
        html = out / "report.html"
        proc = cli(
            "device",
            "eval",
            "digits-mlp",
            "--device-dir",
            str(device_dir),
            "--data",
            str(corpus / "data/digits/digits_test.npz"),
            "--json",
            "--html",
            str(html),
        )
        (out / "report.json").write_text(proc.stdout)
        cli(
            "device",
            "eval",
            "digits-mlp",
            "--device-dir",
            str(device_dir),
            "--data",
            str(corpus / "data/digits/digits_test.npz"),
        )

        step("8. Usage sync: the device uploads its signed, hash-chained usage log")
        cli("device", "sync", "--device-dir", str(device_dir))
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()

    step("Done")
    report = json.loads((out / "report.json").read_text())
    print(f"report: {out / 'report.html'} (HTML with plots), {out / 'report.json'} (JSON)")
    print(
        f"on-device accuracy of the int8 build: {report['classification']['accuracy']:.4f} on {report['samples']} "
        f"held-out digits; latency p50 {report['latency_ms']['p50']:.2f} ms per call"
    )
    print(f"whole flow took {time.monotonic() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
