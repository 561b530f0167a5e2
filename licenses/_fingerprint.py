# Why this is one module: canonicalisation and the two matchers share the unit normalisation they compare under.
"""Weight fingerprints: canonical per-layer weights, compact descriptors and the exact layer/unit match.

Canonical form removes what a seller can change without changing the function: tensor names, format,
opset, precision (fp16/int8 are dequantized first), hidden-unit order (Hungarian matching of units,
propagated to the next layer's inputs) and positive per-unit scale (ReLU rescaling, folded BN)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from licenses._formats import ParsedModel

DESCRIPTOR_DIM = 8


@dataclass(frozen=True)
class MatchPolicy:
    """Thresholds of the exact match, calibrated on independent same-architecture models (see bench)."""

    layer_similarity: float = 0.80  # median unit cosine for a layer to count as matched
    min_fan_in: int = 12  # below this a free Hungarian match of random units looks similar: not evidence
    min_fraction: float = 0.5  # matched / informative base layers for "derived"
    max_units_hungarian: int = 4096
    # Pooled (block) matching compares each base unit with every upload unit of its fan-in, so a chance
    # match grows with the pool: a layer is evidence only while the best cosine its units reach with their
    # inputs shuffled (chance, measured against the same pool) stays this far below layer_similarity.
    pooled_margin: float = 0.15
    min_units_pooled: int = 4
    min_share: float = 0.2  # share of the base's weight parameters found for a partial derivative
    max_block_factor: int = 8  # row/column block splits tried: 2..this
    max_units_pooled: int = 256  # base units (evenly sampled) compared per layer in pooled matching


DEFAULT_POLICY = MatchPolicy()


@dataclass
class Fingerprint:
    """Learned tensors of one model in canonical form; fixed-by-construction tensors are left out."""

    sha256: str
    format: str
    weights: list[np.ndarray]  # canonical (out, in, k), float32, unit rows L2-normalized, no source scaling
    sources: list[int]  # -1 when unknown
    kinds: list[str]
    descriptors: np.ndarray = field(default_factory=lambda: np.zeros((0, DESCRIPTOR_DIM), np.float32))
    norms: list[np.ndarray] | None = None  # row norms before normalization (None: weights already scaled)
    names: list[str] = field(default_factory=list)
    _scaled: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    _pools: dict[tuple[int, int], Any] = field(default_factory=dict, repr=False)

    @property
    def shapes(self) -> list[tuple[int, int, int]]:
        return [tuple(int(d) for d in w.shape) for w in self.weights]  # type: ignore[misc]

    @property
    def parameters(self) -> int:
        return int(sum(w.size for w in self.weights))

    def name(self, i: int) -> str:
        return self.names[i] if i < len(self.names) else f"layer {i}"

    def scaled(self, i: int) -> np.ndarray:
        """Layer i with the source's per-unit scale multiplied in (invariant to ReLU rescaling)."""
        if self.norms is None:
            return self.weights[i]
        if i not in self._scaled:
            w = self.weights[i].astype(np.float64) * self.norms[i][:, None, None]
            src = self.sources[i]
            if 0 <= src < len(self.weights) and self.norms[src].size == w.shape[1]:
                w = w * self.norms[src][None, :, None]
            self._scaled[i] = _normalize_rows(np.nan_to_num(w)).astype(np.float32)
        return self._scaled[i]

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {
            "sources": np.asarray(self.sources, np.int64),
            "kinds": np.asarray(self.kinds, dtype="U9"),
            "descriptors": self.descriptors,
            "names": np.asarray(self.names or [""] * len(self.weights), dtype=str),
        }
        for i, w in enumerate(self.weights):
            arrays[f"w{i}"] = w.astype(np.float16)
            if self.norms is not None:
                arrays[f"n{i}"] = self.norms[i].astype(np.float32)
        return arrays

    @classmethod
    def from_arrays(cls, arrays, *, sha256: str, format: str) -> Fingerprint:  # type: ignore[no-untyped-def]
        n = len(arrays["sources"])
        files = set(arrays.files) if hasattr(arrays, "files") else set(arrays)
        has_norms = n > 0 and "n0" in files
        return cls(
            sha256=sha256,
            format=format,
            weights=[np.asarray(arrays[f"w{i}"], np.float32) for i in range(n)],
            sources=[int(s) for s in arrays["sources"]],
            kinds=[str(k) for k in arrays["kinds"]],
            descriptors=np.asarray(arrays["descriptors"], np.float32),
            norms=[np.asarray(arrays[f"n{i}"], np.float32) for i in range(n)] if has_norms else None,
            names=[str(x) for x in arrays["names"]] if "names" in files else [],
        )


