"""Deterministic regressions for what fuzzing the chain-file, model-card and bundle parsers found,
plus the explicit YAML bombs: "billion laughs" aliases, alias cycles and deep nesting must be
refused with one UsageError, without expanding (peak memory measured with tracemalloc).

Before the fixes: alias bombs hung (error messages and json.dumps walked the expanded value),
deep nesting raised RecursionError, malformed tagged scalars leaked ValueError / KeyError /
IndexError / AttributeError, a NUL in a model path leaked ValueError, NaN timeouts were accepted,
card dates and sets broke json.dumps, `op: [..]` raised TypeError, and verify_members raised
ValueError on a duplicated member."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import drm
from drm.bundle import BuildEntry, FileEntry, make_manifest, sign_manifest
from edge_runtime.bundle import Member, verify_members
from edge_runtime.chain.spec import MAX_CHAIN_BYTES, load_chain, parse_chain, parse_chain_text
from licenses.card import parse_model_card

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "chains"
YAML = Path("/nonexistent/fuzz/chain.yaml")
JSON = Path("/nonexistent/fuzz/chain.json")
MIB = 1024 * 1024


def alias_bomb(width: int = 9, depth: int = 9) -> str:
    """Flow-style 'billion laughs': width**depth scalars (387 million by default) in ~300 bytes."""
    layers = ["&l0 [" + ", ".join(["lol"] * width) + "]"]
    layers += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, depth)]
    return "[" + ", ".join(layers) + "]"


def chain_yaml(**fields: str) -> str:
    """A valid chain file with some top-level fields replaced by raw YAML text."""
    base = {
        "version": "1",
        "stages": "[{name: s, vendor: v, model: {listing: l}, inputs: {x: x}}]",
        "outputs": "{o: s.y}",
        **fields,
    }
    return "".join(f"{k}: {v}\n" for k, v in base.items())


@pytest.fixture
def peak_memory() -> Iterator[Callable[[], int]]:
    tracemalloc.start()
    try:
        yield lambda: tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def refused(parse: Callable[[], Any], match: str) -> str:
    with pytest.raises(drm.UsageError, match=match) as info:
        parse()
    return info.value.message


# ----------------------------------------------------------------------------- chain files

# Where the bomb sits decides which check meets it first; before the fix every one of these hung.
CHAIN_BOMB_SITES = {
    "version": {"version": alias_bomb()},
    "slots": {"slots": alias_bomb()},
    "isolation": {"isolation": alias_bomb()},
    "name": {"name": alias_bomb()},
    "timeouts": {"timeouts": "{start: " + alias_bomb() + "}"},
    "shape": {"inputs": "{x: {dtype: float32, shape: " + alias_bomb() + "}}"},
    "step": {
        "stages": "[{name: s, vendor: v, model: {listing: l}, inputs: {x: {from: x, steps: "
        "[{op: resize, size: " + alias_bomb() + "}]}}}]"
    },
    "unknown key": {"extra": alias_bomb()},
}


@pytest.mark.parametrize("site", sorted(CHAIN_BOMB_SITES))
def test_fuzz_regression_chain_alias_bomb_is_refused_unexpanded(
    site: str, peak_memory: Callable[[], int]
) -> None:
    text = chain_yaml(**CHAIN_BOMB_SITES[site])
    assert len(text) < 1024
    message = refused(lambda: parse_chain_text(text, YAML), "alias bomb")
    assert len(message) < 300
    assert peak_memory() < 8 * MIB


def test_fuzz_regression_chain_alias_cycle_and_deep_nesting() -> None:
    refused(lambda: parse_chain_text(chain_yaml(slots="&a [*a]"), YAML), "refers to a node that contains it")
    deep = "[" * 5000 + "]" * 5000
    refused(lambda: parse_chain_text(chain_yaml(slots=deep), YAML), "nested more than 64 levels")
    refused(
        lambda: parse_chain_text(chain_yaml(slots="{a: " * 5000 + "}" * 5000), YAML), "nested more than 64"
    )
    # Aliases nest too: 40 levels written once, used inside another 40 levels.
    inner = "&d " + "[" * 40 + "]" * 40
    refused(
        lambda: parse_chain_text(chain_yaml(slots=f"[{inner}, " + "[" * 40 + "*d" + "]" * 41), YAML),
        "aliases nest more than 64 levels",
    )
    refused(lambda: parse_chain_text('{"slots": ' + "[" * 100_000 + "]" * 100_000 + "}", JSON), "nested")


def test_fuzz_regression_chain_modest_aliases_still_work() -> None:
    text = chain_yaml(
        inputs="{x: &t {dtype: float32, shape: [1, 8]}, y: *t}",
        outputs="{o: &b {from: s.y, steps: [{op: argmax}]}, p: *b}",
    )
    spec = parse_chain_text(text, YAML)
    assert spec.inputs["x"] == spec.inputs["y"] and set(spec.outputs) == {"o", "p"}
    assert parse_chain_text((EXAMPLES / "face_mesh.yaml").read_text(), YAML).name == "face-mesh"


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"slots": "!!bool maybe"}, "not a valid bool value"),  # was KeyError
        ({"slots": "!!int ''"}, "not a valid int value"),  # was IndexError
        ({"slots": "!!int 0x"}, "not a valid int value"),  # was ValueError
        ({"slots": "!!float x"}, "not a valid float value"),  # was ValueError
        ({"slots": "9" * 5000}, "integer longer than 100 characters"),  # was ValueError, mislabelled JSON
        ({"slots": "1" + ":0" * 3000}, "integer longer than 100 characters"),  # sexagesimal
        ({"slots": "!!python/object:os.system x"}, "could not determine a constructor"),
    ],
)
def test_fuzz_regression_chain_malformed_scalars(fields: dict[str, str], match: str) -> None:
    refused(lambda: parse_chain_text(chain_yaml(**fields), YAML), match)


def test_fuzz_regression_chain_timestamps_stay_text() -> None:
    # `!!timestamp x` raised AttributeError and `2024-13-45` ValueError (no such date) in PyYAML.
    assert parse_chain_text(chain_yaml(name="!!timestamp x"), YAML).name == "x"
    assert parse_chain_text(chain_yaml(name="2024-13-45"), YAML).name == "2024-13-45"


@pytest.mark.parametrize(
    ("text", "path"),
    [
        (chain_yaml(timeouts="{start: .nan}"), YAML),  # was accepted: Timeouts(start=nan)
        (chain_yaml(timeouts="{frame: .inf}"), YAML),  # was accepted: a frame may never time out
        (json.dumps({"stages": [], "outputs": {}}).replace("[]", '[], "timeouts": {"stop": NaN}'), JSON),
        ('{"timeouts": {"start": 1e400}, "stages": [], "outputs": {}}', JSON),  # inf
        ('{"slots": ' + "9" * 5000 + ', "stages": [], "outputs": {}}', JSON),
    ],
)
def test_fuzz_regression_chain_non_finite_and_huge_numbers(text: str, path: Path) -> None:
    refused(lambda: parse_chain_text(text, path), r"positive number of seconds|not valid JSON")


def test_fuzz_regression_chain_decoded_data_edge_cases() -> None:
    def chain(**top: Any) -> dict[str, Any]:
        stage = {"name": "s", "vendor": "v", "model": {"listing": "l"}, "inputs": {"x": "x"}}
        return {"stages": [stage], "outputs": {"o": "s.y"}, **top}

    refused(lambda: parse_chain(chain(timeouts={"start": 10**400}), YAML), "positive number")  # OverflowError
    bad_path = chain()
    bad_path["stages"][0]["model"] = {"build": "a\x00b.emdl", "license": "b.lic"}
    refused(lambda: parse_chain(bad_path, YAML), r"model\.build: expected a file path")  # was ValueError
    bad_step = chain()
    bad_step["stages"][0]["inputs"] = {"x": {"from": "x", "steps": [{"op": ["resize"]}]}}
    refused(lambda: parse_chain(bad_step, YAML), "unknown step")  # was TypeError (unhashable)
    huge = chain(slots=2**20000)  # repr() of this raises ValueError; the message must not
    assert "20001-bit integer" in refused(lambda: parse_chain(huge, YAML), "slots")


def test_fuzz_regression_chain_file_size_is_bounded(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_bytes(chain_yaml().encode() + b"#" * MAX_CHAIN_BYTES)
    refused(lambda: load_chain(big), "larger than the limit")
    refused(lambda: parse_chain_text(" " * (MAX_CHAIN_BYTES + 1), YAML), "exceeds the chain file limit")


# ----------------------------------------------------------------------------- model cards


def card(front: str) -> str:
    return f"---\n{front}\n---\n# body\n"


def test_fuzz_regression_card_alias_bomb_is_refused_unexpanded(peak_memory: Callable[[], int]) -> None:
    # Before: parse_model_card accepted this; the model index's json.dumps then ran for hours.
    for field in ("metrics", "license", "base_model", "anything_else"):
        text = card(f"{field}: {alias_bomb()}")
        message = refused(lambda text=text: parse_model_card(text), "malformed YAML front matter.*alias bomb")
        assert len(message) < 300
    assert peak_memory() < 8 * MIB


def test_fuzz_regression_card_cycle_deep_nesting_huge_ints() -> None:
    refused(lambda: parse_model_card(card("metrics: &m [*m]")), "contains it")  # json.dumps: circular
    refused(lambda: parse_model_card(card("metrics: " + "[" * 5000 + "]" * 5000)), "nested")  # RecursionError
    refused(lambda: parse_model_card(card("license: " + "9" * 5000)), "integer longer")  # was ValueError
    refused(lambda: parse_model_card(card("license: !!bool x")), r"at line 2, column 10: not a valid bool")


def test_fuzz_regression_card_values_serialize() -> None:
    """Dates, sets and !!binary used to come back as date / set / bytes, breaking json.dumps downstream."""
    parsed = parse_model_card(
        card(
            "date: 2024-01-15\nbad_date: 2024-13-45\nmetrics: [!!set {a: null, b: null}]\nblob: !!binary aGk="
        )
    )
    assert parsed.raw == {
        "date": "2024-01-15",
        "bad_date": "2024-13-45",
        "metrics": [["a", "b"]],
        "blob": "aGk=",
    }
    json.dumps({**parsed.raw, **parsed.to_dict()})
    anchored = parse_model_card(card("tags: [&t vision, *t]\nmetrics: [&m {type: acc}, *m]"))
    assert anchored.raw["tags"] == ["vision", "vision"] and len(anchored.metrics) == 2


# ----------------------------------------------------------------------------- bundles


def test_fuzz_regression_verify_members_duplicate_member() -> None:
    """A member given twice passed the missing/extra checks and hit zip(strict=True): ValueError."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    build = drm.seal(b"m" * 5000, key=bytes(32), target="onnx-fp32", chunk_size=4096)
    build_hash = drm.read_header(build).build_hash
    build_name = "builds/" + build_hash[7:] + ".emdl"
    files = {build_name: build, "mlbom.cdx.json": b'{"bomFormat":"CycloneDX"}', "NOTICE": b""}
    manifest = make_manifest(
        [FileEntry(n, len(d), drm.sha256_tag(d)) for n, d in files.items()],
        [BuildEntry(build_name, build_hash, "onnx-fp32")],
        [],
    ).to_bytes()
    key = ed25519.Ed25519PrivateKey.generate()
    members = [Member("manifest.json", manifest), Member("manifest.sig", sign_manifest(manifest, key))]
    members += [Member(n, files[n]) for n in (build_name, "mlbom.cdx.json", "NOTICE")]
    with pytest.raises(drm.IntegrityError, match="duplicate member 'NOTICE'"):
        verify_members([*members, members[-1]], now=0)
