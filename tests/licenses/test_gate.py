"""The gate end to end on corpus models: decisions, evidence, NOTICE and a schema-valid, reproducible ML-BOM."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from edgemart.core.errors import UsageError
from licenses import LicenseIndex, check_model, make_mlbom, make_notice
from licenses import _transforms as T


def _codes(decision) -> set[str]:
    return {f.code for f in decision.findings}


def test_undeclared_derivative_is_blocked_with_evidence(model_bytes, open_index) -> None:
    decision = check_model(
        model_bytes("digits/digits_mlp_finetuned.onnx"), declared_license="MIT", index=open_index
    )
    assert decision.outcome == "block"
    finding = next(f for f in decision.findings if f.code == "undeclared_derivative")
    assert finding.severity == "block"
    assert finding.evidence["base"] == "digits-base"
    assert finding.evidence["base_license"] == "CC-BY-4.0"
    assert finding.evidence["similarity"] > 0.95
    assert finding.evidence["layers_matched"] == "3/3"
    assert "base_model: digits-base" in finding.message
    assert decision.lineage[0]["relation"] == "fingerprint"
    json.dumps(decision.to_dict())


def test_hidden_derivative_is_blocked(digits_bytes, open_index) -> None:
    hidden = T.rename_tensors(T.relu_rescale(T.permute_hidden(digits_bytes, seed=11), seed=12))
    decision = check_model(hidden, declared_license="LicenseRef-Proprietary", index=open_index)
    assert decision.outcome == "block"
    assert "undeclared_derivative" in _codes(decision)


def test_declared_cc_by_derivative_is_allowed_with_obligations(model_bytes, open_index) -> None:
    card = "---\nlicense: mit\nbase_model: digits-base\n---\n# fine-tuned digits\n"
    decision = check_model(model_bytes("digits/digits_mlp_finetuned.onnx"), card=card, index=open_index)
    assert decision.outcome == "allow_with_obligations"
    assert decision.declared_license == "MIT"
    assert decision.lineage == (
        {"name": "digits-base", "license": "CC-BY-4.0", "relation": "declared",
         "similarity": decision.lineage[0]["similarity"], "layers_matched": "3/3"},
    )  # fmt: skip
    obligations = {f.evidence["obligation"] for f in decision.findings if f.code == "base_obligation"}
    assert {"attribution", "notice"} <= obligations
    assert any("attribution (CC-BY-4.0, from digits-base)" in o for o in decision.obligations)


def test_nc_base_blocks_even_when_declared(model_bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        index = LicenseIndex(Path(tmp))
        index.add(model_bytes("digits/digits_mlp_base.onnx"), name="digits-nc", license="CC-BY-NC-4.0")
        card = "---\nbase_model: digits-nc\n---\n"
        decision = check_model(
            model_bytes("digits/digits_mlp_pruned.onnx"),
            card=card,
            declared_license="Apache-2.0",
            index=index,
        )
    assert decision.outcome == "block"
    finding = next(f for f in decision.findings if f.code == "base_license_forbids")
    assert "NonCommercial" in finding.message and finding.evidence["base_license"] == "CC-BY-NC-4.0"


def test_apache_base_gives_notice_obligation(model_bytes, open_index) -> None:
    card = "---\nlicense: apache-2.0\nbase_model: [blazeface-front]\n---\n"
    decision = check_model(
        model_bytes("mediapipe/face_detection_short_range.tflite"), card=card, index=open_index
    )
    assert decision.outcome == "allow_with_obligations"
    assert any(o.startswith("notice (Apache-2.0, from blazeface-front)") for o in decision.obligations)


def test_share_alike_base_requires_same_license(model_bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        index = LicenseIndex(Path(tmp))
        index.add(model_bytes("digits/digits_mlp_base.onnx"), name="digits-sa", license="CC-BY-SA-4.0")
        card = "---\nbase_model: digits-sa\n---\n"
        finetuned = model_bytes("digits/digits_mlp_finetuned.onnx")
        wrong = check_model(finetuned, card=card, declared_license="MIT", index=index)
        right = check_model(finetuned, card=card, declared_license="CC-BY-SA-4.0", index=index)
    assert wrong.outcome == "block" and "license_incompatible" in _codes(wrong)
    assert right.outcome == "allow_with_obligations"


def test_independent_model_is_allowed(model_bytes, open_index) -> None:
    decision = check_model(
        model_bytes("digits/digits_mlp_independent.onnx"), declared_license="MIT", index=open_index
    )
    assert decision.outcome == "allow"
    assert decision.lineage == () and decision.findings == ()


def test_no_license_blocks(model_bytes, open_index) -> None:
    decision = check_model(model_bytes("digits/digits_mlp_independent.onnx"), index=open_index)
    assert decision.outcome == "block"
    assert any(f.code == "license_missing" and "declare a license" in f.message for f in decision.findings)


def test_all_findings_are_collected(model_bytes, open_index) -> None:
    card = "---\nlicense: Foo-1.0\nbase_model: not-indexed/model\n---\n"
    decision = check_model(
        model_bytes("digits/digits_mlp_pruned.onnx"),
        card=card,
        declared_license="GPL-3.0-only",
        index=open_index,
    )
    assert decision.outcome == "block"
    assert {"license_unknown", "license_not_sellable", "base_not_indexed", "undeclared_derivative"} <= _codes(
        decision
    )
    unknown = next(f for f in decision.findings if f.code == "license_unknown")
    assert "unknown license Foo-1.0: declare an SPDX id or LicenseRef from the list" in unknown.message


def test_license_conflict_between_flag_and_card(model_bytes) -> None:
    decision = check_model(
        model_bytes("digits/digits_mlp_independent.onnx"),
        card="---\nlicense: mit\n---\n",
        declared_license="Apache-2.0",
    )
    assert decision.outcome == "block" and "license_conflict" in _codes(decision)


def test_nc_listing_license_blocks(model_bytes) -> None:
    decision = check_model(model_bytes("digits/digits_mlp_independent.onnx"), declared_license="CC-BY-NC-4.0")
    assert decision.outcome == "block" and "license_not_sellable" in _codes(decision)


def test_openrail_listing_flows_use_restrictions_down(model_bytes) -> None:
    decision = check_model(model_bytes("digits/digits_mlp_independent.onnx"), declared_license="openrail-m")
    assert decision.outcome == "allow_with_obligations"
    assert decision.declared_license == "LicenseRef-OpenRAIL-M"
    assert any(o.startswith("use_restrictions") for o in decision.obligations)


def test_embedded_onnx_metadata_declares_lineage(digits_bytes, open_index) -> None:
    import onnx

    proto = onnx.load_model_from_string(T.add_noise(digits_bytes, seed=5))
    onnx.helper.set_model_props(proto, {"base_model": "digits-base", "license": "CC-BY-4.0"})
    decision = check_model(proto.SerializeToString(), declared_license="CC-BY-4.0", index=open_index)
    assert "embedded_base_model" in _codes(decision)
    assert decision.outcome == "allow_with_obligations"
    assert decision.lineage[0]["relation"] == "declared"


def test_embedded_nc_license_blocks(digits_bytes) -> None:
    import onnx

    proto = onnx.load_model_from_string(digits_bytes)
    onnx.helper.set_model_props(proto, {"license": "CC-BY-NC-4.0"})
    decision = check_model(proto.SerializeToString(), declared_license="MIT")
    assert decision.outcome == "block" and "embedded_license_forbids" in _codes(decision)


def test_bad_inputs_raise_usage_errors(digits_bytes) -> None:
    with pytest.raises(UsageError, match="unrecognized model format"):
        check_model(b"\x89PNG....", declared_license="MIT")
    with pytest.raises(UsageError, match="malformed YAML"):
        check_model(digits_bytes, card="---\nlicense: [mit\n---\n")


# ------------------------------------------------------------------------------------------ outputs


def _bom_inputs(model_bytes, open_index) -> list[dict]:
    card = "---\nlicense: mit\nbase_model: digits-base\ndatasets: [optdigits]\nmetrics: [{type: accuracy, value: 0.97}]\n---\n"
    decision = check_model(model_bytes("digits/digits_mlp_finetuned.onnx"), card=card, index=open_index)
    from licenses import parse_model_card

    return [
        {"name": "digits-ft", "version": "1.0", "sha256": "ab" * 32, "format": "onnx",
         "card": parse_model_card(card), "decision": decision, "target": "arm-cpu"},
        {"name": "blazeface", "version": "2", "license": "Apache-2.0", "sha256": "cd" * 32, "format": "tflite"},
    ]  # fmt: skip


def test_mlbom_validates_and_is_deterministic(model_bytes, open_index) -> None:
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    entries = _bom_inputs(model_bytes, open_index)
    bom = make_mlbom(entries, serial_seed="bundle-42")
    text = json.dumps(bom, sort_keys=True)
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(text) is None
    assert json.dumps(make_mlbom(list(reversed(entries)), serial_seed="bundle-42"), sort_keys=True) == text
    assert make_mlbom(entries, serial_seed="bundle-43")["serialNumber"] != bom["serialNumber"]
    model = next(c for c in bom["components"] if c["name"] == "digits-ft")
    assert model["type"] == "machine-learning-model"
    assert model["licenses"] == [{"expression": "MIT"}]
    ancestor = model["pedigree"]["ancestors"][0]
    assert ancestor["name"] == "digits-base" and ancestor["licenses"] == [{"expression": "CC-BY-4.0"}]
    assert model["modelCard"]["modelParameters"]["datasets"][0]["name"] == "optdigits"


def test_mlbom_validates_against_1_5(model_bytes, open_index) -> None:
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    bom = make_mlbom(_bom_inputs(model_bytes, open_index), serial_seed="s")
    bom["specVersion"] = "1.5"
    bom["$schema"] = "http://cyclonedx.org/schema/bom-1.5.schema.json"
    assert JsonStrictValidator(SchemaVersion.V1_5).validate_str(json.dumps(bom)) is None


def test_notice_lists_lineage_and_obligations(model_bytes, open_index) -> None:
    entries = _bom_inputs(model_bytes, open_index)
    text = make_notice(entries)
    assert text == make_notice(list(reversed(entries)))
    assert "== digits-ft 1.0 ==" in text and "License: MIT" in text
    assert "digits-base (license CC-BY-4.0, declared" in text
    assert "attribution (CC-BY-4.0, from digits-base)" in text
    assert "== blazeface 2 ==" in text and "License: Apache-2.0" in text
