from __future__ import annotations

import pytest

from licenses._policy import ExpressionProblem, evaluate, load_policy, normalize


@pytest.mark.parametrize(
    ("expression", "normalized"),
    [
        ("apache-2.0", "Apache-2.0"),
        ("mit or gpl-3.0-only", "MIT OR GPL-3.0-only"),
        ("GPL-2.0+", "GPL-2.0-or-later"),
        ("openrail-m", "LicenseRef-OpenRAIL-M"),
        ("creativeml-openrail-m", "LicenseRef-CreativeML-OpenRAIL-M"),
        ("bigscience-openrail-m", "LicenseRef-BigScience-OpenRAIL-M"),
        ("llama2", "LicenseRef-Llama-2-Community"),
        ("llama3", "LicenseRef-Llama-3-Community"),
        ("gemma", "LicenseRef-Gemma-Terms"),
        ("cc-by-4.0 and (mit or bsd-3-clause)", "CC-BY-4.0 AND (MIT OR BSD-3-Clause)"),
    ],
)
def test_normalize(expression: str, normalized: str) -> None:
    assert normalize(expression) == normalized


@pytest.mark.parametrize(
    ("expression", "use", "verdict", "must_include"),
    [
        ("Apache-2.0", "derivative", "obligations", {"notice", "attribution"}),
        ("Apache-2.0", "listing", "allow", set()),
        ("CC-BY-4.0", "derivative", "obligations", {"attribution", "notice"}),
        ("CC-BY-NC-4.0", "derivative", "forbidden", set()),
        ("CC-BY-NC-4.0", "listing", "forbidden", set()),
        ("CC-BY-ND-4.0", "derivative", "forbidden", set()),
        ("GPL-3.0-only", "listing", "forbidden", set()),
        ("CC0-1.0", "derivative", "allow", set()),
        ("LicenseRef-OpenRAIL-M", "derivative", "obligations", {"use_restrictions"}),
        ("LicenseRef-Llama-2-Community", "derivative", "obligations", {"acceptable_use_policy"}),
        ("CC-BY-SA-4.0", "derivative", "obligations", {"same_license"}),
        # OR picks the most permissive option.
        ("CC-BY-NC-4.0 OR MIT", "derivative", "obligations", {"attribution"}),
        ("GPL-3.0-only OR CC0-1.0", "listing", "allow", set()),
        # AND is as restrictive as its strictest part and unions the obligations.
        ("CC-BY-4.0 AND CC-BY-NC-4.0", "derivative", "forbidden", set()),
        ("Apache-2.0 AND LicenseRef-OpenRAIL-M", "derivative", "obligations", {"notice", "use_restrictions"}),
        # WITH uses the exception's entry: a linking exception relaxes GPL.
        ("GPL-2.0-only WITH Classpath-exception-2.0", "listing", "allow", set()),
        ("GPL-2.0-only", "listing", "forbidden", set()),
    ],
)
def test_policy_decisions(expression: str, use: str, verdict: str, must_include: set[str]) -> None:
    terms = evaluate(normalize(expression), use)
    assert terms.verdict == verdict
    assert must_include <= set(terms.obligations)
    if verdict == "forbidden":
        assert terms.reasons


def test_unknown_license_is_named() -> None:
    with pytest.raises(ExpressionProblem) as info:
        normalize("MIT AND Foo-1.0")
    assert info.value.code == "license_unknown"
    assert "unknown license Foo-1.0" in str(info.value)
    assert "declare an SPDX id or LicenseRef" in str(info.value)


def test_unlisted_licenseref_is_unknown() -> None:
    with pytest.raises(ExpressionProblem, match="LicenseRef-MyOwn"):
        normalize("LicenseRef-MyOwn")


def test_valid_spdx_without_policy_entry_is_unclassified() -> None:
    with pytest.raises(ExpressionProblem) as info:
        evaluate(normalize("Artistic-2.0"), "listing")
    assert info.value.code == "license_unclassified"


def test_malformed_expression() -> None:
    with pytest.raises(ExpressionProblem) as info:
        normalize("MIT AND (")
    assert info.value.code == "license_invalid"


def test_other_with_license_name_becomes_licenseref() -> None:
    assert normalize("other", license_name="OpenRAIL-M") == "LicenseRef-OpenRAIL-M"
    with pytest.raises(ExpressionProblem, match="LicenseRef-My-Terms"):
        normalize("other", license_name="My Terms")
    with pytest.raises(ExpressionProblem):
        normalize("other")


def test_policy_table_is_consistent() -> None:
    policy = load_policy()
    verdicts = {"allow", "obligations", "forbidden"}
    for key, entry in policy.licenses.items():
        assert entry["listing"] in verdicts and entry["derivative"] in verdicts, key
        for obligation in entry.get("obligations", []) + entry.get("listing_obligations", []):
            assert obligation in policy.obligation_text, (key, obligation)
        if "forbidden" in (entry["listing"], entry["derivative"]):
            assert entry.get("reason"), key
    for alias, target in policy.aliases.items():
        assert target in policy.licenses, alias
