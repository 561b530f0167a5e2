"""Concurrency on both databases: 50 simultaneous requests for the last evaluation seat issue exactly one
license; simultaneous retries of one upload (same Idempotency-Key) create one listing; simultaneous
uploads under one name give one listing and clean 4xx answers, never a 500; two new versions of one
listing published at the same instant never share a number."""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import delete, func, select

import drm
from store.models import IdempotentResponse, License, Listing, ListingVersion

N = 50


def _together(n: int, fn) -> list:  # type: ignore[no-untyped-def]
    """Run fn(i) in n threads released at the same instant."""
    barrier = threading.Barrier(n)

    def go(i: int):  # type: ignore[no-untyped-def]
        barrier.wait()
        return fn(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(go, range(n)))


@pytest.fixture
def last_seat(store, digits_base):
    """A listed model whose buyer bob already holds evaluation licenses on all but one allowed device,
    and 50 more enrolled devices of bob's."""
    assert store.upload("sally", digits_base, name="seat", targets="onnx-fp32").status_code == 202
    store.wait()
    with store.ctx.Session() as s:
        s.get(Listing, "seat").eval_device_limit = 3
        s.commit()

    def enroll() -> str:
        keys = drm.DeviceKeys.generate()
        r = store.client.post(
            "/api/v1/devices/enroll", json={"csr": keys.csr().decode()}, headers=store.auth("bob")
        )
        assert r.status_code == 201, r.json
        return keys.device_id

    for _ in range(2):
        r = store.client.post(
            "/api/v1/listings/seat/eval-license",
            json={"device_id": enroll(), "target": "onnx-fp32"},
            headers=store.auth("bob"),
        )
        assert r.status_code in (200, 201), r.json
    return [enroll() for _ in range(N)]


def test_fifty_requests_for_the_last_eval_seat_issue_exactly_one_license(store, last_seat):
    def ask(i: int) -> int:
        client = store.app.test_client()
        r = client.post(
            "/api/v1/listings/seat/eval-license",
            json={"device_id": last_seat[i], "target": "onnx-fp32"},
            headers=store.auth("bob"),
        )
        assert r.status_code < 500, r.data[:300]
        return r.status_code

    statuses = _together(N, ask)
    assert sorted(statuses).count(403) == N - 1, statuses
    assert len([s for s in statuses if s in (200, 201)]) == 1
    with store.ctx.Session() as s:
        devices = s.scalar(
            select(func.count(func.distinct(License.device_id))).where(
                License.listing_id == "seat", License.kind == "eval"
            )
        )
        assert devices == 3


def test_concurrent_retries_of_one_upload_create_one_listing(store, digits_base):
    raw = digits_base.read_bytes()

    def upload(i: int) -> tuple[int, str | None]:
        r = store.upload(
            "sally",
            raw,
            name="retry",
            headers={"Idempotency-Key": "upload-42"},
            client=store.app.test_client(),
        )
        return r.status_code, (r.json or {}).get("listing", {}).get("id")

    results = _together(8, upload)
    assert {code for code, _ in results} == {202}, results
    assert {listing for _, listing in results} == {"retry"}
    store.wait()
    with store.ctx.Session() as s:
        assert s.scalar(select(func.count()).select_from(Listing)) == 1
    blobs = store.counts()
    assert blobs["listings"] == 1 and blobs["builds"] == 1 and blobs["jobs"] == 1


def test_retry_whose_key_lookup_ran_before_the_first_commit_gets_the_first_listing(
    store, digits_base, monkeypatch
):
    """The interleaving behind a fresh-clone CI failure, forced: the retry's Idempotency-Key lookup in the
    view misses (the first attempt had not committed yet), then the first attempt commits, then the retry
    reaches the name check. It must answer with the first listing, never "name taken"."""
    from store.services import listings

    raw = digits_base.read_bytes()
    first = store.upload("sally", raw, name="retry", headers={"Idempotency-Key": "upload-7"})
    assert first.status_code == 202, first.json
    store.wait()
    with store.ctx.Session() as s:  # the first attempt has not yet recorded its answer for replay
        s.execute(delete(IdempotentResponse))
        s.commit()
    before = store.counts()
    real = listings.by_idempotency_key
    calls: list[str] = []

    def lookup_missing_once(session, seller, key):  # type: ignore[no-untyped-def]
        calls.append(key)
        return None if len(calls) == 1 else real(session, seller, key)

    monkeypatch.setattr(listings, "by_idempotency_key", lookup_missing_once)
    again = store.upload("sally", raw, name="retry", headers={"Idempotency-Key": "upload-7"})
    assert len(calls) >= 2, "the view's lookup and the name check's re-check both ran"
    assert again.status_code == 202, again.json
    assert again.json["listing"]["id"] == "retry"
    assert again.json["jobs"] == first.json["jobs"]
    store.wait()
    assert store.counts() == before  # the retry's model blob was not kept

    # Without the key, the same name is still a clean refusal.
    other = store.upload("sally", raw, name="retry")
    assert other.status_code == 422 and "already exists" in other.json["error"]["message"]


def test_concurrent_uploads_under_one_name_give_one_listing_and_clean_errors(store, digits_base):
    raw = digits_base.read_bytes()
    before = store.counts()

    def upload(i: int) -> int:
        r = store.upload("sally", raw, name="same", client=store.app.test_client())
        assert r.status_code < 500, r.data[:300]
        return r.status_code

    statuses = _together(6, upload)
    assert statuses.count(202) == 1 and all(s in (202, 409, 422) for s in statuses), statuses
    store.wait()
    after = store.counts()
    assert after["listings"] == before["listings"] + 1
    # the losers' model blobs were removed: one model + one sealed build + one quality report remain
    assert after["blobs"] == before["blobs"] + 3


def test_two_new_versions_at_once_never_share_a_number(store, digits_base, corpus):
    """Both read version 1 as the newest: the unique (listing, number) lets one commit version 2; the other
    gets a clean 409 and leaves no blobs (or, had it started after the first committed, version 3)."""
    assert store.upload("sally", digits_base, name="twice").status_code == 202
    store.wait()
    raw = (corpus / "models" / "digits" / "digits_mlp_independent.onnx").read_bytes()  # not v1's model
    before = store.counts()

    def publish(i: int) -> tuple[int, int | None]:
        r = store.app.test_client().post(
            "/api/v1/listings/twice/versions",
            data={"model": (io.BytesIO(raw), "model.onnx")},
            headers=store.auth("sally"),
            content_type="multipart/form-data",
        )
        assert r.status_code < 500, r.data[:300]
        return r.status_code, (r.json.get("version") or {}).get("number") if r.status_code == 202 else None

    results = _together(2, publish)
    statuses = sorted(s for s, _ in results)
    numbers = sorted(n for _, n in results if n is not None)
    assert statuses in ([202, 202], [202, 409]), results
    assert numbers == list(range(2, 2 + len(numbers))), results  # consecutive from 2, never the same twice
    store.wait()
    with store.ctx.Session() as s:
        stored = s.scalars(select(ListingVersion.number).where(ListingVersion.listing_id == "twice")).all()
    assert sorted(stored) == [1, *numbers]
    if numbers == [2]:
        # the winner added its model, its sealed build and its quality report; the loser's model is gone
        assert store.counts()["blobs"] == before["blobs"] + 3
