"""Attacks on license tokens: bit flips, algorithm substitution, stripped co-signatures, wrong
certificates, wrong devices, time windows, revocation and the HPKE info binding."""

from __future__ import annotations

import json
import random

import pytest
from cryptography.hazmat.primitives import serialization
from drm_testkit import BUILD_HASH, NOW, PROPERTY, IssueFn, Store
from hypothesis import given
from hypothesis import strategies as st

import drm
from drm._canonical import b64d, b64e, dumps
from drm.envelope import signed_message
from drm.license import LICENSE_TYP, LicenseClaims

# Bit flips in x5c make certificates with odd serials; cryptography warns before it refuses them.
pytestmark = pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")


def _verify(token: bytes, store: Store, device: drm.DeviceKeys, **kw: object) -> drm.VerifiedLicense:
    args: dict[str, object] = {"root": store.authority.cert, "now": NOW, "device_id": device.device_id}
    args.update(kw)
    return drm.verify_license(token, **args)  # type: ignore[arg-type]


def _refused(token: bytes, store: Store, device: drm.DeviceKeys, **kw: object) -> str:
    with pytest.raises(drm.LicenseRefused) as info:
        _verify(token, store, device, **kw)
    assert str(info.value) == "license refused"  # opaque to the caller; the reason is for the audit log
    return info.value.reason


def _envelope(token: bytes) -> dict:
    return json.loads(token)


def _resign(claims: dict, signer_key, cert, pq_key=None, typ: str = LICENSE_TYP) -> bytes:  # type: ignore[no-untyped-def]
    body = dumps(claims)
    sigs = {"Ed25519": b64e(signer_key.sign(signed_message(typ, body)))}
    if pq_key is not None:
        sigs["ML-DSA-65"] = b64e(pq_key.sign(signed_message(typ, body)))
    der = cert.public_bytes(serialization.Encoding.DER)
    return dumps({"payload": b64e(body), "sig": sigs, "typ": typ, "x5c": [b64e(der)]})


def _claims(token: bytes) -> dict:
    return json.loads(b64d(_envelope(token)["payload"], what="p", max_len=1 << 20))


# ----------------------------------------------------------------------------- round trips


@PROPERTY
@given(
    kind=st.sampled_from(["eval", "production"]),
    listing=st.from_regex(r"\A[A-Za-z0-9._:\-]{1,40}\Z"),
    days=st.integers(min_value=1, max_value=3650),
    max_runs=st.one_of(st.none(), st.integers(min_value=0, max_value=2**40)),
    pq=st.booleans(),
)
def test_license_round_trip(
    store: Store,
    device: drm.DeviceKeys,
    cek: bytes,
    issue: IssueFn,
    kind: str,
    listing: str,
    days: int,
    max_runs: int | None,
    pq: bool,
) -> None:
    token = issue(
        kind=kind,
        listing=listing,
        days=days,
        max_runs=max_runs,
        issuer=store.issuer if pq else store.issuer_ed_only,
    )
    v = _verify(token, store, device, build_hash=BUILD_HASH)
    c = v.claims
    assert (c.kind, c.listing, c.max_runs, c.device_id, c.build_hash) == (
        kind,
        listing,
        max_runs,
        device.device_id,
        BUILD_HASH,
    )
    assert c.not_after == NOW + days * 86400 and c.not_before <= NOW
    assert v.pq_verified is pq
    assert LicenseClaims.from_dict(c.to_dict()) == c
    assert drm.unwrap_cek(c, device) == cek


def test_device_without_ml_kem_gets_the_x25519_suite(store: Store, cek: bytes, issue: IssueFn) -> None:
    classic = drm.DeviceKeys.generate(pq=False)
    token = issue(recipient=classic.kem_public(), device_id=classic.device_id)
    c = _verify(token, store, classic).claims
    assert c.wrapped_cek["suite"].startswith("DHKEM-X25519")
    assert drm.unwrap_cek(c, classic) == cek


