# Why this is one module: the sample contract (batched, per-run, fixed inputs, recurrent state) is one rule set used by packagers and device eval alike.
"""The sample contract: how arrays keyed by input name feed a model, run by run, for any input signature.

An array whose rank equals its input's rank carries the batch on axis 0; an array of rank + 1 enumerates
samples on axis 0, one run each (scalars, fixed `[1, ...]` inputs). Inputs the caller fixes take one value
instead of an array; recurrent state inputs take none: each step gets the output that feeds it on the step
before, from zeros at every `sequence_start`. Pure numpy; the packagers and `device eval` both use it."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from edgemart.core.errors import UsageError

LABEL_KEY = "y"
SINGLE_INPUT_KEY = "x"
SEQUENCE_KEY = "sequence_start"  # optional: 1 where a new sequence (state reset) begins
RESERVED_KEYS = (LABEL_KEY, SEQUENCE_KEY)

# (state input, the output that feeds it): names a streaming export commonly uses.
_STATE_SUFFIXES = ("N", "n", "_n", "_out", "_next", "_new", "_o", ".out", "Out", "_1")
_STATE_PREFIXES = ("new_", "next_", "out_", "updated_")
_STATE_SWAPS = (("in", "out"), ("_in", "_out"), ("0", "n"), ("0", "N"), ("_0", "_n"), ("input", "output"),
                ("prev", "next"), ("_prev", "_next"), ("past", "present"))  # fmt: skip


class Spec(Protocol):
    """A model input or output as both the packagers and the device backends describe it."""

    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> tuple[int | None, ...]: ...

    @property
    def dtype(self) -> str: ...


@dataclass(frozen=True)
class StatePair:
    """A recurrent state: `input` is fed, at each step, the value `output` had on the step before."""

    input: str
    output: str
    how: str  # "declared" | "detected by name and shape"

    def to_dict(self) -> dict[str, str]:
        return {"input": self.input, "output": self.output, "how": self.how}


@dataclass(frozen=True)
class Contract:
    """What the caller says about the model beyond its signature: fixed input values and state pairs."""

    fixed: Mapping[str, float] = field(default_factory=dict)  # input -> the one value it always gets
    state: Mapping[str, str] = field(default_factory=dict)  # declared state input -> output
    detect_state: bool = True


def parse_pairs(items: Sequence[str], what: str, *, numeric: bool = False) -> dict[str, Any]:
    """`NAME=VALUE` items (the `--fixed` / `--state` syntax) as a dict; UsageError on a malformed item."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = str(item).partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            raise UsageError(f"{what} expects NAME=VALUE, got {item!r}")
        if name in out:
            raise UsageError(f"{what} names input {name!r} twice")
        if numeric:
            try:
                number = float(value)
            except ValueError:
                raise UsageError(f"{what} {name}={value!r}: the value must be a number") from None
            if not math.isfinite(number):
                raise UsageError(f"{what} {name}={value!r}: the value must be finite")
            out[name] = number
        else:
            out[name] = value
    return out


def shape_text(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _dims_fit(a: Sequence[int | None], b: Sequence[int | None]) -> bool:
    return len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b, strict=True))


def _names_pair(inp: str, out: str) -> bool:
    if any(out == inp + s for s in _STATE_SUFFIXES) or any(out == p + inp for p in _STATE_PREFIXES):
        return True
    for old, new in _STATE_SWAPS:
        if inp.endswith(old) and out == inp[: len(inp) - len(old)] + new:
            return True
        if inp.startswith(old) and out == new + inp[len(old) :]:
            return True
        if old in inp and out == inp.replace(old, new, 1):
            return True
    return False


def state_pairs(inputs: Sequence[Spec], outputs: Sequence[Spec], contract: Contract) -> tuple[StatePair, ...]:
    """Declared pairs (checked) plus, unless turned off, inputs fed by a same-shaped output of a related name."""
    by_in = {s.name: s for s in inputs}
    by_out = {s.name: s for s in outputs}
    pairs: list[StatePair] = []
    for inp, out in contract.state.items():
        if inp not in by_in:
            raise UsageError(
                f"state {inp}={out}: the model has no input {inp!r} (inputs: {', '.join(by_in)})"
            )
        if out not in by_out:
            raise UsageError(
                f"state {inp}={out}: the model has no output {out!r} (outputs: {', '.join(by_out)})"
            )
        a, b = by_in[inp], by_out[out]
        if a.dtype != b.dtype or not _dims_fit(a.shape, b.shape):
            raise UsageError(
                f"state {inp}={out}: input {shape_text(a.shape)} {a.dtype} cannot take output "
                f"{shape_text(b.shape)} {b.dtype}"
            )
        pairs.append(StatePair(inp, out, "declared"))
    if contract.detect_state:
        taken_in = {p.input for p in pairs} | set(contract.fixed)
        taken_out = {p.output for p in pairs}
        for a in inputs:
            if a.name in taken_in or not a.shape:
                continue
            for b in outputs:
                if b.name in taken_out or b.dtype != a.dtype or not _dims_fit(a.shape, b.shape):
                    continue
                if _names_pair(a.name, b.name):
                    pairs.append(StatePair(a.name, b.name, "detected by name and shape"))
                    taken_out.add(b.name)
                    break
    return tuple(pairs)


