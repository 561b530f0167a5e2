"""The store's wiring: configuration defaults and the one object holding engine, blobs, vault and queue.

Services receive a ``StoreContext`` (never the Flask app), so the job worker and the CLI use them too."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from edgemart.core.errors import UsageError
from edgemart.core.fileio import atomic_write
from store import db
from store.blobs import BlobStore, FileBlobStore
from store.jobs import JobQueue, NoWorker
from store.keyvault import FileKeyVault, KeyVault

DEFAULTS: dict[str, Any] = {
    "DATA_DIR": None,  # $EDGEMART_DATA_DIR or ./edgemart-data
    "DATABASE_URL": None,  # sqlite:///DATA_DIR/store.db; postgresql+psycopg://... for scale-out
    "BLOB_URL": None,  # file:DATA_DIR/blobs (default) or s3://BUCKET[/PREFIX] (S3_ENDPOINT_URL, AWS_* env)
    "S3_ENDPOINT_URL": None,  # e.g. http://127.0.0.1:8333 for SeaweedFS; None = AWS
    "KEY_VAULT": None,  # "file" (DATA_DIR/keys, default) or "pkcs11" (PKCS11_MODULE, PKCS11_TOKEN, PKCS11_PIN)
    "PKCS11_MODULE": None,
    "PKCS11_TOKEN": None,
    "PKCS11_PIN": None,
    "MAX_UPLOAD_BYTES": 512 * 1024 * 1024,
    "MAX_JSON_BYTES": 256 * 1024,
    "MAX_USAGE_BYTES": 8 * 1024 * 1024,
    "MAX_CARD_BYTES": 256 * 1024,
    # Seller sample archives (.npz) are checked from their headers before anything is inflated.
    "MAX_SAMPLE_BYTES": 256 * 1024 * 1024,  # all arrays together, uncompressed
    "MAX_SAMPLE_MEMBERS": 1024,
    "MAX_SAMPLE_RATIO": 200.0,  # uncompressed:compressed, per member above 1 MiB
    # Caps on what an uploaded model may declare (drm.model_safety; the device uses the defaults).
    "MODEL_MAX_TENSOR_BYTES": 1 << 30,
    "MODEL_MAX_TOTAL_BYTES": 4 << 30,
    "MODEL_MAX_GRAPH_DEPTH": 16,
    # Seller bytes are gated, inspected and packaged in a confined child (store/sandbox.py) with these limits.
    "SANDBOX_MEMORY_BYTES": 4 << 30,  # address space one task may add to the preloaded runner's
    "SANDBOX_CPU_SECONDS": 900,
    "SANDBOX_WALL_SECONDS": 1800.0,
    "WORKER": "thread",  # "thread": in-process worker; "none": this process runs no jobs
    "JOB_POLL_SECONDS": 2.0,
    "JOB_LEASE_SECONDS": 120,  # a running job without a heartbeat for this long is re-queued
    "JOB_HEARTBEAT_SECONDS": 10.0,  # a running job renews its lease this often
    "JOB_MAX_ATTEMPTS": 3,  # then the job is dead-lettered for an admin
    "JOB_RETRY_BASE_SECONDS": 10.0,  # backoff after a failed attempt: base * 4^(attempt-1), capped
    "JOB_RETRY_MAX_SECONDS": 600.0,
    "EVAL_DEVICE_LIMIT": 3,
    # Offline budget of an eval license when its listing sets none: runs and hours between check-ins.
    "EVAL_OFFLINE_RUNS": 200,
    "EVAL_OFFLINE_HOURS": 72,
    "PAGE_SIZE": 20,
    "SECRET_KEY": None,  # else DATA_DIR/secret.key (created 0600)
    "SESSION_COOKIE_SECURE": False,  # also on whenever PUBLIC_URL is https
    "PUBLIC_URL": None,  # e.g. https://store.example.com: https turns on HSTS and Secure cookies
    "TRUSTED_PROXY_HOPS": 0,  # proxies in front whose X-Forwarded-For/-Proto are believed (rate limits by IP)
    "SESSION_IDLE_SECONDS": 3600,  # a web session unused this long ends
    "SESSION_MAX_SECONDS": 12 * 3600,  # a web session ends this long after sign-in, used or not
    # Requests per RATE_LIMIT_WINDOW_SECONDS, counted in the database across all web processes; 0 = no limit.
    # "account" counts every API token and web session of one user together (minting tokens does not help).
    "RATE_LIMIT_WINDOW_SECONDS": 60,
    "RATE_LIMIT_LOGIN_PER_IP": 60,
    "RATE_LIMIT_UPLOAD_PER_ACCOUNT": 60,
    "RATE_LIMIT_UPLOAD_PER_IP": 300,
    "RATE_LIMIT_LICENSE_PER_ACCOUNT": 600,
    "RATE_LIMIT_LICENSE_PER_IP": 1200,
    "CLOCK": None,  # callable -> unix seconds; tests freeze time with it
    "LICENSE_INDEX_DIR": None,  # DATA_DIR/license-index
    "HOLDOUT_FRACTION": 0.25,  # share of the seller's samples kept out of calibration to measure quality
    "MIN_CALIBRATION_SAMPLES": 8,  # fewer cannot set int8 ranges worth selling: the job fails saying so
}


def default_data_dir() -> Path:
    return Path(os.environ.get("EDGEMART_DATA_DIR") or "edgemart-data")


# Settings a deployment gives as environment variables (EDGEMART_<KEY>); an explicit config wins.
ENV_KEYS = (
    "DATABASE_URL",
    "BLOB_URL",
    "S3_ENDPOINT_URL",
    "KEY_VAULT",
    "PKCS11_MODULE",
    "PKCS11_TOKEN",
    "PKCS11_PIN",
    "WORKER",
    "SECRET_KEY",
    "LICENSE_INDEX_DIR",
    "MAX_UPLOAD_BYTES",
    "MAX_SAMPLE_BYTES",
    "MAX_SAMPLE_MEMBERS",
    "MAX_SAMPLE_RATIO",
    "MODEL_MAX_TENSOR_BYTES",
    "MODEL_MAX_TOTAL_BYTES",
    "MODEL_MAX_GRAPH_DEPTH",
    "SANDBOX_MEMORY_BYTES",
    "SANDBOX_CPU_SECONDS",
    "SANDBOX_WALL_SECONDS",
    "JOB_POLL_SECONDS",
    "JOB_LEASE_SECONDS",
    "JOB_HEARTBEAT_SECONDS",
    "JOB_MAX_ATTEMPTS",
    "JOB_RETRY_BASE_SECONDS",
    "JOB_RETRY_MAX_SECONDS",
    "SESSION_COOKIE_SECURE",
    "PUBLIC_URL",
    "TRUSTED_PROXY_HOPS",
    "SESSION_IDLE_SECONDS",
    "SESSION_MAX_SECONDS",
    "RATE_LIMIT_WINDOW_SECONDS",
    "RATE_LIMIT_LOGIN_PER_IP",
    "RATE_LIMIT_UPLOAD_PER_ACCOUNT",
    "RATE_LIMIT_UPLOAD_PER_IP",
    "RATE_LIMIT_LICENSE_PER_ACCOUNT",
    "RATE_LIMIT_LICENSE_PER_IP",
)


def env_config(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The EDGEMART_* settings present in the environment (numbers converted)."""
    env = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for key in ENV_KEYS:
        value = env.get(f"EDGEMART_{key}")
        if value:
            if isinstance(DEFAULTS.get(key), bool):
                out[key] = value.strip().lower() in ("1", "true", "yes", "on")
            elif isinstance(DEFAULTS.get(key), int | float):
                try:
                    out[key] = type(DEFAULTS[key])(value)
                except ValueError:
                    raise UsageError(f"EDGEMART_{key} must be a number, got {value!r}") from None
            else:
                out[key] = value
    return out


