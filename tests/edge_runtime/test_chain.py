"""Slot chains on real licensed corpus models: results, start-time checks, failures and cleanup."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import drm
from edge_runtime import Device
from edge_runtime.chain import Chain, StageFailed, StageHung, StageRefused
from edge_runtime.chain.spec import Timeouts, load_chain
from edge_runtime.chain.steps import apply

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "chains"
MODELS = {
    "digits-base": "models/digits/digits_mlp_base.onnx",
    "digits-independent": "models/digits/digits_mlp_independent.onnx",
    "face-detect": "models/mediapipe/face_detection_short_range.tflite",
    "face-mesh": "models/mediapipe/face_landmark.tflite",
}


def make_device(
    root: Path, corpus: Path, models: dict[str, str], max_runs: dict[str, int] | None = None
) -> Path:
    """A device dir with each corpus model sealed, licensed to this device and installed under a listing."""
    now = int(time.time())
    authority = drm.Authority.generate(now=now - 60)
    issuer = authority.issue_issuer(now=now - 60)
    device = Device.init(root / "dev", trust=drm.cert_to_pem(authority.cert), now=now - 30)
    kem = drm.cert_kem_keys(drm.cert_from_bytes((root / "dev" / "device.crt").read_bytes()))
    for listing, rel in models.items():
        cek = drm.generate_content_key()
        target = "onnx-fp32" if rel.endswith(".onnx") else "coral-edgetpu"
        build = drm.seal((corpus / rel).read_bytes(), key=cek, target=target)
        license_bytes = drm.issue_license(
            issuer=issuer, cek=cek, recipient=kem, kind="eval", listing=listing,
            build_hash=drm.read_header(build[:65536]).build_hash, target=target, now=now - 30, days=30,
            max_runs=(max_runs or {}).get(listing), device_id=device.device_id,
        )  # fmt: skip
        device.install(build=build, license=license_bytes, listing=listing, now=now - 20)
    return root / "dev"


@pytest.fixture(scope="module")
def anchors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("anchors")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEMART_ANCHOR_DIR", str(path))  # inherited by the stage processes
        yield path


@pytest.fixture(autouse=True)
def anchor_dir(anchors: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Overrides the per-test anchor dir of conftest: the module's device keeps one anchor dir."""
    monkeypatch.setenv("EDGEMART_ANCHOR_DIR", str(anchors))
    return anchors


@pytest.fixture(scope="module")
def device_dir(tmp_path_factory: pytest.TempPathFactory, corpus: Path, anchors: Path) -> Path:
    return make_device(tmp_path_factory.mktemp("chain-device"), corpus, MODELS)


@pytest.fixture(scope="module")
def faces(corpus: Path) -> np.ndarray:
    return np.load(corpus / "data" / "mediapipe" / "face_detection_front.npz")["input"]


def _shm() -> set[str]:
    """/dev/shm entries that could be ours: a PostgreSQL server another suite left running for the session
    creates and drops its own dynamic shared memory segments there at any time."""
    return {name for name in os.listdir("/dev/shm") if not name.startswith("PostgreSQL.")}


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _slot_mappings(pid: int | str = "self") -> int:
    return Path(f"/proc/{pid}/maps").read_text().count("edgemart-slot")


def _gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


