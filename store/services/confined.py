"""The store's calls that read seller bytes, each run in the sandbox (store.sandbox): inspect a model,
check a samples archive, run the compliance gate, package for a target. Views and jobs call these, never
packagers or licenses directly on seller bytes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edgemart.core.errors import UsageError
from store.context import StoreContext
from store.sandbox import SandboxChildError, SandboxCrash


class UnprocessableModel(UsageError):
    """The seller's model or samples made the confined processing fail (HTTP 422)."""

    http_status = 422
    code = "invalid_model"


def _sample_limits(config: Any) -> dict[str, Any]:
    return {
        "max_bytes": int(config["MAX_SAMPLE_BYTES"]),
        "max_members": int(config["MAX_SAMPLE_MEMBERS"]),
        "max_ratio": float(config["MAX_SAMPLE_RATIO"]),
    }


def _at_upload(ctx: StoreContext, task: str, args: dict[str, Any], blobs: dict[str, bytes], what: str) -> Any:
    """Run an upload-time task; a crash on the seller's bytes is a 422 naming it, never a 500."""
    try:
        result, _ = ctx.sandbox.run(task, args, blobs, read=_reads(ctx))
    except (SandboxChildError, SandboxCrash) as exc:
        raise UnprocessableModel(
            f"{what} could not be processed ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None
    return result


def _reads(ctx: StoreContext) -> list[Any]:
    return [ctx.config["LICENSE_INDEX_DIR"]]


def inspect(ctx: StoreContext, model: bytes) -> dict[str, Any]:
    """The model's signature (ModelInfo.to_dict()); UsageError naming what is wrong with it.

    The model-safety walk runs here first with the store's configured caps (it is pure code of ours), then
    again with the defaults inside the sandbox before any library parses the bytes."""
    from edgemart.core.model_safety import ModelLimits, check_model_bytes

    cfg = ctx.config
    check_model_bytes(
        model,
        ModelLimits(
            max_tensor_bytes=int(cfg["MODEL_MAX_TENSOR_BYTES"]),
            max_total_tensor_bytes=int(cfg["MODEL_MAX_TOTAL_BYTES"]),
            max_graph_depth=int(cfg["MODEL_MAX_GRAPH_DEPTH"]),
        ),
    )
    return _at_upload(ctx, "inspect", {}, {"model": model}, "the model")["info"]  # type: ignore[no-any-return]


def check_samples(
    ctx: StoreContext,
    data: bytes,
    *,
    model: bytes | None = None,
    targets: list[str] | None = None,
    target_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A samples archive after the archive checks: {"shapes", "fit_problems": [[message, [targets]]...]}
    (how the samples miss each target's sample contract, when the model is given); UsageError otherwise."""
    args = {
        "sample_limits": _sample_limits(ctx.config),
        "targets": list(targets or []),
        "target_options": target_options or {},
    }
    blobs = {"samples": data} if model is None else {"samples": data, "model": model}
    return _at_upload(ctx, "samples", args, blobs, "the calibration file")  # type: ignore[no-any-return]


def gate(ctx: StoreContext, model: bytes, *, card: str | None, license: str) -> dict[str, Any]:
    """The compliance gate's decision (Decision.to_dict()) against the store's license index."""
    index = ctx.license_index()
    args = {"card": card, "license": license, "index": str(index.directory) if index is not None else None}
    return _at_upload(ctx, "gate", args, {"model": model}, "the model")["decision"]  # type: ignore[no-any-return]


def package(
    ctx: StoreContext,
    model: bytes,
    samples: bytes | None,
    *,
    target: str,
    options: dict[str, Any] | None,
    progress: Callable[[float, str], None] | None,
) -> Any:
    """A packagers.Build for `target`; raises what packaging raised (a packaging job explains it)."""
    import packagers

    args = {
        "target": target,
        "options": options,
        "sample_limits": _sample_limits(ctx.config),
        "min_calibration": int(ctx.config["MIN_CALIBRATION_SAMPLES"]),
        "holdout_fraction": float(ctx.config["HOLDOUT_FRACTION"]),
    }
    blobs = {"model": model} if samples is None else {"model": model, "samples": samples}
    meta, out = ctx.sandbox.run("package", args, blobs, read=_reads(ctx), progress=progress)
    quality = packagers.QualityReport(**meta["quality"])
    return packagers.Build(
        target=meta["target"],
        payload=out["payload"],
        format=meta["format"],
        build_hash=meta["build_hash"],
        metadata=meta["metadata"],
        quality=quality,
    )
