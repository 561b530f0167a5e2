# Why this is one module: the sandbox's two halves (the parent's client and the child's runner and tasks) speak one private frame protocol; keeping them together keeps that protocol in one place.
"""Confined processing of seller bytes: the gate, sample checks, calibration, quantization, conversion and
quality runs happen in a child process that cannot read the store's keys, reach the network or outgrow its
limits.

One runner per store process is started with ``exec`` (so it holds none of the parent's memory: no KEK, no
session secret), a scrubbed environment (no ``EDGEMART_*``, ``AWS_*`` or PKCS#11 PIN), an empty private
working directory, and the heavy libraries preloaded. Each task is a ``fork`` of that runner which, before
touching the task's bytes:

- restricts itself with Landlock (Linux >= 5.13): read-only access to the Python installation and the
  packages it imports plus the paths the task names (the license index), read-write access to its own
  empty scratch directory, nothing else — no data dir, no key files, no ``/proc`` of other processes, no
  TCP, no signals to processes outside the sandbox;
- sets resource limits: address space (``SANDBOX_MEMORY_BYTES`` beyond what the preloaded runner maps), CPU
  seconds, file size, open files, no core dumps.

The parent holds a wall-clock deadline and kills the task past it. Results come back as JSON and raw byte
frames over a socket pair — never pickle, so a compromised child cannot run code in the store. Any limit hit
is a ``SandboxLimit`` (HTTP 422 / a failed job naming the limit), never a 500.

Where Landlock is missing (old kernels) the rest still applies and `landlock_available()` says so; the
store logs it once at start."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgemart.core import errors as _errors
from edgemart.core.errors import EdgemartError, UsageError

log = logging.getLogger("edgemart.sandbox")


class SandboxLimit(UsageError):
    """Processing a seller's model hit one of the sandbox's limits (HTTP 422; a failed job naming the limit)."""

    http_status = 422
    code = "limit"


class SandboxCrash(Exception):
    """The confined task ended without an answer for a reason that is not a known limit (retried as internal)."""


class SandboxChildError(Exception):
    """An exception the child raised that is not an EdgemartError: its type, module and message, as text."""

    def __init__(self, type_name: str, module: str, message: str) -> None:
        super().__init__(message)
        self.type_name, self.origin_module = type_name, module


@dataclass(frozen=True)
class SandboxLimits:
    memory_bytes: int = 4 << 30  # address space a task may add to the preloaded runner's
    cpu_seconds: int = 900
    wall_seconds: float = 1800.0
    file_bytes: int = 2 << 30
    open_files: int = 256

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SandboxLimits:
        return cls(
            memory_bytes=int(config["SANDBOX_MEMORY_BYTES"]),
            cpu_seconds=int(config["SANDBOX_CPU_SECONDS"]),
            wall_seconds=float(config["SANDBOX_WALL_SECONDS"]),
        )


# ------------------------------------------------------------------------------------------ framing

_MAX_HEADER = 64 << 20


def _send(sock: socket.socket, header: dict[str, Any], blob: bytes | memoryview = b"") -> None:
    head = json.dumps({**header, "blob": len(blob)}, separators=(",", ":")).encode()
    sock.sendall(struct.pack(">I", len(head)) + head)
    if blob:
        sock.sendall(blob)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError("peer closed")
        got += k
    return bytes(buf)


def _recv(sock: socket.socket, max_blob: int) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack(">I", _recv_exact(sock, 4))
    if length > _MAX_HEADER:
        raise EOFError("oversized frame header")
    header = json.loads(_recv_exact(sock, length))
    if not isinstance(header, dict) or not isinstance(header.get("blob"), int) or header["blob"] < 0:
        raise EOFError("malformed frame")
    if header["blob"] > max_blob:
        raise EOFError("oversized frame")
    return header, _recv_exact(sock, header["blob"]) if header["blob"] else b""


# ------------------------------------------------------------------------------------------ landlock

_SYS_CREATE, _SYS_ADD, _SYS_RESTRICT = 444, 445, 446  # the same numbers on x86_64 and aarch64
_FS_EXECUTE, _FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_ALL_V1 = (1 << 13) - 1
_FS_REFER, _FS_TRUNCATE, _FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1
_SCOPE_ABSTRACT_UNIX, _SCOPE_SIGNAL = 1 << 0, 1 << 1
_FILE_RIGHTS = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV
_PR_SET_NO_NEW_PRIVS, _PR_SET_PDEATHSIG = 38, 1


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when Landlock is unavailable."""
    if sys.platform != "linux":
        return 0
    try:
        abi = _libc().syscall(_SYS_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    except (OSError, AttributeError):
        return 0
    return max(int(abi), 0)


def landlock_available() -> bool:
    return landlock_abi() > 0


def _landlock(read: list[str], write: list[str]) -> int:
    """Restrict this (single-threaded) process: read-only `read`, read-write `write`, no TCP, no signals
    or abstract sockets beyond the sandbox. Returns the ABI used (0: not available, nothing done)."""
    abi = landlock_abi()
    if abi <= 0:
        return 0
    libc = _libc()
    handled = _FS_ALL_V1 | (_FS_REFER if abi >= 2 else 0) | (_FS_TRUNCATE if abi >= 3 else 0)
    handled |= _FS_IOCTL_DEV if abi >= 5 else 0
    net = (_NET_BIND_TCP | _NET_CONNECT_TCP) if abi >= 4 else 0
    scoped = (_SCOPE_ABSTRACT_UNIX | _SCOPE_SIGNAL) if abi >= 6 else 0
    attr = struct.pack("<QQQ", handled, net, scoped)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    buf = ctypes.create_string_buffer(attr[:size], size)
    ruleset = libc.syscall(_SYS_CREATE, buf, ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset failed")
    try:
        read_rights = _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR
        for paths, rights in ((read, read_rights), (write, handled)):
            for path in paths:
                try:
                    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    continue  # a path that does not exist grants nothing
                try:
                    allowed = rights if os.path.isdir(path) else rights & _FILE_RIGHTS
                    rule = ctypes.create_string_buffer(struct.pack("<Qi", allowed & handled, fd), 12)
                    if libc.syscall(_SYS_ADD, ruleset, ctypes.c_int(1), rule, ctypes.c_uint32(0)) < 0:
                        raise OSError(ctypes.get_errno(), f"landlock_add_rule failed for {path}")
                finally:
                    os.close(fd)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(NO_NEW_PRIVS) failed")
        if libc.syscall(_SYS_RESTRICT, ruleset, ctypes.c_uint32(0)) < 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    finally:
        os.close(ruleset)
    return abi


_OWN_PACKAGES = ("drm", "edge_runtime", "edgemart", "licenses", "packagers", "store")


def _readable_code_paths(forbidden: list[Path]) -> list[str]:
    """What a task may read to import Python code: the interpreter's and the import path's directories,
    except that a directory holding a forbidden path (a data dir under the checkout) is opened up only
    child by child, leaving out the branch that leads to the forbidden path."""
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, *sysconfig.get_paths().values()}
    roots |= {p for p in sys.path if p and os.path.isdir(p)}
    # Our own packages wherever they are imported from: an editable install maps them through an import
    # hook, not sys.path, and their data files (licenses/policy.json, ...) are read lazily by the tasks.
    roots |= {str(Path(__file__).resolve().parent.parent / name) for name in _OWN_PACKAGES}
    roots |= {"/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/share/zoneinfo", "/etc/ld.so.cache"}
    roots |= {"/etc/localtime", "/dev/null", "/dev/urandom", "/sys/devices/system/cpu"}
    out: set[str] = set()
    bad = [f.resolve() for f in forbidden]
    pending = [Path(r).resolve() for r in roots if os.path.exists(r)]
    while pending:
        root = pending.pop()
        holds = [b for b in bad if b == root or root in b.parents]
        if not holds:
            out.add(str(root))
            continue
        if any(b == root for b in holds) or not root.is_dir():
            continue
        for child in root.iterdir():
            if child.is_symlink():
                continue
            pending.append(child)
    return sorted(out)


# ------------------------------------------------------------------------------------------ tasks


def _task_inspect(
    args: dict[str, Any], blobs: dict[str, bytes], progress: Callable[[float, str], None]
) -> Any:
    """The model's format and input/output signature (the model-safety walk runs first, inside)."""
    import packagers

    return {"info": packagers.inspect_model(blobs["model"]).to_dict()}, {}


def _task_samples(
    args: dict[str, Any], blobs: dict[str, bytes], progress: Callable[[float, str], None]
) -> Any:
    """A samples archive checked (sizes, ratio, headers) and read; answers the array shapes and, given the
    model, how the samples miss each target's sample contract: [[message, [targets]]...]."""
    import packagers

    samples = _load_npz(blobs["samples"], args.get("sample_limits"))
    out: dict[str, Any] = {"shapes": {k: list(v.shape) for k, v in samples.items()}, "fit_problems": []}
    if "model" in blobs:
        info = packagers.inspect_model(blobs["model"])
        misses: dict[str, list[str]] = {}
        options = args.get("target_options") or {}
        for target in [t for t in args.get("targets", []) if t in packagers.TARGETS]:
            try:
                packagers.get_packager(target, options.get(target)).bind(info, samples, "calibration")
            except UsageError as exc:
                misses.setdefault(exc.message, []).append(target)
        out["fit_problems"] = [[message, names] for message, names in misses.items()]
    return out, {}


def _load_npz(data: bytes, limits: dict[str, Any] | None) -> dict[str, Any]:
    import packagers

    path = Path("samples.npz")  # the task's private scratch directory is the working directory
    path.write_bytes(data)
    try:
        return packagers.load_calibration(path, packagers.SampleLimits(**(limits or {})))
    except UsageError as exc:
        raise UsageError(exc.message.replace(f"sample file {path}", "the calibration file")) from None
    finally:
        path.unlink()


def _task_gate(args: dict[str, Any], blobs: dict[str, bytes], progress: Callable[[float, str], None]) -> Any:
    import licenses

    index = licenses.LicenseIndex(Path(args["index"])) if args.get("index") else None
    decision = licenses.check_model(
        blobs["model"], card=args.get("card"), declared_license=args.get("license"), index=index
    )
    return {"decision": decision.to_dict()}, {}


def _task_package(
    args: dict[str, Any], blobs: dict[str, bytes], progress: Callable[[float, str], None]
) -> Any:
    """Check the seller's samples against the model, split off the hold-out, package for the target."""
    import packagers

    model, target = blobs["model"], args["target"]
    calibration = holdout = None
    if "samples" in blobs:
        # The seller's samples bound by the target's sample contract (fixed inputs, state pairs), counted as
        # uploaded, then split: the first part calibrates, the held-out rest (cut between sequences for a
        # stateful model) measures quality honestly.
        packager = packagers.get_packager(target, args.get("options"))
        samples = _load_npz(blobs["samples"], args.get("sample_limits"))
        bound = packager.bind(packagers.inspect_model(model), samples, "calibration")
        least = int(args.get("min_calibration", 1))
        if packager.needs_calibration and bound.count < least:
            raise UsageError(
                f"calibration too small: {bound.count} sample(s); {target} needs at least {least} to set its"
                " int8 ranges",
                code="calibration_too_small",
            )
        calibration = bound
        held = int(bound.count * float(args.get("holdout_fraction", 0.0)))
        if held >= 10 and bound.count - held >= 10:
            first, rest = bound.split_tail(held)
            if rest is not None and rest.count >= 10 and first.count >= 10:
                calibration, holdout = first, rest
    build = packagers.package_model(
        model,
        target,
        calibration=calibration,
        holdout=holdout,
        options=args.get("options"),
        progress=progress,
    )
    meta = {
        "target": build.target,
        "format": build.format,
        "build_hash": build.build_hash,
        "metadata": json.loads(json.dumps(build.metadata, default=str)),
        "quality": build.quality.to_dict(),
    }
    return meta, {"payload": build.payload}


def _task_selftest(
    args: dict[str, Any], blobs: dict[str, bytes], progress: Callable[[float, str], None]
) -> Any:
    """What a task can reach (for `store status` and the tests): which of `paths` it can read, its
    environment, whether it can open a TCP connection or signal the store process, its working dir."""
    readable = []
    for path in args.get("paths", []):
        try:
            with open(path, "rb") as fp:
                fp.read(1)
            readable.append(path)
        except OSError:
            pass
    tcp = False
    if args.get("port"):
        try:
            socket.create_connection(("127.0.0.1", int(args["port"])), timeout=2).close()
            tcp = True
        except OSError:
            pass
    signalled = False
    if args.get("pid"):
        try:
            os.kill(int(args["pid"]), 0)
            signalled = True
        except OSError:
            pass
    out = {"readable": readable, "env": sorted(os.environ), "tcp": tcp, "signal": signalled}
    out["cwd"] = sorted(os.listdir("."))
    out["limits"] = {
        "as": resource.getrlimit(resource.RLIMIT_AS)[0],
        "cpu": resource.getrlimit(resource.RLIMIT_CPU)[0],
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }
    if args.get("allocate"):
        out["allocated"] = len(bytearray(int(args["allocate"])))
    if args.get("spin"):
        end = time.monotonic() + float(args["spin"])
        while time.monotonic() < end:
            pass
    return out, {}


TASKS: dict[str, Callable[..., Any]] = {
    "inspect": _task_inspect,
    "samples": _task_samples,
    "gate": _task_gate,
    "package": _task_package,
    "selftest": _task_selftest,
}


def _run_child(sock: socket.socket, scratch: str, forbidden: list[str]) -> None:
    """In the forked child: confine, read the request, run it, answer. Never returns."""
    code = 0
    try:
        os.chdir(scratch)
        # This task process exits when it answers: TensorFlow (coral-edgetpu's converter) may load in it,
        # which packagers keep out of every longer-lived process by converting in a child of their own.
        from packagers._onnx2tf import convert_in_this_process

        convert_in_this_process()
        base = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        _send(sock, {"pid": os.getpid()})
        request, _ = _recv(sock, 0)
        limits = request.get("limits", {})
        # Confined before a single byte of the seller's is read.
        # /proc/self/cmdline is this task's own command line (the runner's, scrubbed of nothing secret):
        # TensorFlow's TFLite converter aborts when it cannot read it (coral-edgetpu's onnx2tf conversion).
        read_paths = (
            _readable_code_paths([Path(f) for f in forbidden])
            + [str(p) for p in request.get("read", [])]
            + ["/proc/self/cmdline"]
        )
        abi = _landlock(read_paths, [scratch])
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits["open_files"], limits["open_files"]))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"], limits["file_bytes"]))
        cpu = int(limits["cpu_seconds"])
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
        resource.setrlimit(resource.RLIMIT_AS, (base + limits["memory_bytes"],) * 2)
        blobs: dict[str, bytes] = {}
        for name in request.get("blobs", []):
            _, data = _recv(sock, 1 << 40)
            blobs[str(name)] = data

        def on_cpu_limit(signum: int, frame: Any) -> None:
            raise SandboxLimit(f"processing used more than {cpu} s of CPU time (SANDBOX_CPU_SECONDS)")

        signal.signal(signal.SIGXCPU, on_cpu_limit)

        def progress(fraction: float, message: str) -> None:
            _send(sock, {"progress": [float(fraction), str(message)[:200]]})

        task = TASKS[request["task"]]
        result, out_blobs = task(request.get("args", {}), blobs, progress)
        _send(sock, {"result": result, "landlock": abi, "blobs": sorted(out_blobs)})
        for name in sorted(out_blobs):
            _send(sock, {"name": name}, out_blobs[name])
    except MemoryError:
        _answer_error(sock, {"kind": "memory"})
    except EdgemartError as exc:
        _answer_error(
            sock,
            {"kind": "edgemart", "type": type(exc).__name__, "message": exc.message, "code": exc.code},
        )
    except BaseException as exc:  # noqa: BLE001 - the child reports every failure, then exits
        import traceback

        if any(sign in str(exc) for sign in _OUT_OF_MEMORY):  # onnxruntime's arena under RLIMIT_AS
            _answer_error(sock, {"kind": "memory"})
            os._exit(0)

        traceback.print_exc(file=sys.stderr)  # the worker log; the seller sees type and first line only
        first = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else ""
        _answer_error(
            sock,
            {
                "kind": "exception",
                "type": type(exc).__name__,
                "module": type(exc).__module__,
                "message": first,
            },
        )
        code = 1
    finally:
        sys.stderr.flush()
        os._exit(code)


