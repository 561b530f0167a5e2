"""Inference backends behind one interface: onnxruntime and LiteRT, both opened from bytes in memory.

The backend is chosen from the build's format (sniffed) and target; no model byte touches the disk."""

from __future__ import annotations

import ctypes
import hashlib
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

import numpy as np

from drm.container import open_sealed_into as drm_open_sealed_into
from drm.container import wipe_soon as drm_wipe_soon
from edgemart.core.errors import UsageError
from edgemart.core.model_safety import check_model_bytes

# Execution providers worth using when the installed onnxruntime has them, per target (CPU is always last).
_PREFERRED_PROVIDERS: dict[str, tuple[str, ...]] = {
    "fpga-xint8": ("VitisAIExecutionProvider",),
    "arm-cpu": ("XnnpackExecutionProvider",),
}
TFLITE_TARGETS = frozenset({"coral-edgetpu", "tflite", "tflite-cpu", "arm-cpu-tflite"})

_ONNX_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(uint16)": "uint16",
    "tensor(int32)": "int32",
    "tensor(uint32)": "uint32",
    "tensor(int64)": "int64",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
    "tensor(string)": "object",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | None, ...]  # None for a dynamic dimension
    dtype: str  # numpy dtype name, e.g. "float32"
    dim_names: tuple[str | None, ...] = ()  # symbolic names of dynamic dims (ONNX dim_param), when known

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


