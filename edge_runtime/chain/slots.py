"""Shared-memory slots and the control channel of one hop between chain processes.

A producer owns its slots: each slot is an anonymous memfd (no name in /dev/shm, gone when the
last fd and mapping close) holding one page of header and a page-aligned payload. Consumers map
the slot read-only and read tensors in place; only (slot, seq) messages cross the Unix socket."""

from __future__ import annotations

import array
import json
import math
import mmap
import os
import select
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgemart.core.errors import EdgemartError, UsageError

PAGE = mmap.PAGESIZE
HEADER_BYTES = PAGE  # the payload starts on the second page
MAX_DIMS = 8
MAX_MESSAGE = 64 * 1024
MAX_FDS_PER_MESSAGE = 16
_MAGIC = 0x45534C54  # "ESLT"
# magic, version, ndim, seq, nbytes, dtype (16 bytes, numpy str), shape[MAX_DIMS]
_HEADER = struct.Struct(f"<IHHqQ16s{MAX_DIMS}q")
_SEQ = struct.Struct("<q")  # the header's seq, at offset 8
# The element types a slot carries (and a chain file may name).
DTYPES = (
    "bool",
    "int8",
    "uint8",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "float16",
    "float32",
    "float64",
)


class PeerGone(EdgemartError):
    """The process at the other end of a hop closed its socket (it exited or crashed)."""

    exit_code = 1
    code = "peer_gone"


class SlotError(EdgemartError):
    """A slot's header does not match the message announcing it."""

    exit_code = 1
    code = "slot_error"


def page_round(n: int) -> int:
    return max(PAGE, (n + PAGE - 1) // PAGE * PAGE)


def check_dtype(dtype: np.dtype) -> str:
    name = np.dtype(dtype).name
    if name not in DTYPES:
        raise UsageError(
            f"dtype {name} cannot travel through a slot (supported: {', '.join(sorted(DTYPES))})"
        )
    return name


@dataclass(frozen=True)
class SlotHeader:
    seq: int
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def _pack_header(seq: int, array: np.ndarray) -> bytes:
    if array.ndim > MAX_DIMS:
        raise UsageError(f"tensor of rank {array.ndim} exceeds the slot limit of {MAX_DIMS} dimensions")
    shape = list(array.shape) + [0] * (MAX_DIMS - array.ndim)
    dtype = check_dtype(array.dtype).encode()
    return _HEADER.pack(_MAGIC, 1, array.ndim, seq, array.nbytes, dtype, *shape)


def _unpack_header(buf: Any) -> SlotHeader:
    magic, version, ndim, seq, nbytes, dtype, *shape = _HEADER.unpack_from(buf, 0)
    if magic != _MAGIC or version != 1 or ndim > MAX_DIMS:
        raise SlotError("slot header is corrupt")
    return SlotHeader(seq, dtype.rstrip(b"\0").decode(), tuple(shape[:ndim]), nbytes)


class OwnedSlot:
    """One producer-side slot: a memfd mapped read-write, regrown when a tensor outgrows it."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.fd = -1
        self.size = 0
        self._map: mmap.mmap | None = None

    def write(self, seq: int, array: np.ndarray) -> bool:
        """Copy `array` into the slot; returns True when the slot got a new memfd (peers must remap)."""
        array = np.asarray(array)
        grown = self.reserve(array.nbytes)
        if array.nbytes:
            target = self.array(array.shape, array.dtype)
            try:
                np.copyto(target, array, casting="no")
            finally:
                # Even when interrupted (Ctrl-C mid-copy): a view kept alive by the traceback's frame would
                # pin the mapping, and close() would then fail with BufferError.
                del target
        self.seal(seq, array)
        return grown

    def reserve(self, nbytes: int) -> bool:
        """Room for a tensor of ``nbytes``; True when that took a new memfd (peers must remap)."""
        needed = HEADER_BYTES + page_round(nbytes)
        grown = needed > self.size
        if grown:
            self.close()
            self.fd = os.memfd_create(f"edgemart-slot:{self.label}"[:240], os.MFD_CLOEXEC)
            os.ftruncate(self.fd, needed)
            self._map = mmap.mmap(self.fd, needed, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self.size = needed
        return grown

    def array(self, shape: tuple[int, ...], dtype: np.dtype | str) -> np.ndarray:
        """A writable view of the reserved slot as ``shape``/``dtype``, for a producer to compute into. The
        caller drops it before the slot is reserved again (a live view pins the mapping)."""
        assert self._map is not None
        dtype = np.dtype(dtype)
        count = math.prod(shape)
        return np.frombuffer(self._map, dtype=dtype, count=count, offset=HEADER_BYTES).reshape(shape)

    def seal(self, seq: int, array: np.ndarray) -> None:
        """Write the header that makes the slot's content frame ``seq`` (``array`` gives dtype and shape)."""
        assert self._map is not None
        self._map[: _HEADER.size] = _pack_header(seq, array)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.size = 0


class MappedSlot:
    """One consumer-side slot: the producer's memfd mapped read-only."""

    def __init__(self, fd: int, size: int) -> None:
        try:
            self._map: mmap.mmap | None = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)  # the mapping keeps the memory alive; no fd lingers in the consumer
        # The view of the last layout read: a stream of frames of one shape reuses it (no per-hop allocation).
        self._layout: bytes = b""
        self._view: np.ndarray | None = None

    def read(self, seq: int) -> np.ndarray:
        """The tensor in the slot, as a read-only view (no copy); checks the header's seq."""
        assert self._map is not None
        raw = self._map[: _HEADER.size]
        layout = raw[:8] + raw[16:]  # everything but the sequence number (bytes 8-16)
        if layout == self._layout and self._view is not None:
            if _SEQ.unpack_from(raw, 8)[0] != seq:
                raise SlotError(
                    f"slot holds frame {_SEQ.unpack_from(raw, 8)[0]}, message announced frame {seq}"
                )
            return self._view
        header = _unpack_header(raw)
        if header.seq != seq:
            raise SlotError(f"slot holds frame {header.seq}, message announced frame {seq}")
        try:
            dtype = np.dtype(check_dtype(np.dtype(header.dtype)))
        except (TypeError, UsageError):
            raise SlotError("slot header is corrupt") from None
        count = math.prod(header.shape)
        if count * dtype.itemsize != header.nbytes or header.nbytes > len(self._map) - HEADER_BYTES:
            raise SlotError("slot header is corrupt")
        view = np.frombuffer(self._map, dtype=dtype, count=count, offset=HEADER_BYTES).reshape(header.shape)
        self._layout, self._view = layout, view
        return view

    def close(self) -> None:
        self._view = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # a caller still holds a view; the mapping goes when that view is collected
            self._map = None


