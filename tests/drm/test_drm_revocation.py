"""Revocation lists: round trip, downgrade, freshness, and signed-but-malformed lists."""

from __future__ import annotations

import pytest
from drm_testkit import NOW, PROPERTY, Store
from hypothesis import given
from hypothesis import strategies as st

import drm
from drm.envelope import sign_envelope
from drm.revocation import REVOCATION_TYP

IDS = st.from_regex(r"\Alic_[0-9a-f]{24}\Z")


@PROPERTY
@given(version=st.integers(min_value=0, max_value=2**40), revoked=st.lists(IDS, max_size=30))
def test_round_trip(store: Store, version: int, revoked: list[str]) -> None:
    token = drm.sign_revocation_list(store.issuer, version=version, issued_at=NOW, revoked=revoked)
    rl = drm.verify_revocation_list(token, root=store.authority.cert, now=NOW, current_version=version)
    assert (rl.version, rl.issued_at, rl.revoked) == (version, NOW, frozenset(revoked))


def test_downgrade_is_refused_and_same_or_newer_accepted(store: Store) -> None:
    old = drm.sign_revocation_list(store.issuer, version=3, issued_at=NOW - 100, revoked=["lic_a"])
    new = drm.sign_revocation_list(store.issuer, version=4, issued_at=NOW, revoked=["lic_a", "lic_b"])
    assert drm.verify_revocation_list(new, root=store.authority.cert, now=NOW, current_version=3).version == 4
    assert drm.verify_revocation_list(new, root=store.authority.cert, now=NOW, current_version=4).version == 4
    with pytest.raises(drm.LicenseRefused) as info:
        drm.verify_revocation_list(old, root=store.authority.cert, now=NOW, current_version=4)
    assert "older" in info.value.reason


def test_future_and_stale_lists(store: Store) -> None:
    future = drm.sign_revocation_list(store.issuer, version=1, issued_at=NOW + 3600, revoked=[])
    with pytest.raises(drm.LicenseRefused):
        drm.verify_revocation_list(future, root=store.authority.cert, now=NOW)
    stale = drm.sign_revocation_list(store.issuer, version=1, issued_at=NOW - 10 * 86400, revoked=[])
    drm.verify_revocation_list(stale, root=store.authority.cert, now=NOW)
    with pytest.raises(drm.LicenseRefused):
        drm.verify_revocation_list(stale, root=store.authority.cert, now=NOW, max_age=7 * 86400)


def test_a_license_is_not_accepted_as_a_revocation_list(store: Store, issue) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(drm.LicenseRefused):
        drm.verify_revocation_list(issue(), root=store.authority.cert, now=NOW)


@pytest.mark.parametrize(
    "payload",
    [
        {"issued_at": NOW, "revoked": ["b", "a"], "v": 1, "version": 1},  # unsorted
        {"issued_at": NOW, "revoked": ["a", "a"], "v": 1, "version": 1},  # duplicate
        {"issued_at": NOW, "revoked": [1], "v": 1, "version": 1},
        {"issued_at": NOW, "revoked": ["has space"], "v": 1, "version": 1},
        {"issued_at": NOW, "revoked": [], "v": 1, "version": -1},
        {"issued_at": NOW, "revoked": [], "v": 2, "version": 1},
        {"issued_at": NOW, "revoked": {}, "v": 1, "version": 1},
        {"issued_at": NOW, "revoked": [], "v": 1},
        {"issued_at": NOW, "revoked": [], "v": 1, "version": 1, "x": 0},
    ],
)
def test_signed_but_malformed_lists_are_refused(store: Store, payload: dict) -> None:
    token = sign_envelope(REVOCATION_TYP, payload, store.issuer)
    with pytest.raises(drm.LicenseRefused):
        drm.verify_revocation_list(token, root=store.authority.cert, now=NOW)


def test_every_bit_flip_in_a_small_list_is_refused(store: Store) -> None:
    import warnings

    token = drm.sign_revocation_list(store.issuer_ed_only, version=2, issued_at=NOW, revoked=["lic_x"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(0, len(token)):
            flipped = bytearray(token)
            flipped[i] ^= 1 << (i % 8)
            with pytest.raises(drm.LicenseRefused):
                drm.verify_revocation_list(bytes(flipped), root=store.authority.cert, now=NOW)