def test_fleet_key_license(store: Store, cek: bytes, issue: IssueFn) -> None:
    from cryptography.hazmat.primitives.asymmetric import x25519

    fleet = x25519.X25519PrivateKey.generate()
    raw = fleet.public_key().public_bytes_raw()
    fid = drm.key_id(raw)
    token = issue(recipient=drm.KemKeys(raw, None), device_id=None, fleet_key_id=fid, kind="production")
    c = drm.verify_license(token, root=store.authority.cert, now=NOW, fleet_key_ids=frozenset({fid})).claims
    assert drm.unwrap_cek(c, fleet) == cek
    with pytest.raises(drm.LicenseRefused):
        drm.verify_license(token, root=store.authority.cert, now=NOW, fleet_key_ids=frozenset({"0" * 32}))
    with pytest.raises(drm.LicenseRefused):
        drm.unwrap_cek(c, x25519.X25519PrivateKey.generate())


# ----------------------------------------------------------------------------- bit flips


def test_every_single_bit_flip_in_a_license_token_is_rejected(
    store: Store, device: drm.DeviceKeys, issue: IssueFn
) -> None:
    token = issue(issuer=store.issuer_ed_only)
    _verify(token, store, device)
    for i in range(len(token)):
        for bit in range(8):
            flipped = bytearray(token)
            flipped[i] ^= 1 << bit
            _refused(bytes(flipped), store, device)


def test_sampled_bit_flips_in_a_pq_cosigned_token_are_rejected(
    store: Store, device: drm.DeviceKeys, issue: IssueFn
) -> None:
    token = issue()
    rng = random.Random(7)
    for _ in range(1500):
        flipped = bytearray(token)
        flipped[rng.randrange(len(token))] ^= 1 << rng.randrange(8)
        _refused(bytes(flipped), store, device)


# ----------------------------------------------------------------------------- algorithm substitution


@pytest.mark.parametrize("alg", ["HS256", "none", "RS256", "ed25519", "ML-DSA-44"])
def test_a_signature_dict_naming_another_algorithm_is_refused(
    store: Store, device: drm.DeviceKeys, issue: IssueFn, alg: str
) -> None:
    env = _envelope(issue(issuer=store.issuer_ed_only))
    sig = env["sig"].pop("Ed25519")
    env["sig"][alg] = sig
    assert "malformed" in _refused(dumps(env), store, device)
    env["sig"]["Ed25519"] = sig  # extra entries next to the real one are refused too
    _refused(dumps(env), store, device)


def test_stripping_the_ml_dsa_cosignature_is_refused(
    store: Store, device: drm.DeviceKeys, issue: IssueFn
) -> None:
    env = _envelope(issue())
    del env["sig"]["ML-DSA-65"]
    assert "stripped" in _refused(dumps(env), store, device)


def test_an_ml_dsa_signature_from_another_key_is_refused(
    store: Store, device: drm.DeviceKeys, issue: IssueFn
) -> None:
    from cryptography.hazmat.primitives.asymmetric import mldsa

    token = issue()
    env = _envelope(token)
    body = b64d(env["payload"], what="p", max_len=1 << 20)
    env["sig"]["ML-DSA-65"] = b64e(mldsa.MLDSA65PrivateKey.generate().sign(signed_message(LICENSE_TYP, body)))
    assert "ML-DSA" in _refused(dumps(env), store, device)


def test_require_pq_refuses_an_ed25519_only_issuer(
    store: Store, device: drm.DeviceKeys, issue: IssueFn
) -> None:
    token = issue(issuer=store.issuer_ed_only)
    _verify(token, store, device)
    _refused(token, store, device, require_pq=True)


def test_a_revocation_list_is_not_accepted_as_a_license(store: Store, device: drm.DeviceKeys) -> None:
    rl = drm.sign_revocation_list(store.issuer, version=1, issued_at=NOW, revoked=[])
    _refused(rl, store, device)
    env = _envelope(rl)
    env["typ"] = LICENSE_TYP  # relabel: the signature covers the type
    _refused(dumps(env), store, device)


# ----------------------------------------------------------------------------- certificates


