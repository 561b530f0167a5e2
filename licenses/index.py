# Why this is one module: the index's storage format and its lookup share the candidate hashing.
"""The on-disk index of open models the gate compares uploads against.

Layout under one directory: index.json (entries), descriptors.npy / owners.npy / shapekeys.npy (one row
per weight layer), unitkeys.npy / unitowners.npy (locality-sensitive hashes of weight units, which find a
base whose tensors were split, merged, reordered or moved) for the vectorized candidate search, and
models/<id>.npz (canonical weights for the exact match). Every file is replaced atomically."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgemart.core.errors import ConflictError, UsageError
from edgemart.core.fileio import atomic_write
from licenses._fingerprint import DEFAULT_POLICY, Fingerprint, MatchPolicy, fingerprint, match, shape_key
from licenses._formats import parse_model

_INDEX_VERSION = 2
_CANDIDATE_TOLERANCE = 0.15  # descriptor distance at which a layer stops counting as a candidate hit
# Unit hashes: sign bits of random projections, in bands. A unit with cosine 0.999 to a base unit (int8,
# fp16, a light fine-tune) shares a band with probability 0.7, one with cosine 0.97 (heavy pruning) 0.14;
# a chance collision happens once in 2**24 per band, so large uploads do not drown the score in chance hits.
_BANDS = 4
_BAND_BITS = 24
_UNITS_PER_LAYER = 256  # units hashed per indexed layer (the upload hashes all of its own)
_UPLOAD_UNITS_PER_LAYER = (
    1024  # upload units hashed per layer (evenly spread): bounds the cost on big uploads
)
_MAX_BLOCK_FACTOR = 2  # column blocks of wider upload units hashed as if they were whole units
_MIN_UNIT_SCORE = 0.02  # share of an indexed model's unit bands the upload must hit
_MIN_UNIT_HITS = 4


@dataclass(frozen=True)
class Match:
    name: str
    license: str
    similarity: float
    layers_matched: str  # "k/n", n = informative layers of the base
    evidence: dict[str, Any] = field(default_factory=dict)


class LicenseIndex:
    def __init__(self, directory: str | os.PathLike[str], *, policy: MatchPolicy = DEFAULT_POLICY) -> None:
        self.directory = Path(directory)
        self.policy = policy
        (self.directory / "models").mkdir(parents=True, exist_ok=True)
        self._entries: list[dict[str, Any]] = []
        self._descriptors = np.zeros((0, 8), np.float32)
        self._owners = np.zeros(0, np.int64)
        self._shapekeys = np.zeros(0, np.int64)
        self._unitkeys = np.zeros(0, np.int64)
        self._unitowners = np.zeros(0, np.int64)
        self._load()

    # ------------------------------------------------------------------------------------- state

    def _load(self) -> None:
        path = self.directory / "index.json"
        if not path.exists():
            return
        try:
            data = json.loads(path.read_text("utf-8"))
            self._entries = list(data["models"])
            self._descriptors = np.load(self.directory / "descriptors.npy")
            self._owners = np.load(self.directory / "owners.npy")
            self._shapekeys = np.load(self.directory / "shapekeys.npy")
            if (self.directory / "unitkeys.npy").exists():
                self._unitkeys = np.load(self.directory / "unitkeys.npy")
                self._unitowners = np.load(self.directory / "unitowners.npy")
        except (OSError, ValueError, KeyError) as exc:
            raise UsageError(f"license index at {self.directory} is unreadable: {exc}") from exc
        if data.get("version", 1) < _INDEX_VERSION:  # written before unit hashes existed: add them once
            keys, owners = [], []
            for i, entry in enumerate(self._entries):
                unit_keys = unit_hashes(self._fingerprint_of(entry), _UNITS_PER_LAYER, 1)
                keys.append(unit_keys)
                owners.append(np.full(unit_keys.size, i, np.int64))
            self._unitkeys = np.concatenate([np.zeros(0, np.int64), *keys])
            self._unitowners = np.concatenate([np.zeros(0, np.int64), *owners])
            self._save()
        self._sort_keys()

    def _sort_keys(self) -> None:
        self._order = np.argsort(self._shapekeys, kind="stable")
        self._sorted_keys = self._shapekeys[self._order]
        self._hashed_per_entry = np.zeros(0, np.float64)
        self._unit_order = np.argsort(self._unitkeys, kind="stable")
        self._sorted_unitkeys = self._unitkeys[self._unit_order]

    def _save(self) -> None:
        _atomic_npy(self.directory / "descriptors.npy", self._descriptors)
        _atomic_npy(self.directory / "owners.npy", self._owners)
        _atomic_npy(self.directory / "shapekeys.npy", self._shapekeys)
        _atomic_npy(self.directory / "unitkeys.npy", self._unitkeys)
        _atomic_npy(self.directory / "unitowners.npy", self._unitowners)
        payload = json.dumps({"version": _INDEX_VERSION, "models": self._entries}, indent=1, sort_keys=True)
        atomic_write(self.directory / "index.json", payload.encode("utf-8"))
        self._sort_keys()

    # ---------------------------------------------------------------------------------- public API

    def names(self) -> list[str]:
        return [entry["name"] for entry in self._entries]

    def entry(self, name: str) -> dict[str, Any] | None:
        wanted = _name_key(name)
        return next((e for e in self._entries if _name_key(e["name"]) == wanted), None)

    def add(
        self,
        model: bytes,
        *,
        name: str,
        license: str,
        source: str = "",
        card: str | None = None,
        allow_empty: bool = False,
    ) -> dict[str, Any]:
        """Fingerprint and index an open model under `name`; returns its entry (idempotent per name+bytes).

        A model in which no learned tensor is found is refused (it could only ever match byte copies)
        unless allow_empty; the entry reports what was found (tensors, parameters, storage formats)."""
        from licenses._policy import ExpressionProblem, normalize
        from licenses.card import parse_model_card

        if not name or not name.strip():
            raise UsageError("index add: --name must not be empty")
        try:
            normalized = normalize(license)
        except ExpressionProblem as exc:
            raise UsageError(f"index add: {exc}") from exc
        card_info = parse_model_card(card).to_dict() if card is not None else None
        parsed = parse_model(model)
        summary = parsed.summary()
        if not summary["learned_tensors"] and not allow_empty:
            fixed = (
                f" ({summary['fixed_tensors']} fixed-by-construction tensors ignored)"
                if summary["fixed_tensors"]
                else ""
            )
            raise UsageError(
                f"index add: no learned tensor found in the {parsed.format} model{fixed}: only byte copies of it "
                "could be recognised; pass --allow-empty to index it anyway"
            )
        fp = fingerprint(parsed)
        existing = self.entry(name)
        if existing is not None:
            if existing["sha256"] == fp.sha256 and existing["license"] == normalized:
                return existing
            raise ConflictError(f"index add: a different model is already indexed as {name!r}")
        return self._add_many([(fp, name.strip(), normalized, source, card_info)], [summary])[0]

    def _add_many(
        self,
        items: Iterable[tuple[Fingerprint, str, str, str, dict[str, Any] | None]],
        summaries: list[dict[str, Any]] | None = None,
    ) -> list[dict[str, Any]]:
        """Bulk insert of already-fingerprinted models with one index write (used by add and the bench)."""
        new_entries: list[dict[str, Any]] = []
        descriptors: list[np.ndarray] = []
        owners: list[np.ndarray] = []
        keys: list[np.ndarray] = []
        unit_keys: list[np.ndarray] = []
        unit_owners: list[np.ndarray] = []
        for number, (fp, name, license, source, card_info) in enumerate(items):
            model_id = f"m{len(self._entries) + len(new_entries):07d}"
            entry = {
                "id": model_id,
                "name": name,
                "license": license,
                "source": source,
                "sha256": fp.sha256,
                "format": fp.format,
                "layers": len(fp.weights),
                "parameters": fp.parameters,
                "card": card_info,
            }
            if summaries is not None and number < len(summaries):
                entry["found"] = summaries[number]
            _atomic_npz(self.directory / "models" / f"{model_id}.npz", fp.to_arrays())
            index = len(self._entries) + len(new_entries)
            new_entries.append(entry)
            descriptors.append(fp.descriptors.reshape(-1, self._descriptors.shape[1]))
            owners.append(np.full(len(fp.weights), index, np.int64))
            keys.append(np.asarray([shape_key(s) for s in fp.shapes], np.int64))
            hashed = unit_hashes(fp, _UNITS_PER_LAYER, 1)
            unit_keys.append(hashed)
            unit_owners.append(np.full(hashed.size, index, np.int64))
        if not new_entries:
            return []
        self._entries.extend(new_entries)
        self._descriptors = np.concatenate([self._descriptors, *descriptors]).astype(np.float32)
        self._owners = np.concatenate([self._owners, *owners])
        self._shapekeys = np.concatenate([self._shapekeys, *keys])
        self._unitkeys = np.concatenate([self._unitkeys, *unit_keys])
        self._unitowners = np.concatenate([self._unitowners, *unit_owners])
        self._save()
        return new_entries

    def lookup(self, model: bytes, *, top_k: int = 5) -> list[Match]:
        """Indexed models the upload derives from (byte copy or weight match), best first."""
        return self.lookup_fingerprint(fingerprint(parse_model(model)), top_k=top_k)

    def lookup_fingerprint(self, fp: Fingerprint, *, top_k: int = 5) -> list[Match]:
        matches: list[Match] = []
        seen: set[int] = set()
        for i, entry in enumerate(self._entries):
            if entry["sha256"] == fp.sha256:
                seen.add(i)
                matches.append(
                    Match(
                        name=entry["name"],
                        license=entry["license"],
                        similarity=1.0,
                        layers_matched=f"{entry['layers']}/{entry['layers']}",
                        evidence={"relation": "byte_copy", "sha256": fp.sha256, "base_id": entry["id"]},
                    )
                )
        limit = max(4 * top_k, 16)
        shared_units = self.unit_candidates(fp, limit=limit)
        for i in dict.fromkeys(self.candidates(fp, limit=limit) + list(shared_units)):
            if i in seen:
                continue
            entry = self._entries[i]
            result = match(fp, self._fingerprint_of(entry), self.policy, pooled=i in shared_units)
            if not result.derived:
                continue
            matches.append(
                Match(
                    name=entry["name"],
                    license=entry["license"],
                    similarity=result.similarity,
                    layers_matched=result.layers_matched_text,
                    evidence={
                        "relation": "weights",
                        "base_id": entry["id"],
                        "base_sha256": entry["sha256"],
                        "layer_similarity_threshold": self.policy.layer_similarity,
                        "parameter_share": result.parameter_share,
                        "parameters_matched": result.parameters_matched,
                        "parameters_total": result.parameters_total,
                        "tensors_matched": [
                            {
                                "base": r.base_name,
                                "upload": list(r.upload_names[:4]),
                                "similarity": r.similarity,
                                "units": r.units,
                                "how": r.method,
                            }
                            for r in result.layers
                            if r.matched
                        ][:32],
                        "layers": [
                            {
                                "upload_layer": r.upload_layer,
                                "base_layer": r.base_layer,
                                "shape": list(r.shape),
                                "similarity": r.similarity,
                                "matched": r.matched,
                                "how": r.method,
                            }
                            for r in result.layers
                            if r.informative
                        ][:64],
                    },
                )
            )
        matches.sort(
            key=lambda m: (
                -m.evidence.get("parameter_share", 1.0),
                -_coverage(m.layers_matched),
                -m.similarity,
                m.name,
            )
        )
        return matches[:top_k]

    def candidates(self, fp: Fingerprint, *, limit: int) -> list[int]:
        """Indexed models whose layers look like the upload's (same shape, close descriptors), best first."""
        if not self._entries or not len(fp.weights):
            return []
        scores = np.zeros(len(self._entries), np.float64)
        best = np.zeros(len(self._entries), np.float64)
        for shape, descriptor in zip(fp.shapes, fp.descriptors, strict=True):
            key = shape_key(shape)
            lo, hi = np.searchsorted(self._sorted_keys, [key, key + 1])
            if lo == hi:
                continue
            rows = self._order[lo:hi]
            distance = np.linalg.norm(self._descriptors[rows] - descriptor, axis=1)
            hit = np.clip(1.0 - distance / _CANDIDATE_TOLERANCE, 0.0, 1.0)
            best[:] = 0.0
            np.maximum.at(best, self._owners[rows], hit)
            scores += best
        layer_counts = np.asarray([max(e["layers"], 1) for e in self._entries], np.float64)
        scores /= np.sqrt(layer_counts)
        order = np.argsort(-scores, kind="stable")[:limit]
        return [int(i) for i in order if scores[i] > 0]

    def unit_candidates(self, fp: Fingerprint, *, limit: int) -> dict[int, float]:
        """Indexed models sharing weight units with the upload, wherever either keeps them, best first:
        entry -> share of its hashed unit bands the upload hits (chance alone stays far below _MIN_UNIT_SCORE)."""
        if not self._entries or not self._sorted_unitkeys.size or not fp.weights:
            return {}
        query = np.unique(unit_hashes(fp, _UPLOAD_UNITS_PER_LAYER, _MAX_BLOCK_FACTOR))
        lo = np.searchsorted(self._sorted_unitkeys, query, side="left")
        hi = np.searchsorted(self._sorted_unitkeys, query, side="right")
        counts = hi - lo
        if not counts.sum():
            return {}
        starts = np.repeat(lo - np.cumsum(counts) + counts, counts) + np.arange(int(counts.sum()))
        owners = self._unitowners[self._unit_order[starts]]
        hits = np.bincount(owners, minlength=len(self._entries)).astype(np.float64)
        if self._hashed_per_entry.size != len(self._entries):
            self._hashed_per_entry = np.bincount(self._unitowners, minlength=len(self._entries)).astype(
                np.float64
            )
        hashed = self._hashed_per_entry
        score = hits / np.maximum(hashed, 1.0)
        order = np.argsort(-score, kind="stable")[:limit]
        return {
            int(i): float(score[i])
            for i in order
            if hits[i] >= _MIN_UNIT_HITS and score[i] >= _MIN_UNIT_SCORE
        }

    def _fingerprint_of(self, entry: dict[str, Any]) -> Fingerprint:
        with np.load(self.directory / "models" / f"{entry['id']}.npz") as arrays:
            return Fingerprint.from_arrays(arrays, sha256=entry["sha256"], format=entry["format"])


