"""Coverage-guided fuzzing of every drm parser with atheris (not collected by pytest).

    .venv/bin/pip install atheris==3.0.0
    .venv/bin/python tests/drm/fuzz_atheris.py -atheris_runs=200000 [corpus_dir]

The first input byte picks the parser; any exception other than a clean drm error
(FormatError, LicenseRefused, IntegrityError) is a finding and crashes the run."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import atheris

with atheris.instrument_imports():
    import drm
    from drm._canonical import loads

sys.path.insert(0, str(Path(__file__).resolve().parent))
from drm_testkit import BUILD_HASH, NOW  # noqa: E402

CLEAN = (drm.FormatError, drm.LicenseRefused, drm.IntegrityError)
KEY = bytes(range(32))
_AUTHORITY = drm.Authority.generate(now=NOW - 86400)
_ISSUER = _AUTHORITY.issue_issuer(now=NOW - 86400, pq=False)
_DEVICE = drm.DeviceKeys.generate()
_SEALED = drm.seal(b"atheris" * 1000, key=KEY, target="arm-cpu", chunk_size=4096)
SEEDS = [
    _SEALED[:600],
    drm.issue_license(
        issuer=_ISSUER,
        cek=KEY,
        recipient=_DEVICE.kem_public(),
        kind="eval",
        listing="l",
        build_hash=BUILD_HASH,
        target="t",
        now=NOW,
        days=1,
        max_runs=1,
        device_id=_DEVICE.device_id,
    ),
    drm.sign_revocation_list(_ISSUER, version=1, issued_at=NOW, revoked=["lic_a"]),
    drm.make_record(
        _DEVICE.sign,
        prev_line=None,
        seq=0,
        device_id=_DEVICE.device_id,
        t=NOW,
        event="run",
        license_id="lic_a",
        build_hash=BUILD_HASH,
        runs=1,
    ),
]


def one_input(data: bytes) -> None:
    if not data:
        return
    which, body = data[0] % 6, data[1:]
    try:
        if which == 0:
            drm.open_sealed(body, key=KEY)
        elif which == 1:
            drm.read_header(body)
        elif which == 2:
            drm.verify_license(body, root=_AUTHORITY.cert, now=NOW, device_id=_DEVICE.device_id)
        elif which == 3:
            drm.verify_revocation_list(body, root=_AUTHORITY.cert, now=NOW)
        elif which == 4:
            drm.verify_log(body, _DEVICE.sign.public_key(), device_id=_DEVICE.device_id)
        else:
            loads(body, max_size=1 << 16, what="fuzz")
            drm.open_state(body, key=KEY, device_id="d")
    except CLEAN:
        pass


def main() -> None:
    warnings.simplefilter("ignore")
    args = list(sys.argv)
    if len(args) > 1 and not args[-1].startswith("-"):
        seed_dir = Path(args[-1])
        seed_dir.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(SEEDS):
            (seed_dir / f"seed{i}").write_bytes(bytes([[0, 2, 3, 4][i]]) + seed)
    atheris.Setup(args, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