def test_a_device_certificate_cannot_act_as_an_issuer(
    store: Store, device: drm.DeviceKeys, issue: IssueFn
) -> None:
    rogue = drm.DeviceKeys.generate()
    rogue_cert = store.authority.issue_device_cert(rogue.csr(), now=NOW - 10)
    claims = _claims(issue())
    claims["issuer_kid"] = rogue.device_id
    token = _resign(claims, rogue.sign, rogue_cert)
    assert "purpose" in _refused(token, store, device)
    self_signed = rogue.self_signed_cert(now=NOW - 10)
    _refused(_resign(claims, rogue.sign, self_signed), store, device)


def test_the_root_itself_cannot_sign_licenses(store: Store, device: drm.DeviceKeys, issue: IssueFn) -> None:
    claims = _claims(issue())
    claims["issuer_kid"] = drm.key_id(store.authority.key.public_key())
    _refused(_resign(claims, store.authority.key, store.authority.cert), store, device)


def test_an_issuer_from_another_root_with_the_same_names_is_refused(
    store: Store, device: drm.DeviceKeys, cek: bytes, issue: IssueFn
) -> None:
    impostor_root = drm.Authority.generate(now=NOW - 100)  # same subject name as the real root
    assert impostor_root.cert.subject == store.authority.cert.subject
    impostor = impostor_root.issue_issuer(now=NOW - 100)
    token = issue(issuer=impostor)
    assert "does not verify" in _refused(token, store, device)


def test_expired_and_not_yet_valid_issuer_certificates_are_refused(
    store: Store, device: drm.DeviceKeys, issue: IssueFn
) -> None:
    short = store.authority.issue_issuer(now=NOW - 86400, days=0)  # valid from NOW-86700 to NOW-86400
    _refused(issue(issuer=short), store, device)
    future = store.authority.issue_issuer(now=NOW + 86400)
    _refused(issue(issuer=future), store, device)


def test_issuer_kid_must_match_the_signing_certificate(
    store: Store, device: drm.DeviceKeys, issue: IssueFn
) -> None:
    claims = _claims(issue(issuer=store.issuer_ed_only))
    claims["issuer_kid"] = "0" * 32
    assert "issuer_kid" in _refused(
        _resign(claims, store.issuer_ed_only.key, store.issuer_ed_only.cert), store, device
    )


def test_a_garbage_certificate_in_x5c_is_refused(
    store: Store, device: drm.DeviceKeys, issue: IssueFn
) -> None:
    env = _envelope(issue())
    for der in (b"", b"\x30\x03\x02\x01\x01", b"\x30" + b"\xff" * 20, bytes(300)):
        env["x5c"] = [b64e(der)]
        _refused(dumps(env), store, device)
    env["x5c"] = []
    _refused(dumps(env), store, device)


# ----------------------------------------------------------------------------- claims


def test_another_device_cannot_use_or_unwrap_the_license(
    store: Store, device: drm.DeviceKeys, other_device: drm.DeviceKeys, issue: IssueFn
) -> None:
    token = issue()
    assert "another device" in _refused(token, store, other_device)
    claims = _verify(token, store, device).claims
    with pytest.raises(drm.LicenseRefused):
        drm.unwrap_cek(claims, other_device)
    _refused(token, store, device, device_id=None)


def test_time_window(store: Store, device: drm.DeviceKeys, issue: IssueFn) -> None:
    token = issue(days=1)
    c = _verify(token, store, device).claims
    _verify(token, store, device, now=c.not_after - 1)
    assert "expired" in _refused(token, store, device, now=c.not_after)
    assert "not yet valid" in _refused(token, store, device, now=c.not_before - 1)


def test_revoked_and_other_build(store: Store, device: drm.DeviceKeys, issue: IssueFn) -> None:
    token = issue()
    lid = _verify(token, store, device).claims.license_id
    assert "revoked" in _refused(token, store, device, revoked=frozenset({lid}))
    assert "another build" in _refused(token, store, device, build_hash="sha256:" + "cd" * 32)


