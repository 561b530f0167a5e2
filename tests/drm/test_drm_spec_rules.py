"""Rules docs/FORMAT.md states that the code did not enforce before the spec was written (issue #22).

Each test failed before its fix: identifiers with a trailing newline, PEM inside ``x5c``, unknown critical
certificate extensions, and issuer names that are equal as strings but not as DER."""

from __future__ import annotations

import json

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from drm_testkit import NOW, IssueFn, Store

import drm
from drm._canonical import b64e, dumps
from drm.keys import _builder, _name


def test_identifiers_with_a_trailing_newline_are_refused(
    issue: IssueFn, store: Store, device: drm.DeviceKeys
) -> None:
    # Python's `$` also matches before a final newline; every pattern now ends at the end of the text.
    with pytest.raises(drm.UsageError):
        issue(license_id="lic_a\n")
    with pytest.raises(drm.UsageError):
        issue(listing="listing\n")
    with pytest.raises(drm.FormatError):
        drm.seal(b"abc", key=bytes(32), target="arm-cpu\n")
    with pytest.raises(drm.FormatError):
        drm.seal(b"abc", key=bytes(32), target="arm-cpu", media_type="application/x\n")
    with pytest.raises(drm.LicenseRefused):
        bad = drm.sign_revocation_list(store.issuer, version=2, issued_at=NOW, revoked=["lic_a\n"])
        drm.verify_revocation_list(bad, root=store.authority.cert, now=NOW)


def test_x5c_must_hold_der_not_pem(issue: IssueFn, store: Store, device: drm.DeviceKeys) -> None:
    token = issue()
    drm.verify_license(token, root=store.authority.cert, now=NOW, device_id=device.device_id)
    env = json.loads(token)
    env["x5c"] = [b64e(drm.cert_to_pem(store.issuer.cert))]  # same certificate, second encoding
    with pytest.raises(drm.LicenseRefused) as err:
        drm.verify_license(dumps(env), root=store.authority.cert, now=NOW, device_id=device.device_id)
    assert "DER" in err.value.reason


def _device_cert(
    store: Store, keys: drm.DeviceKeys, *, issuer_name: x509.Name, extra: bool
) -> x509.Certificate:
    b = _builder(_name(keys.device_id, org="edgemart device"), issuer_name, keys.sign.public_key(), NOW, 10)
    b = b.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    b = b.add_extension(x509.ExtendedKeyUsage([drm.EKU_DEVICE]), critical=False)
    if extra:
        b = b.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.59999.7.99"), b"\x05\x00"),
            critical=True,
        )
    return b.sign(store.authority.key, None)


def test_an_unknown_critical_extension_is_refused(store: Store, device: drm.DeviceKeys) -> None:
    root = store.authority.cert
    plain = _device_cert(store, device, issuer_name=root.subject, extra=False)
    drm.verify_cert(plain, root, now=NOW, purpose=drm.EKU_DEVICE)
    with pytest.raises(drm.LicenseRefused) as err:
        drm.verify_cert(
            _device_cert(store, device, issuer_name=root.subject, extra=True),
            root,
            now=NOW,
            purpose=drm.EKU_DEVICE,
        )
    assert "critical" in err.value.reason


def test_issuer_name_must_equal_the_root_subject_as_der(store: Store, device: drm.DeviceKeys) -> None:
    printable = x509.name._ASN1Type.PrintableString  # type: ignore[attr-defined]
    lookalike = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgemart", _type=printable),
            x509.NameAttribute(NameOID.COMMON_NAME, "edgemart store root", _type=printable),
        ]
    )
    assert lookalike == store.authority.cert.subject  # equal to cryptography's Name comparison ...
    cert = _device_cert(store, device, issuer_name=lookalike, extra=False)
    with pytest.raises(drm.LicenseRefused):  # ... but another DER encoding, so not the root's name
        drm.verify_cert(cert, store.authority.cert, now=NOW, purpose=drm.EKU_DEVICE)


def test_validity_bounds_are_inclusive(store: Store) -> None:
    cert = store.issuer.cert
    lo, hi = int(cert.not_valid_before_utc.timestamp()), int(cert.not_valid_after_utc.timestamp())
    for now in (lo, hi):
        drm.verify_cert(cert, store.authority.cert, now=now, purpose=drm.EKU_LICENSE_ISSUER)
    for now in (lo - 1, hi + 1):
        with pytest.raises(drm.LicenseRefused):
            drm.verify_cert(cert, store.authority.cert, now=now, purpose=drm.EKU_LICENSE_ISSUER)


def _out_of_range_mlkem_key(device: drm.DeviceKeys) -> bytes:
    """The device's ML-KEM-768 encapsulation key with its first 12-bit coefficient set to q = 3329."""
    ek = bytearray(device.kem_public().mlkem768 or b"")
    ek[0], ek[1] = 3329 & 0xFF, (ek[1] & 0xF0) | (3329 >> 8)
    return bytes(ek)


def test_mlkem_key_with_a_coefficient_of_q_or_more_is_refused(store: Store, device: drm.DeviceKeys) -> None:
    # FIPS 203 §7.2 encapsulation-key check: ByteEncode12(ByteDecode12(ek)) = ek, i.e. every coefficient < q.
    # The store refuses such a key at enrollment (before certifying it), not later when it wraps a CEK.
    from cryptography.hazmat.primitives import serialization

    from drm.keys import OID_MLKEM768_KEM, OID_X25519_KEM, KemKeys

    bad = _out_of_range_mlkem_key(device)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_name(device.device_id, org="edgemart device"))
        .add_extension(x509.UnrecognizedExtension(OID_X25519_KEM, device.kem_public().x25519 or b""), False)
        .add_extension(x509.UnrecognizedExtension(OID_MLKEM768_KEM, bad), False)
        .sign(device.sign, None)
        .public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(drm.UsageError, match="FIPS 203"):
        store.authority.issue_device_cert(csr, now=NOW)
    with pytest.raises(drm.UsageError, match="FIPS 203"):
        drm.wrap_cek(bytes(32), KemKeys(device.kem_public().x25519, bad), license_id="lic_a",
                     build_hash="sha256:" + "a" * 64, binding_id=device.device_id)  # fmt: skip
