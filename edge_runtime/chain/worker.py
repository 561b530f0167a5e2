"""A chain stage process: opens its own licensed models and runs its stages as frames arrive.

Started by the supervisor (edge_runtime.chain) as `python -m edge_runtime.chain.worker FD`, where
FD is its control socket. A vendor's decrypted weights live only in this process."""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.chain.node import Node
from edge_runtime.chain.slots import DTYPES, Channel, PeerGone
from edge_runtime.chain.spec import parse_binding
from edge_runtime.chain.steps import apply
from edgemart.core.errors import EdgemartError, LicenseRefused

_DONE_BATCH = 16


@dataclass
class _Stage:
    name: str
    model_ref: dict[str, str]
    bindings: dict[str, Any]  # input name -> Binding
    refs: list[str]
    model: Any = None
    next_seq: int = 0
    local_consumers: list[str] = field(default_factory=list)  # stages in this process that read our outputs
    remote_outputs: set[str] = field(default_factory=set)  # our output keys that other processes read
    local_outputs: dict[str, int] = field(default_factory=dict)  # output key -> local reader count
    # A stage input computed here for a stage of another process (supervisor._hoisted): no model; its one
    # binding ("value") is published as this key.
    derived_key: str | None = None
    # Outputs the model writes straight into their slots (name, key, shape, dtype): read only by other
    # processes, of a static shape. None until the model is open; [] when there are none (or that failed).
    direct: list[tuple[str, str, tuple[int, ...], str]] | None = None


def _open_models(device_dir: str, stages: list[_Stage], control: Channel) -> bool:
    from edge_runtime import Device

    device = Device.open(Path(device_dir))
    for stage in stages:
        if stage.derived_key is not None:
            continue
        try:
            ref = stage.model_ref
            if "listing" in ref:
                stage.model = device.open_model(listing=ref["listing"])
            else:
                stage.model = device.open_model(
                    build_path=Path(ref["build"]), license_bytes=Path(ref["license"]).read_bytes()
                )
        except (EdgemartError, OSError) as exc:
            _report(control, stage.name, exc)
            return False
    return True


def _report(control: Channel, stage: str, exc: BaseException) -> None:
    if isinstance(exc, EdgemartError):
        kind = "license_refused" if isinstance(exc, LicenseRefused) else exc.code
        message, exit_code = exc.message, exc.exit_code
    else:  # OSError on a build or license path
        kind, message, exit_code = "os_error", f"{type(exc).__name__}: {exc}", 2
    try:
        control.send({"t": "error", "stage": stage, "kind": kind, "message": message, "exit_code": exit_code})
    except PeerGone:
        pass


def _signature(model: Any) -> dict[str, Any]:
    def spec(t: Any) -> dict[str, Any]:
        return {
            "name": t.name,
            "shape": [None if d is None else int(d) for d in t.shape],
            "dtype": str(t.dtype),
        }

    return {"inputs": [spec(t) for t in model.inputs], "outputs": [spec(t) for t in model.outputs]}


