# Why this is one module: the run ledger's commit order (usage log, anchor, sealed state) must be read as one protocol; splitting it would scatter the crash-safety argument.
"""The device's rollback-resistant ledger: sealed state, the signed usage log, the anchor and the audit log.

Every commit appends exactly one signed usage record, then writes the anchor, then the state, each
durably; a crash at any point leaves at most one log record ahead, which the next load rolls forward.
Runs are counted in reservations: a "run" record with detail "reserve:<n>" raises a license's counter by
n before any of those runs is computed, "release:<n>" gives back the unused part when the model closes."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import drm
from drm._canonical import FormatError
from drm.usagelog import genesis, parse_record
from edge_runtime.anchor import Anchor, AnchorError, FileAnchor
from edgemart.core import fileio

STATE_VERSION = 1
_TAIL_BYTES = 3 * 4096 + 2  # two whole records at most 4 KiB each, plus slack


@dataclass(frozen=True)
class Policy:
    """Security-relevant device settings (explicit, with safe defaults)."""

    clock_tolerance: int = 120  # seconds the system clock may lag the high-water mark before it is a rollback
    max_license_bytes: int = 64 * 1024
    max_build_bytes: int = 1024**3
    # Runs a LicensedModel reserves (one durable commit) before computing them; unused ones are given back
    # on close, and lost (never granted twice) when the process dies. 1 = one durable commit per run.
    reserve_block: int = 64

    def __post_init__(self) -> None:
        if self.reserve_block < 1:
            raise drm.UsageError(f"reserve_block must be at least 1, not {self.reserve_block}")


DEFAULT_POLICY = Policy()


@dataclass
class State:
    generation: int
    hwm: int  # high-water mark of trusted time (clock readings and license issue times)
    clock_hwm: int  # highest system-clock reading seen (rollback detection compares against this)
    runs: dict[str, int]
    revocation_version: int
    log_seq: int  # number of records in usage.log
    log_head: str  # sha256 tag of the last record line (genesis tag when empty)
    rollbacks: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    # Installed bundle release per fleet (drm.bundle.Release): a lower version is refused without a
    # signed downgrade allowance. Absent from the sealed bytes while empty (older states stay identical).
    bundles: dict[str, int] = field(default_factory=dict)
    # What anchors this state when it is not the default file anchor: {"kind": "tpm", "base": counter at
    # generation 0}. Sealed, so deleting DIR/anchor.json cannot switch a TPM-anchored device to a file.
    anchor: dict[str, Any] = field(default_factory=dict)
    # Licenses whose signatures this device verified: "<token hash>:<root hash>" -> {"rv": revocation version,
    # "first"/"last": seconds the certificate chain is valid, "at": trusted time of the check}. A cache only,
    # persisted with the next commit: see device._cached_verification; losing it costs one verification.
    verified: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self, kind: str = "state") -> dict[str, Any]:
        out = {
            "clock_hwm": self.clock_hwm,
            "generation": self.generation,
            "hwm": self.hwm,
            "kind": kind,
            "log": {"head": self.log_head, "seq": self.log_seq},
            "revocation_version": self.revocation_version,
            "rollbacks": self.rollbacks,
            "runs": dict(sorted(self.runs.items())),
            "v": STATE_VERSION,
            **({"verified": self.verified} if self.verified else {}),
        }
        if self.bundles:
            out["bundles"] = dict(sorted(self.bundles.items()))
        if self.anchor:
            out["anchor"] = dict(sorted(self.anchor.items()))
        return out

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> State:
        if obj.get("kind") != "state" or obj.get("v") != STATE_VERSION:
            raise FormatError("not a device state")
        log = obj["log"]
        runs = obj["runs"]
        if not isinstance(runs, dict) or not all(isinstance(v, int) for v in runs.values()):
            raise FormatError("bad run counters")
        anchor = obj.get("anchor", {})
        if (
            not isinstance(anchor, dict)
            or anchor.get("kind", "tpm") != "tpm"
            or not isinstance(anchor.get("base", 0), int)
        ):
            raise FormatError("bad anchor")
        bundles = obj.get("bundles", {})
        if not isinstance(bundles, dict) or not all(isinstance(v, int) for v in bundles.values()):
            raise FormatError("bad bundle releases")
        return cls(
            generation=int(obj["generation"]),
            hwm=int(obj["hwm"]),
            clock_hwm=int(obj["clock_hwm"]),
            runs=dict(runs),
            revocation_version=int(obj["revocation_version"]),
            log_seq=int(log["seq"]),
            log_head=str(log["head"]),
            rollbacks=int(obj.get("rollbacks", 0)),
            bundles=dict(bundles),
            anchor=dict(anchor),
            verified=_verified_cache(obj.get("verified", {})),
        )

    def copy(self) -> State:
        return State(
            self.generation,
            self.hwm,
            self.clock_hwm,
            dict(self.runs),
            self.revocation_version,
            self.log_seq,
            self.log_head,
            self.rollbacks,
            bundles=dict(self.bundles),
            anchor=dict(self.anchor),
            verified={k: dict(v) for k, v in self.verified.items()},
        )


_VERIFIED_FIELDS = frozenset({"rv", "first", "last", "at"})


def _verified_cache(obj: Any) -> dict[str, dict[str, int]]:
    if not isinstance(obj, dict) or not all(
        isinstance(k, str)
        and isinstance(v, dict)
        and set(v) == _VERIFIED_FIELDS
        and all(type(n) is int for n in v.values())
        for k, v in obj.items()
    ):
        raise FormatError("bad verified-license cache")
    return {k: dict(v) for k, v in obj.items()}


RESERVE, RELEASE = "reserve", "release"
BUNDLE_DETAIL = "bundle"  # a "sync" record with detail "bundle:<fleet>:<version>" installs a bundle release


def bundle_detail(fleet: str, version: int) -> str:
    return f"{BUNDLE_DETAIL}:{fleet}:{version}"


def reservation_detail(kind: str, runs: int) -> str:
    """The usage-record detail of a reservation ("reserve:<n>") or of giving unused runs back ("release:<n>")."""
    return f"{kind}:{runs}"


def run_delta(detail: str) -> int | None:
    """How a "run" record changes its license's counter: +n for "reserve:n", -n for "release:n", +1 for a
    single counted run (detail ""). None when the detail is none of these."""
    if detail == "":
        return 1
    kind, sep, number = detail.partition(":")
    if not sep or not number.isdigit() or kind not in (RESERVE, RELEASE):
        return None
    n = int(number)
    if n < 1:
        return None
    return n if kind == RESERVE else -n


def replay_run_counters(records: Sequence[dict[str, Any]]) -> tuple[dict[str, int], str | None]:
    """Per-license run counters rebuilt from verified usage records (reserved minus released).

    Returns (counters, problem): problem names the first record whose counter does not follow from the
    one before it (a forged or reordered reservation), else None."""
    counters: dict[str, int] = {}
    for rec in records:
        if rec["event"] != "run" or not rec["license_id"]:
            continue
        lid = rec["license_id"]
        delta = run_delta(rec["detail"])
        expected = None if delta is None else counters.get(lid, 0) + delta
        if expected is None or expected < 0 or int(rec["runs"]) != expected:
            return counters, (
                f"usage record {rec['seq']} sets license {lid}'s run counter to {rec['runs']}"
                f" ({rec['detail'] or 'one run'!r}) after {counters.get(lid, 0)}"
            )
        counters[lid] = expected
    return counters, None


class StateProblem(Exception):
    """Internal: the ledger cannot be trusted; the caller turns it into a recorded refusal."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def default_anchor_dir() -> Path:
    env = os.environ.get("EDGEMART_ANCHOR_DIR")
    if env:
        return Path(env)
    return Path.home() / ".local" / "state" / "edgemart" / "anchors"