_OUT_OF_MEMORY = ("Failed to allocate memory", "bad_alloc", "Cannot allocate memory")


def _answer_error(sock: socket.socket, error: dict[str, Any]) -> None:
    try:
        _send(sock, {"error": error})
    except OSError:
        pass


_PRELOAD = (
    "numpy",
    "onnx",
    "onnx.numpy_helper",
    "onnxruntime",
    "onnxruntime.quantization",
    "scipy.optimize",
    "licenses.gate",
    "licenses.index",
    "packagers",
)


def runner_main(fd: int) -> None:
    """The runner: preload, then fork one confined child per request received on `fd`."""
    import importlib
    import shutil

    control = socket.socket(fileno=fd)
    _libc().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    scratch_root = os.getcwd()
    for name in _PRELOAD:  # so each fork starts warm and imports nothing heavy under its limits
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    _send(control, {"ready": True, "landlock": landlock_abi()})
    control.settimeout(1.0)
    counter = 0
    live: dict[int, str] = {}
    while True:
        for pid, scratch in list(live.items()):  # single-threaded: scratch dirs go when their task has
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                shutil.rmtree(scratch, ignore_errors=True)
                del live[pid]
        try:
            msg, fds, _, _ = socket.recv_fds(control, 1 << 16, 1)
        except TimeoutError:
            continue
        except OSError:
            return
        if not msg or not fds:
            return
        request = json.loads(msg)
        counter += 1
        scratch = tempfile.mkdtemp(prefix=f"task{counter}-", dir=scratch_root)
        pid = os.fork()
        if pid == 0:
            control.close()
            _run_child(socket.socket(fileno=fds[0]), scratch, list(request.get("forbidden", [])))
        os.close(fds[0])
        live[pid] = scratch


