from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgemart.core.errors import UsageError
from licenses import parse_model_card

VALID = """---
license: cc-by-4.0
base_model:
  - digits-base
  - other/model
datasets: optdigits
metrics:
  - type: accuracy
    value: 0.97
---
# Digits classifier

Fine-tuned from digits-base.
"""


def test_valid_card() -> None:
    card = parse_model_card(VALID)
    assert card.has_front_matter
    assert card.license == "cc-by-4.0"
    assert card.base_model == ("digits-base", "other/model")
    assert card.datasets == ("optdigits",)
    assert card.metrics == ({"type": "accuracy", "value": 0.97},)
    assert card.body.strip().startswith("# Digits classifier")


def test_base_model_as_string_and_license_fields() -> None:
    card = parse_model_card(
        "---\nlicense: other\nlicense_name: my-terms\nlicense_link: LICENSE.md\nbase_model: a/b\n---\n"
    )
    assert card.base_model == ("a/b",)
    assert (card.license, card.license_name, card.license_link) == ("other", "my-terms", "LICENSE.md")


def test_missing_front_matter_is_an_empty_card() -> None:
    card = parse_model_card("# Just a README\n\nlicense: mit is not front matter\n")
    assert not card.has_front_matter
    assert card.license is None and card.base_model == ()


def test_malformed_yaml_names_the_line() -> None:
    with pytest.raises(UsageError, match=r"malformed YAML front matter at line 3"):
        parse_model_card("---\nlicense: mit\nbase_model: [a, b\n---\n")


def test_unclosed_front_matter() -> None:
    with pytest.raises(UsageError, match="never closed"):
        parse_model_card("---\nlicense: mit\n")


def test_front_matter_must_be_a_mapping() -> None:
    with pytest.raises(UsageError, match="must be a YAML mapping"):
        parse_model_card("---\n- a\n- b\n---\n")


def test_wrong_types_are_rejected() -> None:
    with pytest.raises(UsageError, match="'base_model' must be a string or a list of strings"):
        parse_model_card("---\nbase_model: {name: x}\n---\n")
    with pytest.raises(UsageError, match="'license' must be a string"):
        parse_model_card("---\nlicense: {id: mit}\n---\n")


@given(st.text(max_size=300))
def test_parser_never_raises_anything_but_usage_error(text: str) -> None:
    try:
        parse_model_card("---\n" + text + "\n---\n")
    except UsageError:
        pass