@dataclass(frozen=True)
class SampleSet:
    """Samples bound to a model's inputs. Axis 0 of every array enumerates the same samples: rows that may be
    batched together (`per_run` False) or whole runs (`per_run` True, `arrays[k][i]` is fed as is)."""

    arrays: dict[str, np.ndarray]
    per_run: bool
    fixed: dict[str, np.ndarray] = field(default_factory=dict)  # fed unchanged to every run
    state: tuple[StatePair, ...] = ()
    initial: dict[str, np.ndarray] = field(
        default_factory=dict
    )  # each state input's value at a sequence start
    starts: np.ndarray | None = None  # stateful: True where a sequence begins (always at 0)
    fixed_batch: int | None = None  # batched: the model's fixed batch, rows per run

    @property
    def count(self) -> int:
        return int(next(iter(self.arrays.values())).shape[0]) if self.arrays else 0

    @property
    def sequences(self) -> list[tuple[int, int]]:
        """(start, end) of each sequence; one per sample when the model has no state."""
        n = self.count
        if not self.state:
            return []
        assert self.starts is not None
        cuts = [int(i) for i in np.flatnonzero(self.starts)] + [n]
        return list(zip(cuts[:-1], cuts[1:], strict=True))

    def take(self, index: slice) -> SampleSet:
        arrays = {k: v[index] for k, v in self.arrays.items()}
        starts = None
        if self.starts is not None:
            starts = self.starts[index].copy()
            if starts.size:
                starts[0] = True
        return replace(self, arrays=arrays, starts=starts)

    def split_tail(self, held: int) -> tuple[SampleSet, SampleSet | None]:
        """(first part, last `held` samples); a stateful set is cut at the sequence start nearest that point."""
        n = self.count
        if held <= 0 or held >= n:
            return self, None
        cut = n - held
        if self.state:
            starts = [s for s, _ in self.sequences if s > 0]
            if not starts:
                return self, None
            cut = min(starts, key=lambda s: abs(s - cut))
        return self.take(slice(0, cut)), self.take(slice(cut, n))

    def first_feed(self) -> dict[str, np.ndarray]:
        """One run's inputs: the first sample (or the first batch), with fixed values and initial state."""
        if self.per_run:
            feed = {k: np.asarray(v[0]) for k, v in self.arrays.items()}
        else:
            feed = {k: v[: self.fixed_batch or 1] for k, v in self.arrays.items()}
        return {**feed, **self.fixed, **{k: v.copy() for k, v in self.initial.items()}}

    def runs(self, max_batch: int = 64) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(samples in this run, feed) for a model without state: rows batched, or one sample per run."""
        if self.state:
            raise ValueError("a stateful sample set is run with run_samples, step by step")
        n = self.count
        if self.per_run:
            for i in range(n):
                yield 1, {**{k: np.asarray(v[i]) for k, v in self.arrays.items()}, **self.fixed}
            return
        size = self.fixed_batch or max(1, max_batch)
        for start in range(0, n, size):
            feed = {k: v[start : start + size] for k, v in self.arrays.items()}
            yield min(size, n - start), {**feed, **self.fixed}

    def describe(self) -> dict[str, Any]:
        """What the reports say about how the samples were run."""
        out: dict[str, Any] = {
            "samples": self.count,
            "mode": "one run per sample" if self.per_run else "batched on axis 0",
        }
        if self.fixed:
            out["fixed_inputs"] = {k: _scalar(v) for k, v in self.fixed.items()}
        if self.state:
            out["state"] = [p.to_dict() for p in self.state]
            out["sequences"] = len(self.sequences)
            out["mode"] = "sequences: one run per step, state carried from each step's output to the next"
        return out


def _scalar(value: np.ndarray) -> Any:
    flat = np.unique(np.asarray(value).ravel())
    return flat[0].item() if flat.size == 1 else np.asarray(value).tolist()


def _given_text(value: Any) -> str:
    return "none" if value is None else f"{shape_text(np.shape(value))} {np.asarray(value).dtype.name}"


def bind(
    inputs: Sequence[Spec],
    outputs: Sequence[Spec],
    samples: Mapping[str, Any],
    role: str,
    contract: Contract | None = None,
) -> SampleSet:
    """Map `samples` onto the model inputs by the contract; one UsageError lists every input that does not fit,
    with its expected and given shapes."""
    contract = contract or Contract()
    data = {k: np.asarray(v) for k, v in samples.items() if k not in RESERVED_KEYS}
    names = [s.name for s in inputs]
    unknown_fixed = [k for k in contract.fixed if k not in names]
    if unknown_fixed:
        raise UsageError(
            f"fixed input {unknown_fixed[0]!r} is not a model input (inputs: {', '.join(names)})"
        )
    pairs = state_pairs(inputs, outputs, contract)
    state_in = {p.input: p for p in pairs}
    needing = [s for s in inputs if s.name not in contract.fixed and s.name not in state_in]
    if len(needing) == 1 and needing[0].name not in data and SINGLE_INPUT_KEY in data:
        data[needing[0].name] = data.pop(SINGLE_INPUT_KEY)

    problems: list[str] = []
    modes: dict[str, str] = {}
    for spec in inputs:
        given = data.get(spec.name)
        if spec.name in contract.fixed:
            if given is not None:
                problems.append(
                    f"'{spec.name}' is fixed to {contract.fixed[spec.name]:g}: give no array for it"
                )
            continue
        if spec.name in state_in:
            if given is not None:
                problems.append(
                    f"'{spec.name}' is recurrent state (fed by output '{state_in[spec.name].output}'): "
                    f"give no array for it, given {_given_text(given)}"
                )
            continue
        problem, mode = _fit(spec, given)
        if problem:
            problems.append(problem)
        else:
            modes[spec.name] = mode
    extra = sorted(set(data) - set(names))
    for key in extra:
        problems.append(f"key '{key}' matches no model input")
    counts = {k: int(data[k].shape[0]) for k in modes}
    per_run = bool(pairs) or "samples" in modes.values()
    runs = {counts[k] for k, m in modes.items() if m == "samples"}
    if not problems and len(runs) > 1:
        problems.append(
            "arrays disagree on the number of samples: "
            + ", ".join(f"'{k}' {counts[k]}" for k, m in modes.items() if m == "samples")
        )
    elif not problems and runs:
        n = next(iter(runs))
        problems.extend(
            f"'{k}' has {counts[k]} rows, not a multiple of the {n} samples of the other inputs"
            for k, m in modes.items()
            if m == "batch" and counts[k] % n
        )
    elif not problems and len(set(counts.values())) > 1:
        problems.append(
            "arrays disagree on the number of samples: " + ", ".join(f"'{k}' {v}" for k, v in counts.items())
        )
    if not problems and not modes:
        problems.append("no input takes an array: nothing to run")
    if problems:
        raise UsageError(f"{role} data does not fit the model inputs: " + "; ".join(problems))

    if 0 in counts.values():
        raise UsageError(f"{role} data holds zero samples")
    arrays = {k: data[k] for k in names if k in modes}
    if per_run:
        runs_n = next((counts[k] for k, m in modes.items() if m == "samples"), None)
        if runs_n is None:  # stateful, every array batched: one row per step unless the batch is fixed
            batch = next((s.shape[0] for s in inputs if s.name in modes and s.shape[0] is not None), 1)
            runs_n = next(iter(counts.values())) // batch
        for k, m in modes.items():
            if m == "batch":
                arrays[k] = arrays[k].reshape(runs_n, -1, *arrays[k].shape[1:])
    n = next(iter(arrays.values())).shape[0]
    sizes = _dim_sizes(inputs, arrays, per_run)
    fixed = {
        k: np.full(_resolve(spec, sizes), v, dtype=spec.dtype)
        for spec in inputs
        for k, v in contract.fixed.items()
        if spec.name == k
    }
    initial = {p.input: np.zeros(_resolve(_spec(inputs, p.input), sizes), _spec(inputs, p.input).dtype)
               for p in pairs}  # fmt: skip
    starts = None
    if pairs:
        starts = np.zeros(n, dtype=bool)
        if SEQUENCE_KEY in samples:
            given_starts = np.asarray(samples[SEQUENCE_KEY]).reshape(-1)
            if given_starts.shape[0] != n:
                raise UsageError(
                    f"{role} data '{SEQUENCE_KEY}' has {given_starts.shape[0]} entries for {n} steps"
                )
            starts = given_starts.astype(bool)
        starts[0] = True
    elif SEQUENCE_KEY in samples:
        raise UsageError(f"{role} data has '{SEQUENCE_KEY}' but the model has no recurrent state input")
    fixed_batch = None
    if not per_run:
        fixed_batch = next((s.shape[0] for s in inputs if s.name in arrays and s.shape and s.shape[0]), None)
    return SampleSet(arrays, per_run, fixed, pairs, initial, starts, fixed_batch)


def _spec(inputs: Sequence[Spec], name: str) -> Spec:
    return next(s for s in inputs if s.name == name)


def _fit(spec: Spec, given: np.ndarray | None) -> tuple[str | None, str]:
    """(problem or None, "batch" | "samples") for one input's array."""
    rank = len(spec.shape)
    want = shape_text(spec.shape)
    ways = [f"{want} (batch on axis 0)"] if rank else []
    ways.append(("[n, " + want[1:] if rank else "[n]") + " (n samples on axis 0)")
    expected = f"'{spec.name}' expects {spec.dtype} " + " or ".join(ways)
    if not rank:
        expected += f" (or --fixed {spec.name}=VALUE)"
    if given is None:
        return f"{expected}, given none", ""
    if given.dtype.name != spec.dtype:
        return f"{expected}, given {_given_text(given)}", ""
    if given.ndim == rank and rank:
        batch = spec.shape[0]
        if all(w is None or w == g for w, g in zip(spec.shape[1:], given.shape[1:], strict=True)):
            if batch is not None and given.shape[0] % batch:
                return (
                    f"{expected}, given {_given_text(given)} (rows not a multiple of the fixed batch {batch})",
                    "",
                )
            return None, "batch"
    elif given.ndim == rank + 1:
        if all(w is None or w == g for w, g in zip(spec.shape, given.shape[1:], strict=True)):
            return None, "samples"
    return f"{expected}, given {_given_text(given)}", ""


