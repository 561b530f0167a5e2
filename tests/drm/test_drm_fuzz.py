"""Fuzz-style property tests for every drm parser: container header, license token and claims,
usage record, revocation list, device state, canonical JSON. Whatever the input, the outcome is a
parsed value or one clean drm error, never KeyError/TypeError/ValueError/RecursionError.

Example count: EDGEMART_FUZZ_EXAMPLES (300 by default; `make fuzz` runs 20000)."""

from __future__ import annotations

import json
import warnings

import pytest
from drm_testkit import FUZZ, NOW, IssueFn, Store
from hypothesis import given
from hypothesis import strategies as st

import drm
from drm._canonical import b64d, b64e, dumps, loads
from drm.envelope import sign_envelope, signed_message
from drm.license import LICENSE_TYP, LicenseClaims
from drm.revocation import REVOCATION_TYP

CLEAN = (drm.FormatError, drm.LicenseRefused, drm.IntegrityError)
KEY = bytes(range(32))

pytestmark = pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.text(max_size=40),
    st.floats(allow_nan=True),
)
json_values = st.recursive(
    json_scalars,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=10), kids, max_size=4)
    ),
    max_leaves=12,
)


def _encode(value: object) -> bytes:
    """Canonical when possible; otherwise plain JSON (floats, huge ints) so parsers see it anyway."""
    try:
        return dumps(value)
    except drm.FormatError:
        return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _mutate(obj: dict, data: st.DataObject) -> dict:
    """Replace, delete or add one (possibly nested) field with an arbitrary JSON value."""
    obj = json.loads(json.dumps(obj))
    target = obj
    keys = sorted(target)
    while keys and data.draw(st.booleans(), label="descend") and isinstance(target.get(keys[0]), dict):
        target = target[data.draw(st.sampled_from([k for k in keys if isinstance(target[k], dict)] or keys))]
        if not isinstance(target, dict):
            return obj
        keys = sorted(target)
    action = data.draw(st.sampled_from(["replace", "delete", "add"]), label="action")
    if action == "add" or not keys:
        target[data.draw(st.text(max_size=8), label="new key")] = data.draw(json_values, label="value")
    elif action == "delete":
        del target[data.draw(st.sampled_from(keys), label="key")]
    else:
        target[data.draw(st.sampled_from(keys), label="key")] = data.draw(json_values, label="value")
    return obj


# ----------------------------------------------------------------------------- canonical JSON


@FUZZ
@given(
    raw=st.one_of(st.binary(max_size=200), json_values.map(_encode), st.text(max_size=100).map(str.encode))
)
def test_fuzz_canonical_loads(raw: bytes) -> None:
    try:
        value = loads(raw, max_size=10_000, what="fuzz")
    except drm.FormatError:
        return
    assert dumps(value) == raw


@FUZZ
@given(value=json_values)
def test_fuzz_canonical_dumps_round_trips_or_refuses(value: object) -> None:
    try:
        raw = dumps(value)
    except drm.FormatError:
        return
    assert loads(raw, max_size=1 << 20, what="fuzz") == json.loads(raw)


@FUZZ
@given(text=st.text(max_size=60))
def test_fuzz_base64url(text: str) -> None:
    try:
        out = b64d(text, what="fuzz", max_len=64)
    except drm.FormatError:
        return
    assert b64e(out) == text


# ----------------------------------------------------------------------------- container header


@pytest.fixture(scope="module")
def sealed() -> bytes:
    return drm.seal(b"fuzz target model" * 300, key=KEY, target="arm-cpu", chunk_size=4096)


@FUZZ
@given(raw=st.binary(max_size=400))
def test_fuzz_container_random_bytes(raw: bytes) -> None:
    for data in (raw, drm.container.MAGIC + raw):
        with pytest.raises(CLEAN):
            drm.open_sealed(data, key=KEY)
        try:
            drm.read_header(data)
        except drm.FormatError:
            pass


@FUZZ
@given(data=st.data())
def test_fuzz_container_header_fields(sealed: bytes, data: st.DataObject) -> None:
    import struct

    head_len = drm.header_size(sealed[:13])
    obj = _mutate(drm.read_header(sealed[:head_len]).to_dict(), data)
    body = _encode(obj)
    edited = drm.container.MAGIC + struct.pack(">BI", 1, len(body)) + body + sealed[head_len:]
    try:
        drm.read_header(edited)
    except drm.FormatError:
        pass
    with pytest.raises(drm.IntegrityError):
        drm.open_sealed(edited, key=KEY)


# ----------------------------------------------------------------------------- license token and claims


