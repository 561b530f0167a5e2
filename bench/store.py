"""Store benchmark: eval-license issuance throughput vs a minimal endpoint (/healthz) on the same app.

Both run through the same Flask app and WSGI stack (in-process test client), interleaved, so the ratio
shows what issuance itself costs: DB transaction, HPKE wrap (hybrid ML-KEM-768+X25519), Ed25519 +
ML-DSA-65 signatures."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

CORPUS = Path.home() / ".cache" / "edgemart-corpus"


def run(quick: bool) -> dict[str, dict[str, Any]]:
    import os

    import drm
    from store import create_app
    from store.services import accounts

    corpus = Path(os.environ.get("EDGEMART_CORPUS", CORPUS))
    n_buyers = 8 if quick else 30
    with tempfile.TemporaryDirectory(prefix="edgemart-bench-store-") as tmp:
        app = create_app({"DATA_DIR": tmp, "JOB_POLL_SECONDS": 0.1})
        ctx = app.extensions["edgemart"]
        client = app.test_client()
        try:
            with ctx.Session() as s:
                seller = accounts.create_user(s, "seller", "seller", now=ctx.now())
                seller_tok = accounts.issue_token(s, seller, now=ctx.now())
                buyers = []
                for i in range(n_buyers):
                    u = accounts.create_user(s, f"buyer{i}", "buyer", now=ctx.now())
                    buyers.append(accounts.issue_token(s, u, now=ctx.now()))
                s.commit()
            model = (corpus / "models/digits/digits_mlp_base.onnx").read_bytes()
            import io

            r = client.post(
                "/api/v1/listings",
                headers={"Authorization": f"Bearer {seller_tok}"},
                data={
                    "name": "bench-digits",
                    "license": "MIT",
                    "targets": "onnx-fp32",
                    "model": (io.BytesIO(model), "m.onnx"),
                },
                content_type="multipart/form-data",
            )
            assert r.status_code == 202, r.get_json()
            assert ctx.queue.wait_idle(120)
            listing = r.get_json()["listing"]["id"]
            # Each buyer enrolls 3 devices (the per-buyer eval limit); each device gets one fresh license.
            devices = []
            for tok in buyers:
                for _ in range(3):
                    keys = drm.DeviceKeys.generate()
                    r = client.post(
                        "/api/v1/devices/enroll",
                        json={"csr": keys.csr().decode()},
                        headers={"Authorization": f"Bearer {tok}"},
                    )
                    assert r.status_code == 201, r.get_json()
                    devices.append((tok, r.get_json()["device_id"]))
            issue_s: list[float] = []
            health_s: list[float] = []
            for tok, device_id in devices:
                t0 = time.perf_counter()
                r = client.post(
                    f"/api/v1/listings/{listing}/eval-license",
                    json={"device_id": device_id, "target": "onnx-fp32"},
                    headers={"Authorization": f"Bearer {tok}"},
                )
                issue_s.append(time.perf_counter() - t0)
                assert r.status_code == 201, r.get_json()
                t0 = time.perf_counter()
                assert client.get("/healthz").status_code == 200
                health_s.append(time.perf_counter() - t0)
        finally:
            ctx.close()
    issue_rps = 1.0 / statistics.median(issue_s)
    health_rps = 1.0 / statistics.median(health_s)
    return {
        "store.license_issue_rps_ratio": {
            "value": issue_rps / health_rps,
            "target": None,
            "unit": "x",
            "note": f"fresh eval licenses {issue_rps:.0f}/s vs /healthz {health_rps:.0f}/s, one worker, in-process "
            f"WSGI, {len(issue_s)} issues",
        },
        "store.license_issue_ms": {
            "value": statistics.median(issue_s) * 1000,
            "target": "<= 50",
            "unit": "ms",
            "note": "median time to issue one fresh eval license (transaction + HPKE + Ed25519 + ML-DSA-65)",
        },
    }