_PROJECTIONS: dict[int, np.ndarray] = {}


def _projection(fan_in: int) -> np.ndarray:
    if fan_in not in _PROJECTIONS:
        rng = np.random.default_rng(fan_in)
        _PROJECTIONS[fan_in] = rng.standard_normal((fan_in, _BANDS * _BAND_BITS)).astype(np.float32)
    return _PROJECTIONS[fan_in]


def unit_hashes(fp: Fingerprint, per_layer: int | None, block_factor: int) -> np.ndarray:
    """Band keys (fan-in, band, sign bits) of the units of every informative layer, and of the column blocks
    of wider units up to block_factor; order-, split- and location-free, unlike the layer descriptors."""
    keys: list[np.ndarray] = []
    weights = (1 << np.arange(_BAND_BITS, dtype=np.int64)).astype(np.float64)
    for w in fp.weights:
        o, c, k = w.shape
        for factor in range(1, block_factor + 1):
            if c % factor:
                continue
            fan_in = (c // factor) * k
            if fan_in < DEFAULT_POLICY.min_fan_in:
                continue
            units = w.reshape(o * factor, fan_in)
            if per_layer is not None and units.shape[0] > per_layer:
                units = units[:: int(np.ceil(units.shape[0] / per_layer))]
            # centred like the pooled match; zeroed or constant units would hash alike in every model
            units = units - units.mean(axis=1, keepdims=True)
            units = units[np.abs(units).max(axis=1) > 1e-6]
            bits = (units @ _projection(fan_in)) > 0
            # float64 dot is exact below 2**53 and runs in BLAS, unlike an int64 matmul
            codes = (bits.reshape(units.shape[0], _BANDS, _BAND_BITS).astype(np.float64) @ weights).astype(
                np.int64
            )
            band = np.arange(_BANDS, dtype=np.int64)[None, :]
            keys.append(((fan_in * _BANDS + band) << _BAND_BITS | codes).reshape(-1))
    return np.concatenate(keys) if keys else np.zeros(0, np.int64)


def _coverage(text: str) -> float:
    k, n = text.split("/")
    return int(k) / max(int(n), 1)


def _name_key(name: str) -> str:
    return re.sub(r"\s+", " ", name.strip()).lower()


def _atomic_npy(path: Path, array: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write(path, buf.getvalue())


def _atomic_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    atomic_write(path, buf.getvalue())