@FUZZ
@given(raw=st.one_of(st.binary(max_size=300), json_values.map(_encode)))
def test_fuzz_license_random_input(store: Store, raw: bytes) -> None:
    with pytest.raises(drm.LicenseRefused):
        drm.verify_license(raw, root=store.authority.cert, now=NOW, device_id="0" * 32)


@FUZZ
@given(data=st.data())
def test_fuzz_license_envelope_fields(
    store: Store, issue: IssueFn, device: drm.DeviceKeys, data: st.DataObject
) -> None:
    env = _mutate(json.loads(issue(issuer=store.issuer_ed_only)), data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(drm.LicenseRefused):
            drm.verify_license(_encode(env), root=store.authority.cert, now=NOW, device_id=device.device_id)


@FUZZ
@given(data=st.data())
def test_fuzz_license_claims_signed_by_the_issuer(
    store: Store, issue: IssueFn, device: drm.DeviceKeys, data: st.DataObject
) -> None:
    """The signature is valid, so the claims parser itself faces the fuzzed fields."""
    token = issue(issuer=store.issuer_ed_only)
    env = json.loads(token)
    claims = _mutate(json.loads(b64d(env["payload"], what="p", max_len=1 << 16)), data)
    body = _encode(claims)
    env["payload"] = b64e(body)
    env["sig"] = {"Ed25519": b64e(store.issuer_ed_only.key.sign(signed_message(LICENSE_TYP, body)))}
    try:
        LicenseClaims.from_dict(claims)
    except drm.FormatError:
        pass
    try:
        v = drm.verify_license(_encode(env), root=store.authority.cert, now=NOW, device_id=device.device_id)
    except drm.LicenseRefused:
        return
    # Only value changes the claims allow (another listing name, a later expiry...) get here;
    # the key unwrap either works (binding untouched) or is one clean refusal.
    try:
        drm.unwrap_cek(v.claims, device)
    except drm.LicenseRefused:
        pass


# ----------------------------------------------------------------------------- usage record


@FUZZ
@given(data=st.data())
def test_fuzz_usage_records(device: drm.DeviceKeys, data: st.DataObject) -> None:
    first = drm.make_record(
        device.sign,
        prev_line=None,
        seq=0,
        device_id=device.device_id,
        t=NOW,
        event="run",
        license_id="lic_1",
        build_hash="sha256:" + "00" * 32,
        runs=1,
    )
    second = drm.make_record(
        device.sign,
        prev_line=first,
        seq=1,
        device_id=device.device_id,
        t=NOW,
        event="run",
        license_id="lic_1",
        build_hash="sha256:" + "00" * 32,
        runs=2,
    )
    mutated = _encode(_mutate(json.loads(second), data))
    raw = data.draw(st.one_of(st.just(mutated), st.binary(max_size=200)), label="line")
    report = drm.verify_log(first + b"\n" + raw, device.sign.public_key(), device_id=device.device_id)
    if raw == b"":  # "first\n" is simply a one-record log
        assert report.ok and len(report.records) == 1
    elif raw != second:
        assert (report.ok, report.first_bad, len(report.records)) == (False, 1, 1)


# ----------------------------------------------------------------------------- revocation list


@FUZZ
@given(data=st.data())
def test_fuzz_revocation_payload(store: Store, data: st.DataObject) -> None:
    payload = _mutate({"issued_at": NOW, "revoked": ["lic_a", "lic_b"], "v": 1, "version": 3}, data)
    try:
        token = sign_envelope(REVOCATION_TYP, payload, store.issuer_ed_only)
    except drm.FormatError:
        return  # not even representable in canonical JSON (a float, a huge integer)
    try:
        rl = drm.verify_revocation_list(token, root=store.authority.cert, now=NOW)
    except drm.LicenseRefused:
        return
    assert isinstance(rl.version, int) and all(isinstance(r, str) for r in rl.revoked)


@FUZZ
@given(raw=st.one_of(st.binary(max_size=300), json_values.map(_encode)))
def test_fuzz_revocation_random_input(store: Store, raw: bytes) -> None:
    with pytest.raises(drm.LicenseRefused):
        drm.verify_revocation_list(raw, root=store.authority.cert, now=NOW)


# ----------------------------------------------------------------------------- device state


@FUZZ
@given(raw=st.binary(max_size=200), state=json_values)
def test_fuzz_device_state(raw: bytes, state: object) -> None:
    with pytest.raises(drm.IntegrityError):
        drm.open_state(drm.sealed_state.STATE_MAGIC + raw, key=KEY, device_id="d")
    if isinstance(state, dict):
        try:
            blob = drm.seal_state(state, key=KEY, device_id="d")
        except drm.FormatError:
            return
        assert drm.open_state(blob, key=KEY, device_id="d") == json.loads(dumps(state))
