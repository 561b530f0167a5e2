"""Calibration and hold-out samples: loading `.npz` files and binding them to a model's input signature.

Every mismatch (name, rank, dim, dtype) is a UsageError that says which input and which figure."""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from typing import BinaryIO

import numpy as np

from drm.errors import UsageError
from edge_runtime.samples import LABEL_KEY, Contract, SampleSet, bind, synthetic
from packagers._model import ModelInfo


@dataclass(frozen=True)
class SampleLimits:
    """What a samples archive may declare, checked from its directory and array headers before anything
    is inflated or allocated."""

    max_bytes: int = 256 * 1024 * 1024  # all arrays together, uncompressed
    max_members: int = 1024
    max_ratio: float = 200.0  # uncompressed / compressed size of one member (checked above 1 MiB)


DEFAULT_SAMPLE_LIMITS = SampleLimits()
_RATIO_FLOOR = 1 << 20


def check_sample_archive(path: str | PathLike[str], limits: SampleLimits = DEFAULT_SAMPLE_LIMITS) -> None:
    """Refuse a zip/npz bomb, object arrays and array headers that claim more than their member holds."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            if len(members) > limits.max_members:
                raise UsageError(f"it has {len(members)} members; the limit is {limits.max_members}")
            total = sum(m.file_size for m in members)
            if total > limits.max_bytes:
                raise UsageError(
                    f"it inflates to {total} bytes; the limit is {limits.max_bytes} "
                    "(send fewer samples or raise the configured cap)"
                )
            for m in members:
                if m.file_size > _RATIO_FLOOR and m.file_size > limits.max_ratio * max(m.compress_size, 1):
                    raise UsageError(
                        f"member {m.filename[:60]!r} compresses {m.file_size // max(m.compress_size, 1)}:1, "
                        f"over the {limits.max_ratio:g}:1 limit (a zip bomb?)"
                    )
                with archive.open(m) as member:
                    _check_npy_header(member, m.filename, m.file_size)
    except zipfile.BadZipFile as exc:
        raise UsageError(str(exc)[:120]) from None


def _check_npy_header(member: BinaryIO, filename: str, size: int) -> None:
    name = filename[:60]
    try:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(member)
        elif version in ((2, 0), (3, 0)):
            shape, _, dtype = np.lib.format.read_array_header_2_0(member)
        else:
            raise ValueError(f"unknown .npy version {version}")
    except (ValueError, EOFError, OSError) as exc:
        raise UsageError(f"member {name!r} is not a .npy array: {str(exc)[:80]}") from None
    if dtype.hasobject:
        raise UsageError(f"member {name!r} holds Python objects; only numeric arrays are read")
    declared = dtype.itemsize * math.prod(shape)
    if declared > size:
        raise UsageError(
            f"member {name!r} declares shape {list(shape)[:8]} ({declared} bytes) but holds {size} bytes"
        )


def load_calibration(
    path: str | PathLike[str], limits: SampleLimits = DEFAULT_SAMPLE_LIMITS
) -> dict[str, np.ndarray]:
    """Read an `.npz` of samples keyed by input name (or `x`); labels `y` and text arrays are dropped.

    The archive is checked against `limits` (sizes, ratio, headers) before any array is inflated."""
    try:
        if zipfile.is_zipfile(path):
            check_sample_archive(path, limits)
        else:  # a bare .npy: its header must not claim more than the file holds either
            with open(path, "rb") as fp:
                _check_npy_header(fp, os.path.basename(path), os.fstat(fp.fileno()).st_size)
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array, not an .npz archive")
        with loaded as npz:
            arrays = {key: npz[key] for key in npz.files}
            members = set(npz.zip.namelist())
    except FileNotFoundError:
        raise UsageError(f"sample file not found: {path}") from None
    except UsageError as exc:
        raise UsageError(f"cannot read sample file {path} as .npz: {exc.message}") from None
    except (OSError, ValueError, EOFError, zlib.error, NotImplementedError, zipfile.BadZipFile) as exc:
        raise UsageError(f"cannot read sample file {path} as .npz: {str(exc)[:120]}") from None
    for key, value in arrays.items():
        if not isinstance(
            value, np.ndarray
        ):  # numpy hands back raw bytes for a member without the .npy magic
            member = key + ".npy" if key + ".npy" in members else key
            raise UsageError(
                f"cannot read sample file {path} as .npz: member {member[:60]!r} is not a .npy array"
            )
    samples = {
        key: value
        for key, value in arrays.items()
        if key != LABEL_KEY and value.dtype.kind in "fiub"  # text / object arrays are annotations
    }
    if not samples:
        raise UsageError(f"sample file {path} holds no numeric input arrays (keys: {', '.join(arrays)})")
    return samples


def bind_samples(
    info: ModelInfo,
    samples: Mapping[str, np.ndarray] | SampleSet,
    role: str,
    contract: Contract | None = None,
) -> SampleSet:
    """Bind `samples` to the model's inputs by the sample contract (see edge_runtime.samples): one UsageError
    lists, per input, the expected and the given shapes. An already bound SampleSet is returned as it is."""
    if isinstance(samples, SampleSet):
        return samples
    return bind(info.inputs, info.outputs, samples, role, contract)


def synthetic_samples(info: ModelInfo, contract: Contract | None = None) -> SampleSet:
    """One run of synthetic inputs for timing a model given no samples."""
    return synthetic(info.inputs, info.outputs, contract)


def card_contract_options(front_matter: Mapping[str, object]) -> dict[str, str]:
    """A model card's declarations of the sample contract, as packager options: `fixed: {sr: 16000}` and
    `state: {state: stateN}` in the YAML front matter become `fixed=sr=16000`, `state=state=stateN`."""
    out: dict[str, str] = {}
    for key in ("fixed", "state"):
        value = front_matter.get(key)
        if value is None:
            continue
        if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str | int | float) and not isinstance(v, bool)
            for k, v in value.items()
        ):
            what = "input names to values" if key == "fixed" else "state inputs to the outputs that feed them"
            raise UsageError(f"model card: '{key}' must map {what}")
        if value:
            out[key] = ",".join(f"{k}={v}" for k, v in value.items())
    return out
