"""Framing of device-service messages: a 4-byte big-endian length, a canonical JSON header, then the
byte blobs the header announces in ``blobs`` (lengths). Arrays travel as uncompressed .npz blobs.

Both ends treat the other as hostile: lengths are bounded before anything is allocated, and arrays are
decoded only after the sample-file checks (no pickles, no bombs)."""

from __future__ import annotations

import io
import json
import socket
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from edgemart.core.errors import UsageError
from edgemart.core.model_safety import DEFAULT_SAMPLE_LIMITS, check_sample_file


@dataclass(frozen=True)
class WireLimits:
    max_header_bytes: int = 1 << 20
    max_blobs: int = 4
    max_blob_bytes: int = 2 * DEFAULT_SAMPLE_LIMITS.max_bytes + (
        1 << 20
    )  # data + reference, with .npz overhead


DEFAULT_LIMITS = WireLimits()


class PeerClosed(Exception):
    """The other end closed the connection between or inside a message."""


def send(sock: socket.socket, header: dict[str, Any], blobs: list[bytes] | tuple[bytes, ...] = ()) -> None:
    data = json.dumps({**header, "blobs": [len(b) for b in blobs]}, sort_keys=True).encode()
    sock.sendall(struct.pack(">I", len(data)) + data)
    for blob in blobs:
        sock.sendall(blob)


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise PeerClosed("connection closed")
        got += k
    return bytes(buf)


def recv(sock: socket.socket, limits: WireLimits = DEFAULT_LIMITS) -> tuple[dict[str, Any], list[bytes]]:
    """One message; UsageError when it breaks the limits or is not a JSON object."""
    (length,) = struct.unpack(">I", _read_exact(sock, 4))
    if length > limits.max_header_bytes:
        raise UsageError(f"message header of {length} bytes exceeds {limits.max_header_bytes}")
    try:
        header = json.loads(_read_exact(sock, length))
    except (ValueError, RecursionError):
        raise UsageError("message header is not JSON") from None
    if not isinstance(header, dict):
        raise UsageError("message header is not a JSON object")
    sizes = header.pop("blobs", [])
    if (
        not isinstance(sizes, list)
        or len(sizes) > limits.max_blobs
        or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s for s in sizes)
        or sum(sizes) > limits.max_blob_bytes
    ):
        raise UsageError(
            f"message announces blobs beyond the limits ({limits.max_blobs}, {limits.max_blob_bytes} B)"
        )
    return header, [_read_exact(sock, s) for s in sizes]


def encode_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    out = io.BytesIO()
    np.savez(out, **arrays)  # type: ignore[arg-type]
    return out.getvalue()


def decode_arrays(blob: bytes, what: str) -> dict[str, np.ndarray]:
    return load_arrays(io.BytesIO(blob), what)


def load_arrays(fp: BinaryIO, what: str, *, name: str = "") -> dict[str, np.ndarray]:
    """Arrays keyed by name from an .npz, or a lone .npy array as ``x``; sizes, ratio and headers are
    checked before anything inflates. ``fp`` is seekable; every failure is one UsageError naming ``what``."""
    import zipfile

    try:
        check_sample_file(fp, name=name or what)
        fp.seek(0)
        loaded = np.load(fp, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return {"x": loaded}
        with loaded as npz:
            return {k: npz[k] for k in npz.files}
    except UsageError as exc:
        raise UsageError(f"{what} is refused: {exc.message}") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise UsageError(f"{what} is not a readable .npz or .npy file: {exc}") from None