def resolve_config(config: dict[str, Any] | None) -> dict[str, Any]:
    cfg = {**DEFAULTS, **env_config(), **(config or {})}
    unknown_worker = cfg["WORKER"] not in ("thread", "none")
    if unknown_worker:
        raise UsageError(f"WORKER must be 'thread' or 'none', got {cfg['WORKER']!r}")
    data_dir = Path(cfg["DATA_DIR"] or default_data_dir()).resolve()
    cfg["DATA_DIR"] = data_dir
    cfg["DATABASE_URL"] = cfg["DATABASE_URL"] or db.sqlite_url(data_dir / "store.db")
    cfg["LICENSE_INDEX_DIR"] = Path(cfg["LICENSE_INDEX_DIR"] or data_dir / "license-index")
    for key in ("SESSION_IDLE_SECONDS", "SESSION_MAX_SECONDS", "RATE_LIMIT_WINDOW_SECONDS"):
        if not isinstance(cfg[key], int | float) or isinstance(cfg[key], bool) or cfg[key] <= 0:
            raise UsageError(f"{key} must be a positive number of seconds, got {cfg[key]!r}")
    for key in [k for k in DEFAULTS if k.startswith("RATE_LIMIT_") and k != "RATE_LIMIT_WINDOW_SECONDS"]:
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 0:
            raise UsageError(f"{key} must be a whole number, 0 for no limit, got {cfg[key]!r}")
    if not isinstance(cfg["TRUSTED_PROXY_HOPS"], int) or not 0 <= cfg["TRUSTED_PROXY_HOPS"] <= 10:
        raise UsageError(f"TRUSTED_PROXY_HOPS must be 0 to 10, got {cfg['TRUSTED_PROXY_HOPS']!r}")
    public = cfg["PUBLIC_URL"]
    if public is not None and not (isinstance(public, str) and public.startswith(("https://", "http://"))):
        raise UsageError(f"PUBLIC_URL must start with https:// or http://, got {str(public)[:80]!r}")
    return cfg


def is_https(cfg: dict[str, Any]) -> bool:
    """Whether browsers reach the store over https (PUBLIC_URL): then cookies are Secure and HSTS is sent."""
    return str(cfg.get("PUBLIC_URL") or "").startswith("https://")


