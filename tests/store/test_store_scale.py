"""`make scale-test` in miniature: the real scale-out harness (PostgreSQL + SeaweedFS + gunicorn app workers +
job worker processes, concurrent clients, a fault phase that SIGKILLs a job worker holding a job and an app
worker and restarts PostgreSQL) for a few seconds per phase. Its checks are the harness's own: no 5xx in the
steady phase, no 500 in the fault phase, no lost upload, no double-issued seat, no lost usage record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_scale_harness_passes_with_faults(tmp_path, postgres_server, seaweed):
    out = tmp_path / "scale.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.scale", "--duration", "12", "--clients", "12", "--app-workers", "2",
         "--job-workers", "2", "--json", str(out)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=540,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    result = json.loads(out.read_text())
    steady, faults = result["steady"], result["faults"]
    assert steady["errors_5xx"] == 0 and steady["requests"] > 100
    assert [e["event"].split(" ")[0] for e in faults["faults"]] == ["job", "gunicorn", "PostgreSQL"]
    killed = [e for e in faults["faults"] if e["event"].startswith("job worker")]
    assert killed and killed[0]["job"] and faults["checks"]["killed_jobs_not_rerun"] == []
    assert faults["checks"]["jobs_retried"] >= 1  # the killed worker's job was finished by another
    for phase in (steady, faults):
        checks = phase["checks"]
        assert checks["uploads_lost"] == [] and checks["seats_double_issued"] == []
        assert checks["usage_records_stored"] == checks["usage_records_produced"] > 0
