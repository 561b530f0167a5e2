"""edgemart's on-device runtime: enrollment, license enforcement, decrypt-to-memory, backends, evaluation.

Imports only drm, numpy, the inference runtimes, yaml and the standard library. Names load lazily so
that `edgemart device ...` (and edge_runtime.cli) start without importing numpy or the runtimes."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_runtime.backends import Backend, LiteRTBackend, OnnxBackend, TensorSpec, open_backend
    from edge_runtime.device import Device, LicensedModel
    from edge_runtime.evaluation.evaluate import EvalReport, ProgressBar, evaluate
    from edge_runtime.ledger import Policy

_EXPORTS = {
    "Backend": "edge_runtime.backends",
    "LiteRTBackend": "edge_runtime.backends",
    "OnnxBackend": "edge_runtime.backends",
    "TensorSpec": "edge_runtime.backends",
    "open_backend": "edge_runtime.backends",
    "Device": "edge_runtime.device",
    "LicensedModel": "edge_runtime.device",
    "EvalReport": "edge_runtime.evaluation.evaluate",
    "ProgressBar": "edge_runtime.evaluation.evaluate",
    "evaluate": "edge_runtime.evaluation.evaluate",
    "Policy": "edge_runtime.ledger",
}

__all__ = [
    "Backend",
    "Device",
    "EvalReport",
    "LicensedModel",
    "LiteRTBackend",
    "OnnxBackend",
    "Policy",
    "ProgressBar",
    "TensorSpec",
    "evaluate",
    "open_backend",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'edge_runtime' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
