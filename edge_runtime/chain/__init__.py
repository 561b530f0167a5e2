"""Shared-memory slot chains: one process per vendor, tensors in memfd slots, a control socket per hop.

`spec` reads and checks a chain file, `check` validates shapes and dtypes before the first frame, `slots`
owns the shared-memory rings, `node`/`worker` run one stage in its own process, `steps` are the built-in
pre/post-processing ops, `supervisor` starts, feeds and watches the stages, `cli` is `edgemart device run`.
Names load lazily so that importing the CLI part does not start numpy or a runtime."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_runtime.chain.supervisor import (
        Chain,
        ChainStats,
        StageFailed,
        StageHung,
        StageRefused,
        run_chain,
    )

_EXPORTS = {name: "edge_runtime.chain.supervisor" for name in (
    "Chain", "ChainStats", "StageFailed", "StageHung", "StageRefused", "describe_exit", "run_chain"
)}  # fmt: skip

__all__ = ["Chain", "ChainStats", "StageFailed", "StageHung", "StageRefused", "describe_exit", "run_chain"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'edge_runtime.chain' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