def check_key_dir(cfg: dict[str, Any]) -> None:
    """Refuse (UsageError) to run with a key directory, or a file in it, that group or others may access: a
    store serving with readable signing keys has already lost them. An absent directory is created 0700."""
    directory = Path(cfg["DATA_DIR"]) / "keys"
    if not directory.is_dir():
        return
    for path in [directory, *sorted(p for p in directory.iterdir() if p.is_file())]:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            fix = "chmod 700" if path == directory else "chmod 600"
            raise UsageError(
                f"{path} is accessible by group or others (mode {mode:04o}); run `{fix} {path}` "
                "and consider the keys exposed"
            )


@dataclass
class StoreContext:
    config: dict[str, Any]
    engine: Engine
    Session: sessionmaker[Session]
    blobs: BlobStore
    vault: KeyVault
    queue: JobQueue = field(default_factory=NoWorker)
    clock: Callable[[], float] = time.time

    @property
    def data_dir(self) -> Path:
        return Path(self.config["DATA_DIR"])

    def now(self) -> int:
        return int(self.clock())

    def root_cert_pem(self) -> bytes:
        import drm

        return drm.cert_to_pem(self.vault.authority().cert)

    @property
    def sandbox(self) -> Any:
        """Where seller bytes are processed: a confined child (store.sandbox) that cannot read DATA_DIR."""
        from store.sandbox import Sandbox, SandboxLimits

        forbidden = [Path(self.config["DATA_DIR"])]
        return Sandbox(SandboxLimits.from_config(self.config), forbidden)

    def license_index(self) -> Any:
        """The open-model index the compliance gate compares uploads with (read fresh: the CLI may add to it)."""
        import licenses

        directory = Path(self.config["LICENSE_INDEX_DIR"])
        directory.mkdir(parents=True, exist_ok=True)
        return licenses.LicenseIndex(directory)

    def close(self) -> None:
        self.queue.stop()
        self.engine.dispose()


def open_context(config: dict[str, Any] | None = None) -> StoreContext:
    """Create the data dir, migrate the schema, make sure the keys exist. No worker is started here."""
    cfg = resolve_config(config)
    data_dir: Path = cfg["DATA_DIR"]
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    db.create_private_sqlite_file(cfg["DATABASE_URL"])
    engine = db.make_engine(cfg["DATABASE_URL"])
    db.migrate(engine)
    clock = cfg["CLOCK"] or time.time
    vault = make_vault(cfg)
    vault.ensure(int(clock()))
    return StoreContext(
        config=cfg,
        engine=engine,
        Session=db.session_factory(engine),
        blobs=make_blobs(cfg),
        vault=vault,
        clock=clock,
    )


def make_blobs(cfg: dict[str, Any]) -> BlobStore:
    """The blob backend named by BLOB_URL: the filesystem (default) or an S3-compatible bucket."""
    url = cfg.get("BLOB_URL") or f"file:{Path(cfg['DATA_DIR']) / 'blobs'}"
    if url.startswith("file:"):
        return FileBlobStore(url.removeprefix("file:").removeprefix("//"))
    if url.startswith("s3://"):
        from store.blobs_s3 import S3BlobStore

        return S3BlobStore.from_url(url, endpoint_url=cfg.get("S3_ENDPOINT_URL"))
    raise UsageError(f"BLOB_URL must start with file: or s3://, got {url!r}")


def make_vault(cfg: dict[str, Any]) -> KeyVault:
    """The key vault named by KEY_VAULT: files under DATA_DIR/keys (default) or a PKCS#11 token."""
    kind = cfg.get("KEY_VAULT") or "file"
    directory = Path(cfg["DATA_DIR"]) / "keys"
    if kind == "file":
        return FileKeyVault(directory)
    if kind == "pkcs11":
        from store.keyvault_pkcs11 import Pkcs11KeyVault

        missing = [k for k in ("PKCS11_MODULE", "PKCS11_TOKEN", "PKCS11_PIN") if not cfg.get(k)]
        if missing:
            raise UsageError("KEY_VAULT=pkcs11 needs " + ", ".join(f"EDGEMART_{k}" for k in missing))
        return Pkcs11KeyVault(
            directory,
            module=cfg["PKCS11_MODULE"],
            token_label=cfg["PKCS11_TOKEN"],
            pin=cfg["PKCS11_PIN"],
        )
    raise UsageError(f"KEY_VAULT must be 'file' or 'pkcs11', got {kind!r}")


def secret_key(cfg: dict[str, Any]) -> bytes:
    """The session-signing key: configured, or kept in DATA_DIR/secret.key so every worker shares it."""
    if cfg.get("SECRET_KEY"):
        key = cfg["SECRET_KEY"]
        return key.encode() if isinstance(key, str) else bytes(key)
    path = Path(cfg["DATA_DIR"]) / "secret.key"
    if not path.is_file():
        atomic_write(path, secrets.token_bytes(32))
    return path.read_bytes()
