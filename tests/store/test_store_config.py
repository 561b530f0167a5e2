"""Configuration by environment: EDGEMART_* settings reach the store; malformed ones are refused precisely."""

from __future__ import annotations

import pytest

from edgemart.core.errors import UsageError
from store.context import env_config, make_blobs, make_vault, resolve_config
from store.db import normalize_url


def test_environment_settings_are_typed():
    cfg = env_config(
        {
            "EDGEMART_DATABASE_URL": "postgresql://u:p@db/x",
            "EDGEMART_JOB_MAX_ATTEMPTS": "5",
            "EDGEMART_JOB_POLL_SECONDS": "0.5",
            "EDGEMART_SESSION_COOKIE_SECURE": "1",
            "EDGEMART_WORKER": "none",
            "UNRELATED": "x",
        }
    )
    assert cfg == {
        "DATABASE_URL": "postgresql://u:p@db/x",
        "JOB_MAX_ATTEMPTS": 5,
        "JOB_POLL_SECONDS": 0.5,
        "SESSION_COOKIE_SECURE": True,
        "WORKER": "none",
    }


def test_explicit_config_wins_over_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEMART_WORKER", "none")
    assert resolve_config({"DATA_DIR": str(tmp_path)})["WORKER"] == "none"
    assert resolve_config({"DATA_DIR": str(tmp_path), "WORKER": "thread"})["WORKER"] == "thread"


@pytest.mark.parametrize(
    "env, message",
    [
        ({"EDGEMART_JOB_MAX_ATTEMPTS": "three"}, "EDGEMART_JOB_MAX_ATTEMPTS must be a number"),
        ({"EDGEMART_WORKER": "celery"}, "WORKER must be 'thread' or 'none'"),
    ],
)
def test_bad_environment_values_are_refused(monkeypatch, tmp_path, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(UsageError, match=message):
        resolve_config({"DATA_DIR": str(tmp_path)})


def test_backend_urls_are_checked(tmp_path):
    with pytest.raises(UsageError, match="BLOB_URL must start with file: or s3://"):
        make_blobs({"DATA_DIR": tmp_path, "BLOB_URL": "ftp://x"})
    with pytest.raises(UsageError, match="KEY_VAULT must be 'file' or 'pkcs11'"):
        make_vault({"DATA_DIR": tmp_path, "KEY_VAULT": "kms"})
    with pytest.raises(
        UsageError, match="EDGEMART_PKCS11_MODULE, EDGEMART_PKCS11_TOKEN, EDGEMART_PKCS11_PIN"
    ):
        make_vault({"DATA_DIR": tmp_path, "KEY_VAULT": "pkcs11"})
    with pytest.raises(UsageError, match="DATABASE_URL must be sqlite"):
        normalize_url("mysql://u@h/db")
    assert normalize_url("postgresql://u:p@h/db") == "postgresql+psycopg://u:p@h/db"
    assert normalize_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    blobs = make_blobs({"DATA_DIR": tmp_path, "BLOB_URL": f"file:{tmp_path / 'b'}"})
    assert blobs.put_bytes(b"x").created and (tmp_path / "b").is_dir()
