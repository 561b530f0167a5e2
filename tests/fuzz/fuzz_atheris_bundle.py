"""Coverage-guided fuzzing of the binary bundle parsers with atheris (not collected by pytest): the tar
reader (plain and gzip'd), the manifest and manifest.sig parsers and the whole offline verification.

    .venv/bin/pip install atheris==3.0.0
    .venv/bin/python tests/fuzz/fuzz_atheris_bundle.py -atheris_runs=200000 [corpus_dir]

The first input byte picks the target; the seeds are a real signed bundle (tar and gzip) and its
manifest. Any exception other than an edgemart error (EdgemartError) is a finding and crashes the run.
Chain files and model cards are text (YAML/JSON): hypothesis covers them in test_fuzz_parsers.py."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import atheris

with atheris.instrument_imports():
    import drm
    from drm.bundle import Manifest, verify_manifest_signature
    from edge_runtime.bundle import read_bundle, verify_bundle

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_fuzz_parsers import NOW, Bundle, iter_gzip  # noqa: E402

_BUNDLE = Bundle()
SEEDS = [
    b"\0" + _BUNDLE.archive,
    b"\1" + b"".join(iter_gzip([_BUNDLE.archive])),
    b"\2" + _BUNDLE.manifest_bytes,
    b"\3" + _BUNDLE.members[1].data,
]


def one_input(data: bytes) -> None:
    if not data:
        return
    which, body = data[0] % 4, data[1:]
    try:
        if which in (0, 1):
            members = read_bundle(body, _BUNDLE.limits)
            assert len(members) <= _BUNDLE.limits.max_members
            verify_bundle(
                body,
                now=NOW + 60,
                root=_BUNDLE.authority.cert,
                builder_key=_BUNDLE.builder.public_key(),
                limits=_BUNDLE.limits,
            )
        elif which == 2:
            Manifest.from_bytes(body, _BUNDLE.limits)
        else:
            verify_manifest_signature(_BUNDLE.manifest_bytes, body, limits=_BUNDLE.limits)
    except drm.EdgemartError:
        pass


def main() -> None:
    warnings.simplefilter("ignore")
    args = list(sys.argv)
    if len(args) > 1 and not args[-1].startswith("-"):
        seed_dir = Path(args[-1])
        seed_dir.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(SEEDS):
            (seed_dir / f"seed{i}").write_bytes(seed)
    atheris.Setup(args, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