class Backend(Protocol):
    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def run_into(self, feeds: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """run(), with the outputs named in ``out`` written into those arrays (of the outputs' static shapes
        and dtypes, e.g. views of chain slots) rather than into new ones; the result holds those arrays."""
        ...

    def close(self) -> None: ...


def scrub_bytes(data: bytes) -> bool:
    """Best-effort zeroing of an immutable bytes object we created and alone reference.

    The inference runtimes take ``bytes``, not a buffer we could wipe; on CPython we overwrite the
    object's storage in place once nothing else refers to it. Returns whether it was scrubbed."""
    if sys.implementation.name != "cpython" or not isinstance(data, bytes) or len(data) < 64:
        return False
    # getrefcount: the caller's name + this parameter + the call's own argument reference.
    if sys.getrefcount(data) > 3:
        return False
    offset = sys.getsizeof(b"") - 1  # header size of a bytes object
    ctypes.memset(id(data) + offset, 0, len(data))
    return True


def sniff_format(model: bytes | bytearray | memoryview) -> str:
    head = bytes(model[:8])
    if head[4:8] == b"TFL3":
        return "tflite"
    return "onnx"


class OnnxBackend:
    """onnxruntime InferenceSession built from bytes (CPU EP, plus accelerators the target prefers)."""

    name = "onnxruntime"

    def __init__(self, model: bytes, *, target: str) -> None:
        import onnxruntime as ort

        preferred = _PREFERRED_PROVIDERS.get(target, ())
        available = set(ort.get_available_providers()) if preferred else set()
        providers = [p for p in preferred if p in available] + ["CPUExecutionProvider"]
        try:
            self._session: Any = ort.InferenceSession(model, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises many types; report one clear line
            raise UsageError(
                f"onnxruntime could not load the decrypted build: {type(exc).__name__}"
            ) from None
        # onnxruntime keeps a reference to the model bytes "indefinitely"; the session owns its own copy.
        self._session._model_bytes = None
        self.providers = list(self._session.get_providers())
        self.inputs = [_onnx_spec(i) for i in self._session.get_inputs()]
        self.outputs = [_onnx_spec(o) for o in self._session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]
        # On the CPU EP alone, call the C++ session directly: the Python wrapper's per-run work (re-reading
        # the input metadata to find missing inputs, OrtValue ownership, EP fallback) is covered by the
        # callers' feed check (LicensedModel.check_feeds) or by the C++ session itself, and costs ~1-2 us.
        raw: Any = getattr(self._session, "_sess", None)
        direct = raw is not None and self.providers == ["CPUExecutionProvider"]
        self._run: Any = raw.run if direct else self._session.run

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self._run(self._output_names, feeds, None)
        return dict(zip(self._output_names, values, strict=True))

    def run_into(self, feeds: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # IOBinding: onnxruntime writes the bound outputs straight into the caller's memory (no copy).
        binding = self._session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self._output_names:
            target = out.get(name)
            if target is None:
                binding.bind_output(name, "cpu")
            else:
                binding.bind_output(name, "cpu", 0, target.dtype, list(target.shape), target.ctypes.data)
        self._session.run_with_iobinding(binding)
        produced = binding.get_outputs()
        return {
            name: out[name] if name in out else produced[i].numpy()
            for i, name in enumerate(self._output_names)
        }

    def close(self) -> None:
        self._session = self._run = None


def _onnx_spec(arg: Any) -> TensorSpec:
    dims = list(arg.shape or [])
    shape = tuple(d if isinstance(d, int) else None for d in dims)
    names = tuple(d if isinstance(d, str) and d else None for d in dims)
    return TensorSpec(arg.name, shape, _ONNX_TYPES.get(arg.type, arg.type), names)


def _litert_interpreter() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]
        except ImportError:
            raise UsageError(
                "this build is TFLite but neither ai-edge-litert nor tflite-runtime is installed"
            ) from None
    return Interpreter


class LiteRTBackend:
    """LiteRT (TFLite) Interpreter from ``model_content``; it reads the bytes in place, so they live until close()."""

    name = "litert"

    def __init__(self, model: bytes, *, target: str) -> None:
        interpreter_cls = _litert_interpreter()
        try:
            self._interp: Any = interpreter_cls(model_content=model)
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise UsageError(f"LiteRT could not load the decrypted build: {exc}") from None
        self._model: bytes | None = model
        self.providers = ["litert-cpu"]
        ins, outs = self._interp.get_input_details(), self._interp.get_output_details()
        self._in_index = {d["name"]: d["index"] for d in ins}
        self._in_shape = {d["name"]: tuple(int(x) for x in d["shape"]) for d in ins}
        self._out = [(d["name"], d["index"]) for d in outs]
        self.inputs = [_tflite_spec(d) for d in ins]
        self.outputs = [_tflite_spec(d) for d in outs]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.run_invoke(feeds)
        # get_tensor already returns a copy (the interpreter reuses its buffers on the next invoke).
        return {name: self._interp.get_tensor(index) for name, index in self._out}

    def run_invoke(self, feeds: dict[str, np.ndarray]) -> None:
        resized = False
        for name, value in feeds.items():
            if tuple(value.shape) != self._in_shape[name]:
                self._interp.resize_tensor_input(self._in_index[name], list(value.shape))
                self._in_shape[name] = tuple(value.shape)
                resized = True
        if resized:
            self._interp.allocate_tensors()
        for name, value in feeds.items():
            self._interp.set_tensor(self._in_index[name], np.ascontiguousarray(value))
        self._interp.invoke()

    def run_into(self, feeds: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # LiteRT computes into its own tensor buffers: the outputs in ``out`` are copied from those buffers
        # straight into the caller's arrays (one copy, where run() and a slot write make two).
        self.run_invoke(feeds)
        result = {}
        for name, index in self._out:
            target = out.get(name)
            if target is None:
                result[name] = self._interp.get_tensor(index)
            else:
                view = self._interp.tensor(index)
                np.copyto(target, view(), casting="no")
                del view  # the interpreter refuses to reallocate while a view of its buffers lives
                result[name] = target
        return result

    def close(self) -> None:
        model, self._model = self._model, None
        self._interp = None
        if model is not None:
            scrub_bytes(model)


def _tflite_spec(d: dict[str, Any]) -> TensorSpec:
    sig = d.get("shape_signature")
    dims = sig if sig is not None and len(sig) == len(d["shape"]) else d["shape"]
    return TensorSpec(
        d["name"], tuple(None if int(x) < 0 else int(x) for x in dims), np.dtype(d["dtype"]).name
    )


def open_backend(plaintext: bytearray, *, target: str) -> Backend:
    """Open the right backend for a decrypted build. The caller wipes ``plaintext`` afterwards."""
    _check_build(plaintext, target)
    return _open_checked(bytes(plaintext), target)  # the runtimes accept only bytes


# Builds under this size that passed the safety walk in this process, by SHA-256 of their plaintext: hashing
# 1 MiB costs ~0.5 ms where the walk of a small model costs more than its session's creation saves, and the
# key is the content itself, so a build that differs in one byte is walked again.
_WALKED_MAX_BYTES = 1024 * 1024
_WALKED_MAX_ENTRIES = 256
_walked: dict[bytes, None] = {}
_walked_lock = threading.Lock()


def _check_build(plaintext: bytes | bytearray | memoryview, target: str) -> None:
    digest = None
    if len(plaintext) <= _WALKED_MAX_BYTES:
        digest = hashlib.sha256(plaintext).digest()
    if digest is None or digest not in _walked:
        check_model_bytes(plaintext)  # in place, no copy: a build that reads files outside itself never opens
        if digest is not None:
            with _walked_lock:
                while len(_walked) >= _WALKED_MAX_ENTRIES:
                    _walked.pop(next(iter(_walked)))
                _walked[digest] = None
    if target in TFLITE_TARGETS and sniff_format(plaintext) != "tflite":
        raise UsageError(f"target {target} expects a TFLite build but the decrypted build is not TFLite")


def _open_checked(model: bytes, target: str) -> Backend:
    """Open a backend on ``model`` (already through _check_build), a bytes object nothing else refers to."""
    backend: Backend
    if sniff_format(model) == "tflite":
        backend = LiteRTBackend(model, target=target)  # keeps ``model`` alive until close()
    else:
        backend = OnnxBackend(model, target=target)
        scrub_bytes(model)
    del model
    return backend


def _private_bytes(n: int) -> tuple[bytes | None, memoryview]:
    """An uninitialized ``bytes`` object of ``n`` bytes and a writable view of its storage, so a build can be
    decrypted straight into the object the runtimes read (they take only ``bytes``): no plaintext copy.

    CPython only (as scrub_bytes): the view is valid only while the object lives, and the object must not be
    hashed or shared before it is filled. Elsewhere (or for n = 0) the view is over a bytearray and None is
    returned: the caller copies it into bytes once. The object is the pooled one when that has this size and
    nothing else refers to it (see _pool_after_wipe), else a new one."""
    if sys.implementation.name != "cpython" or n == 0:
        return None, memoryview(bytearray(n))
    global _pooled
    with _pool_lock:
        data, _pooled = _pooled, None
    # Ours alone: the name `data` and getrefcount's argument. Anything more (a runtime or a traceback still
    # holding it) and it is left alone: a bytes object others hold must never change under them.
    if data is None or len(data) != n or sys.getrefcount(data) != 2:
        # Uninitialized (no zero-fill pass over the plaintext size): every byte is written by the decryption,
        # and on any failure open_sealed_into zeroes the whole buffer.
        data = _new_bytes(None, n)
    storage = (ctypes.c_char * n).from_address(id(data) + sys.getsizeof(b"") - 1)
    return data, memoryview(storage).cast("B")


# One zeroed plaintext buffer is kept for the next build of the same size (a device re-opening a model): a
# fresh 10 MB allocation costs 2-5 ms of first-touch page faults on this VM (4 us per 4 KiB page) when the
# decryption writes it, more than the decryption itself. Only ONNX builds of 1-64 MiB (onnxruntime keeps its
# own copy; LiteRT reads the bytes in place until close), only after the helper thread has zeroed it.
_POOL_MIN_BYTES, _POOL_MAX_BYTES = 1 << 20, 64 << 20
_pool_lock = threading.Lock()
_pooled: bytes | None = None


def _pool_after_wipe(data: bytes) -> Callable[[], None]:
    def keep() -> None:
        global _pooled
        if _POOL_MIN_BYTES <= len(data) <= _POOL_MAX_BYTES:
            with _pool_lock:
                _pooled = data

    return keep


if sys.implementation.name == "cpython":
    _new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
    _new_bytes.restype = ctypes.py_object
    _new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)


def open_sealed_backend(
    container: bytes | bytearray | memoryview | BinaryIO, *, key: bytes, build_hash: str, target: str
) -> Backend:
    """Decrypt a sealed build straight into the bytes a backend reads and open it, in one pass.

    The model-safety walk runs on the plaintext before the backend sees it; the build hash is checked on a
    second thread while the backend opens, and a mismatch closes the backend, zeroes the plaintext and raises
    drm.IntegrityError (see drm.open_sealed_into). Nothing is returned before every check has passed. The
    plaintext is zeroed as soon as onnxruntime has its own copy; LiteRT reads it in place until close()."""
    held: dict[str, Any] = {}  # the bytes, kept alive while any view of their storage exists

    def allocate(n: int) -> memoryview:
        held["model"], held["view"] = _private_bytes(n)
        return held["view"]

    def use(view: memoryview) -> Backend:
        _check_build(view if held["model"] is None else held["model"], target)  # the same storage
        model = held["model"] if held["model"] is not None else bytes(view)
        if sniff_format(view) == "tflite":
            held["wipe"] = held["model"] is None  # LiteRT reads ``model`` in place until close()
            return LiteRTBackend(model, target=target)
        held["wipe"] = True  # the session holds its own copy (wiped after the hash check, which reads it)
        return OnnxBackend(model, target=target)

    def discard(backend: Backend) -> None:
        backend.close()

    try:
        _, backend = drm_open_sealed_into(
            container, key=key, allocate=allocate, use=use, discard=discard, expected_build_hash=build_hash
        )
        if held.get("wipe"):
            # Zeroed on the drm helper thread, which keeps the bytes alive until then: the caller does not
            # wait ~0.7 ms per 10 MB for it.
            model = held["model"]
            drm_wipe_soon(held["view"], model, then=None if model is None else _pool_after_wipe(model))
            del model
    finally:
        held.clear()  # the views go first; then the bytes (LiteRT's own reference keeps its model alive)
    return backend
