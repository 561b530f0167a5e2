# Why this is one module: the supervisor's start, feed, watch and shutdown share the stage processes and slot rings it owns.
"""The chain supervisor: starts one process per vendor (or stage), checks signatures, feeds frames.

Frames go into supervisor-owned slots; stages pass tensors to each other through their own slots;
the supervisor reads the chain outputs in place and copies them out. It never opens a model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from edge_runtime.chain.check import check_signatures
from edge_runtime.chain.node import Node
from edge_runtime.chain.slots import Channel, PeerGone, SlotError
from edge_runtime.chain.spec import SUPERVISOR, ChainSpec, Timeouts, load_chain
from edge_runtime.chain.steps import TensorType, apply
from edgemart.core.errors import EdgemartError, LicenseRefused, UsageError

_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


class StageFailed(EdgemartError):
    """A chain stage died, hung or reported an error; the chain was stopped."""

    exit_code = 1
    http_status = 500
    code = "stage_failed"

    def __init__(
        self,
        message: str,
        *,
        stage: str = "",
        pid: int | None = None,
        returncode: int | None = None,
        kind: str = "",
    ) -> None:
        super().__init__(message)
        self.stage = stage
        self.pid = pid
        self.returncode = returncode
        self.kind = kind


class StageHung(StageFailed):
    """A chain stage made no progress within the frame timeout."""

    code = "stage_hung"


class StageRefused(LicenseRefused):
    """A stage's license refused the run (opaque, like every license refusal)."""

    def __init__(self, stage: str) -> None:
        super().__init__(f"stage {stage!r}: license refused")
        self.stage = stage


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


@dataclass
class _Process:
    name: str
    stages: list[str]
    popen: subprocess.Popen[bytes]
    control: Channel

    @property
    def label(self) -> str:
        which = ", ".join(repr(s) for s in self.stages)
        return f"stage{'s' if len(self.stages) > 1 else ''} {which} ({self.name}, pid {self.popen.pid})"


@dataclass
class ChainStats:
    """Per-stage compute latency (ms, measured in the stage process) and end-to-end figures."""

    stage_ms: dict[str, list[float]] = field(default_factory=dict)
    frame_ms: list[float] = field(default_factory=list)
    frames: int = 0
    first_in: float | None = None
    last_out: float | None = None

    def report(self) -> dict[str, Any]:
        def pct(values: list[float]) -> dict[str, float | None]:
            if not values:
                return {"p50_ms": None, "p99_ms": None, "mean_ms": None}
            a = np.asarray(values)
            return {
                "p50_ms": float(np.percentile(a, 50)),
                "p99_ms": float(np.percentile(a, 99)),
                "mean_ms": float(a.mean()),
            }

        wall = (
            (self.last_out - self.first_in)
            if self.first_in is not None and self.last_out is not None
            else 0.0
        )
        return {
            "frames": self.frames,
            "wall_s": wall,
            "throughput_fps": (self.frames / wall) if wall > 0 else None,
            "end_to_end": pct(self.frame_ms),
            "stages": {name: {"frames": len(v), **pct(v)} for name, v in self.stage_ms.items()},
        }


