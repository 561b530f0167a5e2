"""One `device eval` request on an open device, as the CLI (direct mode) and the device service run it:
validated options in, the report's dict, text, optional HTML and optional outputs out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgemart.core.errors import UsageError


@dataclass(frozen=True)
class EvalRequest:
    listing: str | None = None
    target: str | None = None
    version: int | None = None
    compare: str | None = None
    warmup: int = 3
    batch_size: int | None = None
    state: tuple[str, ...] = ()
    single_array: bool = False  # the data came as one bare .npy array
    want_outputs: bool = False
    want_html: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalRequest:
        """From a service message: every field type-checked (the sender is another local user)."""

        def opt(name: str, kind: type) -> Any:
            v = d.get(name)
            if v is not None and (not isinstance(v, kind) or isinstance(v, bool) and kind is not bool):
                raise UsageError(f"eval request: {name} must be a {kind.__name__}")
            return v

        state = d.get("state") or []
        if not isinstance(state, list) or not all(isinstance(s, str) for s in state):
            raise UsageError("eval request: state must be a list of IN=OUT strings")
        warmup = opt("warmup", int)
        if warmup is not None and not 0 <= warmup <= 1000:
            raise UsageError("eval request: warmup must be between 0 and 1000")
        return cls(
            listing=opt("listing", str),
            target=opt("target", str),
            version=opt("version", int),
            compare=opt("compare", str),
            warmup=3 if warmup is None else warmup,
            batch_size=opt("batch_size", int),
            state=tuple(state),
            single_array=bool(opt("single_array", bool)),
            want_outputs=bool(opt("want_outputs", bool)),
            want_html=bool(opt("want_html", bool)),
        )


@dataclass
class EvalResult:
    report: dict[str, Any]
    text: str
    html: str | None = None
    outputs: dict[str, np.ndarray] = field(default_factory=dict)


def run_eval(
    device: Any,
    request: EvalRequest,
    data: dict[str, np.ndarray],
    *,
    reference: dict[str, np.ndarray] | None = None,
    build_path: Any = None,
    license_bytes: bytes | None = None,
    progress: Any = None,
) -> EvalResult:
    """``progress`` is a factory of progress bars (one per evaluated build), or None."""
    from edge_runtime.evaluation.evaluate import evaluate
    from edge_runtime.evaluation.samples import parse_pairs

    state = parse_pairs(list(request.state), "--state")
    if request.compare:
        return _compare(device, request, data, state, progress)
    if build_path is not None:
        model = device.open_model(build_path=build_path, license_bytes=license_bytes)
    else:
        if not request.listing:
            raise UsageError("give a LISTING to evaluate")
        model = device.open_model(listing=request.listing, target=request.target, version=request.version)
    with model:
        if request.single_array and len(model.inputs) > 1:
            raise UsageError(
                f"the data holds one array but the model has {len(model.inputs)} inputs"
                f" ({', '.join(s.name for s in model.inputs)}): use an .npz keyed by input name"
            )
        report = evaluate(
            model,
            data,
            progress=progress() if progress else None,
            warmup=request.warmup,
            batch_size=request.batch_size,
            reference=reference,
            state=state,
        )
    return EvalResult(
        report.to_dict(),
        report.to_text(),
        report.to_html() if request.want_html else None,
        dict(report.outputs) if request.want_outputs else {},
    )


def _compare(
    device: Any, request: EvalRequest, data: dict[str, np.ndarray], state: Any, progress: Any
) -> EvalResult:
    """`--target A --compare B`: B runs first, then A with B's outputs as reference."""
    from edge_runtime.evaluation.compare import Comparison
    from edge_runtime.evaluation.evaluate import evaluate

    reports: list[Any] = []
    for target, reference in ((request.compare, None), (request.target, True)):
        with device.open_model(listing=request.listing, target=target, version=request.version) as model:
            reports.append(
                evaluate(
                    model,
                    data,
                    progress=progress() if progress else None,
                    warmup=request.warmup,
                    batch_size=request.batch_size,
                    reference=reports[0].outputs if reference else None,
                    state=state,
                )
            )
    comparison = Comparison(candidate=reports[1], baseline=reports[0])
    return EvalResult(
        comparison.to_dict(),
        comparison.to_text(),
        comparison.to_html() if request.want_html else None,
        dict(reports[1].outputs) if request.want_outputs else {},
    )
