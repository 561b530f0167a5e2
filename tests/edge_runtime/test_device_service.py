"""The device service under its own account, attacked from a buyer's account (issue #20 item 1).

Runs as root (CI does): `edgemart device install-service` makes the service account and group, the service
runs as that account (runuser), and every buyer command runs as a real second account through runuser.
Skipped cleanly when not root or when runuser/useradd are missing."""

from __future__ import annotations

import base64
import json
import os
import pwd
import select
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import drm

ROOT = Path(__file__).resolve().parents[2]
SVC, GROUP, BUYER, OTHER = "emtest-device", "emtest-users", "emtest-buyer", "emtest-other"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root: creates accounts, runs as them"
    ),
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("runuser", "useradd", "groupadd", "userdel")),
        reason="needs runuser and the shadow account tools",
    ),
]


def _reachable_by_others(path: Path) -> bool:
    """Every directory above ``path`` is searchable by others and the file itself readable/executable."""
    path = path.resolve()
    return all(p.stat().st_mode & stat.S_IXOTH for p in path.parents) and bool(
        path.stat().st_mode & stat.S_IROTH
    )


def _python_for_others() -> tuple[str, str]:
    """An interpreter the other accounts may execute, and a PYTHONPATH with this tree and its packages."""
    import site

    pythonpath = os.pathsep.join([str(ROOT), *site.getsitepackages()])
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (Path(sys.executable), Path(f"/usr/bin/python{version}")):
        if candidate.exists() and _reachable_by_others(candidate):
            return str(candidate), pythonpath
    pytest.skip(f"no python{version} that other accounts can execute (this one lives under a private home)")


def _ensure_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True
        )


class Board:
    """The board: the service's account and state, a buyer and an outsider, and the running service."""

    def __init__(self, base: Path, python: str, pythonpath: str) -> None:
        self.base, self.python, self.pythonpath = base, python, pythonpath
        self.state = base / "state"
        self.device_dir = self.state / "device"
        self.anchors = self.state / "anchors"
        self.socket = base / "run" / "device.sock"
        self.units = base / "units"
        self.work = base / "buyer"
        self.secrets: dict[str, bytes] = {}
        self.plaintexts: dict[str, bytes] = {}
        self.process: subprocess.Popen[bytes] | None = None

    def command(self, user: str, *args: str) -> list[str]:
        env = ["env", f"PYTHONPATH={self.pythonpath}", "EDGEMART_ANCHOR_DIR=/nonexistent"]
        return ["runuser", "-u", user, "--", *env, self.python, *args]

    def edgemart(self, user: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(user, "-m", "edgemart", *args), capture_output=True, text=True, cwd=self.work
        )

    def shell(self, user: str, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["runuser", "-u", user, "--", *argv], capture_output=True, text=True, cwd=self.work
        )

    def give(self, path: Path, user: str) -> Path:
        account = pwd.getpwnam(user)
        os.chown(path, account.pw_uid, account.pw_gid)
        return path

    def start(self) -> None:
        run_dir = self.socket.parent
        run_dir.mkdir(mode=0o755, exist_ok=True)  # what systemd's RuntimeDirectory= makes
        self.give(run_dir, SVC)
        self.process = subprocess.Popen(
            self.command(
                SVC, "-m", "edgemart", "device", "serve", "--device-dir", str(self.device_dir),
                "--anchor-dir", str(self.anchors), "--socket", str(self.socket), "--group", GROUP,
            ),
            stderr=subprocess.PIPE, cwd="/",
        )  # fmt: skip
        assert self.process.stderr is not None
        ready, _, _ = select.select([self.process.stderr], [], [], 120)
        line = self.process.stderr.readline().decode() if ready else ""
        assert "serving" in line, line or "the service did not start"
        os.set_blocking(self.process.stderr.fileno(), False)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait()

    @property
    def service_pid(self) -> int:
        """The serve process itself (runuser's child)."""
        assert self.process is not None
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        return int(children[0]) if children else self.process.pid


