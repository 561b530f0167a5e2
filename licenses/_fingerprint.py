"""Weight fingerprints: canonical per-layer weights, compact descriptors and the exact layer/unit match.

Canonical form removes what a seller can change without changing the function: tensor names, format,
opset, precision (fp16/int8 are dequantized first), hidden-unit order (Hungarian matching of units,
propagated to the next layer's inputs) and positive per-unit scale (ReLU rescaling, folded BN)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

from licenses._formats import ParsedModel, WeightLayer

DESCRIPTOR_DIM = 8


@dataclass(frozen=True)
class MatchPolicy:
    """Thresholds of the exact match, calibrated on independent same-architecture models (see bench)."""

    layer_similarity: float = 0.80  # median unit cosine for a layer to count as matched
    min_fan_in: int = 12  # below this a free Hungarian match of random units looks similar: not evidence
    min_fraction: float = 0.5  # matched / informative base layers for "derived"
    max_units_hungarian: int = 4096


DEFAULT_POLICY = MatchPolicy()


@dataclass
class Fingerprint:
    sha256: str
    format: str
    weights: list[np.ndarray]  # canonical (out, in, k), float32, unit rows L2-normalized
    sources: list[int]  # -1 when unknown
    kinds: list[str]
    descriptors: np.ndarray = field(default_factory=lambda: np.zeros((0, DESCRIPTOR_DIM), np.float32))

    @property
    def shapes(self) -> list[tuple[int, int, int]]:
        return [tuple(int(d) for d in w.shape) for w in self.weights]  # type: ignore[misc]

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {
            "sources": np.asarray(self.sources, np.int64),
            "kinds": np.asarray(self.kinds, dtype="U9"),
            "descriptors": self.descriptors,
        }
        for i, w in enumerate(self.weights):
            arrays[f"w{i}"] = w.astype(np.float16)
        return arrays

    @classmethod
    def from_arrays(cls, arrays, *, sha256: str, format: str) -> Fingerprint:  # type: ignore[no-untyped-def]
        n = len(arrays["sources"])
        return cls(
            sha256=sha256,
            format=format,
            weights=[np.asarray(arrays[f"w{i}"], np.float32) for i in range(n)],
            sources=[int(s) for s in arrays["sources"]],
            kinds=[str(k) for k in arrays["kinds"]],
            descriptors=np.asarray(arrays["descriptors"], np.float32),
        )


def fingerprint(parsed: ParsedModel) -> Fingerprint:
    weights = [_canonical(layer, parsed.layers) for layer in parsed.layers]
    sources = [-1 if layer.source is None else layer.source for layer in parsed.layers]
    descriptors = np.stack([describe(w) for w in weights]) if weights else np.zeros((0, DESCRIPTOR_DIM))
    return Fingerprint(
        sha256=parsed.sha256,
        format=parsed.format,
        weights=weights,
        sources=sources,
        kinds=[layer.kind for layer in parsed.layers],
        descriptors=descriptors.astype(np.float32),
    )


def _canonical(layer: WeightLayer, layers: list[WeightLayer]) -> np.ndarray:
    w = np.nan_to_num(np.asarray(layer.weight, np.float64))
    # A positive per-unit scale s on the source's unit c is undone by 1/s on input channel c here;
    # multiplying by the source's row norms makes the product invariant.
    if layer.source is not None:
        src = layers[layer.source].weight
        if src.shape[0] == w.shape[1]:
            norms = np.sqrt(np.square(np.asarray(src, np.float64)).reshape(src.shape[0], -1).sum(axis=1))
            w = w * norms[None, :, None]
    return _normalize_rows(np.nan_to_num(w)).astype(np.float32)


def _normalize_rows(w: np.ndarray) -> np.ndarray:
    flat = w.reshape(w.shape[0], -1)
    norms = np.linalg.norm(flat, axis=1)
    norms[norms == 0] = 1.0
    return (flat / norms[:, None]).reshape(w.shape)


def describe(weight: np.ndarray) -> np.ndarray:
    """Permutation- and scale-invariant layer descriptor: leading normalized singular values."""
    flat = np.asarray(weight, np.float64).reshape(weight.shape[0], -1)
    if flat.size == 0:
        return np.zeros(DESCRIPTOR_DIM, np.float32)
    gram = flat @ flat.T if flat.shape[0] <= flat.shape[1] else flat.T @ flat  # cheaper than an SVD
    sv = np.sqrt(np.clip(np.linalg.eigvalsh(gram)[::-1], 0.0, None))
    sv = sv / max(float(np.linalg.norm(sv)), 1e-12)
    out = np.zeros(DESCRIPTOR_DIM, np.float32)
    out[: min(DESCRIPTOR_DIM, sv.size)] = sv[:DESCRIPTOR_DIM]
    return out


def shape_key(shape: tuple[int, ...]) -> int:
    o, c, k = (int(d) for d in shape)
    return (o * 1_000_003 + c) * 1_000_033 + k


# ----------------------------------------------------------------------------------------- matching


@dataclass(frozen=True)
class LayerMatch:
    upload_layer: int
    base_layer: int
    shape: tuple[int, int, int]
    similarity: float
    informative: bool
    matched: bool


@dataclass(frozen=True)
class MatchResult:
    similarity: float  # median layer similarity over aligned informative layers
    layers_matched: int
    layers_total: int  # informative layers of the base
    derived: bool
    layers: tuple[LayerMatch, ...]

    @property
    def layers_matched_text(self) -> str:
        return f"{self.layers_matched}/{self.layers_total}"


def align_layers(
    upload: list[tuple[int, int, int]], base: list[tuple[int, int, int]]
) -> list[tuple[int, int]]:
    """Longest common subsequence of layer shapes: survives layers added or removed at either end."""
    n, m = len(upload), len(base)
    if n == 0 or m == 0:
        return []
    table = np.zeros((n + 1, m + 1), np.int32)
    for i in range(n - 1, -1, -1):
        row, below = table[i], table[i + 1]
        for j in range(m - 1, -1, -1):
            row[j] = below[j + 1] + 1 if upload[i] == base[j] else max(below[j], row[j + 1])
    pairs: list[tuple[int, int]] = []
    i = j = 0
    while i < n and j < m:
        if upload[i] == base[j] and table[i, j] == table[i + 1, j + 1] + 1:
            pairs.append((i, j))
            i += 1
            j += 1
        elif table[i + 1, j] >= table[i, j + 1]:
            i += 1
        else:
            j += 1
    return pairs


def match(upload: Fingerprint, base: Fingerprint, policy: MatchPolicy = DEFAULT_POLICY) -> MatchResult:
    """Align layers, match units (Hungarian, permutation propagated to inputs) and score each layer."""
    pairs = align_layers(upload.shapes, base.shapes)
    base_of = dict(pairs)
    # perm[u_layer][j] = unit of the upload layer that corresponds to base unit j
    perms: dict[int, np.ndarray] = {}
    results: list[LayerMatch] = []
    for iu, ib in pairs:
        u, b = upload.weights[iu], base.weights[ib]
        src_u = upload.sources[iu]
        depthwise = upload.kinds[iu] == "depthwise"
        inherited = None
        if src_u >= 0 and src_u in perms and base_of.get(src_u) == base.sources[ib]:
            candidate = perms[src_u]
            if candidate.size == (u.shape[0] if depthwise else u.shape[1]):
                inherited = candidate
        if inherited is not None and not depthwise:
            u = u[:, inherited, :]
        fan_in = u.shape[1] * u.shape[2]
        uf = u.reshape(u.shape[0], -1).astype(np.float64)
        bf = b.reshape(b.shape[0], -1).astype(np.float64)
        if depthwise and inherited is not None:
            # A depthwise unit is tied to its input channel: its order is the inherited one.
            perm = inherited
            sims = np.einsum("ij,ij->i", uf[perm], bf)
            informative = fan_in >= 4
        elif u.shape[0] <= policy.max_units_hungarian:
            sim = bf @ uf.T  # base unit x upload unit cosine (rows are unit-norm)
            rows, cols = linear_sum_assignment(sim, maximize=True)
            perm = np.empty(u.shape[0], np.int64)
            perm[rows] = cols
            sims = sim[rows, cols]
            informative = fan_in >= policy.min_fan_in
        else:
            perm = np.arange(u.shape[0])
            sims = np.einsum("ij,ij->i", uf, bf)
            informative = fan_in >= policy.min_fan_in
        perms[iu] = perm
        live = np.linalg.norm(bf, axis=1) > 0
        similarity = float(np.median(sims[live])) if live.any() else 0.0
        results.append(
            LayerMatch(
                upload_layer=iu,
                base_layer=ib,
                shape=tuple(int(d) for d in b.shape),  # type: ignore[arg-type]
                similarity=round(similarity, 4),
                informative=informative,
                matched=informative and similarity >= policy.layer_similarity,
            )
        )
    total = sum(
        1 for w, kind in zip(base.weights, base.kinds, strict=True) if _informative_alone(w, kind, policy)
    )
    total = max(total, 1)
    aligned = [r for r in results if r.informative]
    matched = sum(1 for r in aligned if r.matched)
    similarity = float(np.median([r.similarity for r in aligned])) if aligned else 0.0
    derived = (
        matched >= max(1, math.ceil(policy.min_fraction * total)) and similarity >= policy.layer_similarity
    )
    return MatchResult(
        similarity=round(similarity, 4),
        layers_matched=min(matched, total),
        layers_total=total,
        derived=derived,
        layers=tuple(results),
    )


def _informative_alone(weight: np.ndarray, kind: str, policy: MatchPolicy) -> bool:
    fan_in = weight.shape[1] * weight.shape[2]
    return fan_in >= (4 if kind == "depthwise" else policy.min_fan_in)
