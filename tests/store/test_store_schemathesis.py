"""Property-based API testing with schemathesis against the store's own /openapi.json (in-process WSGI):
every /api/v1 operation gets generated valid and invalid requests; none may produce a 5xx, and responses
must match the status codes, content types and schemas the spec declares."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip(
    "schemathesis", reason="schemathesis is not installed (pip install -e '.[dev]')"
)

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.store.conftest import Store, make_store  # noqa: E402

pytestmark = pytest.mark.slow

# The usage-log upload body is text (one JSON record a line): send generated strings as they are.
schemathesis.serializer.alias("application/x-ndjson", "text/plain")

# Which account calls each operation, so generated requests reach past authentication into the views.
CALLER = {
    "api_upload_listing": "sally",
    "api_listing_usage": "sally",
    "api_get_job": "sally",
    "api_enroll_device": "bob",
    "api_list_devices": "bob",
    "api_upload_usage": "bob",
    "api_eval_license": "bob",
    "api_list_licenses": "bob",
    "api_get_license": "bob",
    "api_download_build": "bob",
    "api_production_licenses": "bill",
}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def api_store(corpus: Path) -> Iterator[tuple[Store, dict[str, str]]]:
    """A store holding one packaged listing, an enrolled device and an eval license; the returned ids are
    swapped into half of the generated requests so they reach past the 404s into the views."""
    import drm

    with tempfile.TemporaryDirectory(prefix="edgemart-schemathesis-") as tmp:
        st = make_store(Path(tmp))
        try:
            resp = st.upload("sally", corpus / "models" / "digits" / "digits_mlp_base.onnx", name="digits")
            assert resp.status_code == 202, resp.get_json()
            listing_id, job_id = resp.get_json()["listing"]["id"], resp.get_json()["jobs"][0]
            st.wait()
            keys = drm.DeviceKeys.generate()
            enroll = st.client.post(
                "/api/v1/devices/enroll", json={"csr": keys.csr().decode()}, headers=st.auth("bob")
            )
            assert enroll.status_code == 201, enroll.get_json()
            lic = st.client.post(
                f"/api/v1/listings/{listing_id}/eval-license",
                json={"device_id": keys.device_id, "target": "onnx-fp32"},
                headers=st.auth("bob"),
            ).get_json()
            ids = {
                "listing_id": listing_id,
                "job_id": job_id,
                "device_id": keys.device_id,
                "license_id": lic["license_id"],
                "build_id": lic["build_hash"].split(":", 1)[1],
                "target": "onnx-fp32",
            }
            yield st, ids
        finally:
            st.ctx.close()


MODES = ["positive", "negative"]


def _fuzz(operation: Any, mode: Any, headers: dict[str, str], ids: dict[str, str], statuses: set[int]) -> Any:
    from hypothesis import given
    from hypothesis import strategies as st

    @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode), real_ids=st.booleans())
    def run(case: Any, real_ids: bool) -> None:
        if real_ids and case.path_parameters:
            case.path_parameters = {k: ids.get(k, v) for k, v in case.path_parameters.items()}
        if real_ids and isinstance(case.body, dict):
            case.body = {k: ids.get(k, v) for k, v in case.body.items()}
        statuses.add(case.call_and_validate(headers=headers, checks=CHECKS).status_code)

    return run


@pytest.mark.parametrize("mode", MODES)
def test_every_operation(api_store: tuple[Store, dict[str, str]], mode: str) -> None:
    """Each operation of the spec, max 25 generated requests per mode; all failures reported together."""
    store, ids = api_store
    api = schemathesis.openapi.from_wsgi("/openapi.json", store.app)
    generation_mode = schemathesis.GenerationMode(mode)
    failures: list[str] = []
    reached: dict[str, set[int]] = {}
    seen = 0
    for result in api.get_all_operations():
        operation = result.ok()
        seen += 1
        who = CALLER.get(operation.definition.raw.get("operationId", ""), "ada")

        statuses: set[int] = set()
        run = _fuzz(operation, generation_mode, store.auth(who), ids, statuses)
        try:
            run()
        except AssertionError as exc:  # schemathesis FailureGroup / check failures
            failures.append(f"{operation.label}: {str(exc)[:2000]}")
        reached[operation.label] = statuses
    assert seen >= 15, f"only {seen} operations in /openapi.json"
    assert not failures, "\n\n".join(failures)
    print({label: sorted(codes) for label, codes in reached.items()})
    if mode == "positive":  # valid requests with real ids get past the 404s into most views
        ok = [label for label, codes in reached.items() if any(200 <= c < 300 for c in codes)]
        assert len(ok) >= 12, reached
