"""Calibration and hold-out samples: loading `.npz` files and binding them to a model's input signature.

Every mismatch (name, rank, dim, dtype) is a UsageError that says which input and which figure."""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Mapping
from os import PathLike

import numpy as np

from edge_runtime.evaluation.samples import LABEL_KEY, Contract, SampleSet, bind, synthetic
from edgemart.core.errors import UsageError
from edgemart.core.model_safety import DEFAULT_SAMPLE_LIMITS, SampleLimits, check_sample_file
from packagers._model import ModelInfo


def load_calibration(
    path: str | PathLike[str], limits: SampleLimits = DEFAULT_SAMPLE_LIMITS
) -> dict[str, np.ndarray]:
    """Read an `.npz` of samples keyed by input name (or `x`); labels `y` and text arrays are dropped.

    The archive is checked against `limits` (sizes, ratio, headers) before any array is inflated."""
    try:
        with open(path, "rb") as fp:
            check_sample_file(fp, limits, name=os.path.basename(path))
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
    """Bind `samples` to the model's inputs by the sample contract (see edge_runtime.evaluation.samples): one UsageError
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