class Worker:
    def __init__(self, control: Channel, config: dict[str, Any], hop_fds: list[int]) -> None:
        self.control = control
        self.config = config
        hops = {peer: Channel.from_fd(fd, peer) for peer, fd in zip(config["hops"], hop_fds, strict=True)}
        self.node = Node(
            config["process"], hops, config["produces"], config["consumes"], int(config["slots"]), [control]
        )
        chain_path = Path(config["chain_path"])
        self.stages: list[_Stage] = []
        for raw in config["stages"]:
            bindings = {
                name: parse_binding(b, chain_path, f"stages.{raw['name']}.inputs.{name}")
                for name, b in raw["inputs"].items()
            }
            refs = sorted({r for b in bindings.values() for r in b.refs()})
            self.stages.append(_Stage(raw["name"], raw["model"], bindings, refs))
        for raw in config.get("derived", []):
            binding = parse_binding(raw["binding"], chain_path, f"derived {raw['key']}")
            refs = sorted(set(binding.refs()))
            self.stages.append(_Stage(raw["key"], {}, {"value": binding}, refs, derived_key=raw["key"]))
        by_name = {s.name: s for s in self.stages}
        for stage in self.stages:
            for ref in stage.refs:
                producer = by_name.get(ref.split(".", 1)[0]) if "." in ref else None
                if producer is not None:
                    producer.local_outputs[ref] = producer.local_outputs.get(ref, 0) + 1
                    if stage.name not in producer.local_consumers:
                        producer.local_consumers.append(stage.name)
        for stage in self.stages:
            if stage.derived_key is not None:
                stage.remote_outputs = {stage.derived_key} & set(config["produces"])
            else:
                stage.remote_outputs = {k for k in config["produces"] if k.split(".", 1)[0] == stage.name}
        self._by_name = by_name
        self._local: dict[tuple[str, int], list[Any]] = {}  # (key, seq) -> [array, readers left]
        self._remote_left: dict[tuple[str, int], int] = {}
        self._done: list[list[Any]] = []  # [stage, frame, ms] not yet reported (see _flush_done)
        self._reader_count = {
            ref: sum(ref in s.refs for s in self.stages) for s in self.stages for ref in s.refs
        }

    # --- scheduling ------------------------------------------------------------------------

    def _available(self, ref: str, seq: int) -> bool:
        if "." in ref and ref.split(".", 1)[0] in self._by_name:
            return (ref, seq) in self._local
        return self.node.has(ref, seq)

    def _runnable(self, stage: _Stage) -> bool:
        n = stage.next_seq
        if not all(self._available(ref, n) for ref in stage.refs):
            return False
        if not all(self.node.can_publish(key, n) for key in stage.remote_outputs):
            return False
        k = self.node.k
        return all(n - self._by_name[c].next_seq < k for c in stage.local_consumers)

    def _fetch(self, ref: str, seq: int) -> np.ndarray:
        local = self._local.get((ref, seq))
        return local[0] if local is not None else self.node.view(ref, seq)

    def _run(self, stage: _Stage) -> None:
        self.node.cork()
        try:
            self._run_corked(stage)
        finally:
            self.node.uncork()

    def _run_corked(self, stage: _Stage) -> None:
        n = stage.next_seq
        t0 = time.perf_counter()
        feeds = {}
        for name, binding in stage.bindings.items():
            value = self._fetch(binding.source, n)
            for step in binding.steps:
                value = apply(step, value, lambda r: self._fetch(r, n))
            feeds[name] = value
        if stage.derived_key is not None:
            outputs = {stage.derived_key: feeds["value"]}
        elif self._direct(stage):
            outputs = self._run_direct(stage, n, feeds)
        else:
            outputs = stage.model.run(feeds)
        feeds.clear()  # drop our references to peer slots before releasing them
        for out_name, array in outputs.items():
            key = out_name if stage.derived_key is not None else f"{stage.name}.{out_name}"
            if key in stage.remote_outputs:
                self.node.publish(key, n, array)
            if stage.local_outputs.get(key):
                self._local[(key, n)] = [array, stage.local_outputs[key]]
        elapsed_ms = (time.perf_counter() - t0) * 1000.0
        for ref in stage.refs:
            local = self._local.get((ref, n))
            if local is not None:
                local[1] -= 1
                if local[1] == 0:
                    del self._local[(ref, n)]
                continue
            left = self._remote_left.get((ref, n), self._reader_count[ref]) - 1
            if left:
                self._remote_left[(ref, n)] = left
            else:
                self._remote_left.pop((ref, n), None)
                self.node.release(ref, n)
        stage.next_seq = n + 1
        if stage.derived_key is None:
            self._done.append([stage.name, n, elapsed_ms])
        if len(self._done) >= _DONE_BATCH:
            self._flush_done()

    def _direct(self, stage: _Stage) -> list[tuple[str, str, tuple[int, ...], str]]:
        if stage.direct is None:
            stage.direct = [
                (spec.name, key, tuple(spec.shape), spec.dtype)
                for spec in stage.model.outputs
                if (key := f"{stage.name}.{spec.name}") in stage.remote_outputs
                and not stage.local_outputs.get(key)
                and None not in spec.shape
                and spec.dtype in DTYPES
            ]
        return stage.direct

    def _run_direct(self, stage: _Stage, n: int, feeds: dict[str, Any]) -> dict[str, Any]:
        """Run the model with its remote-only outputs written straight into their slots (onnxruntime through
        IOBinding, LiteRT from its tensor buffers): no copy of those outputs in this process. The rest come
        back as usual. A model whose outputs turn out not to match their declared shapes falls back to run()
        for good (that frame's first attempt counts as a run: it was computed)."""
        assert stage.direct is not None
        out = {name: self.node.reserve(key, n, shape, dtype) for name, key, shape, dtype in stage.direct}
        try:
            outputs = stage.model.run_into(feeds, out)
        except (ValueError, RuntimeError, EdgemartError) as exc:
            out.clear()
            if isinstance(exc, LicenseRefused) or stage.next_seq > 0:
                raise
            stage.direct = []
            return dict(stage.model.run(feeds))
        for name, key, _, _ in stage.direct:
            self.node.commit(key, n, out[name])
        rest = {name: value for name, value in outputs.items() if name not in out}
        out.clear()  # no view of a slot outlives this frame
        return rest

    def _flush_done(self) -> None:
        """Stage timings go to the supervisor in one message when this process is about to wait (or every
        _DONE_BATCH frames): one wake-up of the supervisor per batch instead of one per frame and stage."""
        if self._done:
            done, self._done = self._done, []
            self.control.send({"t": "done", "runs": done})

    def loop(self) -> int:
        while True:
            progressed = False
            for stage in self.stages:
                if self._runnable(stage):
                    try:
                        self._run(stage)
                    except (EdgemartError, ValueError, RuntimeError) as exc:
                        # ValueError/RuntimeError: a step or the backend rejected this frame's data.
                        if not isinstance(exc, EdgemartError):
                            exc = EdgemartError(
                                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                            )
                        if isinstance(exc, PeerGone):
                            raise
                        _report(self.control, stage.name, exc)
                        return self.wait_for_stop()
                    progressed = True
            if not progressed:
                self._flush_done()
            for _, message in self.node.pump(0 if progressed else None):
                if message.get("t") == "stop":
                    return 0

    def wait_for_stop(self) -> int:
        """After a failure: hold still (keeping our slots mapped) until the supervisor says stop."""
        while True:
            try:
                message, fds = self.control.recv(None)
            except PeerGone:
                return 0
            for fd in fds:
                os.close(fd)
            if message.get("t") == "stop":
                return 0

    def close(self) -> None:
        for stage in self.stages:
            if stage.model is not None:
                stage.model.close()
                stage.model = None
        self.node.close()


def main(argv: list[str]) -> int:
    # Ctrl-C goes to the supervisor, which stops us in order; we never die half-way through a slot.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    control = Channel.from_fd(int(argv[0]), "supervisor")
    try:
        config, fds = control.recv_expect("config", timeout=60.0)
    except (PeerGone, TimeoutError):
        return 3
    worker = Worker(control, config, fds)
    try:
        if not _open_models(config["device_dir"], worker.stages, control):
            return worker.wait_for_stop()
        signatures = {s.name: _signature(s.model) for s in worker.stages if s.derived_key is None}
        control.send({"t": "loaded", "signatures": signatures})
        message, _ = control.recv(None)
        if message.get("t") != "go":
            return 0
        return worker.loop()
    except PeerGone:
        # The supervisor or a peer went away: the supervisor reports the culprit; we just leave.
        return worker.wait_for_stop()
    finally:
        worker.close()
        control.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