class Ledger:
    """Reads and commits the device's sealed state; one instance per device directory."""

    def __init__(
        self,
        directory: Path,
        *,
        device_id: str,
        sign_key: Any,
        state_key: bytes,
        anchor_dir: Path | None = None,
        anchor: Anchor | None = None,
        policy: Policy = DEFAULT_POLICY,
    ) -> None:
        self.dir = directory
        self.device_id = device_id
        self._sign_key = sign_key
        self._key = state_key
        self.policy = policy
        self.anchor: Anchor = anchor or FileAnchor((anchor_dir or default_anchor_dir()) / device_id)
        self.state_path = directory / "state.bin"
        self.log_path = directory / "usage.log"
        self.audit_path = directory / "audit.log"
        self.lock_path = directory / ".lock"
        # The last state this process loaded and fully checked, with the file-system identity of every file
        # the check read (see _identity); load() reuses it while none of them changed.
        self._loaded: tuple[tuple[Any, ...], State] | None = None

    # ------------------------------------------------------------------ creation

    def create(self, *, now: int) -> State:
        """Initial state for a new device (refuses when a state or anchor already exists)."""
        if self.state_path.exists() or self.anchor.exists():
            raise drm.UsageError(
                f"{self.state_path} or its anchor already exists; refusing to reset device state"
            )
        st = State(
            generation=1,
            hwm=now,
            clock_hwm=now,
            runs={},
            revocation_version=0,
            log_seq=0,
            log_head=genesis(self.device_id),
        )
        fileio.create_private(self.log_path, b"")
        try:
            memo = self.anchor.create(st.log_seq, self._seal(st, "anchor"))
        except AnchorError as exc:
            raise drm.UsageError(f"cannot create the rollback anchor: {exc}") from None
        if self.anchor.kind != "file":
            st.anchor = {"kind": self.anchor.kind, **memo}
        fileio.atomic_write(self.state_path, self._seal(st, "state"))
        return st

    # ------------------------------------------------------------------ sealing

    def _seal(self, st: State, kind: str) -> bytes:
        return drm.seal_state(st.to_dict(kind), key=self._key, device_id=self.device_id)

    def _open(self, blob: bytes, kind: str) -> dict[str, Any]:
        obj = drm.open_state(blob, key=self._key, device_id=self.device_id)
        if obj.get("kind") != kind:
            raise drm.IntegrityError()
        return obj

    def _write_anchor(self, st: State) -> None:
        try:
            self.anchor.write(st.log_seq, self._seal(st, "anchor"), st.anchor)
        except AnchorError as exc:
            raise StateProblem(str(exc)) from None

    # ------------------------------------------------------------------ loading

    def _log_tail(self) -> tuple[list[bytes], int]:
        """The last (up to) two complete record lines and the seq of the last one (-1 when empty)."""
        tail = fileio.read_tail(self.log_path, _TAIL_BYTES)
        if not tail:
            return [], -1
        if not tail.endswith(b"\n"):
            raise StateProblem("usage log ends with a partial record")
        lines = tail[:-1].split(b"\n")
        if len(tail) == _TAIL_BYTES:
            lines = lines[1:]  # the first piece may be a cut line
        lines = lines[-2:]
        try:
            seq = parse_record(lines[-1])["rec"]["seq"]
        except FormatError:
            raise StateProblem("usage log's last record is malformed") from None
        return lines, int(seq)

    def load(self) -> tuple[State, bool]:
        """The current state, checked against the usage log and the anchor. Returns (state, rolled_forward).

        Raises StateProblem with the precise reason when state is missing, corrupt or rolled back.

        A process that loads again while the state file, the usage log and a file anchor are exactly as its
        last full check saw them gets a copy of that checked state without reading them again. "Exactly" is
        their inode, size, mtime and ctime: any write, copy, rename or restore changes the ctime, which only
        the kernel sets (a user can set mtime back, not ctime). A hardware anchor is always read: its counter
        can move without any file changing."""
        identity = self._identity()
        if identity is not None and self._loaded is not None and self._loaded[0] == identity:
            return self._loaded[1].copy(), False
        self._loaded = None
        st, rolled = self._load_checked()
        if identity is not None and not rolled:
            self._loaded = (identity, st.copy())
        return st, rolled

    def _identity(self) -> tuple[Any, ...] | None:
        """(inode, size, mtime, ctime) of the files a full load reads; None when one is missing or the anchor
        is not a file (then every load is a full one)."""
        if not isinstance(self.anchor, FileAnchor):
            return None
        out: list[Any] = []
        for path in (self.state_path, self.log_path, self.anchor.path):
            try:
                info = os.stat(path)
            except OSError:
                return None
            out.append((info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns))
        return tuple(out)

    def _load_checked(self) -> tuple[State, bool]:
        try:
            blob = self.state_path.read_bytes()
        except FileNotFoundError:
            raise StateProblem(
                "device state file is missing (deleted?); refusing rather than resetting"
            ) from None
        try:
            st = State.from_dict(self._open(blob, "state"))
        except (drm.IntegrityError, FormatError, KeyError, TypeError, ValueError):
            raise StateProblem("device state file is corrupt or was not sealed by this device") from None
        lines, last_seq = self._log_tail()
        head = drm.sha256_tag(lines[-1]) if lines else genesis(self.device_id)
        rolled = False
        before: tuple[int, int, str] | None = None
        if last_seq + 1 == st.log_seq and head == st.log_head:
            pass
        elif last_seq == st.log_seq and lines:
            # One record past the state: a crash between the log append and the state write, or a
            # state file restored from one commit back. Either way the record is signed evidence of
            # the newer counters, so roll forward (this never grants a run).
            prev = drm.sha256_tag(lines[-2]) if len(lines) == 2 else genesis(self.device_id)
            report = drm.verify_log(
                lines[-1] + b"\n",
                self._sign_key.public_key(),
                device_id=self.device_id,
                start_seq=st.log_seq,
                start_prev=st.log_head,
            )
            if not report.ok or (st.log_seq > 0 and prev != st.log_head):
                raise StateProblem(
                    "device state does not match the usage log (state file restored from an older copy?)"
                )
            before = (st.generation, st.log_seq, st.log_head)
            self._apply(st, report.records[0])
            st.generation += 1
            st.log_seq += 1
            st.log_head = head
            rolled = True
        elif last_seq + 1 > st.log_seq:
            raise StateProblem(
                f"device state is older than the usage log ({st.log_seq} records in state, {last_seq + 1} in the log):"
                " state file restored from an older copy"
            )
        else:
            raise StateProblem(
                f"usage log is shorter than or diverges from the device state ({st.log_seq} records in state,"
                f" {last_seq + 1} in the log): log truncated or replaced"
            )
        # After a roll-forward the anchor may hold either side of the interrupted commit.
        self._check_anchor(st, also=before if rolled else None)
        if rolled:
            self._write_anchor(st)
            fileio.atomic_write(self.state_path, self._seal(st, "state"))
        return st, rolled

    @staticmethod
    def _apply(st: State, rec: dict[str, Any]) -> None:
        if rec["event"] == "run" and rec["license_id"]:
            lid = rec["license_id"]
            delta = run_delta(rec["detail"])
            expected = None if delta is None else st.runs.get(lid, 0) + delta
            if expected is None or expected < 0 or int(rec["runs"]) != expected:
                raise StateProblem(
                    f"usage log's last record does not follow from the device state's run counter for {lid}"
                )
            st.runs[lid] = expected
        if rec["event"] == "sync" and rec["detail"].startswith(BUNDLE_DETAIL + ":"):
            _, fleet, version = rec["detail"].split(":", 2)
            if version.isdigit():
                st.bundles[fleet] = int(version)
        st.hwm = max(st.hwm, int(rec["t"]))

    def _check_anchor(self, st: State, *, also: tuple[int, int, str] | None = None) -> None:
        kind = st.anchor.get("kind", "file")
        if kind != self.anchor.kind:
            raise StateProblem(
                f"device state is anchored by a {kind} anchor but the device is set up with a {self.anchor.kind}"
                " anchor (DIR/anchor.json removed or edited?)"
            )

        def open_blob(blob: bytes) -> tuple[int, int | None, str | None]:
            try:
                anchor = State.from_dict({**self._open(blob, "anchor"), "kind": "state"})
            except (drm.IntegrityError, FormatError, KeyError, TypeError, ValueError):
                raise AnchorError(f"rollback anchor ({self.anchor.describe()}) is corrupt") from None
            return anchor.generation, anchor.log_seq, anchor.log_head

        try:
            seen = self.anchor.read(st.anchor, open_blob)
        except AnchorError as exc:
            raise StateProblem(str(exc)) from None
        now: tuple[Any, ...] = (st.generation, st.log_seq, st.log_head)
        if seen[0] is None:  # a counter anchors the number of records alone
            now, also = (None, st.log_seq, None), (None if also is None else (None, also[1], None))  # type: ignore[assignment]
        if seen != now and seen != also:
            raise StateProblem(
                f"device state (generation {st.generation}, {st.log_seq} records) disagrees with the rollback anchor"
                f" ({self.anchor.describe()}: {seen[1]} records): device directory restored from a copy?"
            )

    # ------------------------------------------------------------------ committing

    def prepare(
        self,
        st: State,
        *,
        event: str,
        t: int,
        license_id: str = "",
        build_hash: str = "",
        runs: int = 0,
        detail: str = "",
    ) -> tuple[bytes, bytes, bytes, State]:
        """CPU part of a commit: the signed record line and the sealed anchor/state for the new state."""
        prev_line = self._log_tail()[0][-1] if st.log_seq else None
        line = drm.make_record(
            self._sign_key,
            prev_line=prev_line,
            seq=st.log_seq,
            device_id=self.device_id,
            t=t,
            event=event,
            license_id=license_id,
            build_hash=build_hash,
            runs=runs,
            detail=detail,
        )
        new = st.copy()
        new.generation += 1
        new.log_seq += 1
        new.log_head = drm.sha256_tag(line)
        return line, self._seal(new, "anchor"), self._seal(new, "state"), new

    def write(self, line: bytes, anchor_blob: bytes, state_blob: bytes, new: State) -> None:
        """I/O part of a commit, in crash-safe order: log record, anchor, state (each durable)."""
        fileio.append_durable(self.log_path, line + b"\n")
        try:
            self.anchor.write(new.log_seq, anchor_blob, new.anchor)
        except AnchorError as exc:
            raise drm.UsageError(f"cannot advance the rollback anchor: {exc}") from None
        fileio.atomic_write(self.state_path, state_blob)

    def commit(self, st: State, **record: Any) -> State:
        line, anchor_blob, state_blob, new = self.prepare(st, **record)
        self.write(line, anchor_blob, state_blob, new)
        return new

    # ------------------------------------------------------------------ refusals

    def audit(self, *, t: int, license_id: str, reason: str, event: str = "refused") -> None:
        entry = {
            "time": t,
            "iso_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)),
            "event": event,
            "license_id": license_id,
            "reason": reason,
        }
        with open(self.audit_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")
        os.chmod(self.audit_path, fileio.PRIVATE_FILE)

    def record_refusal(
        self, st: State | None, *, t: int, license_id: str, build_hash: str, reason: str
    ) -> None:
        """Audit line + a signed "refused" usage record. With a broken state the record is still chained
        onto the log (the state stays broken: a refusal never repairs it)."""
        self.audit(t=t, license_id=license_id, reason=reason)
        if st is not None:
            self.commit(
                st,
                event="refused",
                t=t,
                license_id=license_id,
                build_hash=build_hash,
                runs=st.runs.get(license_id, 0),
                detail=reason,
            )
            return
        try:
            lines, last_seq = self._log_tail()
        except StateProblem:
            return  # the log itself is damaged; the audit line is all we can add
        line = drm.make_record(
            self._sign_key,
            prev_line=lines[-1] if lines else None,
            seq=last_seq + 1,
            device_id=self.device_id,
            t=t,
            event="refused",
            license_id=license_id,
            build_hash=build_hash,
            runs=0,
            detail=reason,
        )
        fileio.append_durable(self.log_path, line + b"\n")
        try:
            self.anchor.bump({})  # a counter counts this record too: a restored log never catches up
        except AnchorError:
            pass  # the record stays one ahead of the counter: a roll-forward case, never a gain
