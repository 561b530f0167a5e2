"""edgemart's pure cryptographic core: container, license, keys, usage log, revocation.

Bytes and ``now`` in, objects or one opaque error out. No files, network or clocks here."""

from drm._canonical import FormatError, sha256_tag
from drm.container import (
    ContainerHeader,
    ContainerLimits,
    generate_content_key,
    open_sealed,
    open_stream,
    read_header,
    seal,
    seal_stream,
    wipe,
)
from drm.envelope import parse_envelope, sign_envelope, verify_envelope
from drm.errors import (
    AuthError,
    ConflictError,
    EdgemartError,
    ForbiddenError,
    IntegrityError,
    LicenseRefused,
    NotFoundError,
    Refusal,
    UsageError,
)
from drm.keys import (
    EKU_BUNDLE_SIGNER,
    EKU_DEVICE,
    EKU_LICENSE_ISSUER,
    Authority,
    DeviceKeys,
    Issuer,
    KemKeys,
    cert_device_id,
    cert_from_bytes,
    cert_kem_keys,
    cert_to_pem,
    key_id,
    verify_cert,
)
from drm.license import (
    LicenseClaims,
    VerifiedLicense,
    issue_license,
    new_license_id,
    unwrap_cek,
    verify_license,
    wrap_cek,
)
from drm.revocation import RevocationList, sign_revocation_list, verify_revocation_list
from drm.sealed_state import open_state, seal_state
from drm.usagelog import LogReport, make_record, verify_log

__all__ = [
    "Authority", "AuthError", "ConflictError", "ContainerHeader", "ContainerLimits", "DeviceKeys",
    "EKU_BUNDLE_SIGNER", "EKU_DEVICE", "EKU_LICENSE_ISSUER", "EdgemartError", "ForbiddenError", "FormatError",
    "IntegrityError", "Issuer", "KemKeys", "LicenseClaims", "LicenseRefused", "LogReport", "NotFoundError",
    "Refusal", "RevocationList", "UsageError", "VerifiedLicense", "cert_device_id", "cert_from_bytes",
    "cert_kem_keys", "cert_to_pem", "generate_content_key", "issue_license", "key_id", "make_record",
    "new_license_id", "open_sealed", "open_state", "open_stream", "parse_envelope", "read_header", "seal",
    "seal_state", "seal_stream", "sha256_tag", "sign_envelope", "sign_revocation_list", "unwrap_cek",
    "verify_cert", "verify_envelope", "verify_license", "verify_log", "verify_revocation_list", "wipe",
]
