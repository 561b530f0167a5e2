"""A throw-away PostgreSQL cluster on 127.0.0.1 for tests and `make scale-test`.

Uses the server binaries of the Debian ``postgresql`` package (``/usr/lib/postgresql/<v>/bin``). PostgreSQL
refuses to run as root, so under root the cluster belongs to the ``postgres`` system user and every server
command runs through ``runuser``. Authentication is ``scram-sha-256`` with a generated password on TCP only
(no Unix socket in a shared directory), so the URL handed out is the one a deployment would use.

``python -m store.localservers.postgres --dir D [--port P]`` runs a cluster until SIGTERM and prints its URL."""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edgemart.core.errors import UsageError
from store.localservers import wait_for_signal

SUPERUSER = "edgemart"


def pg_bindir() -> Path | None:
    """The newest installed PostgreSQL server bin directory, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_owner(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@dataclass
class PostgresServer:
    """A running cluster; ``url(db)`` gives a SQLAlchemy URL for psycopg 3."""

    directory: Path
    port: int
    password: str
    bindir: Path

    @property
    def datadir(self) -> Path:
        return self.directory / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def _psql(self, sql: str) -> None:
        env = {**os.environ, "PGPASSWORD": self.password}
        subprocess.run(
            [str(self.bindir / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, "-d",
             "postgres", "-v", "ON_ERROR_STOP=1", "-q", "-c", sql],
            check=True, env=env, capture_output=True,
        )  # fmt: skip

    def create_database(self, name: str | None = None) -> str:
        """A fresh empty database; returns its URL."""
        name = name or "t_" + secrets.token_hex(6)
        if not name.replace("_", "").isalnum():
            raise UsageError(f"invalid database name {name!r}")
        self._psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        cmd = [str(self.bindir / "pg_ctl"), "-D", str(self.datadir), *args]
        return subprocess.run(_as_owner(cmd), check=check, capture_output=True, timeout=120)

    def start(self) -> None:
        log = self.directory / "server.log"
        opts = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
            "-c fsync=on -c max_connections=200 -c shared_buffers=64MB"
        )
        self._pg_ctl("-l", str(log), "-o", opts, "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._pg_ctl("-m", mode, "-w", "-t", "60", "stop", check=False)

    def restart(self) -> None:
        """Stop (fast: open connections are cut) and start again on the same port."""
        self.stop()
        self.start()

    def kill(self) -> None:
        """SIGKILL the postmaster (a crash; the next start runs WAL recovery)."""
        pid_file = self.datadir / "postmaster.pid"
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)


def init_cluster(directory: Path, port: int | None = None) -> PostgresServer:
    bindir = pg_bindir()
    if bindir is None:
        raise UsageError(
            "PostgreSQL server binaries not found (apt-get install postgresql; `make apt` does it)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    server = PostgresServer(directory.resolve(), port or free_port(), secrets.token_urlsafe(18), bindir)
    pwfile = directory / "pw"
    pwfile.write_text(server.password)
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres", "postgres")
        shutil.chown(pwfile, "postgres", "postgres")
    os.chmod(pwfile, 0o600)
    cmd = [str(bindir / "initdb"), "-D", str(server.datadir), "-U", SUPERUSER, "--pwfile", str(pwfile),
           "-A", "scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"]  # fmt: skip
    res = subprocess.run(_as_owner(cmd), capture_output=True, timeout=180)
    pwfile.unlink()
    if res.returncode != 0:
        raise UsageError(f"initdb failed: {res.stderr.decode(errors='replace')[-2000:]}")
    return server


@contextlib.contextmanager
def running_postgres(directory: Path, port: int | None = None) -> Iterator[PostgresServer]:
    server = init_cluster(directory, port)
    server.start()
    try:
        yield server
    finally:
        server.stop("immediate")


@contextlib.contextmanager
def throwaway_postgres(prefix: str = "edgemart-pg-") -> Iterator[PostgresServer]:
    """A running cluster in a fresh directory directly under the temp dir (under root the cluster belongs to
    the postgres user, who must be able to reach it), removed afterwards."""
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        with running_postgres(directory) as server:
            yield server
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m store.localservers.postgres")
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--port", type=int)
    args = ap.parse_args(argv)
    with running_postgres(args.dir, args.port) as server:
        print(server.url(), flush=True)
        wait_for_signal()
    return 0


if __name__ == "__main__":
    sys.exit(main())