def fingerprint(parsed: ParsedModel) -> Fingerprint:
    kept = [i for i, layer in enumerate(parsed.layers) if not layer.fixed]
    renumber = {old: new for new, old in enumerate(kept)}
    layers = [parsed.layers[i] for i in kept]
    weights, norms = [], []
    for layer in layers:
        w = np.nan_to_num(np.asarray(layer.weight, np.float64))
        row_norms = np.linalg.norm(w.reshape(w.shape[0], -1), axis=1)
        weights.append(_normalize_rows(w).astype(np.float32))
        norms.append(row_norms.astype(np.float32))
    fp = Fingerprint(
        sha256=parsed.sha256,
        format=parsed.format,
        weights=weights,
        sources=[renumber.get(layer.source, -1) if layer.source is not None else -1 for layer in layers],
        kinds=[layer.kind for layer in layers],
        norms=norms,
        names=[layer.name for layer in layers],
    )
    fp.descriptors = (
        np.stack([describe(fp.scaled(i)) for i in range(len(weights))]).astype(np.float32)
        if weights
        else np.zeros((0, DESCRIPTOR_DIM), np.float32)
    )
    return fp


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
    upload_layer: int  # the upload layer holding most matched units (-1: none)
    base_layer: int
    shape: tuple[int, int, int]
    similarity: float
    informative: bool
    matched: bool
    method: str = "aligned"  # "aligned" (same-shape layers in order) | "pooled" (units across layers/blocks)
    units: str = ""  # "k/n" base units (or column blocks) found
    upload_layers: tuple[int, ...] = ()
    base_name: str = ""
    upload_names: tuple[str, ...] = ()

    @property
    def parameters(self) -> int:
        o, c, k = self.shape
        return o * c * k


@dataclass(frozen=True)
class MatchResult:
    similarity: float  # median best similarity over the base's informative layers that were compared
    layers_matched: int
    layers_total: int  # informative layers of the base
    derived: bool
    layers: tuple[LayerMatch, ...]
    parameters_matched: int = 0
    parameters_total: int = 0  # weight parameters of the base's learned tensors

    @property
    def layers_matched_text(self) -> str:
        return f"{self.layers_matched}/{self.layers_total}"

    @property
    def parameter_share(self) -> float:
        return round(self.parameters_matched / max(self.parameters_total, 1), 4)


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


def match(
    upload: Fingerprint, base: Fingerprint, policy: MatchPolicy = DEFAULT_POLICY, *, pooled: bool = True
) -> MatchResult:
    """Compare every learned base tensor with the upload two ways and keep the better per base layer.

    Aligned: same-shape layers in order, units matched by Hungarian with permutations propagated to the next
    layer's inputs (hidden-unit shuffles, ReLU rescaling). Pooled: each base unit against every upload unit
    of its fan-in wherever it lives, including row/column blocks of larger or split tensors (gate reorders,
    Concat-split matrices, weights moved into subgraphs or between layers)."""
    aligned = {r.base_layer: r for r in _aligned(upload, base, policy)}
    # pooled=False when the caller knows no unit of the two models hashes alike (index lookups): then no
    # base unit can sit anywhere in the upload, and only the order-aware aligned match can still find it.
    by_pool = {r.base_layer: r for r in _pooled(upload, base, policy)} if pooled else {}
    layers: list[LayerMatch] = []
    for ib in range(len(base.weights)):
        options = [r for r in (aligned.get(ib), by_pool.get(ib)) if r is not None]
        informative = [r for r in options if r.informative]
        if informative:
            layers.append(max(informative, key=lambda r: (r.matched, r.similarity)))
        elif options:
            layers.append(options[0])
    informative_base = [
        i
        for i, (w, kind) in enumerate(zip(base.weights, base.kinds, strict=True))
        if _informative_alone(w, kind, policy)
    ]
    total = max(len(informative_base), 1)
    compared = [r for r in layers if r.informative]
    matched = [r for r in compared if r.matched]
    similarity = float(np.median([r.similarity for r in compared])) if compared else 0.0
    parameters_total = base.parameters
    parameters_matched = sum(r.parameters for r in matched)
    share = parameters_matched / max(parameters_total, 1)
    whole = (
        len(matched) >= max(1, math.ceil(policy.min_fraction * total))
        and similarity >= policy.layer_similarity
    )
    partial = share >= policy.min_share and len(matched) >= min(2, total)
    return MatchResult(
        similarity=round(similarity, 4),
        layers_matched=min(len(matched), total),
        layers_total=total,
        derived=bool(matched) and (whole or partial),
        layers=tuple(layers),
        parameters_matched=int(parameters_matched),
        parameters_total=int(parameters_total),
    )


def _aligned(upload: Fingerprint, base: Fingerprint, policy: MatchPolicy) -> list[LayerMatch]:
    """Align layers by shape (LCS), match units (Hungarian, permutation propagated to inputs), score each."""
    pairs = align_layers(upload.shapes, base.shapes)
    base_of = dict(pairs)
    # perm[u_layer][j] = unit of the upload layer that corresponds to base unit j
    perms: dict[int, np.ndarray] = {}
    results: list[LayerMatch] = []
    for iu, ib in pairs:
        u, b = upload.scaled(iu), base.scaled(ib)
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
        found = int(np.sum(sims[live] >= policy.layer_similarity))
        results.append(
            LayerMatch(
                upload_layer=iu,
                base_layer=ib,
                shape=tuple(int(d) for d in b.shape),  # type: ignore[arg-type]
                similarity=round(similarity, 4),
                informative=informative,
                matched=informative and similarity >= policy.layer_similarity,
                method="aligned",
                units=f"{found}/{int(live.sum())}",
                upload_layers=(iu,),
                base_name=base.name(ib),
                upload_names=(upload.name(iu),),
            )
        )
    return results