def _populate(board: Board, corpus: Path) -> None:
    """Root puts licensed builds into the service's device dir, then hands it over to the account."""
    from edge_runtime.device import Device

    now = int(time.time())
    authority = drm.Authority.generate(now=now - 60)
    issuer = authority.issue_issuer(now=now - 60)
    os.environ["EDGEMART_ANCHOR_DIR"] = str(board.anchors)
    try:
        device = Device.init(board.device_dir, trust=drm.cert_to_pem(authority.cert), now=now - 30)
        kem = device.keys.kem_public()
        models = {
            "digits-base": ("models/digits/digits_mlp_base.onnx", None),
            "digits-independent": ("models/digits/digits_mlp_independent.onnx", None),
            "digits-capped": ("models/digits/digits_mlp_base.onnx", 3),
        }
        sealed: dict[str, tuple[bytes, bytes]] = {}  # one build per model: builds are stored by their hash
        for listing, (rel, max_runs) in models.items():
            plaintext = (corpus / rel).read_bytes()
            if rel not in sealed:
                cek = drm.generate_content_key()
                sealed[rel] = (cek, drm.seal(plaintext, key=cek, target="onnx-fp32"))
            cek, build = sealed[rel]
            token = drm.issue_license(
                issuer=issuer, cek=cek, recipient=kem, kind="eval", listing=listing,
                build_hash=drm.read_header(build[:65536]).build_hash, target="onnx-fp32", now=now - 30,
                days=30, max_runs=max_runs, device_id=device.device_id,
            )  # fmt: skip
            device.install(build=build, license=token, listing=listing, now=now - 20)
            board.plaintexts[listing] = plaintext
            board.secrets[f"cek:{listing}"] = cek
    finally:
        del os.environ["EDGEMART_ANCHOR_DIR"]
    for name in ("sign.key", "kem.key", "pqkem.key", "state.key"):
        if (board.device_dir / name).is_file():
            board.secrets[name] = (board.device_dir / name).read_bytes()
    for key in (device.keys.sign, device.keys.kem):
        board.secrets[f"raw:{type(key).__name__}"] = key.private_bytes_raw()
    account = pwd.getpwnam(SVC)
    for path in [board.state, *board.state.rglob("*")]:
        os.chown(path, account.pw_uid, account.pw_gid, follow_symlinks=False)


@pytest.fixture(scope="module")
def board(corpus: Path, digits_test: Path) -> Iterator[Board]:
    python, pythonpath = _python_for_others()
    base = Path(tempfile.mkdtemp(prefix="edgemart-service-", dir="/tmp"))
    base.chmod(0o755)
    b = Board(base, python, pythonpath)
    created = [u for u in (BUYER, OTHER) if not _exists(u)]
    for user in (BUYER, OTHER):
        _ensure_user(user)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "edgemart", "device", "install-service", "--user", SVC, "--group", GROUP,
             "--state-dir", str(b.state), "--socket", str(b.socket), "--unit-dir", str(b.units),
             "--python", python, "--pythonpath", pythonpath, "--json"],
            capture_output=True, text=True, cwd=ROOT,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        subprocess.run(["usermod", "--append", "--groups", GROUP, BUYER], check=True)
        b.work.mkdir(mode=0o700)
        b.give(b.work, BUYER)
        for name, src in (
            ("digits.npz", digits_test),
            ("chain.json", ROOT / "examples/chains/digits_two_vendors.json"),
        ):
            shutil.copyfile(src, b.work / name)
            b.give(b.work / name, BUYER)
        with np.load(digits_test) as d:
            np.savez(b.work / "one.npz", x=d["x"][:8], y=d["y"][:8])
        b.give(b.work / "one.npz", BUYER)
        _populate(b, corpus)
        b.start()
        yield b
    finally:
        b.stop()
        shutil.rmtree(base, ignore_errors=True)
        for user in (*created, SVC):
            subprocess.run(["userdel", user], capture_output=True)
        subprocess.run(["groupdel", GROUP], capture_output=True)