# ------------------------------------------------------------------------------------------ parent side

_SAFE_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "OMP_NUM_THREADS")


def _scrubbed_env(home: str) -> dict[str, str]:
    env = {k: os.environ[k] for k in _SAFE_ENV if k in os.environ}
    env.update(HOME=home, TMPDIR=home, PYTHONDONTWRITEBYTECODE="1", PYTHONNOUSERSITE="1")
    return env


@dataclass
class _Runner:
    process: subprocess.Popen[bytes]
    control: socket.socket
    scratch: tempfile.TemporaryDirectory[str]
    landlock: int
    lock: threading.Lock = field(default_factory=threading.Lock)


class Sandbox:
    """Runs the named tasks confined (see the module docstring). Thread-safe; one runner per process."""

    _runner: _Runner | None = None
    _runner_pid: int | None = None
    _start_lock = threading.Lock()

    def __init__(self, limits: SandboxLimits, forbidden: list[Path]) -> None:
        self.limits = limits
        self.forbidden = [str(p) for p in forbidden]

    @classmethod
    def _ensure_runner(cls) -> _Runner:
        with cls._start_lock:
            runner = cls._runner
            if runner is not None and cls._runner_pid == os.getpid() and runner.process.poll() is None:
                return runner
            scratch = tempfile.TemporaryDirectory(prefix="edgemart-sandbox-")
            os.chmod(scratch.name, 0o700)
            parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            code = (
                "import sys, json; sys.path[:] = json.loads(sys.argv[1]); "
                "from store.sandbox import runner_main; runner_main(int(sys.argv[2]))"
            )
            process = subprocess.Popen(
                [sys.executable, "-I", "-c", code, json.dumps(sys.path), str(child.fileno())],
                cwd=scratch.name,
                env=_scrubbed_env(scratch.name),
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
            child.close()
            parent.settimeout(120)
            try:
                ready = json.loads(parent.recv(1 << 16)[4:])
            except (OSError, ValueError):
                ready = {}
            parent.settimeout(None)
            if not isinstance(ready, dict) or not ready.get("ready"):
                process.kill()
                raise SandboxCrash("the sandbox runner did not start")
            cls._runner = runner = _Runner(process, parent, scratch, int(ready.get("landlock", 0)))
            cls._runner_pid = os.getpid()
            if not runner.landlock:
                log.warning("Landlock is not available on this kernel: sandboxed tasks are not file-confined")
            return runner

    def run(
        self,
        task: str,
        args: Mapping[str, Any],
        blobs: Mapping[str, bytes],
        *,
        read: list[Path] = (),  # type: ignore[assignment]
        progress: Callable[[float, str], None] | None = None,
        max_result_bytes: int = 8 << 30,
    ) -> tuple[dict[str, Any], dict[str, bytes]]:
        """Run `task` confined; returns (result JSON, result blobs) or raises what the task raised."""
        runner = self._ensure_runner()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + self.limits.wall_seconds
        pid = None
        try:
            request = {"forbidden": self.forbidden}
            with runner.lock:
                socket.send_fds(runner.control, [json.dumps(request).encode()], [theirs.fileno()])
            theirs.close()
            mine.settimeout(max(self.limits.wall_seconds, 0.001))
            hello, _ = _recv(mine, 0)
            pid = int(hello["pid"])
            _send(
                mine,
                {
                    "task": task,
                    "args": dict(args),
                    "blobs": sorted(blobs),
                    "limits": asdict(self.limits),
                    "read": [str(p) for p in read],
                },
            )
            for name in sorted(blobs):
                _send(mine, {"name": name}, blobs[name])
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                mine.settimeout(left)
                header, _ = _recv(mine, 0)
                if "progress" in header and progress is not None:
                    fraction, message = header["progress"]
                    progress(float(fraction), str(message))
                elif "error" in header:
                    raise _rebuild_error(header["error"], self.limits)
                elif "result" in header:
                    out: dict[str, bytes] = {}
                    for name in header.get("blobs", []):
                        h, data = _recv(mine, max_result_bytes)
                        out[str(h.get("name", name))] = data
                    return header["result"], out
        except TimeoutError:
            raise SandboxLimit(
                f"processing took longer than {self.limits.wall_seconds:g} s (SANDBOX_WALL_SECONDS)"
            ) from None
        except (EOFError, ConnectionError, json.JSONDecodeError):
            raise SandboxLimit(
                "processing stopped without an answer: it most likely needed more than "
                f"{self.limits.memory_bytes >> 20} MiB of memory (SANDBOX_MEMORY_BYTES) or crashed the runtime"
            ) from None
        finally:
            mine.close()
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _rebuild_error(error: Any, limits: SandboxLimits) -> BaseException:
    """The parent-side exception for an error frame: only known classes, never anything the child names."""
    if not isinstance(error, dict):
        return SandboxCrash("malformed error from the sandbox")
    kind = error.get("kind")
    message = str(error.get("message", ""))[:1000]
    if kind == "memory":
        return SandboxLimit(
            f"processing needed more than {limits.memory_bytes >> 20} MiB of memory (SANDBOX_MEMORY_BYTES)"
        )
    if kind == "edgemart":
        cls = getattr(_errors, str(error.get("type")), None)
        if str(error.get("type")) == "SandboxLimit":
            cls = SandboxLimit
        elif str(error.get("type")) == "UnsafeModel":
            from edgemart.core.model_safety import UnsafeModel

            cls = UnsafeModel
        if not (isinstance(cls, type) and issubclass(cls, EdgemartError)):
            cls = UsageError
        code = error.get("code")
        try:
            return cls(message, code=str(code) if code else None)
        except TypeError:
            return UsageError(message, code=str(code) if code else None)
    return SandboxChildError(str(error.get("type", "Error")), str(error.get("module", "")), message)
