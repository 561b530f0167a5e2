"""The caller's side of the device service: the same calls as a Device, answered by the service account.

Errors come back as the EdgemartError subclass the service raised (same exit code, same one line)."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.evaluation.session import EvalRequest, EvalResult
from edge_runtime.service import DEFAULT_GROUP, DEFAULT_SOCKET, SOCKET_ENV, wire
from edgemart.core import errors
from edgemart.core.errors import EdgemartError, ForbiddenError, UsageError

_ERRORS: dict[str, type[EdgemartError]] = {
    cls.code: cls
    for cls in (
        errors.UsageError,
        errors.Unavailable,
        errors.NotFoundError,
        errors.ConflictError,
        errors.AuthError,
        errors.ForbiddenError,
        errors.Refusal,
        errors.IntegrityError,
        errors.LicenseRefused,
    )
}


def _raise(error: Any) -> None:
    if not isinstance(error, dict):
        raise UsageError("the device service sent a malformed answer")
    cls = _ERRORS.get(str(error.get("code")))
    exc = (cls or EdgemartError)(str(error.get("message") or "device service error"))
    if cls is None:
        exc.exit_code = int(error.get("exit_code") or 1)
    raise exc


def service_socket(explicit: str | os.PathLike[str] | None) -> Path | None:
    """The socket to use: --service, else $EDGEMART_DEVICE_SOCKET, else the default one when it exists."""
    if explicit:
        return Path(explicit)
    if os.environ.get(SOCKET_ENV):
        return Path(os.environ[SOCKET_ENV])
    return Path(DEFAULT_SOCKET) if Path(DEFAULT_SOCKET).is_socket() else None


class ServiceClient:
    """One connection per call, like a Device opened per command."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self.path))
        except FileNotFoundError:
            sock.close()
            raise UsageError(
                f"no device service at {self.path}: start `edgemart device serve` or use --device-dir"
            ) from None
        except PermissionError:
            sock.close()
            raise ForbiddenError(
                f"permission denied on {self.path}: the device service serves members of its group"
                f" (default {DEFAULT_GROUP!r})"
            ) from None
        except ConnectionRefusedError:
            sock.close()
            raise UsageError(f"the device service at {self.path} is not running") from None
        return sock

    @staticmethod
    def _answer(sock: socket.socket) -> tuple[dict[str, Any], list[bytes]]:
        try:
            header, blobs = wire.recv(sock)
        except (wire.PeerClosed, ConnectionResetError):
            raise UsageError("the device service closed the connection") from None
        if not header.get("ok"):
            _raise(header.get("error"))
        return header, blobs

    def call(
        self, op: str, fields: dict[str, Any] | None = None, blobs: tuple[bytes, ...] | list[bytes] = ()
    ) -> tuple[dict[str, Any], list[bytes]]:
        with self._connect() as sock:
            try:
                wire.send(sock, {"op": op, **(fields or {})}, list(blobs))
            except (BrokenPipeError, ConnectionResetError):
                pass  # the service refused before reading: its answer says why
            return self._answer(sock)

    # --- the Device calls ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return self.call("status")[0]["result"]

    def enroll(self, store: str, token: str, *, name: str | None = None) -> dict[str, Any]:
        return self.call("enroll", {"store": store, "token": token, "name": name})[0]["result"]

    def add_fleet_key(self, pem: bytes) -> dict[str, Any]:
        return self.call("add-fleet-key", {}, [pem])[0]["result"]

    def activate(
        self, license_id: str, *, store: str | None = None, token: str | None = None
    ) -> dict[str, Any]:
        fields = {"license_id": license_id, "store": store, "token": token}
        return self.call("activate", fields)[0]["result"]

    def install_activation(self, token: bytes) -> dict[str, Any]:
        return self.call("activate", {}, [token])[0]["result"]

    def fetch(self, listing: str, target: str, *, version: int | None = None) -> dict[str, Any]:
        return self.call("fetch", {"listing": listing, "target": target, "version": version})[0]["result"]

    def install(self, *, build: bytes, license: bytes, listing: str | None = None) -> dict[str, Any]:
        return self.call("install", {"listing": listing}, [build, license])[0]["result"]

    def sync(self) -> dict[str, Any]:
        return self.call("sync")[0]["result"]

    def verify_log(self) -> dict[str, Any]:
        return self.call("verify-log")[0]["result"]

    def evaluate(self, request: EvalRequest, data: bytes, reference: bytes | None = None) -> EvalResult:
        blobs = [data] if reference is None else [data, reference]
        header, out = self.call("eval", {"request": request.to_dict()}, blobs)
        outputs = wire.decode_arrays(out[0], "outputs") if out else {}
        return EvalResult(header["result"], str(header.get("text") or ""), header.get("html"), outputs)

    def run_chain(
        self, text: str, name: str, frames_for: Any
    ) -> tuple[Iterator[dict[str, np.ndarray]], dict[str, Any]]:
        """Start the chain in the service; ``frames_for(input_names)`` gives the frames. Returns the results
        as they come and a dict that holds the report (under "report") once the results are exhausted."""
        sock = self._connect()
        final: dict[str, Any] = {}
        try:
            wire.send(sock, {"op": "run", "chain": text, "chain_name": name})
            header, _ = self._answer(sock)
        except BaseException:
            sock.close()
            raise
        frames: Iterable[dict[str, np.ndarray]] = frames_for(list(header["inputs"]))
        failure: list[BaseException] = []

        def feed() -> None:  # a thread, so results are read while frames are still being sent
            try:
                for frame in frames:
                    wire.send(sock, {"t": "frame"}, [wire.encode_arrays(dict(frame))])
                wire.send(sock, {"t": "end"})
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                failure.append(exc)
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

        def results() -> Iterator[dict[str, np.ndarray]]:
            sender = threading.Thread(target=feed, daemon=True)
            sender.start()
            try:
                while True:
                    try:
                        message, blobs = self._answer(sock)
                    except EdgemartError:
                        sender.join()
                        if failure:
                            raise failure[0] from None
                        raise
                    if message.get("t") == "report":
                        final["report"] = message["result"]
                        break
                    yield wire.decode_arrays(blobs[0], "chain result")
                sender.join()
                if failure:
                    raise failure[0]
            finally:
                sock.close()

        return results(), final
