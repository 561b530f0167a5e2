"""`edgemart device serve`: the device service. Runs as its own account, alone owns the device dir, keys,
sealed state, anchor and every decrypted model, and answers local users of its group over a unix socket.

Every answer is a JSON header plus .npz blobs of model *outputs*; no operation returns model bytes,
content keys or device keys. Chains run inside the service (its stage processes, memfd slots); the
caller's frames and results travel as framed .npz over the socket."""

from __future__ import annotations

import grp
import os
import pwd
import signal
import socket
import socketserver
import stat
import struct
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.service import wire
from edgemart.core.errors import EdgemartError, ForbiddenError, UsageError

_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, as the kernel recorded them at connect()."""
    pid, uid, gid = _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return pid, uid, gid


def may_use(uid: int, group_gid: int) -> bool:
    """Root, the service account itself, and members of the service's group (read from the group
    database at each connection, so removing a user from the group takes effect at once)."""
    if uid in (0, os.geteuid()):
        return True
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return False
    return group_gid in os.getgrouplist(user.pw_name, user.pw_gid)


def _str(h: dict[str, Any], key: str, *, required: bool = False) -> Any:
    value = h.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value or len(value) > 4096:
        raise UsageError(f"request field {key!r} must be a non-empty string")
    return value


def _int(h: dict[str, Any], key: str) -> int | None:
    value = h.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise UsageError(f"request field {key!r} must be an integer")
    return value


def _blobs(blobs: list[bytes], n: int, op: str) -> list[bytes]:
    if len(blobs) != n:
        raise UsageError(f"{op} takes {n} blob(s), got {len(blobs)}")
    return blobs


class DeviceService:
    """The request handlers; one Device is opened per request (the ledger lock serialises state)."""

    def __init__(self, device_dir: Path, group_gid: int, *, log: Callable[[str], None] | None = None) -> None:
        self.device_dir = device_dir
        self.group_gid = group_gid
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))

    def _device(self) -> Any:
        from edge_runtime.device import Device

        return Device.open(self.device_dir)

    # --- operations: (header, blobs) -> (answer, blobs) -----------------------------------------------

    def op_status(self, h: dict[str, Any], blobs: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
        return {"result": self._device().status()}, []

    def op_enroll(self, h: dict[str, Any], blobs: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
        device = self._device()
        result = device.enroll(
            _str(h, "store", required=True), _str(h, "token", required=True), name=_str(h, "name")
        )
        return {"result": result}, []

    def op_add_fleet_key(self, h: dict[str, Any], blobs: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
        from edge_runtime.device import MAX_FLEET_KEY_BYTES

        (pem,) = _blobs(blobs, 1, "add-fleet-key")
        if len(pem) > MAX_FLEET_KEY_BYTES:
            raise UsageError(f"fleet key is larger than {MAX_FLEET_KEY_BYTES} bytes")
        return {"result": self._device().add_fleet_key(pem)}, []

    def op_activate(self, h: dict[str, Any], blobs: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
        """A seat activation: online for ``license_id`` (header), or the one token blob (offline)."""
        from edge_runtime.device import MAX_ACTIVATION_BYTES

        if blobs:
            (token,) = _blobs(blobs, 1, "activate")
            if len(token) > MAX_ACTIVATION_BYTES:
                raise UsageError(f"seat activation is larger than {MAX_ACTIVATION_BYTES} bytes")
            return {"result": self._device().install_activation(token)}, []
        result = self._device().activate(
            _str(h, "license_id", required=True), store=_str(h, "store"), token=_str(h, "token")
        )
        return {"result": result}, []

    def op_fetch(self, h: dict[str, Any], blobs: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
        entry = self._device().fetch(
            _str(h, "listing", required=True), _str(h, "target", required=True), version=_int(h, "version")
        )
        return {"result": entry}, []

    def op_install(self, h: dict[str, Any], blobs: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
        build, license_bytes = _blobs(blobs, 2, "install")
        entry = self._device().install(build=build, license=license_bytes, listing=_str(h, "listing"))
        return {"result": entry}, []

    def op_sync(self, h: dict[str, Any], blobs: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
        return {"result": self._device().sync()}, []

    def op_verify_log(self, h: dict[str, Any], blobs: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
        return {"result": self._device().verify_log()}, []

    def op_eval(self, h: dict[str, Any], blobs: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
        from edge_runtime.evaluation.session import EvalRequest, run_eval

        fields = h.get("request")
        request = EvalRequest.from_dict(fields if isinstance(fields, dict) else {})
        if not 1 <= len(blobs) <= 2:
            raise UsageError("eval takes the data blob and an optional reference blob")
        data = wire.decode_arrays(blobs[0], "--data")
        reference = wire.decode_arrays(blobs[1], "--reference") if len(blobs) == 2 else None
        result = run_eval(self._device(), request, data, reference=reference)
        answer = {"result": result.report, "text": result.text, "html": result.html}
        return answer, [wire.encode_arrays(result.outputs)] if request.want_outputs else []

    # --- chains stream: frames in, results out, a report at the end ----------------------------------

    def run_chain(self, conn: socket.socket, h: dict[str, Any]) -> None:
        from edge_runtime.chain import Chain
        from edge_runtime.chain.spec import parse_chain_text

        text, name = _str(h, "chain", required=True), _str(h, "chain_name", required=True)
        name = Path(name).name
        if Path(name).suffix.lower() not in (".json", ".yaml", ".yml"):
            raise UsageError(f"chain file {name!r}: expected .json, .yaml or .yml")
        spec = parse_chain_text(text, Path("/nonexistent") / name)
        for stage in spec.stages:
            if stage.model.build is not None:
                raise UsageError(
                    f"{name}: stage {stage.name!r} names build/license files; through the device service a"
                    " stage names an installed listing (model: {listing: NAME}); install the build first"
                )
        with Chain(spec, self.device_dir) as chain:
            wire.send(conn, {"ok": True, "inputs": sorted(chain.input_types)})

            def frames() -> Iterator[dict[str, np.ndarray]]:
                while True:
                    m, b = wire.recv(conn)
                    if m.get("t") == "end":
                        return
                    if m.get("t") != "frame" or len(b) != 1:
                        raise UsageError("expected a frame message")
                    yield wire.decode_arrays(b[0], "frame")

            for result in chain.run_many(frames()):
                wire.send(conn, {"ok": True, "t": "result"}, [wire.encode_arrays(result)])
            report = {"chain": chain.spec.name, "processes": chain.processes, **chain.stats.report()}
        wire.send(conn, {"ok": True, "t": "report", "result": report})

    # --- one connection --------------------------------------------------------------------------------

    def handle(self, conn: socket.socket) -> None:
        pid, uid, _ = peer_credentials(conn)
        op = "?"
        started = time.monotonic()
        try:
            if not may_use(uid, self.group_gid):
                raise ForbiddenError(
                    f"uid {uid} is not a member of group {_group_name(self.group_gid)}: the device service"
                    " refuses it"
                )
            header, blobs = wire.recv(conn)
            op = str(header.get("op"))[:40]
            if op == "run":
                self.run_chain(conn, header)
            else:
                handler = (
                    getattr(self, "op_" + op.replace("-", "_"), None)
                    if op.replace("-", "").isalpha()
                    else None
                )
                if handler is None:
                    raise UsageError(f"unknown operation {op!r}")
                answer, out = handler(header, blobs)
                wire.send(conn, {"ok": True, **answer}, out)
            outcome = "ok"
        except wire.PeerClosed:
            outcome = "peer closed"
        except EdgemartError as exc:
            outcome = f"{exc.code}: {exc.diagnostics()}"
            _answer_error(conn, exc.code, exc.diagnostics(), exc.exit_code)
        except Exception:  # noqa: BLE001 - the service keeps serving; the caller learns nothing internal
            outcome = "internal error\n" + traceback.format_exc()
            _answer_error(conn, "internal", "the device service failed (see its log)", 1)
        self.log(f"edgemart-device: pid {pid} uid {uid} {op}: {outcome} ({time.monotonic() - started:.2f} s)")


def _answer_error(conn: socket.socket, code: str, message: str, exit_code: int) -> None:
    try:
        wire.send(conn, {"ok": False, "error": {"code": code, "message": message, "exit_code": exit_code}})
    except OSError:
        pass


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def check_private_dir(path: Path) -> None:
    """The device dir must belong to this account and be closed to group and others (0700)."""
    st = path.stat()
    if st.st_uid != os.geteuid():
        raise UsageError(
            f"device directory {path} belongs to uid {st.st_uid}, not to this account ({os.geteuid()})"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise UsageError(
            f"device directory {path} is open to group or others (mode {stat.S_IMODE(st.st_mode):04o}):"
            " the device service refuses to start; chmod 0700 it"
        )


def _not_dumpable() -> None:
    """No core dumps (they would hold decrypted models) and no same-uid ptrace of the service."""
    import ctypes
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4
    except (OSError, AttributeError):
        pass


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False


def serve(
    device_dir: Path,
    socket_path: Path,
    group: str,
    *,
    anchor_dir: Path | None = None,
    ready: Callable[[str], None] | None = None,
) -> None:
    from edge_runtime.device import Device

    os.umask(0o077)
    _not_dumpable()
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        raise UsageError(
            f"group {group!r} does not exist (create it with `edgemart device install-service`)"
        ) from None
    if anchor_dir is not None:
        os.environ["EDGEMART_ANCHOR_DIR"] = str(anchor_dir)  # the chain's stage processes inherit it
    if not (device_dir / "sign.key").exists():
        Device.init(device_dir)
    check_private_dir(device_dir)
    Device.open(device_dir)  # refuse to start on a broken device dir
    if socket_path.is_socket():
        socket_path.unlink()  # a stale socket from a previous run
    elif socket_path.exists():
        raise UsageError(f"{socket_path} exists and is not a socket")
    service = DeviceService(device_dir, gid)

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            service.handle(self.request)

    server = _Server(str(socket_path), Handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # systemd stops us with SIGTERM: remove the socket
    try:
        os.chmod(socket_path, 0o660)
        try:
            os.chown(socket_path, -1, gid)
        except PermissionError:
            raise UsageError(
                f"cannot give {socket_path} to group {group}: the service account must be a member of it"
            ) from None
        line = f"edgemart-device: serving {device_dir} on {socket_path} for group {group}"
        (ready or (lambda s: print(s, file=sys.stderr, flush=True)))(line)
        server.serve_forever()
    finally:
        server.server_close()
        try:
            socket_path.unlink()
        except FileNotFoundError:
            pass
