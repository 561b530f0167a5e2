"""Model cards: Hugging Face style Markdown with a YAML front matter block (license, base_model, ...).

Parsing is strict about structure (a malformed block is a UsageError naming the line) and lenient
about content (unknown keys are kept in `raw`); license validity is the policy's job, not the parser's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgemart.core.errors import UsageError
from edgemart.core.safe_yaml import load_yaml

_FENCE = "---"


@dataclass(frozen=True)
class ModelCard:
    license: str | None = None
    license_name: str | None = None
    license_link: str | None = None
    base_model: tuple[str, ...] = ()
    base_model_relation: str | None = None
    datasets: tuple[str, ...] = ()
    metrics: tuple[Any, ...] = ()
    has_front_matter: bool = False
    body: str = ""
    raw: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "license": self.license,
            "license_name": self.license_name,
            "license_link": self.license_link,
            "base_model": list(self.base_model),
            "base_model_relation": self.base_model_relation,
            "datasets": list(self.datasets),
            "metrics": list(self.metrics),
        }


def parse_model_card(text: str) -> ModelCard:
    """Parse a card; a card without front matter is valid (and carries no declarations)."""
    if not isinstance(text, str):
        raise UsageError("model card must be text")
    lines = text.lstrip("\ufeff").splitlines()
    if not lines or lines[0].strip() != _FENCE:
        return ModelCard(body=text)
    try:
        end = next(i for i in range(1, len(lines)) if lines[i].strip() in (_FENCE, "..."))
    except StopIteration:
        raise UsageError(
            "model card: YAML front matter opened on line 1 is never closed with '---'"
        ) from None
    block = "\n".join(lines[1:end])
    # Bounded (size, nesting, alias expansion) and JSON-compatible: the card lands in the model
    # index, the ML-BOM and the NOTICE, which all serialize it.
    data = (
        load_yaml(block, what="model card: malformed YAML front matter", first_line=2)
        if block.strip()
        else {}
    )
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"model card: front matter must be a YAML mapping, got {type(data).__name__}")
    return ModelCard(
        license=_optional_str(data, "license"),
        license_name=_optional_str(data, "license_name"),
        license_link=_optional_str(data, "license_link"),
        base_model=_str_list(data, "base_model"),
        base_model_relation=_optional_str(data, "base_model_relation"),
        datasets=_str_list(data, "datasets"),
        metrics=tuple(_as_list(data.get("metrics"))),
        has_front_matter=True,
        body="\n".join(lines[end + 1 :]),
        raw=data,
    )


def _optional_str(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | int | float):
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise UsageError(f"model card: '{key}' must be a string, got {type(value).__name__}")
    return str(value).strip() or None


def _str_list(data: dict[str, Any], key: str) -> tuple[str, ...]:
    items = _as_list(data.get(key))
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise UsageError(f"model card: '{key}' must be a string or a list of strings")
    return tuple(item.strip() for item in items)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]