def _dim_sizes(inputs: Sequence[Spec], arrays: Mapping[str, np.ndarray], per_run: bool) -> dict[str, int]:
    """Sizes of named dynamic dims (ONNX dim_param) as one run of the given arrays has them."""
    sizes: dict[str, int] = {}
    for spec in inputs:
        names = getattr(spec, "dim_names", ()) or ()
        if spec.name not in arrays or not names:
            continue
        run_shape = arrays[spec.name].shape[1:] if per_run else (1, *arrays[spec.name].shape[1:])
        for dim, name in zip(run_shape, names, strict=False):
            if name:
                sizes.setdefault(name, int(dim))
    return sizes


def _resolve(spec: Spec, sizes: Mapping[str, int]) -> tuple[int, ...]:
    """A concrete shape for a fixed or state input: static dims as they are, named dims as the data has
    them, any other dynamic dim 1 (one stream, one batch row)."""
    names = list(getattr(spec, "dim_names", ()) or ()) + [None] * len(spec.shape)
    return tuple(d if d is not None else sizes.get(names[i] or "", 1) for i, d in enumerate(spec.shape))


def synthetic(inputs: Sequence[Spec], outputs: Sequence[Spec], contract: Contract | None = None,
              seed: int = 0) -> SampleSet:  # fmt: skip
    """One run of uniform [0, 1) inputs (zeros for integer inputs), for timing only, never for calibration.

    Named dynamic dims take 1; any other dynamic dim past the batch axis is an error naming the input."""
    contract = contract or Contract()
    rng = np.random.default_rng(seed)
    pairs = state_pairs(inputs, outputs, contract)
    carried = {p.input for p in pairs} | set(contract.fixed)
    # A named dim is the batch (one row here) where some input has that name on axis 0; others are unknown.
    batch_names = {(getattr(s, "dim_names", ()) or (None,))[0] for s in inputs if s.shape} - {None}
    arrays: dict[str, np.ndarray] = {}
    for spec in inputs:
        if spec.name in carried:
            continue
        names = list(getattr(spec, "dim_names", ()) or ()) + [None] * len(spec.shape)
        if any(d is None and names[i] not in batch_names for i, d in enumerate(spec.shape) if i > 0):
            raise UsageError(
                f"input '{spec.name}' has dynamic shape {shape_text(spec.shape)}: timing it needs samples "
                "(--calibration PATH.npz) to fix its dims"
            )
        shape = tuple(1 if d is None else d for d in spec.shape)
        value = rng.random(shape) if spec.dtype.startswith("float") else np.zeros(shape)
        arrays[spec.name] = value.astype(spec.dtype)[None]
    if not arrays:
        raise UsageError("every model input is fixed or recurrent state: nothing to time")
    base = SampleSet({k: v for k, v in arrays.items()}, True)
    sizes = _dim_sizes(inputs, arrays, True)
    fixed = {s.name: np.full(_resolve(s, sizes), contract.fixed[s.name], s.dtype) for s in inputs
             if s.name in contract.fixed}  # fmt: skip
    initial = {p.input: np.zeros(_resolve(_spec(inputs, p.input), sizes), _spec(inputs, p.input).dtype)
               for p in pairs}  # fmt: skip
    return replace(base, fixed=fixed, state=pairs, initial=initial,
                   starts=np.ones(1, dtype=bool) if pairs else None)  # fmt: skip