def test_hpke_info_binds_license_id_build_and_device(
    store: Store, device: drm.DeviceKeys, cek: bytes, issue: IssueFn
) -> None:
    """A wrapped key moved into other (validly signed) claims does not unwrap: the info differs."""
    donor = _verify(issue(), store, device).claims
    for change in ({"license_id": "lic_other"}, {"build_hash": "sha256:" + "cd" * 32}):
        claims = _claims(issue(issuer=store.issuer_ed_only))
        claims.update(change)
        claims["wrapped_cek"] = donor.wrapped_cek
        token = _resign(claims, store.issuer_ed_only.key, store.issuer_ed_only.cert)
        moved = _verify(token, store, device).claims  # signature fine: the issuer signed it
        with pytest.raises(drm.LicenseRefused):
            drm.unwrap_cek(moved, device)
    assert drm.unwrap_cek(donor, device) == cek


@pytest.mark.parametrize(
    "change",
    [
        {"kind": "trial"},
        {"device_id": None},
        {"fleet_key_id": "0" * 32},
        {"device_id": "not-hex"},
        {"not_after": None},
        {"not_after": NOW - 10**6},
        {"max_runs": -1},
        {"max_runs": True},
        {"wrapped_cek": {"suite": "DHKEM-P256-HKDF-SHA256/HKDF-SHA256/AES-128-GCM", "enc": "AAAA"}},
        {"wrapped_cek": {"suite": "MLKEM768-X25519/HKDF-SHA256/AES-256-GCM", "enc": "AAAA"}},
        {"build_hash": "md5:abc"},
        {"v": 2},
        {"extra": 1},
        {"listing": "a b"},
        {"issued_at": -5},
        {"version": 0},
        {"version": None},  # absent, never null
        {"version": True},
        {"version": "2"},
        {"version": 2**31},
    ],
)
def test_signed_but_malformed_claims_are_refused(
    store: Store, device: drm.DeviceKeys, issue: IssueFn, change: dict[str, object]
) -> None:
    claims = _claims(issue(issuer=store.issuer_ed_only))
    claims.update(change)
    token = _resign(claims, store.issuer_ed_only.key, store.issuer_ed_only.cert)
    assert "malformed" in _refused(token, store, device)
    with pytest.raises(drm.FormatError):
        LicenseClaims.from_dict(claims)


def test_the_version_claim_is_signed_and_optional(
    store: Store, device: drm.DeviceKeys, issue: IssueFn
) -> None:
    """A license names its listing version; one issued without (before versions existed) still verifies."""
    versioned = issue(version=3)
    assert _claims(versioned)["version"] == 3 and _verify(versioned, store, device).claims.version == 3
    plain = issue()
    assert "version" not in _claims(plain) and _verify(plain, store, device).claims.version is None
    claims = _claims(versioned)
    claims["version"] = 4  # changing it breaks the signature
    forged = dumps({**_envelope(versioned), "payload": b64e(dumps(claims))})
    assert "signature" in _refused(forged, store, device)


def test_the_issuer_refuses_to_sign_what_a_verifier_would_reject(issue: IssueFn) -> None:
    with pytest.raises(drm.FormatError):
        issue(listing="has spaces")
    with pytest.raises(drm.FormatError):
        issue(days=None)  # an eval license must expire


def test_nonzero_unused_bits_in_the_certificate_signature_are_refused(
    store: Store, device: drm.DeviceKeys
) -> None:
    """Regression (found by the exhaustive bit-flip test): the signature BIT STRING's unused-bits byte is not
    covered by the signature, and the X.509 parser accepts 1..7 when the signature's last bits are zero."""
    for _ in range(64):  # until the signature ends in a 0 bit, so one unused bit still parses (p = 1/2 each)
        cert = store.authority.issue_device_cert(device.csr(), now=NOW)
        if cert.signature[-1] & 1 == 0:
            break
    der = bytearray(cert.public_bytes(serialization.Encoding.DER))
    tail = b"\x03\x41\x00" + cert.signature
    assert der.endswith(tail)
    der[len(der) - len(tail) + 2] = 0x01  # one unused bit
    malleated = drm.cert_from_bytes(bytes(der))
    assert malleated.signature == cert.signature  # same signature, different bytes
    drm.verify_cert(cert, store.authority.cert, now=NOW, purpose=drm.EKU_DEVICE)
    with pytest.raises(drm.LicenseRefused) as info:
        drm.verify_cert(malleated, store.authority.cert, now=NOW, purpose=drm.EKU_DEVICE)
    assert "encoding" in info.value.reason
