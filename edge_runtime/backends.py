"""Inference backends behind one interface: onnxruntime and LiteRT, both opened from bytes in memory.

The backend is chosen from the build's format (sniffed) and target; no model byte touches the disk."""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

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

        available = set(ort.get_available_providers())
        providers = [p for p in _PREFERRED_PROVIDERS.get(target, ()) if p in available] + [
            "CPUExecutionProvider"
        ]
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

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self._session.run(self._output_names, feeds)
        return dict(zip(self._output_names, values, strict=True))

    def close(self) -> None:
        self._session = None


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
        return {name: np.array(self._interp.get_tensor(index), copy=True) for name, index in self._out}

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
    fmt = sniff_format(plaintext)
    check_model_bytes(plaintext)  # in place, no copy: a build that reads files outside itself never opens
    if target in TFLITE_TARGETS and fmt != "tflite":
        raise UsageError(f"target {target} expects a TFLite build but the decrypted build is not TFLite")
    model = bytes(plaintext)  # the runtimes accept only bytes
    backend: Backend
    if fmt == "tflite":
        backend = LiteRTBackend(model, target=target)  # keeps ``model`` alive until close()
    else:
        backend = OnnxBackend(model, target=target)
        scrub_bytes(model)
    del model
    return backend