def _write_chain(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def test_face_chain_matches_sequential_run(device_dir: Path, faces: np.ndarray) -> None:
    shm_before, fds_before = _shm(), _fds()
    with Chain.from_file(EXAMPLES / "face_mesh.yaml", device_dir) as chain:
        pids = chain.stage_pids
        assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()  # one process per vendor
        outputs = list(chain.run_many({"image": faces[i : i + 1]} for i in range(len(faces))))
        report = chain.stats.report()
    assert report["frames"] == 2 and set(report["stages"]) == {"detect", "mesh"}
    assert all(report["stages"][s]["frames"] == 2 for s in ("detect", "mesh"))

    # The same stages and steps, sequentially, in this process.
    spec = load_chain(EXAMPLES / "face_mesh.yaml")
    binding = spec.stage("mesh").inputs["input_1"]
    device = Device.open(device_dir)
    with device.open_model(listing="face-detect") as detect, device.open_model(listing="face-mesh") as mesh:
        for i, got in enumerate(outputs):
            det = detect.run({"input": faces[i : i + 1]})
            crop = faces[i : i + 1]
            for step in binding.steps:
                crop = apply(step, crop, lambda ref: det[ref.split(".", 1)[1]])  # noqa: B023
            lm = mesh.run({"input_1": crop})
            assert np.array_equal(got["landmarks"], lm["conv2d_20"])
            assert np.array_equal(got["face_flag"], lm["conv2d_30"])
            assert np.array_equal(got["face_scores"], det["classificators"])
    # The astronaut has a face, the coffee cup has none: the crop found the face.
    assert outputs[0]["face_flag"].item() > 0 > outputs[1]["face_flag"].item()
    assert all(_gone(pid) for pid in pids.values())
    assert _fds() == fds_before and _shm() == shm_before and _slot_mappings() == 0


def test_input_steps_run_beside_the_process_that_holds_their_tensors(tmp_path: Path) -> None:
    # face_mesh.yaml: the mesh input's crop + resize read only the image and detect's outputs, so the
    # detect process computes it and the mesh process receives the prepared 192 px crop, nothing else.
    chain = Chain.from_file(EXAMPLES / "face_mesh.yaml", tmp_path)
    assert chain._hoisted() == {("mesh", "input_1"): ("vendor:mediapipe", "@mesh:input_1")}
    produces, consumes = chain._routes()
    assert consumes["vendor:acme-vision"] == {"@mesh:input_1": "vendor:mediapipe"}
    assert produces["supervisor"] == {"image": ["vendor:mediapipe"]}  # the image no longer goes to mesh
    # Steps reading tensors of two processes stay with their consumer.
    path = _write_chain(
        tmp_path / "two.yaml",
        """
        version: 1
        inputs: {x: {shape: [1, 64], dtype: float32}}
        stages:
          - {name: a, vendor: va, model: {listing: digits-a}, inputs: {x: x}}
          - {name: b, vendor: vb, model: {listing: digits-b}, inputs: {x: x}}
          - name: c
            vendor: vc
            model: {listing: digits-a}
            inputs:
              x: {from: x, steps: [{op: crop_by_boxes, boxes: a.probabilities, scores: b.probabilities}]}
        outputs: {y: c.probabilities}
        """,
    )
    assert Chain.from_file(path, tmp_path)._hoisted() == {}


def test_digits_two_vendors_and_stage_isolation(device_dir: Path, digits_test: Path, tmp_path: Path) -> None:
    x = np.load(digits_test)["x"][:12]
    for isolation in ("vendor", "stage"):
        spec = json.loads((EXAMPLES / "digits_two_vendors.json").read_text())
        spec["isolation"] = isolation
        spec["stages"][1]["vendor"] = "vendor-a"  # same vendor: one process under vendor isolation
        path = tmp_path / f"{isolation}.json"
        path.write_text(json.dumps(spec))
        with Chain.from_file(path, device_dir) as chain:
            assert len(set(chain.stage_pids.values())) == (1 if isolation == "vendor" else 2)
            outputs = list(chain.run_many({"x": x[i : i + 1]} for i in range(len(x))))
            one = chain.run({"x": x[:5]})  # dynamic batch dim: a frame may carry several rows
        device = Device.open(device_dir)
        with (
            device.open_model(listing="digits-base") as a,
            device.open_model(listing="digits-independent") as b,
        ):
            for i, got in enumerate(outputs):
                ra, rb = a.run({"x": x[i : i + 1]}), b.run({"x": x[i : i + 1]})
                assert np.array_equal(got["label_a"], np.argmax(ra["probabilities"], axis=-1))
                assert np.array_equal(got["label_b"], rb["label"])
                assert np.array_equal(got["probabilities_b"], rb["probabilities"])
            assert np.array_equal(one["probabilities_b"], b.run({"x": x[:5]})["probabilities"])


def test_shape_mismatch_at_start_names_stage_and_tensor(device_dir: Path, tmp_path: Path) -> None:
    chain = _write_chain(
        tmp_path / "bad.yaml",
        """
        stages:
          - {name: detect, vendor: a, model: {listing: face-detect}, inputs: {input: image}}
          - name: mesh
            vendor: b
            model: {listing: face-mesh}
            inputs:
              input_1: {from: image, steps: [{op: resize, size: [160, 160]}]}
        outputs: {flag: mesh.conv2d_30}
        """,
    )
    fds_before = _fds()
    with pytest.raises(
        drm.UsageError, match=r"stage 'mesh' input 'input_1'.*\[1,192,192,3\].*\[1,160,160,3\]"
    ):
        Chain.from_file(chain, device_dir).start()
    dtype = _write_chain(
        tmp_path / "dtype.yaml",
        """
        stages:
          - name: digits
            vendor: a
            model: {listing: digits-base}
            inputs: {x: {from: x, steps: [{op: cast, dtype: float64}]}}
        outputs: {label: digits.label}
        """,
    )
    with pytest.raises(drm.UsageError, match=r"stage 'digits' input 'x'.*float32.*float64"):
        Chain.from_file(dtype, device_dir).start()
    missing = _write_chain(
        tmp_path / "missing.yaml",
        """
        stages:
          - {name: digits, vendor: a, model: {listing: digits-base}, inputs: {x: x}}
        outputs: {p: digits.probs}
        """,
    )
    with pytest.raises(drm.UsageError, match=r"stage 'digits' has no output 'probs'"):
        Chain.from_file(missing, device_dir).start()
    assert _fds() == fds_before


def test_bad_frame_is_a_usage_error(device_dir: Path, faces: np.ndarray) -> None:
    with Chain.from_file(EXAMPLES / "face_mesh.yaml", device_dir) as chain:
        with pytest.raises(drm.UsageError, match=r"frame 0: input 'image' is float64"):
            chain.run({"image": faces[:1].astype(np.float64)})


def _endless(faces: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
    i = 0
    while True:
        yield {"image": faces[i % len(faces) : i % len(faces) + 1]}
        i += 1


def test_killed_stage_is_reported_and_nothing_leaks(device_dir: Path, faces: np.ndarray) -> None:
    shm_before, fds_before = _shm(), _fds()
    chain = Chain.from_file(EXAMPLES / "face_mesh.yaml", device_dir).start()
    pids = chain.stage_pids
    with pytest.raises(StageFailed, match=r"stages? 'mesh'.*killed by SIGKILL") as info:
        for n, _ in enumerate(chain.run_many(_endless(faces))):
            if n == 3:
                os.kill(pids["mesh"], signal.SIGKILL)
    assert info.value.stage == "mesh" and info.value.returncode == -signal.SIGKILL
    chain.stop()
    assert all(_gone(pid) for pid in pids.values())
    assert _fds() == fds_before and _shm() == shm_before and _slot_mappings() == 0


def test_hung_stage_is_detected_within_the_timeout(device_dir: Path, faces: np.ndarray) -> None:
    fds_before = _fds()
    chain = Chain.from_file(
        EXAMPLES / "face_mesh.yaml", device_dir, timeouts=Timeouts(frame=2.0, stop=1.0)
    ).start()
    pids = chain.stage_pids
    stopped_at = None
    with pytest.raises(StageHung, match=r"stage 'detect'.*no progress.*2 s") as info:
        for n, _ in enumerate(chain.run_many(_endless(faces))):
            if n == 2:
                os.kill(pids["detect"], signal.SIGSTOP)  # alive but frozen: only a timeout can tell
                stopped_at = time.monotonic()
    assert stopped_at is not None and time.monotonic() - stopped_at < 30
    assert info.value.stage == "detect"
    assert all(_gone(pid) for pid in pids.values())
    assert _fds() == fds_before and _slot_mappings() == 0


def test_sigint_to_supervisor_stops_cleanly(device_dir: Path) -> None:
    script = textwrap.dedent(f"""
        import json, os, sys
        import numpy as np
        from edge_runtime.chain import Chain
        faces = np.load({str(Path(os.environ.get("EDGEMART_CORPUS", Path.home() / ".cache/edgemart-corpus")) / "data/mediapipe/face_detection_front.npz")!r})["input"]
        def frames():
            while True:
                yield {{"image": faces[:1]}}
        try:
            with Chain.from_file({str(EXAMPLES / "face_mesh.yaml")!r}, {str(device_dir)!r}) as chain:
                print(json.dumps(chain.stage_pids), flush=True)
                for n, _ in enumerate(chain.run_many(frames())):
                    if n == 2:
                        print("running", flush=True)
        except KeyboardInterrupt:
            print(json.dumps({{"maps": open("/proc/self/maps").read().count("edgemart-slot"),
                              "fds": sorted(os.listdir("/proc/self/fd"))}}), flush=True)
            sys.exit(130)
        """)  # fmt: skip
    shm_before = _shm()
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    try:
        assert proc.stdout is not None
        pids = json.loads(proc.stdout.readline())
        assert proc.stdout.readline().strip() == "running"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    after = json.loads(out.strip().splitlines()[-1])
    assert after["maps"] == 0 and after["fds"] == ["0", "1", "2", "3"]  # stdio + the listdir handle
    assert all(_gone(pid) for pid in pids.values())
    assert _shm() == shm_before


def test_each_stage_enforces_its_own_license(
    corpus: Path, tmp_path: Path, anchors: Path, digits_test: Path
) -> None:
    device_dir = make_device(tmp_path, corpus, {k: MODELS[k] for k in ("digits-base", "digits-independent")},
                             max_runs={"digits-independent": 3})  # fmt: skip
    x = np.load(digits_test)["x"]
    with Chain.from_file(EXAMPLES / "digits_two_vendors.json", device_dir) as chain:
        got = [chain.run({"x": x[i : i + 1]}) for i in range(3)]
        assert len(got) == 3
        with pytest.raises(StageRefused, match=r"stage 'independent': license refused") as info:
            chain.run({"x": x[3:4]})
    assert info.value.exit_code == 1
    device = Device.open(device_dir)
    with device.open_model(listing="digits-base") as base:
        assert base.runs_left() is None  # the other vendor's stage counted its runs on its own license
    with pytest.raises(
        StageRefused, match=r"stage 'independent'"
    ):  # exhausted: refused when the chain starts
        Chain.from_file(EXAMPLES / "digits_two_vendors.json", device_dir).start()


def test_cli_device_run(device_dir: Path, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.npz"
    cmd = [sys.executable, "-m", "edgemart", "device", "run", "--device-dir", str(device_dir),
           "--chain", str(EXAMPLES / "face_mesh.yaml"),
           "--input", str(corpus / "data/mediapipe/face_detection_front.npz"), "--input-key", "image=input",
           "--save-outputs", str(out), "--json"]  # fmt: skip
    result = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["frames"] == 2 and report["throughput_fps"] > 0
    assert set(report["stages"]) == {"detect", "mesh"} and report["stages"]["mesh"]["p99_ms"] > 0
    saved = np.load(out)
    assert saved["landmarks"].shape == (2, 1, 1, 1404) and saved["face_flag"].shape == (2, 1, 1, 1)

    frames = tmp_path / "frames"
    frames.mkdir()
    x = np.load(corpus / "data/digits/digits_test.npz")["x"]
    for i in range(3):
        np.save(frames / f"{i:03d}.npy", x[i : i + 1])
    cmd = [sys.executable, "-m", "edgemart", "device", "run", "--device-dir", str(device_dir),
           "--chain", str(EXAMPLES / "digits_two_vendors.json"), "--input", str(frames), "--json"]  # fmt: skip
    result = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["frames"] == 3

    stream = b"".join(_npy(x[i : i + 1]) for i in range(4))
    cmd[cmd.index("--input") + 1] = "-"
    result2 = subprocess.run(
        cmd, input=stream, capture_output=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert result2.returncode == 0, result2.stderr
    assert json.loads(result2.stdout)["frames"] == 4

    bad = subprocess.run([*cmd[:-3], "--input", str(corpus / "data/digits/digits_test.npz"), "--chain",
                          str(EXAMPLES / "face_mesh.yaml")], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert bad.returncode == 2 and "image" in bad.stderr


def _npy(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()
