"""The compliance decision: collect every finding about an upload, then allow, allow with obligations, or block.

Inputs are the model bytes, the model card, the declared license and the index of open models; the
decision carries the evidence a reviewer needs (which base, how similar, which term, what to do)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from licenses._fingerprint import match
from licenses._formats import ParsedModel, parse_model
from licenses._policy import FORBIDDEN, ExpressionProblem, Terms, evaluate, load_policy, normalize
from licenses.card import ModelCard, parse_model_card
from licenses.index import LicenseIndex

INFO, OBLIGATION, BLOCK = "info", "obligation", "block"


@dataclass(frozen=True)
class Finding:
    code: str
    severity: str  # info | obligation | block
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "severity": self.severity,
            "message": self.message,
            "evidence": self.evidence,
        }


@dataclass(frozen=True)
class Decision:
    outcome: str  # allow | allow_with_obligations | block
    findings: tuple[Finding, ...]
    declared_license: str | None
    lineage: tuple[dict[str, Any], ...]
    obligations: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "declared_license": self.declared_license,
            "lineage": [dict(item) for item in self.lineage],
            "obligations": list(self.obligations),
            "findings": [f.to_dict() for f in self.findings],
        }

    @property
    def blocking(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity == BLOCK)


class _Collector:
    def __init__(self) -> None:
        self.findings: list[Finding] = []
        self.obligations: list[str] = []
        self.lineage: list[dict[str, Any]] = []

    def add(self, code: str, severity: str, message: str, **evidence: Any) -> None:
        self.findings.append(Finding(code, severity, message, evidence))

    def oblige(self, text: str) -> None:
        if text not in self.obligations:
            self.obligations.append(text)


def check_model(
    model: bytes,
    *,
    card: str | None = None,
    declared_license: str | None = None,
    index: LicenseIndex | None = None,
) -> Decision:
    """Run every check on an upload; UsageError only for unreadable input (model bytes, card syntax)."""
    parsed = parse_model(model)
    model_card = parse_model_card(card) if card is not None else None
    out = _Collector()
    license_expr = _declared_license(out, declared_license, model_card)
    if license_expr is not None:
        _listing_terms(out, license_expr)
    embedded_bases = _embedded_metadata(out, parsed)
    declared_bases = list(model_card.base_model if model_card else ()) + embedded_bases
    if model_card is not None and not model_card.has_front_matter:
        out.add(
            "card_without_front_matter",
            INFO,
            "the model card has no YAML front matter: nothing is declared in it",
        )
    _lineage(out, parsed, declared_bases, license_expr, index)
    if any(f.severity == BLOCK for f in out.findings):
        outcome = "block"
    elif any(f.severity == OBLIGATION for f in out.findings):
        outcome = "allow_with_obligations"
    else:
        outcome = "allow"
    return Decision(
        outcome=outcome,
        findings=tuple(out.findings),
        declared_license=license_expr,
        lineage=tuple(out.lineage),
        obligations=tuple(out.obligations),
    )


def _declared_license(out: _Collector, declared: str | None, card: ModelCard | None) -> str | None:
    candidates: list[tuple[str, str]] = []
    if declared and declared.strip():
        candidates.append(("declared", declared))
    if card is not None and card.license:
        candidates.append(("model card", card.license))
    if not candidates:
        out.add(
            "license_missing",
            BLOCK,
            "declare a license: pass --license SPDX or set `license:` in the model card front matter",
        )
        return None
    normalized: list[tuple[str, str]] = []
    for where, text in candidates:
        try:
            name = card.license_name if card is not None and where == "model card" else None
            normalized.append((where, normalize(text, license_name=name)))
        except ExpressionProblem as exc:
            out.add(exc.code, BLOCK, f"{where} license: {exc}", expression=text, symbols=list(exc.symbols))
    if len({expr for _, expr in normalized}) > 1:
        out.add(
            "license_conflict",
            BLOCK,
            f"the declared license {normalized[0][1]} differs from the model card's {normalized[1][1]}: "
            "make them agree",
            declared=normalized[0][1],
            card=normalized[1][1],
        )
    return normalized[0][1] if normalized else None


def _listing_terms(out: _Collector, expression: str) -> None:
    policy = load_policy()
    try:
        terms = evaluate(expression, "listing")
    except ExpressionProblem as exc:
        out.add(exc.code, BLOCK, str(exc), expression=expression, symbols=list(exc.symbols))
        return
    if terms.verdict == FORBIDDEN:
        out.add(
            "license_not_sellable",
            BLOCK,
            f"a model licensed {expression} cannot be sold on the store: {'; '.join(terms.reasons)}; "
            "pick a license that allows commercial distribution",
            license=expression,
            term=terms.chosen,
        )
        return
    for obligation in terms.obligations:
        text = f"{obligation} ({terms.chosen}): {policy.describe(obligation)}"
        out.add(
            "listing_obligation",
            OBLIGATION,
            text,
            license=expression,
            term=terms.chosen,
            obligation=obligation,
        )
        out.oblige(text)


_LICENSE_LINE = re.compile(r"\blicen[cs]e\b\s*[:=]\s*([A-Za-z0-9.+\-]+)", re.IGNORECASE)


def _embedded_metadata(out: _Collector, parsed: ParsedModel) -> list[str]:
    """Record license / lineage hints stored inside the model file; returns embedded base model names."""
    bases: list[str] = []
    licenses: list[tuple[str, str]] = []
    for key, value in sorted(parsed.metadata.items()):
        lowered = key.lower()
        if lowered in ("base_model", "base_models", "derived_from", "parent_model"):
            bases.extend(v.strip() for v in re.split(r"[,\n]", value) if v.strip())
        elif lowered in ("license", "license_name", "spdx", "spdx_license"):
            licenses.append((key, value.strip()))
        else:
            found = _LICENSE_LINE.search(value)
            if found:
                licenses.append((key, found.group(1)))
    if bases:
        out.add(
            "embedded_base_model",
            INFO,
            f"the model file names its base model(s): {', '.join(bases)}",
            bases=bases,
        )
    for key, text in licenses:
        try:
            expression = normalize(text)
            terms = evaluate(expression, "derivative")
        except ExpressionProblem:
            out.add(
                "embedded_license",
                INFO,
                f"the model file's metadata '{key}' mentions license {text!r}",
                key=key,
            )
            continue
        if terms.verdict == FORBIDDEN:
            out.add(
                "embedded_license_forbids",
                BLOCK,
                f"the model file's own metadata says {expression} ({'; '.join(terms.reasons)}): "
                "remove it only if you hold the rights, and declare the real license and lineage",
                key=key,
                license=expression,
            )
        else:
            out.add(
                "embedded_license", INFO, f"the model file's metadata declares license {expression}", key=key
            )
    return bases


def _lineage(
    out: _Collector,
    parsed: ParsedModel,
    declared_bases: list[str],
    license_expr: str | None,
    index: LicenseIndex | None,
) -> None:
    from licenses._fingerprint import fingerprint

    declared_keys = {name.strip().lower(): name for name in declared_bases}
    fp = fingerprint(parsed)
    matches = index.lookup_fingerprint(fp) if index is not None else []
    matched_by_name = {m.name.strip().lower(): m for m in matches}
    for key, name in declared_keys.items():
        entry = index.entry(name) if index is not None else None
        if entry is None or index is None:
            out.add(
                "base_not_indexed",
                OBLIGATION,
                f"declared base model {name!r} is not in the license index: its license could not be checked; "
                "attribute it and honour its license (a reviewer confirms it)",
                base=name,
            )
            out.oblige(
                f"attribution ({name}): credit the declared base model {name!r} and keep its license terms"
            )
            out.lineage.append(
                {
                    "name": name,
                    "license": None,
                    "relation": "declared",
                    "similarity": None,
                    "layers_matched": None,
                }
            )
            continue
        found = matched_by_name.get(key)
        if found is not None:
            similarity, layers = found.similarity, found.layers_matched
        else:
            result = match(fp, index._fingerprint_of(entry), index.policy)  # noqa: SLF001 - same package
            similarity, layers = result.similarity, result.layers_matched_text
            if not result.derived:
                out.add(
                    "declared_base_not_confirmed",
                    INFO,
                    f"declared base {entry['name']!r} was not confirmed by the weights "
                    f"(similarity {similarity:.3f}, layers {layers}); its terms apply as declared",
                    base=entry["name"],
                    similarity=similarity,
                    layers_matched=layers,
                )
        out.lineage.append(
            {
                "name": entry["name"],
                "license": entry["license"],
                "relation": "declared",
                "similarity": similarity,
                "layers_matched": layers,
            }
        )
        _apply_base_terms(out, entry["name"], entry["license"], license_expr, similarity, layers)
    for m in matches:
        if m.name.strip().lower() in declared_keys:
            continue
        out.lineage.append(
            {
                "name": m.name,
                "license": m.license,
                "relation": "fingerprint",
                "similarity": m.similarity,
                "layers_matched": m.layers_matched,
            }
        )
        how = "is a byte copy of" if m.evidence.get("relation") == "byte_copy" else "has the weights of"
        share = m.evidence.get("parameter_share")
        share_text = f", {share:.0%} of its weight parameters found" if share is not None else ""
        out.add(
            "undeclared_derivative",
            BLOCK,
            f"the upload {how} indexed model {m.name!r} (license {m.license}; similarity {m.similarity:.3f}, "
            f"layers matched {m.layers_matched}{share_text}) but does not declare it: add `base_model: {m.name}` "
            "to the model card; its license terms then apply",
            base=m.name,
            base_license=m.license,
            similarity=m.similarity,
            layers_matched=m.layers_matched,
            **m.evidence,
        )
        _apply_base_terms(out, m.name, m.license, license_expr, m.similarity, m.layers_matched)


def _apply_base_terms(
    out: _Collector, base: str, base_license: str, license_expr: str | None, similarity: float, layers: str
) -> None:
    policy = load_policy()
    evidence = {
        "base": base,
        "base_license": base_license,
        "similarity": similarity,
        "layers_matched": layers,
    }
    try:
        terms: Terms = evaluate(base_license, "derivative")
    except ExpressionProblem as exc:
        out.add("base_license_unclassified", BLOCK, f"base {base!r}: {exc}", **evidence)
        return
    if terms.verdict == FORBIDDEN:
        out.add(
            "base_license_forbids",
            BLOCK,
            f"base model {base!r} is licensed {base_license}, which forbids selling derivatives "
            f"({'; '.join(terms.reasons)}): this model cannot be listed",
            term=terms.chosen,
            **evidence,
        )
        return
    if terms.same_license and license_expr is not None and license_expr != base_license:
        out.add(
            "license_incompatible",
            BLOCK,
            f"base model {base!r} is share-alike ({base_license}): offer the derivative under {base_license} "
            f"instead of {license_expr}",
            term=terms.chosen,
            **evidence,
        )
    for obligation in terms.obligations:
        text = f"{obligation} ({base_license}, from {base}): {policy.describe(obligation)}"
        out.add("base_obligation", OBLIGATION, text, obligation=obligation, term=terms.chosen, **evidence)
        out.oblige(text)
