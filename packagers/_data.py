"""Calibration and hold-out samples: loading `.npz` files and binding them to a model's input signature.

Every mismatch (name, rank, dim, dtype) is a UsageError that says which input and which figure."""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from os import PathLike

import numpy as np

from edgemart.core.errors import UsageError
from edgemart.core.model_safety import DEFAULT_SAMPLE_LIMITS, SampleLimits, check_sample_file
from packagers._model import ModelInfo, TensorSpec

LABEL_KEY = "y"
SINGLE_INPUT_KEY = "x"


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


def bind_samples(info: ModelInfo, samples: Mapping[str, np.ndarray], role: str) -> dict[str, np.ndarray]:
    """Map `samples` onto the model inputs, checking names, ranks, static dims and dtypes."""
    data = {k: np.asarray(v) for k, v in samples.items() if k != LABEL_KEY}
    names = [spec.name for spec in info.inputs]
    if len(names) == 1 and names[0] not in data and SINGLE_INPUT_KEY in data:
        data[names[0]] = data.pop(SINGLE_INPUT_KEY)
    missing = [n for n in names if n not in data]
    if missing:
        raise UsageError(
            f"{role} data has no array for model input '{missing[0]}' "
            f"(data keys: {', '.join(sorted(samples)) or 'none'}; model inputs: {', '.join(names)})"
        )
    extra = sorted(set(data) - set(names))
    if extra:
        raise UsageError(
            f"{role} data key '{extra[0]}' matches no model input (model inputs: {', '.join(names)})"
        )
    counts = set()
    for spec in info.inputs:
        _check_array(spec, data[spec.name], role)
        counts.add(data[spec.name].shape[0])
    if len(counts) != 1:
        raise UsageError(f"{role} data arrays disagree on the number of samples: {sorted(counts)}")
    if counts.pop() == 0:
        raise UsageError(f"{role} data holds zero samples")
    return {n: data[n] for n in names}


def _check_array(spec: TensorSpec, array: np.ndarray, role: str) -> None:
    where = f"{role} data for input '{spec.name}'"
    if array.dtype.name != spec.dtype:
        raise UsageError(f"{where} has dtype {array.dtype.name}, the model expects {spec.dtype}")
    if array.ndim != len(spec.shape):
        raise UsageError(
            f"{where} has shape {list(array.shape)} (rank {array.ndim}), "
            f"the model expects rank {len(spec.shape)} {spec.shape_text()} with samples on axis 0"
        )
    batch = spec.shape[0] if spec.shape else None
    if batch is not None and array.shape[0] % batch:
        raise UsageError(f"{where} has {array.shape[0]} samples, not a multiple of the fixed batch {batch}")
    for axis, (want, got) in enumerate(zip(spec.shape[1:], array.shape[1:], strict=True), start=1):
        if want is not None and want != got:
            raise UsageError(
                f"{where} has shape {list(array.shape)}, the model expects {spec.shape_text()} (axis {axis})"
            )


def require_static_shapes(info: ModelInfo, why: str) -> None:
    """Without samples, only a dynamic batch axis can be fixed (to 1); any other dynamic dim is an error."""
    for spec in info.inputs:
        if any(d is None for d in spec.shape[1:]):
            raise UsageError(
                f"input '{spec.name}' has dynamic shape {spec.shape_text()}: {why} needs calibration "
                "samples (--calibration PATH.npz) to fix its dims"
            )


def synthetic_inputs(info: ModelInfo, count: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Uniform [0,1) inputs for models with static shapes; used for timing only, never for calibration."""
    require_static_shapes(info, "timing")
    rng = np.random.default_rng(seed)
    out = {}
    for spec in info.inputs:
        batch = spec.shape[0] or 1
        shape = (max(count, batch), *spec.shape[1:])
        if spec.dtype.startswith("float"):
            out[spec.name] = rng.random(shape).astype(spec.dtype)
        else:
            out[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return out


def sample_count(samples: Mapping[str, np.ndarray]) -> int:
    return int(next(iter(samples.values())).shape[0])


def take(samples: Mapping[str, np.ndarray], index: slice | np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in samples.items()}


def batches(samples: Mapping[str, np.ndarray], info: ModelInfo, max_batch: int) -> Iterator[dict]:
    """Chunks of samples sized for the model: its fixed batch if it has one, else up to `max_batch`."""
    fixed = [spec.shape[0] for spec in info.inputs if spec.shape and spec.shape[0] is not None]
    size = fixed[0] if fixed else max_batch
    total = sample_count(samples)
    for start in range(0, total, size):
        yield take(samples, slice(start, start + size))