def _exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


def test_install_service_makes_the_account_a_private_dir_and_the_unit(board: Board) -> None:
    account = pwd.getpwnam(SVC)
    for d in (board.state, board.device_dir, board.anchors):
        st = d.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (account.pw_uid, 0o700), d
    assert account.pw_shell.endswith("nologin") and account.pw_uid < 1000  # a system account
    assert GROUP in subprocess.run(["id", "-nG", SVC], capture_output=True, text=True).stdout.split()
    unit = (board.units / "edgemart-device.service").read_text()
    assert f"User={SVC}" in unit and f"SupplementaryGroups={GROUP}" in unit and "LimitCORE=0" in unit
    assert f"--device-dir {board.device_dir}" in unit and f"--socket {board.socket}" in unit
    sock = board.socket.stat()
    assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) == 0o660
    assert (sock.st_uid, sock.st_gid) == (account.pw_uid, pwd_group_gid(GROUP))


def pwd_group_gid(name: str) -> int:
    import grp

    return grp.getgrnam(name).gr_gid


def test_the_buyer_evaluates_and_chains_through_the_service(board: Board) -> None:
    done = board.edgemart(
        BUYER, "device", "eval", "digits-base", "--service", str(board.socket), "--data", "digits.npz",
        "--save-outputs", "out.npz", "--html", "report.html", "--json", "--quiet",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["samples"] > 100 and report["classification"]["accuracy"] > 0.8
    with np.load(board.work / "out.npz") as out:
        assert out["probabilities"].shape == (report["samples"], 10)
    assert "<html" in (board.work / "report.html").read_text().lower()
    assert (board.work / "out.npz").stat().st_uid == pwd.getpwnam(BUYER).pw_uid  # the buyer wrote it

    done = board.edgemart(
        BUYER, "device", "run", "--service", str(board.socket), "--chain", "chain.json", "--input",
        "digits.npz", "--limit", "6", "--save-outputs", "chain.npz", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    chain = json.loads(done.stdout)
    assert chain["frames"] == 6 and set(chain["processes"]) == {"vendor:vendor-a", "vendor:vendor-b"}
    with np.load(board.work / "chain.npz") as got, np.load(board.work / "out.npz") as single:
        assert np.array_equal(got["label_a"], np.argmax(single["probabilities"][:6], axis=-1))

    status = board.edgemart(BUYER, "device", "status", "--service", str(board.socket), "--json")
    assert status.returncode == 0 and {lic["listing"] for lic in json.loads(status.stdout)["licenses"]} >= {
        "digits-base",
        "digits-capped",
    }
    # With $EDGEMART_DEVICE_SOCKET set, no flag is needed.
    env_run = subprocess.run(
        ["runuser", "-u", BUYER, "--", "env", f"PYTHONPATH={board.pythonpath}",
         f"EDGEMART_DEVICE_SOCKET={board.socket}", board.python, "-m", "edgemart", "device", "verify-log"],
        capture_output=True, text=True, cwd=board.work,
    )  # fmt: skip
    assert env_run.returncode == 0 and "usage log OK" in env_run.stdout, env_run.stderr


def test_the_buyer_cannot_read_or_copy_the_device_state(board: Board) -> None:
    for argv in (
        ["cat", str(board.device_dir / "sign.key")],
        ["cat", str(board.device_dir / "state.bin")],
        ["ls", str(board.device_dir)],
        ["ls", str(board.anchors)],
        ["cp", "-a", str(board.state), str(board.work / "copy")],
        ["tar", "-cf", str(board.work / "state.tar"), str(board.state)],
        ["cp", "-a", str(board.work / "digits.npz"), str(board.device_dir / "x")],  # nor write into it
    ):
        done = board.shell(BUYER, *argv)
        assert done.returncode != 0 and "Permission denied" in done.stderr, (argv, done.stderr)
    # Direct mode on the service's dir: one line, exit 2.
    done = board.edgemart(BUYER, "device", "status", "--device-dir", str(board.device_dir))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    # Nor the memory of the service (decrypted models live there): another uid may not ptrace or read it.
    probe = (
        "import sys\n"
        "for name in ('mem', 'environ', 'maps'):\n"
        "    try:\n"
        "        open(f'/proc/{sys.argv[1]}/' + name, 'rb').read(1)\n"
        "    except PermissionError:\n"
        "        print(name, 'denied')\n"
    )
    done = subprocess.run(
        board.command(BUYER, "-c", probe, str(board.service_pid)), capture_output=True, text=True, cwd="/"
    )
    assert done.stdout.split("\n")[:3] == ["mem denied", "environ denied", "maps denied"], done


_SCAN = r"""
import base64, json, sys
from pathlib import Path
from edge_runtime.service import wire
from edge_runtime.service.client import ServiceClient
from edge_runtime.evaluation.session import EvalRequest

seen = []
read_exact = wire._read_exact
def recording(sock, n):
    data = read_exact(sock, n)
    seen.append(data)
    return data
wire._read_exact = recording

client = ServiceClient(Path(sys.argv[1]))
data = Path("one.npz").read_bytes()
chain = Path("chain.json").read_text()
results = []
def attempt(name, call):
    try:
        call()
        results.append([name, "ok"])
    except Exception as exc:
        results.append([name, type(exc).__name__ + ": " + str(exc)])
attempt("status", client.status)
attempt("verify-log", client.verify_log)
attempt("sync", client.sync)
attempt("fetch", lambda: client.fetch("digits-base", "onnx-fp32"))
attempt("enroll", lambda: client.enroll("http://127.0.0.1:9", "t"))
attempt("install", lambda: client.install(build=b"\0" * 64, license=b"{}"))
attempt("add-fleet-key", lambda: client.add_fleet_key(b"-----BEGIN PRIVATE KEY-----\n"))
for listing in ("digits-base", "digits-independent"):
    attempt("eval " + listing, lambda: client.evaluate(
        EvalRequest(listing=listing, warmup=0, want_outputs=True, want_html=True), data))
attempt("compare", lambda: client.evaluate(
    EvalRequest(listing="digits-base", target="onnx-fp32", compare="onnx-fp32"), data))
def run():
    import numpy as np
    x = np.load("one.npz")["x"]
    out, final = client.run_chain(chain, "chain.json", lambda names: ({"x": x[i:i+1]} for i in range(4)))
    list(out)
attempt("run", run)
for op in ("keys", "export", "__init__", "_device", "op_status", "../status", "read"):
    attempt("raw " + op, lambda: client.call(op))
print(json.dumps({"results": results, "bytes": base64.b64encode(b"".join(seen)).decode()}))
"""


def test_no_operation_hands_the_buyer_model_bytes_or_keys(board: Board) -> None:
    (board.work / "scan.py").write_text(_SCAN)
    board.give(board.work / "scan.py", BUYER)
    done = subprocess.run(
        board.command(BUYER, "scan.py", str(board.socket)), capture_output=True, text=True, cwd=board.work
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    outcome = dict(answer["results"])
    assert outcome["status"] == outcome["eval digits-base"] == outcome["run"] == "ok", outcome
    assert outcome["raw keys"].startswith("UsageError: unknown operation")
    assert outcome["raw _device"].startswith("UsageError") and outcome["raw op_status"].startswith(
        "UsageError"
    )
    received = base64.b64decode(answer["bytes"])
    assert len(received) > 10_000  # reports, outputs and HTML did come back
    forms = []
    for name, secret in board.secrets.items():
        forms += [(name, secret), (name, secret.hex().encode()), (name, base64.b64encode(secret))]
    for listing, plaintext in board.plaintexts.items():
        step = max(1, (len(plaintext) - 32) // 200)
        forms += [(f"{listing}@{i}", plaintext[i : i + 32]) for i in range(0, len(plaintext) - 32, step)]
    leaked = [name for name, form in forms if form in received]
    assert not leaked, leaked


def test_a_user_outside_the_group_is_refused(board: Board) -> None:
    done = board.edgemart(OTHER, "device", "status", "--service", str(board.socket))
    assert done.returncode == 2 and "permission denied" in done.stderr.lower(), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    # Even with the socket opened to everyone, the peer-credential check refuses the outsider.
    board.socket.chmod(0o666)
    try:
        done = board.edgemart(OTHER, "device", "status", "--service", str(board.socket))
        assert done.returncode == 2 and f"not a member of group {GROUP}" in done.stderr, done.stderr
        scan = subprocess.run(
            board.command(OTHER, "-c", _OUTSIDER, str(board.socket)), capture_output=True, text=True, cwd="/"
        )
        assert scan.stdout.strip() == "refused all", scan.stdout + scan.stderr
    finally:
        board.socket.chmod(0o660)


_OUTSIDER = r"""
import sys
from pathlib import Path
from edge_runtime.service.client import ServiceClient
from edgemart.core.errors import ForbiddenError
client = ServiceClient(Path(sys.argv[1]))
for op in ("status", "verify-log", "eval", "run", "fetch", "sync"):
    try:
        client.call(op)
    except ForbiddenError:
        continue
    print("answered", op)
    break
else:
    print("refused all")
"""


def test_restoring_everything_the_buyer_can_reach_gains_no_runs(board: Board) -> None:
    def evaluate() -> subprocess.CompletedProcess[str]:
        return board.edgemart(
            BUYER, "device", "eval", "digits-capped", "--service", str(board.socket), "--data", "one.npz",
            "--warmup", "0", "--batch-size", "8", "--json", "--quiet",
        )  # fmt: skip

    snapshot = board.shell(BUYER, "tar", "-cf", "/tmp/emtest-buyer-snapshot.tar", "-C", str(board.work), ".")
    assert snapshot.returncode == 0, snapshot.stderr
    try:
        runs = 0
        for _ in range(10):
            done = evaluate()
            if done.returncode != 0:
                break
            runs += 1
        assert runs >= 1 and done.returncode == 1 and "run cap" in done.stderr, done.stderr
        restore = board.shell(BUYER, "tar", "-xf", "/tmp/emtest-buyer-snapshot.tar", "-C", str(board.work))
        assert restore.returncode == 0, restore.stderr
        done = evaluate()
        assert done.returncode == 1 and "run cap" in done.stderr, done.stderr
        status = json.loads(
            board.edgemart(BUYER, "device", "status", "--service", str(board.socket), "--json").stdout
        )
        capped = [lic for lic in status["licenses"] if lic.get("listing") == "digits-capped"]
        assert capped and capped[0]["runs_left"] == 0
    finally:
        Path("/tmp/emtest-buyer-snapshot.tar").unlink(missing_ok=True)


def test_bad_input_through_the_service_is_one_line_exit_2(board: Board) -> None:
    (board.work / "bad.npz").write_bytes(b"PK\x03\x04 not a zip")
    board.give(board.work / "bad.npz", BUYER)
    done = board.edgemart(
        BUYER, "device", "eval", "nope", "--service", str(board.socket), "--data", "one.npz"
    )
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    done = board.edgemart(
        BUYER, "device", "eval", "digits-base", "--service", str(board.socket), "--data", "bad.npz"
    )
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    done = board.edgemart(BUYER, "device", "status", "--service", str(board.base / "none.sock"))
    assert done.returncode == 2 and "no device service" in done.stderr, done.stderr
