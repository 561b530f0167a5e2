"""License expressions against the policy table (policy.json): what reselling a model under them requires.

OR picks the most permissive option, AND the most restrictive verdict with the union of obligations;
`X WITH E` uses the exception's entry when the table has one. Unknown symbols are reported, never guessed."""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

ALLOW, OBLIGATIONS, FORBIDDEN = "allow", "obligations", "forbidden"
_RANK = {ALLOW: 0, OBLIGATIONS: 1, FORBIDDEN: 2}


class ExpressionProblem(ValueError):
    """A license expression that cannot be evaluated; `code` says why (unknown / invalid / unclassified)."""

    def __init__(self, code: str, message: str, symbols: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.symbols = symbols


@dataclass(frozen=True)
class Terms:
    """What a license expression allows for one use (the seller's own listing, or a derivative)."""

    verdict: str  # allow | obligations | forbidden
    obligations: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    chosen: str = ""  # the licence(s) the decision rests on
    same_license: bool = False

    def rank(self) -> tuple[int, int]:
        return (_RANK[self.verdict], len(self.obligations))


@dataclass(frozen=True)
class Policy:
    licenses: dict[str, dict[str, Any]]
    exceptions: dict[str, dict[str, Any]]
    aliases: dict[str, str]
    obligation_text: dict[str, str]
    _lower: dict[str, str] = field(default_factory=dict)

    def entry(self, key: str) -> dict[str, Any] | None:
        canonical = self._lower.get(key.lower())
        return self.licenses.get(canonical) if canonical else None

    def canonical(self, key: str) -> str | None:
        return self._lower.get(key.lower())

    def describe(self, obligation: str) -> str:
        return self.obligation_text.get(obligation, obligation.replace("_", " "))


@functools.cache
def load_policy() -> Policy:
    raw = json.loads(resources.files("licenses").joinpath("policy.json").read_text("utf-8"))
    licenses = raw["licenses"]
    return Policy(
        licenses=licenses,
        exceptions=raw.get("exceptions", {}),
        aliases={k.lower(): v for k, v in raw.get("aliases", {}).items()},
        obligation_text=raw.get("obligations", {}),
        _lower={k.lower(): k for k in licenses},
    )


@functools.cache
def _licensing():  # type: ignore[no-untyped-def]
    from license_expression import get_spdx_licensing

    return get_spdx_licensing()


_TOKEN = re.compile(r"[^\s()]+")


def normalize(expression: str, *, license_name: str | None = None) -> str:
    """Canonical SPDX expression string; Hugging Face ids (openrail-m, llama3, gemma...) become LicenseRefs.

    Raises ExpressionProblem('license_invalid' | 'license_unknown', ...)."""
    policy = load_policy()
    text = expression.strip()
    if not text:
        raise ExpressionProblem("license_missing", "empty license expression")
    if text.lower() == "other":
        if not license_name:
            raise ExpressionProblem(
                "license_unknown",
                "license 'other' without license_name: declare an SPDX id or LicenseRef",
                ("other",),
            )
        text = "LicenseRef-" + re.sub(r"[^A-Za-z0-9.\-]+", "-", license_name.strip()).strip("-")

    def substitute(match: re.Match[str]) -> str:
        token = match.group(0)
        if token.upper() in ("AND", "OR", "WITH"):
            return token.upper()
        alias = policy.aliases.get(token.lower())
        if alias:
            return alias
        return policy.canonical(token) or token

    text = _TOKEN.sub(substitute, text)
    licensing = _licensing()
    try:
        parsed = licensing.parse(text, validate=False)
    except Exception as exc:  # noqa: BLE001 - license_expression raises several ExpressionError kinds
        raise ExpressionProblem(
            "license_invalid", f"invalid license expression {expression!r}: {exc}"
        ) from exc
    if parsed is None:
        raise ExpressionProblem("license_missing", "empty license expression")
    unknown = tuple(key for key in licensing.unknown_license_keys(parsed) if policy.canonical(key) is None)
    if unknown:
        raise ExpressionProblem(
            "license_unknown",
            f"unknown license {', '.join(unknown)}: declare an SPDX id or LicenseRef from the list "
            f"(e.g. Apache-2.0, CC-BY-4.0, LicenseRef-OpenRAIL-M)",
            unknown,
        )
    return str(parsed.render())


def evaluate(expression: str, use: str) -> Terms:
    """Terms of a normalized expression for `use` in ('listing', 'derivative')."""
    policy = load_policy()
    parsed = _licensing().parse(expression, validate=False)
    return _eval(parsed, use, policy)


def _eval(node: Any, use: str, policy: Policy) -> Terms:
    from license_expression import AND, OR, LicenseSymbol, LicenseWithExceptionSymbol

    if isinstance(node, OR):
        options = [_eval(arg, use, policy) for arg in node.args]
        return min(options, key=lambda t: t.rank())
    if isinstance(node, AND):
        parts = [_eval(arg, use, policy) for arg in node.args]
        verdict = max((p.verdict for p in parts), key=_RANK.__getitem__)
        return Terms(
            verdict=verdict,
            obligations=tuple(sorted({o for p in parts for o in p.obligations})),
            reasons=tuple(r for p in parts for r in p.reasons),
            chosen=" AND ".join(p.chosen for p in parts),
            same_license=any(p.same_license for p in parts),
        )
    if isinstance(node, LicenseWithExceptionSymbol):
        exception = policy.exceptions.get(node.exception_symbol.key)
        if exception is not None:
            return _terms(
                exception, use, f"{node.license_symbol.key} WITH {node.exception_symbol.key}", policy
            )
        return _eval(node.license_symbol, use, policy)
    if isinstance(node, LicenseSymbol):
        entry = policy.entry(node.key)
        if entry is None:
            raise ExpressionProblem(
                "license_unclassified",
                f"license {node.key} is a valid SPDX id but has no entry in the policy table; "
                "pick a listed license or ask a reviewer to classify it",
                (node.key,),
            )
        return _terms(entry, use, policy.canonical(node.key) or node.key, policy)
    raise ExpressionProblem("license_invalid", f"unsupported license expression node {node!r}")


def _terms(entry: dict[str, Any], use: str, key: str, policy: Policy) -> Terms:
    verdict = entry[use]
    if use == "listing":
        obligations = tuple(entry.get("listing_obligations", ()))
    else:
        obligations = tuple(entry.get("obligations", ()))
    if verdict == ALLOW and obligations and use == "derivative":
        verdict = OBLIGATIONS
    reason = entry.get("reason", "")
    return Terms(
        verdict=verdict,
        obligations=tuple(sorted(obligations)),
        reasons=(f"{key}: {reason}",) if reason and verdict == FORBIDDEN else (),
        chosen=key,
        same_license=bool(entry.get("same_license")),
    )


def license_keys(expression: str) -> list[str]:
    return [str(k) for k in _licensing().license_keys(_licensing().parse(expression, validate=False))]