RunFn = Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]]


def _join(parts: list[np.ndarray]) -> np.ndarray:
    """Outputs of consecutive runs as one array: concatenated on axis 0 when they have one, else stacked; runs
    of different shapes are flattened end to end (compared element by element, as one signal)."""
    if all(p.ndim >= 1 for p in parts) and all(p.shape[1:] == parts[0].shape[1:] for p in parts):
        return np.concatenate(parts, axis=0)
    if all(p.shape == parts[0].shape for p in parts):
        return np.stack(parts)
    return np.concatenate([np.asarray(p).ravel() for p in parts])


def run_samples(
    run: RunFn,
    samples: SampleSet,
    *,
    max_batch: int = 64,
    on_run: Callable[[int, int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Every sample through `run`, outputs joined on axis 0. A stateful set runs step by step, each step
    fed the state outputs of the one before, reset to the initial state at each sequence start."""
    parts: dict[str, list[np.ndarray]] = {}
    if samples.state:
        feeds: Iterator[tuple[int, dict[str, np.ndarray]]] = _stepped(run, samples)
    else:
        feeds = samples.runs(max_batch)
    total = samples.count if samples.per_run else -(-samples.count // (samples.fixed_batch or max_batch))
    for i, item in enumerate(feeds):
        out = item[1] if samples.state else run(item[1])
        for name, value in out.items():
            parts.setdefault(name, []).append(np.asarray(value))
        if on_run is not None:
            on_run(i + 1, total)
    return {name: _join(p) for name, p in parts.items()}


def _stepped(run: RunFn, samples: SampleSet) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    assert samples.starts is not None
    state: dict[str, np.ndarray] = {}
    for i in range(samples.count):
        if samples.starts[i] or not state:
            state = {k: v.copy() for k, v in samples.initial.items()}
        feed = {**{k: np.asarray(v[i]) for k, v in samples.arrays.items()}, **samples.fixed, **state}
        out = run(feed)
        missing = [p.output for p in samples.state if p.output not in out]
        if missing:
            raise UsageError(f"the model did not return state output '{missing[0]}'")
        state = {p.input: np.asarray(out[p.output]) for p in samples.state}
        yield 1, dict(out)


def unroll(run: RunFn, samples: SampleSet) -> SampleSet:
    """A stateful set as plain per-run samples: each step's state inputs as `run` carried them (teacher
    forcing with the reference model), so calibration and per-layer figures see realistic states."""
    if not samples.state:
        return samples
    assert samples.starts is not None
    seen: dict[str, list[np.ndarray]] = {p.input: [] for p in samples.state}
    state: dict[str, np.ndarray] = {}
    for i in range(samples.count):
        if samples.starts[i] or not state:
            state = {k: v.copy() for k, v in samples.initial.items()}
        for k, v in state.items():
            seen[k].append(v)
        out = run({**{k: np.asarray(v[i]) for k, v in samples.arrays.items()}, **samples.fixed, **state})
        state = {p.input: np.asarray(out[p.output]) for p in samples.state}
    arrays = dict(samples.arrays)
    for k, values in seen.items():
        if any(v.shape != values[0].shape for v in values):
            raise UsageError(f"state '{k}' changes shape from step to step; it cannot be calibrated")
        arrays[k] = np.stack(values)
    return SampleSet(arrays, True, dict(samples.fixed))