def _recv_fds(sock: socket.socket, flags: int) -> tuple[bytes, list[int], int]:
    """socket.recv_fds, but honouring `flags` (Python 3.11's version drops them)."""
    fds = array.array("i")
    data, ancillary, msg_flags, _ = sock.recvmsg(
        MAX_MESSAGE, socket.CMSG_LEN(MAX_FDS_PER_MESSAGE * fds.itemsize), flags
    )
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    return data, list(fds), msg_flags


# The two per-frame messages travel as one struct (kind, slot, seq, size) + the tensor key instead of JSON:
# no encoder or parser work per hop. Every other message is JSON (it starts with "{", never with 1, 2 or 3).
# A packet starting with 3 carries several frame messages, each prefixed by its length (u16): what one stage
# run says to one peer (its outputs ready, its inputs released) wakes that peer once, not once per tensor.
_FRAME = struct.Struct("<BIqQ")
_FRAME_KINDS = {"ready": 1, "released": 2}
_FRAME_NAMES = {v: k for k, v in _FRAME_KINDS.items()}
_BATCH = 3
_PART = struct.Struct("<H")


def _encode(message: dict[str, Any]) -> bytes:
    kind = _FRAME_KINDS.get(message.get("t"))  # type: ignore[arg-type]
    if kind is not None and set(message) <= {"t", "k", "s", "q", "z"}:
        return _FRAME.pack(kind, message["s"], message["q"], message.get("z", 0)) + message["k"].encode()
    return json.dumps(message, separators=(",", ":")).encode()


def _decode_batch(data: bytes) -> list[dict[str, Any]]:
    out, pos = [], 1
    while pos < len(data):
        (n,) = _PART.unpack_from(data, pos)
        part = data[pos + _PART.size : pos + _PART.size + n]
        if len(part) != n or not n or part[0] not in _FRAME_NAMES:
            raise ValueError("malformed batch")
        out.append(_decode(part))
        pos += _PART.size + n
    if not out:
        raise ValueError("empty batch")
    return out