class Chain:
    """A running chain of licensed models. Use as a context manager, or start()/stop().

    >>> with Chain.from_file("face.yaml", device_dir) as chain:
    ...     out = chain.run({"image": frame})"""

    def __init__(self, spec: ChainSpec, device_dir: str | Path, *, timeouts: Timeouts | None = None) -> None:
        self.spec = spec if timeouts is None else replace(spec, timeouts=timeouts)
        self.device_dir = Path(device_dir)
        self.stats = ChainStats({s.name: [] for s in spec.stages})
        self._processes: dict[str, _Process] = {}
        self._node: Node | None = None
        self._input_types: dict[str, TensorType | None] = {}
        self._output_types: dict[str, TensorType] = {}
        self._next_seq = 0
        self._last_done = {s.name: -1 for s in spec.stages}
        self._last_progress = 0.0
        self._running = False
        self._chain_inputs = sorted(
            {r for s in spec.stages for r in s.refs() if "." not in r}
            | {r for b in spec.outputs.values() for r in b.refs() if "." not in r}
        )

    @classmethod
    def from_file(
        cls, path: str | Path, device_dir: str | Path, *, timeouts: Timeouts | None = None
    ) -> Chain:
        return cls(load_chain(path), device_dir, timeouts=timeouts)

    # --- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Chain:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def stage_pids(self) -> dict[str, int]:
        return {stage: p.popen.pid for p in self._processes.values() for stage in p.stages}

    @property
    def processes(self) -> dict[str, list[str]]:
        """Process name ('vendor:<label>' or 'stage:<name>') -> the stages it runs."""
        return {
            name: list(stages)
            for name, stages in ((n, [s.name for s in group]) for n, group in self.spec.processes().items())
        }

    @property
    def input_types(self) -> dict[str, TensorType | None]:
        """Chain input name -> the type frames must have (None where nothing constrains it)."""
        return {name: self._input_types.get(name) for name in self._chain_inputs}

    def start(self) -> Chain:
        """Spawn the stage processes, let them load their models, check shapes and dtypes."""
        if self._running:
            return self
        if not self.device_dir.is_dir():
            raise UsageError(f"device directory not found: {self.device_dir}")
        try:
            self._spawn()
            signatures = self._await_loaded()
            self._input_types, self._output_types = check_signatures(self.spec, signatures)
            for process in self._processes.values():
                process.control.send({"t": "go"})
        except BaseException:
            self.stop()
            raise
        self._running = True
        self._last_progress = time.monotonic()
        return self

    def _hoisted(self) -> dict[tuple[str, str], tuple[str, str]]:
        """Input steps computed upstream: (stage, input) -> (process, key) for each stage input whose steps
        read only chain inputs and the outputs of one other stage process. That process computes the input
        (it holds every tensor the steps read) and publishes it as one tensor, so the consumer receives the
        prepared input instead of its ingredients and the work of the steps sits beside the producer's model:
        on two cores a chain whose downstream stage also crops and resizes is balanced this way. Nothing
        crosses a vendor boundary that did not before: the producer already held every tensor read."""
        out: dict[tuple[str, str], tuple[str, str]] = {}
        for stage in self.spec.stages:
            home = self.spec.process_of(stage)
            for name, binding in stage.inputs.items():
                if not binding.steps:
                    continue
                owners = {self.spec.producer_of(r) for r in binding.refs()} - {SUPERVISOR}
                if len(owners) == 1 and (owner := next(iter(owners))) != home:
                    out[(stage.name, name)] = (owner, f"@{stage.name}:{name}")
        return out

    def _routes(self) -> tuple[dict[str, dict[str, list[str]]], dict[str, dict[str, str]]]:
        produces: dict[str, dict[str, list[str]]] = {}
        consumes: dict[str, dict[str, str]] = {}
        hoisted = self._hoisted()
        readers: list[tuple[str, set[str]]] = []
        for stage in self.spec.stages:
            refs: set[str] = set()
            for name, binding in stage.inputs.items():
                if (stage.name, name) in hoisted:
                    owner, key = hoisted[(stage.name, name)]
                    refs.add(key)
                    readers.append((owner, set(binding.refs())))
                else:
                    refs.update(binding.refs())
            readers.append((self.spec.process_of(stage), refs))
        readers.append((SUPERVISOR, {r for b in self.spec.outputs.values() for r in b.refs()}))
        made_by = {key: owner for owner, key in hoisted.values()}
        for consumer, refs in readers:
            for ref in sorted(refs):
                producer = made_by.get(ref) or self.spec.producer_of(ref)
                if producer == consumer:
                    continue
                peers = produces.setdefault(producer, {}).setdefault(ref, [])
                if consumer not in peers:
                    peers.append(consumer)
                consumes.setdefault(consumer, {})[ref] = producer
        return produces, consumes

    def _spawn(self) -> None:
        produces, consumes = self._routes()
        hoisted = self._hoisted()
        groups = self.spec.processes()
        pairs = sorted(
            {tuple(sorted((p, c))) for p, keys in produces.items() for peers in keys.values() for c in peers}
        )
        ends: dict[str, dict[str, Channel]] = {name: {} for name in [*groups, SUPERVISOR]}
        for a, b in pairs:
            end_a, end_b = Channel.pair(a, b)
            ends[a][b], ends[b][a] = end_a, end_b
        self._node = Node(
            SUPERVISOR,
            ends[SUPERVISOR],
            produces.get(SUPERVISOR, {}),
            consumes.get(SUPERVISOR, {}),
            self.spec.slots,
        )
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
        try:
            for name, stages in groups.items():
                ours, theirs = Channel.pair(SUPERVISOR, name)
                try:
                    popen = subprocess.Popen(
                        [sys.executable, "-m", "edge_runtime.chain.worker", str(theirs.fileno())],
                        pass_fds=(theirs.fileno(),),
                        stdin=subprocess.DEVNULL,
                        env=env,
                        start_new_session=True,  # Ctrl-C reaches the supervisor only; it stops stages in order
                    )
                finally:
                    theirs.close()
                self._processes[name] = _Process(name, [s.name for s in stages], popen, ours)
                hops = ends[name]
                config = {
                    "t": "config",
                    "process": name,
                    "chain_path": str(self.spec.path),
                    "device_dir": str(self.device_dir.resolve()),
                    "slots": self.spec.slots,
                    "hops": list(hops),
                    "produces": produces.get(name, {}),
                    "consumes": consumes.get(name, {}),
                    "stages": [
                        {
                            "name": s.name,
                            "model": s.model.to_dict(),
                            "inputs": {
                                k: {"from": hoisted[(s.name, k)][1], "steps": []}
                                if (s.name, k) in hoisted
                                else b.to_dict()
                                for k, b in s.inputs.items()
                            },
                        }
                        for s in stages
                    ],
                    "derived": [
                        {"key": key, "binding": self.spec.stage(st).inputs[inp].to_dict()}
                        for (st, inp), (owner, key) in sorted(hoisted.items())
                        if owner == name
                    ],
                }
                ours.send(config, [c.fileno() for c in hops.values()])
        finally:
            for name in groups:
                for channel in ends[name].values():
                    channel.close()  # the worker has its own copy now (or was never started)
        for process in self._processes.values():
            self._node.add_control(process.control)

    def _await_loaded(self) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + self.spec.timeouts.start
        waiting = dict(self._processes)
        signatures: dict[str, dict[str, Any]] = {}
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                slow = next(iter(waiting.values()))
                raise StageHung(
                    f"{slow.label} did not load its model within {self.spec.timeouts.start:g} s",
                    stage=slow.stages[0],
                    pid=slow.popen.pid,
                    kind="start_timeout",
                )
            for channel, message in self._pump(min(remaining, 0.5)):
                process = self._process_of(channel)
                if message.get("t") == "loaded":
                    signatures.update(message["signatures"])
                    waiting.pop(process.name, None)
                else:
                    self._raise_reported(process, message)
        return signatures

    def stop(self) -> None:
        """Stop every stage process, reclaim all slots and sockets. Safe to call more than once."""
        self._running = False
        deadline = time.monotonic() + self.spec.timeouts.stop
        for process in self._processes.values():
            if process.popen.poll() is None:
                try:
                    process.control.send({"t": "stop"})
                except (PeerGone, OSError):
                    pass  # already gone; reaped below
        for process in self._processes.values():
            try:
                process.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.popen.kill()  # hung or stopped (SIGSTOP): SIGKILL still works
                process.popen.wait()
            process.control.close()
        self._processes.clear()
        if self._node is not None:
            self._node.close()
            self._node = None

    # --- frames ------------------------------------------------------------------------------

    def run(self, frame: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one frame through the chain and return the chain outputs (copies)."""
        results = list(self.run_many([frame]))
        return results[0]

    def run_many(self, frames: Iterable[Mapping[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
        """Pipelined: keeps several frames in flight and yields outputs in frame order."""
        if not self._running or self._node is None:
            raise UsageError("the chain is not started (use start() or a with-block)")
        node = self._node
        source = iter(frames)
        pending: deque[tuple[int, float, dict[str, np.ndarray]]] = deque()
        exhausted = False
        max_in_flight = self.spec.slots * (len(self.spec.stages) + 1)
        try:
            while True:
                while (
                    not exhausted
                    and len(pending) < max_in_flight
                    and all(node.can_publish(k, self._next_seq) for k in node.produces)
                ):
                    try:
                        frame = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    seq = self._next_seq
                    arrays = self._validate(frame, seq)
                    if not pending:
                        self._last_progress = time.monotonic()
                    t0 = time.perf_counter()
                    if self.stats.first_in is None:
                        self.stats.first_in = t0
                    for key in node.produces:
                        node.publish(key, seq, arrays[key])
                    pending.append((seq, t0, arrays))
                    self._next_seq += 1
                if pending and all(node.has(r, pending[0][0]) for r in node.consumes):
                    seq, t0, arrays = pending.popleft()
                    result = self._collect(seq, arrays)
                    now = time.perf_counter()
                    self.stats.frame_ms.append((now - t0) * 1000.0)
                    self.stats.frames += 1
                    self.stats.last_out = now
                    self._last_progress = time.monotonic()
                    yield result
                    continue
                if exhausted and not pending:
                    self._drain_done()
                    return
                wait = self._last_progress + self.spec.timeouts.frame - time.monotonic()
                if wait <= 0:
                    self._raise_hung(pending[0][0])
                for channel, message in self._pump(min(wait, 1.0)):
                    self._on_control(channel, message)
        except GeneratorExit:
            # The caller stopped iterating. With frames still in flight the pipeline cannot be resumed
            # in order, so the chain stops and reclaims every slot; otherwise it stays usable.
            if pending:
                self.stop()
            raise
        except BaseException:
            # A failure or Ctrl-C: stop every stage and reclaim every slot before reporting.
            self.stop()
            raise

    def _drain_done(self) -> None:
        """Stage timings arrive on the control sockets, possibly just after the last output: collect them."""
        last = self._next_seq - 1
        deadline = time.monotonic() + 1.0
        while any(done < last for done in self._last_done.values()) and time.monotonic() < deadline:
            for channel, message in self._pump(0.05):
                self._on_control(channel, message)

    def _pump(self, timeout: float) -> list[tuple[Channel, dict[str, Any]]]:
        assert self._node is not None
        try:
            return self._node.pump(timeout)
        except PeerGone:
            self._raise_dead()
        except SlotError as exc:
            raise StageFailed(f"slot protocol error: {exc.message}", kind="protocol") from None

    def _on_control(self, channel: Channel, message: dict[str, Any]) -> None:
        process = self._process_of(channel)
        if message.get("t") == "done":  # a batch of [stage, frame, ms] (see chain_worker._flush_done)
            for stage, seq, ms in message["runs"]:
                self.stats.stage_ms[stage].append(float(ms))
                self._last_done[stage] = max(self._last_done[stage], int(seq))
            self._last_progress = time.monotonic()
        else:
            self._raise_reported(process, message)

    def _process_of(self, channel: Channel) -> _Process:
        return next(p for p in self._processes.values() if p.control is channel)

    def _raise_reported(self, process: _Process, message: dict[str, Any]) -> NoReturn:
        if message.get("t") != "error":
            raise StageFailed(
                f"{process.label} sent an unexpected {message.get('t')!r} message", kind="protocol"
            )
        stage = str(message.get("stage", process.stages[0]))
        if message.get("kind") == "license_refused":
            raise StageRefused(stage)
        text = (
            f"stage {stage!r} ({process.name}, pid {process.popen.pid}) failed: {message.get('message', '')}"
        )
        if message.get("exit_code") == 2:
            raise UsageError(text)
        raise StageFailed(text, stage=stage, pid=process.popen.pid, kind=str(message.get("kind", "")))

    def _raise_dead(self) -> NoReturn:
        """A peer closed a socket: find the process that exited and say how."""
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            for process in self._processes.values():
                if process.popen.poll() is not None:
                    raise StageFailed(
                        f"{process.label} {describe_exit(process.popen.returncode)}",
                        stage=process.stages[0],
                        pid=process.popen.pid,
                        returncode=process.popen.returncode,
                        kind="died",
                    )
            time.sleep(0.01)
        raise StageFailed("a stage process closed its channel without exiting", kind="died")

    def _raise_hung(self, seq: int) -> NoReturn:
        for stage in self.spec.stages:
            if self._last_done[stage.name] < seq:
                process = self._processes[self.spec.process_of(stage)]
                if process.popen.poll() is not None:
                    self._raise_dead()
                raise StageHung(
                    f"stage {stage.name!r} ({process.name}, pid {process.popen.pid}) made no progress on frame {seq} "
                    f"within {self.spec.timeouts.frame:g} s",
                    stage=stage.name,
                    pid=process.popen.pid,
                    kind="hung",
                )
        raise StageHung(f"frame {seq} made no progress within {self.spec.timeouts.frame:g} s", kind="hung")

    def _validate(self, frame: Mapping[str, np.ndarray], seq: int) -> dict[str, np.ndarray]:
        if not isinstance(frame, Mapping):
            raise UsageError(
                f"frame {seq}: expected a mapping of input name to array, got {type(frame).__name__}"
            )
        arrays: dict[str, np.ndarray] = {}
        for name in self._chain_inputs:
            if name not in frame:
                raise UsageError(
                    f"frame {seq}: missing chain input {name!r} (inputs: {', '.join(self._chain_inputs)})"
                )
            array = np.asarray(frame[name])
            expected = self._input_types.get(name)
            if expected is not None:
                if expected.dtype is not None and array.dtype.name != expected.dtype:
                    raise UsageError(
                        f"frame {seq}: input {name!r} is {array.dtype.name}, the chain expects {expected.dtype}"
                    )
                if expected.shape is not None and (
                    array.ndim != len(expected.shape)
                    or any(d is not None and d != a for d, a in zip(expected.shape, array.shape, strict=True))
                ):
                    raise UsageError(
                        f"frame {seq}: input {name!r} has shape {list(array.shape)}, "
                        f"the chain expects {expected.describe()}"
                    )
            arrays[name] = array
        return arrays

    def _collect(self, seq: int, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self._node is not None
        node = self._node

        def fetch(ref: str) -> np.ndarray:
            return arrays[ref] if "." not in ref else node.view(ref, seq)

        result: dict[str, np.ndarray] = {}
        for name, binding in self.spec.outputs.items():
            value = fetch(binding.source)
            for step in binding.steps:
                value = apply(step, value, fetch)
            result[name] = np.array(value, copy=True)  # the slot is released next; hand out our own copy
        node.cork()  # one "released" packet per producer for this frame
        try:
            for ref in node.consumes:
                node.release(ref, seq)
        finally:
            node.uncork()
        return result


def run_chain(
    chain_path: str | Path,
    device_dir: str | Path,
    frames: Iterable[Mapping[str, np.ndarray]],
    *,
    keep_outputs: bool = False,
) -> tuple[dict[str, Any], list[dict[str, np.ndarray]]]:
    """Run `frames` through a chain file; returns the stats report and (optionally) the outputs."""
    outputs: list[dict[str, np.ndarray]] = []
    with Chain.from_file(chain_path, device_dir) as chain:
        for result in chain.run_many(frames):
            if keep_outputs:
                outputs.append(result)
        report = chain.stats.report()
        report["processes"] = chain.processes
    return report, outputs
