"""Confined processing of seller bytes (store.sandbox): a task cannot read the store's keys, database or
secret, sees no secrets in its environment, opens no TCP connection, cannot signal the store, and every
limit it hits is a clear refusal or a failed job naming the limit, never a 500."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from store.sandbox import Sandbox, SandboxLimit, SandboxLimits, landlock_available
from store.services import packaging
from tests.store.conftest import make_store

needs_landlock = pytest.mark.skipif(not landlock_available(), reason="kernel without Landlock")


@pytest.fixture
def own_store(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """A store whose environment holds the secrets a deployment passes as environment variables."""
    for key, value in {
        "EDGEMART_SECRET_KEY": "env-secret-key",
        "AWS_SECRET_ACCESS_KEY": "aws-secret",
        "EDGEMART_PKCS11_PIN": "1234",
    }.items():
        monkeypatch.setenv(key, value)
    st = make_store(tmp_path / "data", WORKER="none")
    yield st
    st.ctx.close()


@needs_landlock
def test_a_task_reads_no_key_no_database_no_secret_and_reaches_nothing(own_store):
    data = Path(own_store.ctx.config["DATA_DIR"])
    secrets = sorted(str(p) for p in data.rglob("*") if p.is_file())
    assert any("keys" in s for s in secrets) and any(s.endswith("store.db") for s in secrets)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    try:
        result, _ = own_store.ctx.sandbox.run(
            "selftest",
            {
                "paths": [
                    *secrets,
                    f"/proc/{os.getpid()}/environ",
                    f"/proc/{os.getpid()}/mem",
                    f"/proc/{os.getpid()}/cmdline",
                    "/proc/self/environ",  # of its own /proc, only cmdline is readable (TensorFlow needs it)
                    "/etc/hostname",
                ],
                "port": listener.getsockname()[1],
                "pid": os.getpid(),
            },
            {},
        )
    finally:
        listener.close()
    assert result["readable"] == []
    assert not [k for k in result["env"] if k.startswith(("EDGEMART_", "AWS_", "PKCS11"))], result["env"]
    assert result["tcp"] is False and result["signal"] is False
    assert result["cwd"] == []  # an empty private working directory: relative paths lead nowhere
    assert result["limits"]["nofile"] == 256 and result["limits"]["cpu"] == 900


def test_the_probe_itself_can_see_what_it_is_allowed_to(own_store, tmp_path):
    """The refusals above are the sandbox's doing: paths it is told it may read are read."""
    readable = tmp_path / "readable.txt"
    readable.write_text("ok")
    paths = [str(readable), "/proc/self/cmdline"]
    result, _ = own_store.ctx.sandbox.run("selftest", {"paths": paths}, {}, read=[tmp_path])
    assert result["readable"] == paths


def test_memory_cpu_and_wall_limits_are_refusals_naming_the_limit():
    sandbox = Sandbox(SandboxLimits(memory_bytes=256 << 20), [])
    assert sandbox.run("selftest", {"allocate": 64 << 20}, {})[0]["allocated"] == 64 << 20
    with pytest.raises(SandboxLimit, match="SANDBOX_MEMORY_BYTES"):
        sandbox.run("selftest", {"allocate": 1 << 30}, {})
    with pytest.raises(SandboxLimit, match="SANDBOX_CPU_SECONDS"):
        Sandbox(SandboxLimits(cpu_seconds=1), []).run("selftest", {"spin": 30}, {})
    with pytest.raises(SandboxLimit, match="SANDBOX_WALL_SECONDS"):
        Sandbox(SandboxLimits(wall_seconds=1), []).run("selftest", {"spin": 30}, {})
    assert sandbox.run("selftest", {}, {})[0]["readable"] == []  # the runner carries on


def test_a_packaging_job_over_the_memory_limit_fails_naming_it(own_store, corpus):
    model = corpus / "models" / "rapidocr" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    samples = corpus / "data" / "rapidocr" / "ch_ppocr_mobile_v2.0_cls_infer.npz"
    r = own_store.upload("sally", model, name="tight", targets="arm-cpu", calibration=samples)
    assert r.status_code == 202, r.json
    own_store.ctx.config["SANDBOX_MEMORY_BYTES"] = 1 << 20  # 1 MiB beyond the runner: quantization cannot fit
    lease = packaging.claim_next(own_store.ctx)
    assert lease is not None
    packaging.run_job(own_store.ctx, lease)
    job = own_store.client.get(f"/api/v1/jobs/{lease.job_id}", headers=own_store.auth("sally")).json
    assert job["state"] == "failed", job
    assert job["failure"]["code"] == "limit" and "SANDBOX_MEMORY_BYTES" in job["failure"]["reason"], job


def test_an_upload_over_the_wall_limit_is_a_422(own_store, digits_base):
    own_store.ctx.config["SANDBOX_WALL_SECONDS"] = 1e-6
    before = own_store.counts()
    r = own_store.upload("sally", digits_base, name="slow")
    assert r.status_code == 422, r.data[:300]
    assert "SANDBOX_WALL_SECONDS" in r.get_data(as_text=True)
    assert own_store.counts() == before


def test_the_runner_holds_none_of_the_store_secrets_in_memory(own_store):
    """The runner is exec'd, not forked from the store: the session secret is nowhere in its memory."""
    secret = Path(own_store.ctx.config["DATA_DIR"], "secret.key")
    needle = secret.read_bytes() if secret.exists() else own_store.app.secret_key
    runner = Sandbox._ensure_runner()
    mem = Path(f"/proc/{runner.process.pid}/mem")
    found = False
    with open(f"/proc/{runner.process.pid}/maps") as maps, open(mem, "rb", buffering=0) as fp:
        for line in maps:
            addr, perms = line.split()[:2]
            if "r" not in perms:
                continue
            start, end = (int(x, 16) for x in addr.split("-"))
            try:
                fp.seek(start)
                chunk = fp.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            if needle in chunk:
                found = True
                break
    assert not found


@needs_landlock
def test_the_gate_reads_its_policy_when_the_checkout_is_not_on_sys_path(tmp_path, digits_base):
    # `pip install -e .` (make venv) maps our packages through an import hook, not sys.path: the CLI, the
    # demo and the bench run that way. The gate task reads licenses/policy.json lazily and must still be
    # allowed to (found by `make bench`: every upload through the CLI-started store was a 422).
    import subprocess
    import sys

    script = (
        "import sys, json\n"
        "from pathlib import Path\n"
        f"sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != Path({str(Path.cwd())!r}).resolve()]\n"
        "from store.sandbox import Sandbox, SandboxLimits\n"
        f"model = Path({str(digits_base)!r}).read_bytes()\n"
        "result, _ = Sandbox(SandboxLimits(), []).run('gate', {'license': 'MIT'}, {'model': model})\n"
        "print(json.dumps(result['decision']['outcome']))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() in ('"allow"', '"allow_with_obligations"', '"block"')
