"""Rollback anchors: where the device keeps a copy of its ledger position that a restore of the device
directory does not bring back. A sealed file (the fallback) or a TPM 2.0 NV monotonic counter.

The TPM counter only ever grows, also across undefine/redefine (TPM 2.0 Part 1 §37.2.3: a new counter starts
at the highest value any counter on the TPM has held), so a state older than the counter is always refused."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import drm
from edgemart.core import fileio

ANCHOR_CONFIG = "anchor.json"  # DIR/anchor.json: {"kind": "tpm", "nv_index": "0x01...", "tcti": "..."}
TPM_NV_INDEX_DEFAULT = 0x01500E00
_NV_INDEX = re.compile(r"^0x01[0-9a-fA-F]{6}\Z")
TPM_TIMEOUT = 30


class AnchorError(Exception):
    """The anchor cannot be read or written (the caller turns it into a recorded refusal)."""


class Anchor(Protocol):
    kind: str

    def describe(self) -> str: ...

    def exists(self) -> bool: ...

    def create(self, records: int, blob: bytes) -> dict[str, Any]:
        """Start anchoring a log of ``records`` records; returns what the sealed state must remember."""
        ...

    def write(self, records: int, blob: bytes, memo: dict[str, Any]) -> None:
        """Anchor the state sealed in ``blob``, whose log holds ``records`` records."""
        ...

    def bump(self, memo: dict[str, Any]) -> None:
        """A record was appended to the log of a state that cannot be trusted (a refusal): a counter counts it
        too, so the appended record can never make a restored log catch up with the anchor."""
        ...

    def read(self, memo: dict[str, Any], open_blob: Callable[[bytes], Any]) -> Any:
        """The anchored position: (generation, seq, head) for a file anchor, (None, seq, None) for a
        counter."""
        ...


class FileAnchor:
    """The sealed ledger position in a file outside the device dir (default ~/.local/state/edgemart/anchors):
    it stops restoring the device dir alone, not a user who copies both."""

    kind = "file"

    def __init__(self, path: Path) -> None:
        self.path = path

    def describe(self) -> str:
        return f"file {self.path}"

    def exists(self) -> bool:
        return self.path.exists()

    def create(self, records: int, blob: bytes) -> dict[str, Any]:
        self.write(records, blob, {})
        return {}

    def write(self, records: int, blob: bytes, memo: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=fileio.PRIVATE_DIR)
        fileio.atomic_write(self.path, blob)

    def bump(self, memo: dict[str, Any]) -> None:
        pass  # the sealed copy names the head: an appended record already disagrees with it

    def read(self, memo: dict[str, Any], open_blob: Callable[[bytes], Any]) -> Any:
        try:
            blob = self.path.read_bytes()
        except FileNotFoundError:
            raise AnchorError(f"rollback anchor {self.path} is missing") from None
        return open_blob(blob)


class TpmAnchor:
    """A TPM 2.0 NV counter (``nt=counter``) driven through tpm2-tools. It counts usage-log records: every
    record the device appends increments it (a commit: log record, counter, state), the sealed state remembers
    the counter value of an empty log (``base``), and a state whose log does not hold ``counter - base``
    records (or one more, mid-commit) is a restored copy. Refusal records appended to an untrusted state
    increment it too, so a restored log never catches up by rolling forward."""

    kind = "tpm"

    def __init__(self, nv_index: int = TPM_NV_INDEX_DEFAULT, tcti: str | None = None) -> None:
        self.nv_index = nv_index
        self.tcti = tcti

    def describe(self) -> str:
        return f"TPM 2.0 NV counter {self.nv_index:#010x}" + (f" ({self.tcti})" if self.tcti else "")

    def _run(self, *args: str) -> bytes:
        tool = shutil.which(args[0])
        if tool is None:
            raise AnchorError(f"{args[0]} not found: install tpm2-tools to use the TPM anchor")
        env = dict(os.environ)
        if self.tcti:
            env["TPM2TOOLS_TCTI"] = self.tcti
        try:
            done = subprocess.run(
                [tool, *args[1:]], capture_output=True, env=env, timeout=TPM_TIMEOUT, check=False
            )
        except subprocess.TimeoutExpired:
            raise AnchorError(f"{args[0]} did not answer within {TPM_TIMEOUT}s") from None
        if done.returncode != 0:
            last = (done.stderr.decode("utf-8", "replace").strip().splitlines() or ["no message"])[-1]
            raise AnchorError(f"{args[0]} failed on NV index {self.nv_index:#010x}: {last}")
        return done.stdout

    def counter(self) -> int:
        data = self._run("tpm2_nvread", "-C", "o", "-s", "8", f"{self.nv_index:#x}")
        if len(data) != 8:
            raise AnchorError(f"TPM NV counter {self.nv_index:#010x} did not read as 8 bytes")
        return int.from_bytes(data, "big")

    def exists(self) -> bool:
        try:
            self.counter()
        except AnchorError:
            return False
        return True

    def create(self, records: int, blob: bytes) -> dict[str, Any]:
        nv = f"{self.nv_index:#x}"
        self._run("tpm2_nvdefine", "-C", "o", "-s", "8", "-a", "nt=counter|ownerwrite|ownerread", nv)
        self._increment()  # a counter reads only once written
        return {"base": self.counter() - records}

    def _increment(self) -> None:
        self._run("tpm2_nvincrement", "-C", "o", f"{self.nv_index:#x}")

    def write(self, records: int, blob: bytes, memo: dict[str, Any]) -> None:
        base = int(memo["base"])
        value = self.counter()
        if value - base > records:
            raise AnchorError(f"TPM counter is past {records} usage records: the state was restored")
        while value - base < records:
            self._increment()
            value += 1

    def bump(self, memo: dict[str, Any]) -> None:
        self._increment()

    def read(self, memo: dict[str, Any], open_blob: Callable[[bytes], Any]) -> Any:
        return (None, self.counter() - int(memo["base"]), None)


def load_config(directory: Path) -> dict[str, Any] | None:
    path = directory / ANCHOR_CONFIG
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_bytes()[:4096])
    except ValueError:
        raise drm.UsageError(f"{path} is not JSON") from None
    if not isinstance(cfg, dict) or cfg.get("kind") != "tpm" or not _NV_INDEX.match(str(cfg.get("nv_index"))):
        raise drm.UsageError(f'{path} must be {{"kind": "tpm", "nv_index": "0x01xxxxxx", "tcti": ...}}')
    return cfg


def tpm_from_config(cfg: dict[str, Any]) -> TpmAnchor:
    tcti = cfg.get("tcti")
    return TpmAnchor(int(str(cfg["nv_index"]), 16), None if tcti is None else str(tcti))


def parse_nv_index(text: str) -> int:
    if not _NV_INDEX.match(text):
        raise drm.UsageError(f"--tpm-nv-index must be an NV index 0x01xxxxxx, not {text!r}")
    return int(text, 16)
