"""`make scale-test`: the store scaled out on one machine, under load, with faults.

Starts a real PostgreSQL cluster and a real SeaweedFS (S3) server on 127.0.0.1, runs `edgemart store serve`
with N gunicorn app workers and M `edgemart store worker` job processes (configured only through EDGEMART_*
environment variables, as a deployment would), then drives it with C concurrent HTTP clients for a fixed
time: browsing, eval-license requests (two clients per buyer, racing for the buyer's last seats), build
downloads, usage-log uploads, and a seller uploading new models (with Idempotency-Key retries).

Two phases: a steady run (any 5xx fails it) and a fault run that SIGKILLs a job worker holding a job, SIGKILLs
an app worker, and restarts PostgreSQL mid-run (clients retry connection errors and 503 + Retry-After the
way the store client does; any 500 fails it). After each phase it checks, from the database and the blob
store: every accepted upload is a listing whose jobs all finished exactly once, no buyer holds more eval
devices than the listing allows and no device got two eval licenses for one build, every usage record a
client produced is stored once, every build blob a license points to exists.

    python -m bench.scale [--duration 60] [--clients 64] [--app-workers 4] [--job-workers 2]
                          [--no-faults] [--json FILE]
    python -m bench.scale --markdown bench/results-scale.json   # the README table of a saved run
Exit status 0 when every check passed, 1 otherwise."""

from __future__ import annotations

import argparse
import http.client
import io
import itertools
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(os.environ.get("EDGEMART_CORPUS", Path.home() / ".cache" / "edgemart-corpus"))
EVAL_LIMIT = 3  # the store default: devices per buyer per listing
DEVICES_PER_BUYER = 4  # one more than the limit, so the last seat is raced for
RETRY_FOR_SECONDS = 30.0