def _pool(upload: Fingerprint, channels: int, kernel: int, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Upload unit vectors of fan-in channels*kernel: whole units of that shape plus the column blocks of
    units `factor` times wider (factor 1 = whole units only). Rows unit-norm; owners = upload layer ids."""
    key = (channels * 1_000_003 + kernel, factor)
    cached = upload._pools.get(key)  # noqa: SLF001 - the fingerprint's own cache
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    rows, owners = [], []
    for i, w in enumerate(upload.weights):
        o, c, k = w.shape
        if k != kernel or c != channels * factor:
            continue
        block = w.reshape(o * factor, channels * kernel) if factor > 1 else w.reshape(o, -1)
        rows.append(block)
        owners.append(np.full(block.shape[0], i, np.int64))
    if rows:
        pool = _centered(np.concatenate(rows))
        result = (pool, np.concatenate(owners))
    else:
        result = (np.zeros((0, channels * kernel), np.float32), np.zeros(0, np.int64))
    upload._pools[key] = result  # noqa: SLF001
    return result


def _centered(rows: np.ndarray) -> np.ndarray:
    """Rows minus their mean, unit-norm: a component every unit shares (inputs that are all positive,
    a common offset) would otherwise make unrelated units look alike across a large pool."""
    rows = np.asarray(rows, np.float32)
    return _normalize_rows(rows - rows.mean(axis=1, keepdims=True))


def _pooled(upload: Fingerprint, base: Fingerprint, policy: MatchPolicy) -> list[LayerMatch]:
    results: list[LayerMatch] = []
    factors = range(2, policy.max_block_factor + 1)
    for ib, b in enumerate(base.weights):
        o, c, k = (int(d) for d in b.shape)
        if base.kinds[ib] == "depthwise" or o < policy.min_units_pooled:
            continue
        best: LayerMatch | None = None
        # (a) base units against upload units and column blocks of wider upload units
        whole = _centered(b.reshape(o, -1))
        candidates = [(whole, _pool(upload, c, k, f)) for f in (1, *factors)]
        # (b) column blocks of base units against narrower upload units
        for f in factors:
            if c % f == 0 and c // f >= 1:
                blocks = _centered(b.reshape(o * f, (c // f) * k))
                candidates.append((blocks, _pool(upload, c // f, k, 1)))
        for vectors, (pool, owners) in candidates:
            if best is not None and best.matched:
                break  # whole units found: row/column blocks cannot do better
            fan_in = vectors.shape[1]
            if pool.shape[0] == 0 or fan_in < policy.min_fan_in:
                continue
            rows = np.flatnonzero(np.linalg.norm(vectors, axis=1) > 0)
            sampled = rows.size > policy.max_units_pooled
            if sampled:  # an evenly spread sample keeps the median honest and the cost bounded
                rows = rows[:: int(np.ceil(rows.size / policy.max_units_pooled))]
            if not rows.size:
                continue
            chosen = vectors[rows].astype(np.float32)
            # What chance alone scores against this pool: the same base units with their inputs shuffled.
            shuffled = chosen[: policy.max_units_pooled // 4][
                :, np.random.default_rng(fan_in).permutation(fan_in)
            ]
            chance = float(np.median(np.max(shuffled @ pool.T, axis=1)))
            informative = chance <= policy.layer_similarity - policy.pooled_margin
            sim = chosen @ pool.T
            best_col = np.argmax(sim, axis=1)
            best_sim = sim[np.arange(sim.shape[0]), best_col]
            similarity = float(np.median(best_sim))
            hit = best_sim >= policy.layer_similarity
            layer_ids, counts = np.unique(owners[best_col[hit]], return_counts=True)
            ranked = tuple(int(layer_ids[j]) for j in np.argsort(-counts))
            candidate = LayerMatch(
                upload_layer=ranked[0] if ranked else -1,
                base_layer=ib,
                shape=(o, c, k),
                similarity=round(similarity, 4),
                informative=informative,
                matched=informative and similarity >= policy.layer_similarity,
                method="pooled",
                units=f"{int(hit.sum())}/{rows.size}" + (" sampled" if sampled else ""),
                upload_layers=ranked[:8],
                base_name=base.name(ib),
                upload_names=tuple(upload.name(i) for i in ranked[:8]),
            )
            if best is None or (candidate.informative, candidate.matched, candidate.similarity) > (
                best.informative,
                best.matched,
                best.similarity,
            ):
                best = candidate
        if best is not None:
            results.append(best)
    return results


def _informative_alone(weight: np.ndarray, kind: str, policy: MatchPolicy) -> bool:
    fan_in = weight.shape[1] * weight.shape[2]
    return fan_in >= (4 if kind == "depthwise" else policy.min_fan_in)
