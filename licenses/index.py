"""The on-disk index of open models the gate compares uploads against.

Layout under one directory: index.json (entries), descriptors.npy / owners.npy / shapekeys.npy (one row
per weight layer, for the vectorized candidate search) and models/<id>.npz (canonical weights for the
exact match). Every file is replaced atomically (temp file, fsync, rename)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from drm.errors import ConflictError, UsageError
from edge_runtime.fileio import atomic_write
from licenses._fingerprint import DEFAULT_POLICY, Fingerprint, MatchPolicy, fingerprint, match, shape_key
from licenses._formats import parse_model

_INDEX_VERSION = 1
_CANDIDATE_TOLERANCE = 0.15  # descriptor distance at which a layer stops counting as a candidate hit


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
        except (OSError, ValueError, KeyError) as exc:
            raise UsageError(f"license index at {self.directory} is unreadable: {exc}") from exc
        self._sort_keys()

    def _sort_keys(self) -> None:
        self._order = np.argsort(self._shapekeys, kind="stable")
        self._sorted_keys = self._shapekeys[self._order]

    def _save(self) -> None:
        _atomic_npy(self.directory / "descriptors.npy", self._descriptors)
        _atomic_npy(self.directory / "owners.npy", self._owners)
        _atomic_npy(self.directory / "shapekeys.npy", self._shapekeys)
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
        self, model: bytes, *, name: str, license: str, source: str = "", card: str | None = None
    ) -> dict[str, Any]:
        """Fingerprint and index an open model under `name`; returns its entry (idempotent per name+bytes)."""
        from licenses._policy import ExpressionProblem, normalize
        from licenses.card import parse_model_card

        if not name or not name.strip():
            raise UsageError("index add: --name must not be empty")
        try:
            normalized = normalize(license)
        except ExpressionProblem as exc:
            raise UsageError(f"index add: {exc}") from exc
        card_info = parse_model_card(card).to_dict() if card is not None else None
        fp = fingerprint(parse_model(model))
        existing = self.entry(name)
        if existing is not None:
            if existing["sha256"] == fp.sha256 and existing["license"] == normalized:
                return existing
            raise ConflictError(f"index add: a different model is already indexed as {name!r}")
        return self._add_many([(fp, name.strip(), normalized, source, card_info)])[0]

    def _add_many(
        self, items: Iterable[tuple[Fingerprint, str, str, str, dict[str, Any] | None]]
    ) -> list[dict[str, Any]]:
        """Bulk insert of already-fingerprinted models with one index write (used by add and the bench)."""
        new_entries: list[dict[str, Any]] = []
        descriptors: list[np.ndarray] = []
        owners: list[np.ndarray] = []
        keys: list[np.ndarray] = []
        for fp, name, license, source, card_info in items:
            model_id = f"m{len(self._entries) + len(new_entries):07d}"
            entry = {
                "id": model_id,
                "name": name,
                "license": license,
                "source": source,
                "sha256": fp.sha256,
                "format": fp.format,
                "layers": len(fp.weights),
                "card": card_info,
            }
            _atomic_npz(self.directory / "models" / f"{model_id}.npz", fp.to_arrays())
            index = len(self._entries) + len(new_entries)
            new_entries.append(entry)
            descriptors.append(fp.descriptors.reshape(-1, self._descriptors.shape[1]))
            owners.append(np.full(len(fp.weights), index, np.int64))
            keys.append(np.asarray([shape_key(s) for s in fp.shapes], np.int64))
        if not new_entries:
            return []
        self._entries.extend(new_entries)
        self._descriptors = np.concatenate([self._descriptors, *descriptors]).astype(np.float32)
        self._owners = np.concatenate([self._owners, *owners])
        self._shapekeys = np.concatenate([self._shapekeys, *keys])
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
        for i in self.candidates(fp, limit=max(4 * top_k, 16)):
            if i in seen:
                continue
            entry = self._entries[i]
            result = match(fp, self._fingerprint_of(entry), self.policy)
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
                        "layers": [
                            {
                                "upload_layer": r.upload_layer,
                                "base_layer": r.base_layer,
                                "shape": list(r.shape),
                                "similarity": r.similarity,
                                "matched": r.matched,
                            }
                            for r in result.layers
                            if r.informative
                        ][:64],
                    },
                )
            )
        matches.sort(key=lambda m: (-_coverage(m.layers_matched), -m.similarity, m.name))
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

    def _fingerprint_of(self, entry: dict[str, Any]) -> Fingerprint:
        with np.load(self.directory / "models" / f"{entry['id']}.npz") as arrays:
            return Fingerprint.from_arrays(arrays, sha256=entry["sha256"], format=entry["format"])


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