def log(msg: str) -> None:
    sys.stderr.write(f"[scale {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


# ------------------------------------------------------------------------------------------ cluster


@dataclass
class Cluster:
    workdir: Path
    env: dict[str, str]
    port: int
    app: subprocess.Popen[bytes] | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    pg: Any = None
    s3: Any = None
    _ctx: Any = None

    @property
    def data_dir(self) -> Path:
        return self.workdir / "store"

    @property
    def ctx(self) -> Any:
        """The store context the processes use (same env), opened once, for seeding, polling and the checks
        (its pool reconnects by itself after the PostgreSQL restart)."""
        if self._ctx is None:
            from store.context import env_config, open_context

            self._ctx = open_context(
                {**env_config(self.env), "DATA_DIR": str(self.data_dir), "WORKER": "none"}
            )
        return self._ctx

    def _spawn(self, *args: str, logname: str) -> subprocess.Popen[bytes]:
        out = open(self.workdir / logname, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        return subprocess.Popen(
            [sys.executable, "-m", "edgemart", "store", *args, "--data-dir", str(self.data_dir)],
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start_app(self, workers: int) -> None:
        self.app = self._spawn(
            "serve", "--port", str(self.port), "--workers", str(workers), logname="app.log"
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.app.poll() is None, "store serve exited at startup: see app.log"
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError("store did not become healthy")

    def start_worker(self) -> subprocess.Popen[bytes]:
        proc = self._spawn("worker", logname=f"worker-{len(self.workers)}.log")
        self.workers.append(proc)
        return proc

    def app_worker_pids(self) -> list[int]:
        assert self.app is not None
        kids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.app.pid:
                kids.append(int(stat.parent.name))
        return kids

    def stop(self) -> None:
        if self._ctx is not None:
            self._ctx.close()
        for proc in [*self.workers, *([self.app] if self.app else [])]:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in [*self.workers, *([self.app] if self.app else [])]:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@contextmanager
def cluster(app_workers: int, job_workers: int) -> Iterator[Cluster]:
    from store.localservers.postgres import free_port, running_postgres
    from store.localservers.seaweedfs import running_seaweedfs

    workdir = Path(tempfile.mkdtemp(prefix="edgemart-scale-"))  # under /tmp: the postgres user must reach it
    os.chmod(
        workdir, 0o711
    )  # traversable (not listable) by the postgres user that owns the cluster under root
    try:
        with ExitStack() as stack:
            t0 = time.monotonic()
            pg = stack.enter_context(running_postgres(workdir / "pg"))
            log(f"PostgreSQL up on port {pg.port} ({time.monotonic() - t0:.1f} s)")
            t0 = time.monotonic()
            s3 = stack.enter_context(running_seaweedfs(workdir / "seaweed"))
            s3.blob_store("edgemart")  # creates the bucket
            log(f"SeaweedFS S3 up at {s3.endpoint_url} ({time.monotonic() - t0:.1f} s)")
            env = {
                **os.environ,
                "PYTHONPATH": str(ROOT),
                **s3.env(),
                "EDGEMART_DATABASE_URL": pg.create_database("edgemart"),
                "EDGEMART_BLOB_URL": "s3://edgemart/blobs",
                "EDGEMART_WORKER": "none",  # web processes run no jobs; the worker processes do
                "EDGEMART_SECRET_KEY": secrets.token_hex(32),  # shared by every app process (stateless)
                "EDGEMART_JOB_POLL_SECONDS": "0.5",
                "EDGEMART_JOB_LEASE_SECONDS": "30",
                "EDGEMART_JOB_HEARTBEAT_SECONDS": "3",
                # Every simulated client shares this host's address: per-address limits would measure
                # the limiter, not the store (per-account limits stay on).
                "EDGEMART_RATE_LIMIT_LOGIN_PER_IP": "0",
                "EDGEMART_RATE_LIMIT_UPLOAD_PER_IP": "0",
                "EDGEMART_RATE_LIMIT_LICENSE_PER_IP": "0",
            }
            os.environ.update(s3.env())  # this process reads the store too (seeding, the final checks)
            c = Cluster(workdir, env, free_port(), pg=pg, s3=s3)
            stack.callback(c.stop)
            _migrate(c)
            c.start_app(app_workers)
            for _ in range(job_workers):
                c.start_worker()
            log(f"store on http://127.0.0.1:{c.port}: {app_workers} app workers, {job_workers} job workers")
            yield c
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _migrate(c: Cluster) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "edgemart", "store", "migrate", "--data-dir", str(c.data_dir)],
        env=c.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        raise RuntimeError(f"store migrate failed: {done.stderr[-2000:]}")


# ------------------------------------------------------------------------------------------ HTTP


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.status: Counter[str] = Counter()
        self.retries: Counter[str] = Counter()
        self.errors: list[str] = []

    def record(self, op: str, seconds: float, status: int) -> None:
        with self.lock:
            self.latency[op].append(seconds)
            self.status[str(status)] += 1

    def retry(self, why: str) -> None:
        with self.lock:
            self.retries[why] += 1

    def error(self, text: str) -> None:
        with self.lock:
            if len(self.errors) < 50:
                self.errors.append(text)


class Http:
    """One keep-alive connection per client; retries connection errors and 503 (honouring Retry-After)
    for up to RETRY_FOR_SECONDS, like a well-behaved client of the store."""

    def __init__(self, port: int, token: str, stats: Stats) -> None:
        self.port, self.token, self.stats = port, token, stats
        self.conn: http.client.HTTPConnection | None = None

    def call(
        self,
        op: str,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        hdrs = {"Authorization": f"Bearer {self.token}", **(headers or {})}
        deadline = time.monotonic() + RETRY_FOR_SECONDS
        while True:
            t0 = time.perf_counter()
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
                self.conn.request(method, path, body=body, headers=hdrs)
                resp = self.conn.getresponse()
                data = resp.read()
                status = resp.status
            except (OSError, http.client.HTTPException) as exc:
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
                self.stats.retry(f"connection: {type(exc).__name__}")
                if time.monotonic() > deadline:
                    self.stats.error(f"{op} {method} {path}: gave up after connection errors ({exc})")
                    return 0, b""
                time.sleep(0.2)
                continue
            self.stats.record(op, time.perf_counter() - t0, status)
            if status == 503 and time.monotonic() < deadline:
                self.stats.retry("503")
                time.sleep(float(resp.getheader("Retry-After") or 1))
                continue
            if status >= 500:
                self.stats.error(f"{op} {method} {path}: {status} {data[:200]!r}")
            return status, data

    def json(self, op: str, method: str, path: str, obj: Any = None, **kw: Any) -> tuple[int, Any]:
        body = None if obj is None else json.dumps(obj).encode()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        status, data = self.call(op, method, path, body, headers=headers, **kw)
        try:
            return status, json.loads(data) if data else None
        except ValueError:
            return status, None


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for k, v in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    for k, (filename, data) in files.items():
        out.write(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode()
        )
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


# ------------------------------------------------------------------------------------------ world


@dataclass
class Buyer:
    name: str
    token: str
    devices: list[Any]  # drm.DeviceKeys


@dataclass
class World:
    seller_token: str
    admin_token: str
    buyers: list[Buyer]
    listings: list[str] = field(default_factory=list)
    uploads_accepted: dict[str, str] = field(default_factory=dict)  # idempotency key -> listing id
    uploads_lock: threading.Lock = field(default_factory=threading.Lock)
    usage_records: dict[str, int] = field(default_factory=dict)  # device id -> records produced
    # device id -> its usage log (kept across phases)
    logs: dict[str, list[bytes]] = field(default_factory=dict)
    # jobs whose worker the fault phase SIGKILLed
    killed_jobs: list[str] = field(default_factory=list)


def seed(c: Cluster, n_buyers: int) -> World:
    import drm
    from store.services import accounts, licensing

    ctx = c.ctx
    with ctx.Session() as s:
        seller = accounts.create_user(s, "seller", "seller", now=ctx.now())
        admin = accounts.create_user(s, "admin", "admin", now=ctx.now())
        world = World(
            accounts.issue_token(s, seller, now=ctx.now()),
            accounts.issue_token(s, admin, now=ctx.now()),
            [],
        )
        users = []
        for i in range(n_buyers):
            u = accounts.create_user(s, f"buyer{i}", "buyer", now=ctx.now())
            users.append(u)
            world.buyers.append(Buyer(u.name, accounts.issue_token(s, u, now=ctx.now()), []))
        s.commit()
        for b, user in zip(world.buyers, users, strict=True):
            for _ in range(DEVICES_PER_BUYER):
                keys = drm.DeviceKeys.generate()
                licensing.enroll(ctx, s, user, keys.csr().decode())
                b.devices.append(keys)
    return world


_VARIANTS = itertools.count(1)


def model_variant() -> bytes:
    """The corpus digits MLP with one bias nudged: a distinct model, and a distinct build for every target
    (int8 packagers keep biases at int32 precision, so even this small change shows), per upload."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    v = next(_VARIANTS)
    model = onnx.load(str(CORPUS / "models" / "digits" / "digits_mlp_base.onnx"))
    bias = next(
        i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and min(i.dims) == 1
    )
    arr = numpy_helper.to_array(bias).copy()
    arr.flat[v % arr.size] += np.float32(1e-3 * v)
    bias.CopyFrom(numpy_helper.from_array(arr, bias.name))
    return model.SerializeToString()


CALIBRATION: bytes = b""


def upload(http_: Http, world: World, n: int, targets: str) -> str | None:
    """One seller upload with an Idempotency-Key, retried through faults; the listing id once accepted."""
    key = f"scale-upload-{n}-{uuid.uuid4().hex[:8]}"
    files = {"model": ("m.onnx", model_variant())}
    if "arm-cpu" in targets:
        files["calibration"] = ("cal.npz", CALIBRATION)
    body, ctype = multipart({"name": f"scale model {n}", "license": "MIT", "targets": targets}, files)
    for _ in range(5):  # a connection cut mid-upload is retried with the same key
        status, data = http_.call(
            "upload", "POST", "/api/v1/listings", body, {"Content-Type": ctype, "Idempotency-Key": key}
        )
        if status == 202:
            listing = json.loads(data)["listing"]["id"]
            with world.uploads_lock:
                world.uploads_accepted[key] = listing
            return str(listing)
        if status != 0:
            http_.stats.error(f"upload {n}: {status} {data[:300]!r}")
            return None
    return None


def wait_jobs_idle(c: Cluster, timeout: float) -> dict[str, int]:
    from sqlalchemy import func, select

    from store.models import Job

    ctx = c.ctx
    deadline = time.monotonic() + timeout
    while True:
        with ctx.Session() as s:
            states = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        idle = not states.get("queued") and not states.get("running")
        if idle or time.monotonic() > deadline:
            return {str(k): int(v) for k, v in states.items()}
        time.sleep(0.5)


# ------------------------------------------------------------------------------------------ clients


class BuyerClient(threading.Thread):
    """Browse, take eval licenses (racing the buyer's other client for the last seat), download builds,
    upload usage logs for the devices this client owns."""

    def __init__(
        self, c: Cluster, world: World, buyer: Buyer, own: list[Any], stats: Stats, stop: threading.Event
    ):
        super().__init__(daemon=True)
        self.c, self.world, self.buyer, self.own, self.stats, self.stop_event = (
            c,
            world,
            buyer,
            own,
            stats,
            stop,
        )
        self.http = Http(c.port, buyer.token, stats)
        self.licenses: dict[str, dict[str, Any]] = {}  # license id -> license json
        self.logs = {k.device_id: world.logs.setdefault(k.device_id, []) for k in own}
        self.rng = random.Random(hash(buyer.name) ^ len(own))

    def run(self) -> None:
        ops = [(self.browse, 40), (self.eval_license, 15), (self.download, 25), (self.usage, 20)]
        funcs, weights = zip(*ops, strict=True)
        while not self.stop_event.is_set():
            try:
                self.rng.choices(funcs, weights)[0]()
            except Exception as exc:  # noqa: BLE001 - a client bug must show up in the report, not vanish
                self.stats.error(f"client {self.buyer.name}: {type(exc).__name__}: {exc}")
        self.sync_usage()  # final sync: every record produced must reach the store

    def browse(self) -> None:
        r = self.rng.random()
        if r < 0.5:
            self.http.json(
                "browse", "GET", f"/api/v1/listings?page=1&target={self.rng.choice(['onnx-fp32', 'arm-cpu'])}"
            )
        elif r < 0.8 and self.world.listings:
            self.http.json("browse", "GET", f"/api/v1/listings/{self.rng.choice(self.world.listings)}")
        else:
            self.http.call("browse", "GET", "/")

    def eval_license(self) -> None:
        if not self.world.listings:
            return
        device = self.rng.choice(self.buyer.devices)
        listing = self.rng.choice(self.world.listings)
        status, body = self.http.json(
            "eval_license",
            "POST",
            f"/api/v1/listings/{listing}/eval-license",
            {"device_id": device.device_id, "target": "onnx-fp32"},
        )
        if status in (200, 201) and body:
            self.licenses[body["license_id"]] = body
        elif status not in (403, 0):
            self.stats.error(f"eval-license {listing}: {status} {body}")

    def download(self) -> None:
        if not self.licenses:
            return self.eval_license()
        lic = self.licenses[self.rng.choice(list(self.licenses))]
        status, data = self.http.call("download", "GET", lic["build_url"])
        if status == 200:
            import drm

            header = drm.read_header(data[:65536])
            if header.build_hash != lic["build_hash"]:
                self.stats.error(f"download {lic['build_url']}: got build {header.build_hash}")
        elif status != 0:
            self.stats.error(f"download {lic['build_url']}: {status}")

    def usage(self) -> None:
        import drm

        mine = [lic for lic in self.licenses.values() if lic["device_id"] in self.logs]
        if not mine:
            return self.eval_license()
        lic = self.rng.choice(mine)
        device = next(k for k in self.own if k.device_id == lic["device_id"])
        lines = self.logs[device.device_id]
        for _ in range(self.rng.randint(1, 5)):
            lines.append(
                drm.make_record(
                    device.sign,
                    prev_line=lines[-1] if lines else None,
                    seq=len(lines),
                    device_id=device.device_id,
                    t=int(time.time()),
                    event="run",
                    license_id=lic["license_id"],
                    build_hash=lic["build_hash"],
                    runs=len(lines) + 1,
                )
            )
        self.world.usage_records[device.device_id] = len(lines)
        status, body = self._post_lines(device.device_id, lines)
        if status == 200 and body and not body.get("ok"):
            self.stats.error(f"usage {device.device_id}: refused {body}")

    def _post_lines(self, device_id: str, lines: list[bytes]) -> tuple[int, Any]:
        tail = lines[-64:]  # the store keeps the chain; re-sending a tail it holds is harmless
        status, data = self.http.call(
            "usage",
            "POST",
            f"/api/v1/devices/{device_id}/usage",
            b"\n".join(tail) + b"\n",
            {"Content-Type": "application/x-ndjson"},
        )
        try:
            return status, json.loads(data)
        except ValueError:
            return status, None

    def sync_usage(self) -> None:
        for device_id, lines in self.logs.items():
            if lines:
                self._post_lines(device_id, lines)


class SellerClient(threading.Thread):
    def __init__(
        self, c: Cluster, world: World, stats: Stats, stop: threading.Event, first: int, every: float
    ):
        super().__init__(daemon=True)
        self.c, self.world, self.stats, self.stop_event = c, world, stats, stop
        self.http = Http(c.port, world.seller_token, stats)
        self.n, self.every = first, every

    def run(self) -> None:
        while not self.stop_event.wait(self.every):
            upload(self.http, self.world, self.n, "onnx-fp32,arm-cpu")
            self.n += 1


# ------------------------------------------------------------------------------------------ phases


def run_phase(
    c: Cluster, world: World, *, name: str, duration: float, clients: int, faults: bool, first_upload: int
) -> dict[str, Any]:
    stats = Stats()
    stop = threading.Event()
    threads: list[threading.Thread] = [
        SellerClient(c, world, stats, stop, first_upload, every=max(1.0, duration / 12))
    ]
    for i in range(clients - 1):  # two clients per buyer, each owning half of its devices' usage logs
        buyer = world.buyers[i // 2]
        half = DEVICES_PER_BUYER // 2
        own = buyer.devices[:half] if i % 2 == 0 else buyer.devices[half:]
        threads.append(BuyerClient(c, world, buyer, own, stats, stop))
    events: list[dict[str, Any]] = []
    t0 = time.monotonic()
    for t in threads:
        t.start()
    if faults:
        inject_faults(c, world, stats, t0, duration, events)
    while time.monotonic() - t0 < duration:
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join(timeout=RETRY_FOR_SECONDS + 60)
    elapsed = time.monotonic() - t0
    jobs = wait_jobs_idle(c, timeout=240)
    checks = check_invariants(c, world)
    result = summarize(name, stats, elapsed, clients, events, jobs, checks, faults)
    result["server_errors"] = server_errors(c)
    return result


def server_errors(c: Cluster) -> list[str]:
    """The last lines of each unhandled-error traceback the app processes logged (for the report)."""
    out = []
    text = (c.workdir / "app.log").read_text(errors="replace") if (c.workdir / "app.log").exists() else ""
    blocks = text.split("unhandled error on ")[1:]
    for block in blocks[-10:]:
        lines = [ln for ln in block.splitlines() if ln.strip()]
        out.append(lines[0][:120] + " ... " + " | ".join(ln.strip()[:200] for ln in lines[-3:]))
    return out


def inject_faults(
    c: Cluster, world: World, stats: Stats, t0: float, duration: float, events: list[dict[str, Any]]
) -> None:
    def at(fraction: float) -> None:
        while time.monotonic() - t0 < duration * fraction:
            time.sleep(0.1)

    def note(what: str, **detail: Any) -> None:
        events.append({"t": round(time.monotonic() - t0, 2), "event": what, **detail})
        log(f"fault: {what} {detail}")

    at(0.2)
    for attempt in range(3):
        # Make sure a job is running at the moment of the kill: upload one more model now.
        threading.Thread(
            target=upload,
            args=(
                Http(c.port, world.seller_token, stats),
                world,
                999_000 + 10 * (int(t0) % 1000) + attempt,
                "arm-cpu",
            ),
            daemon=True,
        ).start()
        found = _worker_holding_a_job(c, wait=max(20.0, duration * 0.25))
        if found is None:
            continue
        victim, job_id = found
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        c.workers.remove(victim)
        c.start_worker()  # its supervisor (systemd) would restart it
        if _job_state(c, job_id) == "done":  # it committed in the instant before the kill: try again
            log(f"fault: job {job_id} finished just before its worker was killed; once more")
            continue
        note("job worker SIGKILLed while holding a job", pid=victim.pid, job=job_id)
        world.killed_jobs.append(job_id)
        break
    else:
        note("no running job could be hit; job worker kill skipped")
        events[-1]["skipped"] = True
    at(0.45)
    kids = c.app_worker_pids()
    if kids:
        os.kill(kids[0], signal.SIGKILL)
        note("gunicorn app worker SIGKILLed", pid=kids[0], of=len(kids))
    at(0.7)
    t_restart = time.monotonic()
    c.pg.restart()
    note(
        "PostgreSQL restarted (fast shutdown: open connections cut)",
        seconds=round(time.monotonic() - t_restart, 2),
    )


def _worker_holding_a_job(c: Cluster, wait: float) -> tuple[subprocess.Popen[bytes], str] | None:
    """A job worker of ours in the first half of a running job, and that job's id."""
    from sqlalchemy import select

    from store.models import Job

    ctx = c.ctx
    deadline = time.monotonic() + wait
    by_pid = {p.pid: p for p in c.workers}
    while time.monotonic() < deadline:
        with ctx.Session() as s:
            rows = s.execute(
                select(Job.id, Job.worker).where(Job.state == "running", Job.progress < 0.5)
            ).all()
        for job_id, worker in rows:
            pid = int((worker or "0").rsplit(":", 1)[-1] or 0)
            if pid in by_pid:
                return by_pid[pid], job_id
        time.sleep(0.02)
    return None


def _job_state(c: Cluster, job_id: str) -> str:
    from store.models import Job

    ctx = c.ctx
    with ctx.Session() as s:
        job = s.get(Job, job_id)
        return job.state if job is not None else "missing"


def check_invariants(c: Cluster, world: World) -> dict[str, Any]:
    from sqlalchemy import func, select

    from store.models import Build, Job, License, Listing, UsageRecord

    ctx = c.ctx
    out: dict[str, Any] = {}
    with ctx.Session() as s:
        accepted = dict(world.uploads_accepted)
        found = {
            lid for (lid,) in s.execute(select(Listing.id).where(Listing.id.in_(list(accepted.values()))))
        }
        out["uploads_accepted"] = len(accepted)
        out["uploads_lost"] = sorted(set(accepted.values()) - found)
        dup = s.execute(
            select(Listing.idempotency_key, func.count())
            .where(Listing.idempotency_key.is_not(None))
            .group_by(Listing.idempotency_key)
            .having(func.count() > 1)
        ).all()
        out["uploads_duplicated"] = [k for k, _ in dup]
        unfinished = s.execute(
            select(Job.id, Job.state, Job.error)
            .join(Build, Job.build_id == Build.id)
            .where(Build.listing_id.in_(list(accepted.values())), Job.state != "done")
        ).all()
        out["jobs_not_done"] = [f"{j}:{st}: {(err or '')[:300]}" for j, st, err in unfinished]
        out["jobs_retried"] = s.scalar(select(func.count()).select_from(Job).where(Job.attempts > 1)) or 0
        out["killed_jobs_not_rerun"] = [
            f"{j.id}: {j.state}, attempts {j.attempts}"
            for j in (s.get(Job, job_id) for job_id in world.killed_jobs)
            if j is None or j.state != "done" or j.attempts < 2
        ]
        over = s.execute(
            select(License.buyer_id, License.listing_id, func.count(func.distinct(License.device_id)))
            .where(License.kind == "eval")
            .group_by(License.buyer_id, License.listing_id)
            .having(func.count(func.distinct(License.device_id)) > EVAL_LIMIT)
        ).all()
        out["seats_over_limit"] = [f"buyer {b} listing {li}: {n}" for b, li, n in over]
        twice = s.execute(
            select(License.device_id, License.build_id, func.count())
            .where(License.kind == "eval")
            .group_by(License.device_id, License.build_id)
            .having(func.count() > 1)
        ).all()
        out["seats_double_issued"] = [f"device {d} build {b}: {n}" for d, b, n in twice]
        out["eval_licenses"] = s.scalar(
            select(func.count()).select_from(License).where(License.kind == "eval")
        )
        stored = dict(
            s.execute(select(UsageRecord.device_id, func.count()).group_by(UsageRecord.device_id)).all()
        )
        out["usage_records_produced"] = sum(world.usage_records.values())
        out["usage_records_stored"] = sum(stored.get(d, 0) for d in world.usage_records)
        out["usage_records_missing"] = {
            d: n - stored.get(d, 0) for d, n in world.usage_records.items() if stored.get(d, 0) != n
        }
        keys = [k for (k,) in s.execute(select(Build.blob_key).where(Build.blob_key.is_not(None)))]
    present = set(ctx.blobs.list())
    out["build_blobs_missing"] = [k for k in keys if k not in present]
    return out


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


def summarize(
    name: str,
    stats: Stats,
    elapsed: float,
    clients: int,
    events: list[dict[str, Any]],
    jobs: dict[str, int],
    checks: dict[str, Any],
    faults: bool,
) -> dict[str, Any]:
    every = [x for v in stats.latency.values() for x in v]
    five = {k: v for k, v in stats.status.items() if k.startswith("5")}
    failures = []
    if faults:
        if five.get("500"):
            failures.append(f"{five['500']} HTTP 500 responses")
    elif five:
        failures.append(f"5xx responses: {five}")
    if stats.errors:
        failures.append(f"{len(stats.errors)} client-side errors")
    if any(ev.get("skipped") for ev in events):
        failures.append("a fault could not be injected")
    for key in (
        "uploads_lost",
        "uploads_duplicated",
        "jobs_not_done",
        "seats_over_limit",
        "seats_double_issued",
        "build_blobs_missing",
        "killed_jobs_not_rerun",
    ):
        if checks[key]:
            failures.append(f"{key}: {checks[key][:5]}")
    if checks["usage_records_missing"]:
        failures.append(f"usage_records_missing: {dict(list(checks['usage_records_missing'].items())[:5])}")
    if checks["uploads_accepted"] == 0:
        failures.append("no upload was accepted")
    return {
        "phase": name,
        "clients": clients,
        "seconds": round(elapsed, 1),
        "requests": len(every),
        "rps": round(len(every) / elapsed, 1),
        "p50_ms": round(_pct(every, 0.50), 1),
        "p99_ms": round(_pct(every, 0.99), 1),
        "by_op": {
            op: {"n": len(v), "p50_ms": round(_pct(v, 0.5), 1), "p99_ms": round(_pct(v, 0.99), 1)}
            for op, v in sorted(stats.latency.items())
        },
        "status": dict(sorted(stats.status.items())),
        "errors_5xx": sum(five.values()),
        "retries": dict(stats.retries),
        "client_errors": stats.errors,
        "faults": events,
        "jobs": jobs,
        "checks": checks,
        "passed": not failures,
        "failures": failures,
    }


def render(result: dict[str, Any]) -> str:
    lines = [
        f"phase {result['phase']}: {result['clients']} clients, {result['seconds']} s — "
        f"{result['requests']} requests, {result['rps']} req/s, p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, "
        f"5xx {result['errors_5xx']}, retries {result['retries'] or 0}",
    ]
    for op, v in result["by_op"].items():
        lines.append(f"  {op:<13} n={v['n']:<6} p50 {v['p50_ms']:>8} ms   p99 {v['p99_ms']:>8} ms")
    for ev in result["faults"]:
        lines.append(f"  fault at {ev['t']} s: {ev['event']}")
    ch = result["checks"]
    lines.append(
        f"  uploads accepted {ch['uploads_accepted']}, lost {len(ch['uploads_lost'])}, duplicated "
        f"{len(ch['uploads_duplicated'])}; jobs {result['jobs']} (retried {ch['jobs_retried']}); eval licenses "
        f"{ch['eval_licenses']}, over limit {len(ch['seats_over_limit'])}, double-issued {len(ch['seats_double_issued'])}; "
        f"usage records {ch['usage_records_stored']}/{ch['usage_records_produced']} stored"
    )
    for err in result.get("server_errors", [])[:5]:
        lines.append(f"  server error: {err}")
    lines.append("  PASSED" if result["passed"] else "  FAILED: " + "; ".join(result["failures"]))
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    """The README / DEPLOY table from a saved run (`--markdown FILE`)."""
    cfg = results["config"]
    rows = [
        f"{cfg['clients']} clients, {cfg['app_workers']} app workers, {cfg['job_workers']} job workers, "
        f"{cfg['duration']:.0f} s per phase, all on one 2-core machine with the load generator:",
        "",
        "| phase | requests | req/s | p50 ms | p99 ms | 500s | 503s (retried) | uploads accepted / lost | "
        "eval licenses / over limit / double | usage records stored / produced | jobs retried | result |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("steady", "faults"):
        r = results.get(name)
        if not r:
            continue
        ch = r["checks"]
        rows.append(
            f"| {name} | {r['requests']} | {r['rps']} | {r['p50_ms']} | {r['p99_ms']} | "
            f"{r['status'].get('500', 0)} | {r['status'].get('503', 0)} | "
            f"{ch['uploads_accepted']} / {len(ch['uploads_lost'])} | "
            f"{ch['eval_licenses']} / {len(ch['seats_over_limit'])} / {len(ch['seats_double_issued'])} | "
            f"{ch['usage_records_stored']} / {ch['usage_records_produced']} | {ch['jobs_retried']} | "
            f"{'pass' if r['passed'] else 'FAIL'} |"
        )
    faults = results.get("faults", {}).get("faults", [])
    if faults:
        rows.append("")
        rows.append("Faults injected: " + "; ".join(f"{ev['event']} at {ev['t']} s" for ev in faults) + ".")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    global CALIBRATION
    ap = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per phase (default 60)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--app-workers", type=int, default=4)
    ap.add_argument("--job-workers", type=int, default=2)
    ap.add_argument("--no-faults", action="store_true", help="skip the fault-injection phase")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--markdown", type=Path, metavar="RESULTS", help="print the results table of a saved run")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0
    if args.clients < 3 or args.duration < 5:
        ap.error("need at least 3 clients and 5 seconds")
    CALIBRATION = (CORPUS / "data" / "digits" / "digits_calibration.npz").read_bytes()
    results: dict[str, Any] = {"config": vars(args) | {"json": str(args.json) if args.json else None}}
    with cluster(args.app_workers, args.job_workers) as c:
        world = seed(c, n_buyers=args.clients // 2)
        setup = Http(c.port, world.seller_token, Stats())
        t0 = time.monotonic()
        for n in range(3):
            listing = upload(setup, world, n, "onnx-fp32,arm-cpu")
            if listing:
                world.listings.append(listing)
        jobs = wait_jobs_idle(c, timeout=300)
        log(f"seeded {len(world.listings)} listings ({jobs}) in {time.monotonic() - t0:.1f} s")
        phases = [("steady", False)] + ([] if args.no_faults else [("faults", True)])
        for i, (name, faults) in enumerate(phases):
            log(f"phase {name}: {args.clients} clients for {args.duration:.0f} s")
            res = run_phase(
                c,
                world,
                name=name,
                duration=args.duration,
                clients=args.clients,
                faults=faults,
                first_upload=1000 * (i + 1),
            )
            print(render(res), flush=True)
            results[name] = res
        results["passed"] = all(results[n]["passed"] for n, _ in phases)
        if not results["passed"]:  # keep the servers' logs for the post-mortem
            keep = Path(tempfile.gettempdir()) / "edgemart-scale-logs"
            shutil.rmtree(keep, ignore_errors=True)
            keep.mkdir()
            for f in c.workdir.glob("*.log"):
                shutil.copy(f, keep / f.name)
            print(f"server logs kept in {keep}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print("scale test " + ("PASSED" if results["passed"] else "FAILED"))
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
