"""The chain description file (YAML or JSON): stages, bindings, steps, isolation, slots, timeouts.

Parsing checks structure only and names the path of any bad field; shapes and dtypes are
checked later, when the stages have loaded their models (chain_check)."""

from __future__ import annotations

import json
import math
import re
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.chain.steps import DTYPES, Step, TensorType, parse_step
from edgemart.core.errors import UsageError

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]{0,63}$")
ISOLATION = ("vendor", "stage")
SUPERVISOR = "supervisor"
MAX_CHAIN_BYTES = 1024 * 1024  # a chain file is a few kB; bundles carry them under the same bound
_MAX_JSON_INT_DIGITS = 100  # as edge_runtime.safe_yaml's default for YAML integers


class _ShortRepr(reprlib.Repr):
    """repr for error messages: a few levels and items, whatever the value (aliases, huge integers)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxlist, self.maxdict, self.maxtuple = 3, 6, 6, 6
        self.maxstring, self.maxother, self.maxlong = 60, 60, 40

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 256:
            return f"<{x.bit_length()}-bit integer>"
        return super().repr_int(x, level)


_show = _ShortRepr().repr


@dataclass(frozen=True)
class Timeouts:
    """Seconds. `frame`: longest a frame may make no progress before the stuck stage is named."""

    start: float = 120.0
    frame: float = 30.0
    stop: float = 5.0


@dataclass(frozen=True)
class ModelRef:
    listing: str | None = None
    build: Path | None = None
    license: Path | None = None

    def to_dict(self) -> dict[str, str]:
        if self.listing is not None:
            return {"listing": self.listing}
        return {"build": str(self.build), "license": str(self.license)}

    def describe(self) -> str:
        return f"listing {self.listing!r}" if self.listing else f"build {self.build}"


@dataclass(frozen=True)
class Binding:
    """Where a tensor comes from: a chain input or 'stage.output', then optional steps."""

    source: str
    steps: tuple[Step, ...] = ()

    def refs(self) -> list[str]:
        out = [self.source]
        for step in self.steps:
            out.extend(step.refs.values())
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"from": self.source, "steps": [s.to_dict() for s in self.steps]}


@dataclass(frozen=True)
class StageSpec:
    name: str
    vendor: str
    model: ModelRef
    inputs: dict[str, Binding]

    def refs(self) -> set[str]:
        return {r for b in self.inputs.values() for r in b.refs()}


@dataclass(frozen=True)
class ChainSpec:
    path: Path
    stages: tuple[StageSpec, ...]
    inputs: dict[str, TensorType | None]
    outputs: dict[str, Binding]
    isolation: str = "vendor"
    slots: int = 2
    timeouts: Timeouts = field(default_factory=Timeouts)
    name: str = "chain"

    def stage(self, name: str) -> StageSpec:
        return next(s for s in self.stages if s.name == name)

    def process_of(self, stage: StageSpec) -> str:
        return f"vendor:{stage.vendor}" if self.isolation == "vendor" else f"stage:{stage.name}"

    def processes(self) -> dict[str, list[StageSpec]]:
        groups: dict[str, list[StageSpec]] = {}
        for stage in self.stages:
            groups.setdefault(self.process_of(stage), []).append(stage)
        return groups

    def producer_of(self, ref: str) -> str:
        """The process that produces a tensor reference (the supervisor for chain inputs)."""
        if "." not in ref:
            return SUPERVISOR
        return self.process_of(self.stage(ref.split(".", 1)[0]))


def split_ref(ref: str) -> tuple[str, str]:
    stage, _, tensor = ref.partition(".")
    return stage, tensor


class _Reader:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, what: str) -> UsageError:
        return UsageError(f"{self.path}: {where}: {what}")

    def mapping(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected a mapping, got {type(value).__name__}")
        return value

    def name(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not _NAME.match(value):
            raise self.fail(where, f"expected a name of letters, digits, '_' or '-', got {_show(value)}")
        return value

    def keys(
        self,
        obj: dict[str, Any],
        where: str,
        allowed: set[str],
        required: frozenset[str] | set[str] = frozenset(),
    ) -> None:
        for key in obj:
            if key not in allowed:
                raise self.fail(
                    f"{where}.{key}" if where else key,
                    f"unknown field (allowed: {', '.join(sorted(allowed))})",
                )
        for key in sorted(required - set(obj)):
            raise self.fail(f"{where}.{key}" if where else key, "required field is missing")

    def tensor_type(self, value: Any, where: str) -> TensorType:
        obj = self.mapping(value, where)
        self.keys(obj, where, {"shape", "dtype"}, {"dtype"})
        dtype = obj["dtype"]
        if dtype not in DTYPES:
            raise self.fail(f"{where}.dtype", f"expected one of {', '.join(DTYPES)}, got {_show(dtype)}")
        shape = obj.get("shape")
        if shape is not None:
            ok = isinstance(shape, list) and all(
                d is None or (isinstance(d, int) and not isinstance(d, bool) and d >= 0) for d in shape
            )
            if not ok:
                raise self.fail(
                    f"{where}.shape", f"expected a list of sizes (null for dynamic), got {_show(shape)}"
                )
            shape = tuple(shape)
        return TensorType(shape, dtype)

    def binding(self, value: Any, where: str) -> Binding:
        if isinstance(value, str):
            value = {"from": value}
        obj = self.mapping(value, where)
        self.keys(obj, where, {"from", "steps"}, {"from"})
        source = obj["from"]
        if not isinstance(source, str) or not source:
            raise self.fail(
                f"{where}.from",
                f"expected a tensor reference ('input' or 'stage.output'), got {_show(source)}",
            )
        raw_steps = obj.get("steps") or []
        if not isinstance(raw_steps, list):
            raise self.fail(f"{where}.steps", "expected a list of steps")
        try:
            steps = tuple(parse_step(s, f"{where}.steps[{i}]") for i, s in enumerate(raw_steps))
        except UsageError as exc:
            raise UsageError(f"{self.path}: {exc.message}") from None
        return Binding(source, steps)

    def number(self, obj: dict[str, Any], key: str, where: str, default: float) -> float:
        value = obj.get(key, default)
        try:
            seconds = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0
        except OverflowError:  # an integer too large for a float
            seconds = math.inf
        if not (0 < seconds < math.inf):  # also refuses NaN
            raise self.fail(f"{where}.{key}", f"expected a positive number of seconds, got {_show(value)}")
        return seconds


def parse_chain(data: Any, path: Path) -> ChainSpec:
    """Build a ChainSpec from the decoded file; relative build/license paths resolve against the file."""
    r = _Reader(path)
    top = r.mapping(data, "top level")
    r.keys(
        top,
        "",
        {"version", "name", "isolation", "slots", "timeouts", "inputs", "stages", "outputs"},
        {"stages", "outputs"},
    )
    if top.get("version", 1) != 1:
        raise r.fail(
            "version", f"unsupported chain file version {_show(top.get('version'))} (this runtime reads 1)"
        )
    name = r.name(top.get("name", "chain"), "name")
    isolation = top.get("isolation", "vendor")
    if isolation not in ISOLATION:
        raise r.fail("isolation", f"expected vendor or stage, got {_show(isolation)}")
    slots = top.get("slots", 2)
    if not isinstance(slots, int) or isinstance(slots, bool) or not 2 <= slots <= 64:
        raise r.fail("slots", f"expected an integer from 2 to 64 (slots per output), got {_show(slots)}")
    t = r.mapping(top.get("timeouts", {}), "timeouts")
    r.keys(t, "timeouts", {"start", "frame", "stop"})
    d = Timeouts()
    timeouts = Timeouts(
        r.number(t, "start", "timeouts", d.start),
        r.number(t, "frame", "timeouts", d.frame),
        r.number(t, "stop", "timeouts", d.stop),
    )

    inputs: dict[str, TensorType | None] = {}
    for key, value in r.mapping(top.get("inputs", {}), "inputs").items():
        r.name(key, f"inputs.{key}")
        inputs[key] = None if value is None else r.tensor_type(value, f"inputs.{key}")

    raw_stages = top["stages"]
    if not isinstance(raw_stages, list) or not raw_stages:
        raise r.fail("stages", "expected a non-empty list of stages")
    stages: list[StageSpec] = []
    for i, raw in enumerate(raw_stages):
        where = f"stages[{i}]"
        obj = r.mapping(raw, where)
        r.keys(obj, where, {"name", "vendor", "model", "inputs"}, {"name", "vendor", "model", "inputs"})
        stage_name = r.name(obj["name"], f"{where}.name")
        if any(s.name == stage_name for s in stages) or stage_name in inputs:
            raise r.fail(f"{where}.name", f"duplicate name {_show(stage_name)}")
        vendor = r.name(obj["vendor"], f"{where}.vendor")
        model = r.mapping(obj["model"], f"{where}.model")
        if "listing" in model:
            r.keys(model, f"{where}.model", {"listing"})
            ref = ModelRef(listing=r.name(model["listing"], f"{where}.model.listing"))
        else:
            r.keys(model, f"{where}.model", {"build", "license", "listing"}, {"build", "license"})
            paths = {}
            for key in ("build", "license"):
                if not isinstance(model[key], str) or not model[key] or "\0" in model[key]:
                    raise r.fail(f"{where}.model.{key}", f"expected a file path, got {_show(model[key])}")
                paths[key] = (path.parent / model[key]).resolve()
            ref = ModelRef(build=paths["build"], license=paths["license"])
        bindings = {}
        for in_name, value in r.mapping(obj["inputs"], f"{where}.inputs").items():
            bindings[str(in_name)] = r.binding(value, f"{where}.inputs.{in_name}")
        stage = StageSpec(stage_name, vendor, ref, bindings)
        _check_refs(r, stage.refs(), stages, inputs, f"{where}.inputs")
        stages.append(stage)

    outputs: dict[str, Binding] = {}
    for key, value in r.mapping(top["outputs"], "outputs").items():
        r.name(key, f"outputs.{key}")
        outputs[key] = r.binding(value, f"outputs.{key}")
        _check_refs(r, set(outputs[key].refs()), stages, inputs, f"outputs.{key}")
    if not outputs:
        raise r.fail("outputs", "name at least one chain output")
    return ChainSpec(path, tuple(stages), inputs, outputs, isolation, slots, timeouts, name)


def _check_refs(
    r: _Reader, refs: set[str], earlier: list[StageSpec], inputs: dict[str, Any], where: str
) -> None:
    for ref in sorted(refs):
        stage, tensor = split_ref(ref)
        if "." not in ref:
            if inputs and ref not in inputs:
                raise r.fail(where, f"{_show(ref)} is not a chain input (inputs: {', '.join(inputs)})")
            if not _NAME.match(ref):
                raise r.fail(where, f"bad tensor reference {_show(ref)} (use 'input' or 'stage.output')")
        elif not tensor or not any(s.name == stage for s in earlier):
            raise r.fail(where, f"{_show(ref)} does not name an output of an earlier stage")


def parse_binding(value: Any, path: Path, where: str) -> Binding:
    """One binding (as written in a chain file or by Binding.to_dict) back into a Binding."""
    return _Reader(path).binding(value, where)


def parse_chain_text(text: str, path: Path) -> ChainSpec:
    """Parse the text of a chain file: JSON when ``path`` ends in .json, else YAML (bounded: size,
    nesting, alias expansion); relative build/license paths resolve against ``path``."""
    if len(text) > MAX_CHAIN_BYTES:
        raise UsageError(f"{path}: {len(text)} characters exceeds the chain file limit of {MAX_CHAIN_BYTES}")
    if path.suffix.lower() != ".json":
        from edgemart.core.safe_yaml import YamlLimits, load_yaml  # stage workers never read YAML

        limits = YamlLimits(max_chars=MAX_CHAIN_BYTES)
        return parse_chain(load_yaml(text, what=f"{path}: not valid YAML", limits=limits), path)
    try:
        data = json.loads(text, parse_int=_json_int, parse_constant=_json_constant)
    except ValueError as exc:  # JSONDecodeError is a ValueError
        raise UsageError(f"{path}: not valid JSON: {exc}") from None
    except RecursionError:
        raise UsageError(f"{path}: not valid JSON: nested too deeply") from None
    return parse_chain(data, path)


def _json_int(text: str) -> int:
    if len(text) > _MAX_JSON_INT_DIGITS:
        raise ValueError(f"integer longer than {_MAX_JSON_INT_DIGITS} digits")
    return int(text)


def _json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def load_chain(path: str | Path) -> ChainSpec:
    """Read and parse a chain file (.yaml, .yml or .json)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CHAIN_BYTES + 1)
    except FileNotFoundError:
        raise UsageError(f"chain file not found: {path}") from None
    except OSError as exc:
        raise UsageError(f"cannot read chain file {path}: {exc}") from None
    if len(raw) > MAX_CHAIN_BYTES:
        raise UsageError(f"chain file {path} is larger than the limit of {MAX_CHAIN_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"cannot read chain file {path}: {exc}") from None
    return parse_chain_text(text, path)