def _decode(data: bytes) -> dict[str, Any]:
    name = _FRAME_NAMES.get(data[0])
    if name is None:
        return json.loads(data)  # type: ignore[no-any-return]
    kind, slot, seq, size = _FRAME.unpack_from(data)
    message: dict[str, Any] = {"t": name, "k": data[_FRAME.size :].decode(), "s": slot, "q": seq}
    if size:
        message["z"] = size
    return message


class Channel:
    """A SOCK_SEQPACKET Unix socket carrying one JSON message (plus optional fds) per packet."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self.closed = False
        self.corked = False  # while set, frame messages without fds wait in _out until flush()
        self._out: list[bytes] = []
        self._inbox: list[dict[str, Any]] = []  # the rest of a received batch, handed out first

    @classmethod
    def pair(cls, a_name: str, b_name: str) -> tuple[Channel, Channel]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(a, b_name), cls(b, a_name)

    @classmethod
    def from_fd(cls, fd: int, peer: str) -> Channel:
        return cls(socket.socket(fileno=fd), peer)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        data = _encode(message)
        if len(data) > MAX_MESSAGE:
            raise UsageError(f"control message to {self.peer} is too large ({len(data)} bytes)")
        if self.corked and not fds and data[0] in _FRAME_NAMES:
            if sum(len(d) + _PART.size for d in self._out) + len(data) + _PART.size + 1 > MAX_MESSAGE:
                self.flush()
            self._out.append(data)
            return
        self.flush()  # what waits goes first: messages keep their order
        self._send(data, fds)

    def flush(self) -> None:
        """Send the frame messages held while corked: one packet (a batch when there are several)."""
        if not self._out:
            return
        held, self._out = self._out, []
        data = held[0] if len(held) == 1 else bytes([_BATCH]) + b"".join(_PART.pack(len(d)) + d for d in held)
        self._send(data, None)

    def _send(self, data: bytes, fds: list[int] | None) -> None:
        try:
            if fds:
                socket.send_fds(self.sock, [data], fds)
            else:
                self.sock.send(data)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise PeerGone(f"{self.peer} closed its channel") from exc

    def recv(self, timeout: float | None = None) -> tuple[dict[str, Any], list[int]]:
        """One message; raises PeerGone on EOF and TimeoutError when nothing arrives in time."""
        if self._inbox:
            return self._inbox.pop(0), []
        if timeout is not None:
            ready, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
            if not ready:
                raise TimeoutError(f"no message from {self.peer} within {timeout:g} s")
        got = self._recv(0)
        assert got is not None
        return got

    def recv_nowait(self) -> tuple[dict[str, Any], list[int]] | None:
        """The next message if one is queued, else None (PeerGone on EOF)."""
        return self._recv(socket.MSG_DONTWAIT)

    def _recv(self, flags_in: int) -> tuple[dict[str, Any], list[int]] | None:
        if self._inbox:
            return self._inbox.pop(0), []
        try:
            data, fds, flags = _recv_fds(self.sock, flags_in)
        except BlockingIOError:
            return None
        except ConnectionResetError as exc:
            raise PeerGone(f"{self.peer} closed its channel") from exc
        if not data:
            for fd in fds:
                os.close(fd)
            raise PeerGone(f"{self.peer} closed its channel")
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            for fd in fds:
                os.close(fd)
            raise SlotError(f"truncated control message from {self.peer}")
        try:
            if data[0] == _BATCH and not fds:
                first, *self._inbox = _decode_batch(data)
                return first, []
            return _decode(data), fds
        except (ValueError, UnicodeDecodeError, struct.error):
            for fd in fds:
                os.close(fd)
            raise SlotError(f"malformed control message from {self.peer}") from None

    def recv_expect(self, kind: str, timeout: float) -> tuple[dict[str, Any], list[int]]:
        deadline = time.monotonic() + timeout
        message, fds = self.recv(deadline - time.monotonic())
        if message.get("t") != kind:
            for fd in fds:
                os.close(fd)
            raise SlotError(f"expected {kind!r} from {self.peer}, got {message.get('t')!r}")
        return message, fds

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()
