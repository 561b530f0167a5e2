"""Compliance artifacts for bundles: the NOTICE text and a CycloneDX ML-BOM (JSON, spec 1.6).

Both are pure functions of their inputs (sorted, no clocks, serial number derived from `serial_seed`),
so a firmware bundle built twice from the same licenses is byte-identical."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from edgemart.core.errors import UsageError

SPEC_VERSION = "1.6"
_SERIAL_NAMESPACE = uuid.UUID("5b0c6d4e-7f1a-4c39-9a52-6564676d6172")  # fixed: "edgemart" ML-BOM serials


def _decision_dict(entry: Mapping[str, Any]) -> dict[str, Any]:
    decision = entry.get("decision")
    if decision is None:
        return {}
    if hasattr(decision, "to_dict"):
        return decision.to_dict()  # type: ignore[no-any-return]
    return dict(decision)


def _field(entry: Mapping[str, Any], key: str, default: Any = None) -> Any:
    if key in entry and entry[key] is not None:
        return entry[key]
    return _decision_dict(entry).get(key, default)


def make_notice(entries: Sequence[Mapping[str, Any]]) -> str:
    """NOTICE text for listings: name, license, lineage with evidence, and the obligations carried over.

    Each entry: name, optional version, license (or decision.declared_license), lineage, obligations,
    attribution (free text) and/or decision (a Decision or its dict)."""
    blocks = ["NOTICE", "", "This distribution contains the following machine-learning models.", ""]
    for entry in sorted(entries, key=lambda e: (str(e.get("name", "")), str(e.get("version", "")))):
        name = entry.get("name")
        if not name:
            raise UsageError("notice entry without a name")
        version = entry.get("version")
        license_expr = _field(entry, "license") or _field(entry, "declared_license") or "NOASSERTION"
        title = f"{name} {version}" if version else str(name)
        blocks += [f"== {title} ==", f"License: {license_expr}"]
        if entry.get("attribution"):
            blocks.append(f"Attribution: {entry['attribution']}")
        lineage = _field(entry, "lineage", []) or []
        if lineage:
            blocks.append("Derived from:")
            for base in sorted(lineage, key=lambda b: str(b.get("name"))):
                detail = [
                    f"license {base.get('license') or 'unverified'}",
                    str(base.get("relation", "declared")),
                ]
                if base.get("similarity") is not None:
                    detail.append(f"weight similarity {float(base['similarity']):.3f}")
                if base.get("layers_matched"):
                    detail.append(f"layers matched {base['layers_matched']}")
                blocks.append(f"  - {base.get('name')} ({', '.join(detail)})")
        obligations = _field(entry, "obligations", []) or []
        if obligations:
            blocks.append("Obligations carried over:")
            blocks += [f"  - {text}" for text in sorted(set(obligations))]
        blocks.append("")
    return "\n".join(blocks).rstrip("\n") + "\n"


def _licenses(expression: str | None) -> list[dict[str, Any]]:
    if not expression:
        return []
    return [{"expression": expression}]


def _ref(name: str, version: str | None) -> str:
    return f"model:{name}@{version}" if version else f"model:{name}"


def make_mlbom(components: Sequence[Mapping[str, Any]], *, serial_seed: str) -> dict[str, Any]:
    """CycloneDX 1.6 ML-BOM: one machine-learning-model component per entry, with modelCard and
    pedigree.ancestors for its lineage. Entry keys: name, version, license, sha256, format, card
    (ModelCard or its dict), lineage, obligations, decision (optional), target, supplier."""
    if not serial_seed:
        raise UsageError("make_mlbom needs a serial_seed (reproducible bundles derive the serial from it)")
    serial = uuid.uuid5(_SERIAL_NAMESPACE, serial_seed)
    out_components: list[dict[str, Any]] = []
    dependencies: list[dict[str, Any]] = []
    for entry in sorted(components, key=lambda e: (str(e.get("name", "")), str(e.get("version", "")))):
        name = entry.get("name")
        if not name:
            raise UsageError("ML-BOM component without a name")
        version = entry.get("version")
        license_expr = _field(entry, "license") or _field(entry, "declared_license")
        component: dict[str, Any] = {
            "type": "machine-learning-model",
            "bom-ref": _ref(str(name), version),
            "name": str(name),
        }
        if version:
            component["version"] = str(version)
        if entry.get("supplier"):
            component["supplier"] = {"name": str(entry["supplier"])}
        if entry.get("sha256"):
            component["hashes"] = [{"alg": "SHA-256", "content": str(entry["sha256"]).lower()}]
        if license_expr:
            component["licenses"] = _licenses(license_expr)
        component["modelCard"] = _model_card(entry)
        lineage = _field(entry, "lineage", []) or []
        if lineage:
            ancestors = []
            for base in sorted(lineage, key=lambda b: str(b.get("name"))):
                ancestor: dict[str, Any] = {
                    "type": "machine-learning-model",
                    "bom-ref": f"{component['bom-ref']}/ancestor:{base.get('name')}",
                    "name": str(base.get("name")),
                }
                if base.get("license"):
                    ancestor["licenses"] = _licenses(str(base["license"]))
                ancestor["properties"] = _properties(
                    {
                        "edgemart:lineage:relation": base.get("relation"),
                        "edgemart:lineage:similarity": base.get("similarity"),
                        "edgemart:lineage:layers_matched": base.get("layers_matched"),
                    }
                )
                ancestors.append(ancestor)
            component["pedigree"] = {"ancestors": ancestors}
        decision = _decision_dict(entry)
        props = {
            "edgemart:format": entry.get("format"),
            "edgemart:target": entry.get("target"),
            "edgemart:compliance:outcome": decision.get("outcome"),
        }
        for i, text in enumerate(sorted(set(_field(entry, "obligations", []) or []))):
            props[f"edgemart:obligation:{i:03d}"] = text
        properties = _properties(props)
        if properties:
            component["properties"] = properties
        out_components.append(component)
        dependencies.append({"ref": component["bom-ref"]})
    return {
        "$schema": "http://cyclonedx.org/schema/bom-1.6.schema.json",
        "bomFormat": "CycloneDX",
        "specVersion": SPEC_VERSION,
        "serialNumber": serial.urn,
        "version": 1,
        "metadata": {
            "tools": {"components": [{"type": "application", "name": "edgemart", "group": "edgemart"}]},
        },
        "components": out_components,
        "dependencies": dependencies,
    }


def _properties(values: Mapping[str, Any]) -> list[dict[str, str]]:
    return [{"name": k, "value": str(v)} for k, v in values.items() if v is not None and v != ""]


def _model_card(entry: Mapping[str, Any]) -> dict[str, Any]:
    card = entry.get("card")
    if card is not None and hasattr(card, "to_dict"):
        card = card.to_dict()
    card = dict(card or {})
    parameters: dict[str, Any] = {}
    if entry.get("format"):
        parameters["modelArchitecture"] = str(entry["format"])
    datasets = card.get("datasets") or []
    if datasets:
        parameters["datasets"] = [
            {"type": "dataset", "name": str(d), "bom-ref": f"dataset:{d}"} for d in sorted(set(datasets))
        ]
    result: dict[str, Any] = {}
    if parameters:
        result["modelParameters"] = parameters
    metrics = _metrics(card.get("metrics") or [])
    if metrics:
        result["quantitativeAnalysis"] = {"performanceMetrics": metrics}
    considerations: dict[str, Any] = {}
    obligations = sorted(set(_field(entry, "obligations", []) or []))
    if obligations:
        considerations["ethicalConsiderations"] = [{"name": text} for text in obligations]
    if card.get("license_link"):
        considerations["technicalLimitations"] = [f"license terms: {card['license_link']}"]
    if considerations:
        result["considerations"] = considerations
    return result


def _metrics(metrics: Sequence[Any]) -> list[dict[str, str]]:
    out = []
    for metric in metrics:
        if isinstance(metric, Mapping):
            item = {"type": str(metric.get("type") or metric.get("name") or "metric")}
            if metric.get("value") is not None:
                item["value"] = str(metric["value"])
            out.append(item)
        else:
            out.append({"type": str(metric)})
    return sorted(out, key=lambda m: (m["type"], m.get("value", "")))
