"""Fuzzing of the parsers outside drm: chain files, model-card front matter, the firmware bundle
manifest and archive. Each parser gets a structure-aware fuzzer (a valid input, decoded, mutated at
any depth, encoded again, sometimes with shared sub-trees that YAML writes as aliases) and a
text/bytes fuzzer (YAML tokens spliced in, truncation, byte flips, random input).

Oracle: a parsed value that satisfies the parser's own invariants (and serializes, since every
consumer does), or one clean edgemart error with a bounded message; never KeyError, TypeError,
ValueError, RecursionError or a yaml error. Bombs and deep nesting: test_fuzz_parser_regressions.py.

Example count per test: EDGEMART_FUZZ_EXAMPLES (300 by default; `make fuzz` runs 20000)."""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import drm
from drm.bundle import (
    MANIFEST_NAME,
    MLBOM_NAME,
    NOTICE_NAME,
    SIGNATURE_NAME,
    BuildEntry,
    BundleLimits,
    FileEntry,
    LicenseEntry,
    Manifest,
    build_member_name,
    iter_archive,
    iter_gzip,
    license_member_name,
    make_manifest,
    read_license_token,
    sign_manifest,
)
from edge_runtime.bundle import Member, read_bundle, verify_bundle, verify_members
from edge_runtime.chain.spec import (
    _NAME,
    ISOLATION,
    ChainSpec,
    load_chain,
    parse_binding,
    parse_chain,
    parse_chain_text,
)
from edgemart.core.safe_yaml import DEFAULT_YAML_LIMITS
from licenses.card import ModelCard, parse_model_card

EXAMPLES = int(os.environ.get("EDGEMART_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
)
# A hang is a finding: the per-test timeout grows with the example count instead of being switched off.
pytestmark = [
    pytest.mark.timeout(180 + EXAMPLES // 20),
    pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning"),
]

ROOT = Path(__file__).resolve().parents[2]
CHAINS = ROOT / "examples" / "chains"
NOW = 1_760_000_000
KEY = bytes(range(32))
# Anything a consumer walks (json.dumps, repr) stays within the YAML expansion budget.
MAX_SERIALIZED = 8 * DEFAULT_YAML_LIMITS.max_expanded


# ----------------------------------------------------------------------------- mutation machinery

KEYS = [
    # chain files
    "version", "name", "isolation", "slots", "timeouts", "inputs", "stages", "outputs", "vendor",
    "model", "listing", "build", "license", "from", "steps", "op", "shape", "dtype", "size", "layout",
    "method", "boxes", "scores", "decode", "margin", "square", "strides", "input_size", "mean", "std",
    "axis", "keepdims", "perm", "start", "frame", "stop",
    # model cards
    "license_name", "license_link", "base_model", "base_model_relation", "datasets", "metrics",
    "model-index", "<<", "tags", "language",
    # bundle manifests
    "builds", "files", "format", "licenses", "v", "path", "sha256", "build_hash", "target", "binding",
    "id", "kind", "issuer_kid", "license_id", "max_runs", "validity", "not_after", "not_before",
]  # fmt: skip
STRINGS = [
    "", " ", "x", "image", "detect.regressors", "base.probabilities", "a.", ".b", "float32", "int64",
    "vendor", "stage", "argmax", "resize", "crop_by_boxes", "normalize", "transpose", "cast",
    "blazeface", "nchw", "nearest", "mit", "apache-2.0", "other", "cc-by-nc-4.0", "edgemart-bundle",
    "device", "fleet", "onnx-fp32", "NOTICE", "mlbom.cdx.json", "manifest.json", "builds/", "chains/x",
    "licenses/../x.lic", "../../etc/passwd", "/abs", "a\\b", "a\x00b", "C:x", "~", "null", "yes", "0x1F",
    "1:30", "2024-13-45", ".nan", "&a", "*a", "!!binary", "<<", "é", "\u2028", "\ufeff", "\U0001f600",
    "x" * 300, "sha256:" + "0" * 64,
]  # fmt: skip
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2, 64, 65, 2**53, 2**63, 10**99, 10**120, 2**1100]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(STRINGS),
)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=8), st.integers(-3, 3), st.none(), st.booleans())
values = st.recursive(
    scalars,
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(keys, kids, max_size=4)),
    max_leaves=10,
)


def _nodes(obj: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _nodes(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _nodes(v, (*path, i))
    return out


def _ids(obj: Any) -> set[int]:
    """Identities of every container in ``obj`` (itself included)."""
    out, stack = set(), [obj]
    while stack:
        node = stack.pop()
        if isinstance(node, dict | list) and id(node) not in out:
            out.add(id(node))
            stack.extend(node.values() if isinstance(node, dict) else node)
    return out


def _at(obj: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        obj = obj[step]
    return obj


def mutate_tree(tree: Any, data: st.DataObject) -> Any:
    """One to four edits anywhere in a decoded document: replace, delete, add, wrap, stringify, or
    share another sub-tree (a YAML alias once dumped). Never makes a cycle (json could not encode it)."""
    tree = copy.deepcopy(tree)
    for _ in range(data.draw(st.sampled_from([1, 1, 1, 2, 3, 4]), label="edits")):
        paths = _nodes(tree)
        path = data.draw(st.sampled_from(paths), label="path")
        action = data.draw(
            st.sampled_from(["replace", "delete", "add", "wrap", "stringify", "share"]), label="action"
        )
        target = _at(tree, path)
        if action == "replace":
            new = data.draw(values, label="value")
        elif action == "delete" and path:
            del _at(tree, path[:-1])[path[-1]]
            continue
        elif action == "add" and isinstance(target, dict):
            target[data.draw(keys, label="key")] = data.draw(values, label="value")
            continue
        elif action == "add" and isinstance(target, list):
            target.insert(
                data.draw(st.integers(0, len(target)), label="at"), data.draw(values, label="value")
            )
            continue
        elif action == "wrap":
            new = data.draw(st.sampled_from([[target], {"from": target}, {"x": target}]), label="wrap")
        elif action == "stringify":
            new = json.dumps(target) if not isinstance(target, str) else target[: len(target) // 2]
        elif action == "share":
            # Earlier shares make the tree a DAG: refuse any sub-tree that reaches the slot's parent.
            ancestors = {id(_at(tree, path[:i])) for i in range(len(path))}
            shareable = [p for p in paths if not ancestors & _ids(_at(tree, p))]
            if not shareable:
                continue
            new = _at(tree, data.draw(st.sampled_from(shareable), label="shared"))
        else:
            continue
        if path:
            _at(tree, path[:-1])[path[-1]] = new
        else:
            tree = new
    return tree


def dump_yaml(tree: Any, data: st.DataObject) -> str:
    """YAML in one of PyYAML's styles (shared sub-trees become &anchors / *aliases); JSON if PyYAML
    cannot represent the value (JSON is YAML 1.2 flow syntax, mostly readable by a YAML 1.1 loader)."""
    try:
        return yaml.safe_dump(
            tree,
            sort_keys=False,
            allow_unicode=data.draw(st.booleans(), label="unicode"),
            default_flow_style=data.draw(st.sampled_from([False, True, None]), label="flow"),
        )
    except (yaml.YAMLError, UnicodeEncodeError):
        return json.dumps(tree)


YAML_TOKENS = [
    "&a ", "*a", "&b [*a, *a, *a, *a] ", "!!int ", "!!float ", "!!bool ", "!!null ", "!!str ",
    "!!timestamp ", "!!binary ", "!!set ", "!!omap ", "!!pairs ", "!!map ", "!!seq ", "!!python/object:os.system ",
    "!local ", "<<: ", "<<: *a\n", "? ", "- ", ": ", "[", "]", "{", "}", ",", "|", ">-", "'", '"', "#", "\\",
    "%YAML 1.1\n", "%TAG ! tag:x,2000:\n", "---\n", "...\n", "\t", "\n", "  ", "~", ".nan", ".inf", "-.inf",
    "1e400", "1.0e400", "9" * 120, "0x", "0b2", "0o9", "1:2:3", "2024-13-45", "2001-12-14t21:59:43.10-05:00",
    "\x00", "\x07", "\ufeff", "\u2028", "\x85", "\ud800", "é", "[" * 200, "{a: " * 100, "- " * 100,
]  # fmt: skip


def mutate_text(text: str, data: st.DataObject) -> str:
    """Splice YAML tokens or random text in, cut, duplicate or flip characters, or truncate."""
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        at = data.draw(st.integers(0, len(text)), label="at")
        action = data.draw(st.sampled_from(["token", "text", "cut", "dup", "flip", "truncate"]), label="op")
        if action == "token":
            text = text[:at] + data.draw(st.sampled_from(YAML_TOKENS), label="token") + text[at:]
        elif action == "text":
            text = text[:at] + data.draw(st.text(max_size=12), label="text") + text[at:]
        elif action == "cut":
            text = text[:at] + text[at + data.draw(st.integers(1, 40), label="n") :]
        elif action == "dup":
            text = text[:at] + text[at : at + data.draw(st.integers(1, 80), label="n")] + text[at:]
        elif action == "flip" and at < len(text):
            bit = 1 << data.draw(st.integers(0, 7), label="bit")
            text = text[:at] + chr(ord(text[at]) ^ bit) + text[at + 1 :]
        elif action == "truncate":
            text = text[:at]
    return text


def _bounded_message(exc: drm.EdgemartError, source_len: int) -> None:
    """An error names the problem; it never echoes an alias-expanded value."""
    assert isinstance(exc.message, str) and exc.message
    assert len(exc.message) <= 4 * source_len + 4096, len(exc.message)


# ----------------------------------------------------------------------------- chain files

CHAIN_FILES = {
    "yaml": (CHAINS / "face_mesh.yaml").read_text(),
    "json": (CHAINS / "digits_two_vendors.json").read_text(),
}
CHAIN_TREES = [yaml.safe_load(CHAIN_FILES["yaml"]), json.loads(CHAIN_FILES["json"])]
CHAIN_PATHS = {"yaml": Path("/nonexistent/fuzz/chain.yaml"), "json": Path("/nonexistent/fuzz/chain.json")}


def check_chain(text: str, path: Path) -> ChainSpec | None:
    try:
        spec = parse_chain_text(text, path)
    except drm.UsageError as exc:
        _bounded_message(exc, len(text))
        event("chain text refused")
        return None
    check_chain_spec(spec)
    event("chain text parsed")
    return spec


def check_chain_spec(spec: ChainSpec) -> None:
    """What the runtime relies on once a chain file parsed."""
    assert spec.stages and spec.outputs
    assert spec.isolation in ISOLATION and 2 <= spec.slots <= 64
    assert all(0 < t < math.inf for t in (spec.timeouts.start, spec.timeouts.frame, spec.timeouts.stop))
    names = [s.name for s in spec.stages]
    assert len(set(names)) == len(names) and all(_NAME.match(n) for n in [*names, spec.name])
    for stage in spec.stages:
        assert _NAME.match(stage.vendor)
        assert stage.model.listing is not None or (stage.model.build and stage.model.license)
        json.dumps(stage.model.to_dict())
        spec.process_of(stage)
    for where, binding in [(f"s.{k}", b) for s in spec.stages for k, b in s.inputs.items()] + [
        (f"o.{k}", b) for k, b in spec.outputs.items()
    ]:
        for ref in binding.refs():
            spec.producer_of(ref)
        # The supervisor sends bindings to the stage workers as JSON; they parse them back.
        wire = json.loads(json.dumps(binding.to_dict()))
        again = parse_binding(wire, spec.path, where)
        assert json.dumps(again.to_dict()) == json.dumps(binding.to_dict())


@FUZZ
@given(data=st.data())
def test_fuzz_chain_structure(data: st.DataObject) -> None:
    """The example chains, decoded, mutated at any depth and written back as YAML or JSON."""
    tree = mutate_tree(data.draw(st.sampled_from(CHAIN_TREES), label="example"), data)
    if data.draw(st.booleans(), label="as yaml"):
        check_chain(dump_yaml(tree, data), CHAIN_PATHS["yaml"])
    else:
        check_chain(json.dumps(tree), CHAIN_PATHS["json"])
    try:
        spec = parse_chain(tree, CHAIN_PATHS["yaml"])  # the decoded-data entry point, fed directly
    except drm.UsageError as exc:
        _bounded_message(exc, len(json.dumps(tree)))
    else:
        check_chain_spec(spec)


@FUZZ
@given(data=st.data())
def test_fuzz_chain_text(data: st.DataObject) -> None:
    """The example chain files as text: YAML tokens spliced in, cuts, flips, truncation, random text."""
    syntax = data.draw(st.sampled_from(["yaml", "json"]), label="syntax")
    text = data.draw(
        st.one_of(st.builds(mutate_text, st.just(CHAIN_FILES[syntax]), st.data()), st.text(max_size=200)),
        label="text",
    )
    check_chain(text, CHAIN_PATHS[data.draw(st.sampled_from(["yaml", "json"]), label="as")])


@FUZZ
@given(
    raw=st.one_of(st.binary(max_size=300), st.builds(bytes.__add__, st.just(b"\xef\xbb\xbf"), st.binary()))
)
def test_fuzz_chain_file_bytes(tmp_path_factory: pytest.TempPathFactory, raw: bytes) -> None:
    """Raw bytes through load_chain (the reading and UTF-8 decoding in front of the parser)."""
    path = tmp_path_factory.getbasetemp() / "fuzz-chain.yaml"
    path.write_bytes(raw)
    try:
        check_chain_spec(load_chain(path))
    except drm.UsageError as exc:
        _bounded_message(exc, len(raw))


# ----------------------------------------------------------------------------- model cards

CARD = """---
language: [en]
license: apache-2.0
license_name: my-terms
license_link: LICENSE.md
base_model:
  - digits-base
  - org/other-model
base_model_relation: finetune
datasets: optdigits
tags: [vision, &tag digits, *tag]
metrics:
  - type: accuracy
    value: 0.97
model-index:
  - name: digits-finetuned
    results:
      - task: {type: image-classification}
        dataset: {name: optdigits, type: optdigits}
        metrics: [{type: accuracy, value: 0.97, verified: false}]
date: 2024-01-15
---
# Digits classifier

Fine-tuned from digits-base.
"""


def _card_parts(card: str) -> tuple[str, str]:
    _, front, body = card.split("---\n", 2)
    return front, body


CARD_TREE = parse_model_card(CARD).raw


def check_card(text: str) -> ModelCard | None:
    try:
        card = parse_model_card(text)
    except drm.UsageError as exc:
        _bounded_message(exc, len(text))
        event("card refused")
        return None
    event("card parsed" if card.has_front_matter else "card parsed (no front matter)")
    for value in (card.license, card.license_name, card.license_link, card.base_model_relation):
        assert value is None or (isinstance(value, str) and value == value.strip() and value)
    assert all(isinstance(v, str) and v and v == v.strip() for v in card.base_model + card.datasets)
    assert isinstance(card.raw, dict) and isinstance(card.body, str)
    assert card.has_front_matter or card.raw == {}
    # The index stores to_dict(); bundles put raw + to_dict() into the ML-BOM and the NOTICE.
    out = json.dumps({**card.raw, **card.to_dict()})
    assert len(out) <= MAX_SERIALIZED
    return card


@FUZZ
@given(data=st.data())
def test_fuzz_card_front_matter_structure(data: st.DataObject) -> None:
    """A Hugging Face style card, its front matter decoded, mutated at any depth, dumped back."""
    front = dump_yaml(mutate_tree(CARD_TREE, data), data)
    check_card(f"---\n{front}---\n{_card_parts(CARD)[1]}")


@FUZZ
@given(data=st.data())
def test_fuzz_card_text(data: st.DataObject) -> None:
    """The card as text (fences included) with YAML tokens spliced in, cuts, flips, truncation; and
    arbitrary text with and without a front-matter fence."""
    text = data.draw(
        st.one_of(
            st.builds(mutate_text, st.just(CARD), st.data()),
            st.text(max_size=300),
            st.text(max_size=300).map(lambda t: "---\n" + t + "\n---\n"),
            st.text(max_size=300).map(lambda t: "\ufeff---\n" + t),
        ),
        label="card",
    )
    check_card(text)


# ----------------------------------------------------------------------------- bundle manifest and archive


class Bundle:
    """A valid bundle built with the project's own format functions: one sealed build, its license, a
    chain file, the ML-BOM and the NOTICE, a signed manifest, in canonical member order."""

    def __init__(self) -> None:
        from cryptography.hazmat.primitives.asymmetric import ed25519

        self.authority = drm.Authority.generate(now=NOW - 86400)
        issuer = self.authority.issue_issuer(now=NOW - 86400, pq=False)
        device = drm.DeviceKeys.generate()
        self.builder = ed25519.Ed25519PrivateKey.generate()
        sealed = drm.seal(b"fuzz target model" * 300, key=KEY, target="onnx-fp32", chunk_size=4096)
        header = drm.read_header(sealed)
        token = drm.issue_license(
            issuer=issuer,
            cek=KEY,
            recipient=device.kem_public(),
            kind="production",
            listing="digits",
            build_hash=header.build_hash,
            target="onnx-fp32",
            now=NOW,
            days=30,
            max_runs=None,
            device_id=device.device_id,
        )
        claims = read_license_token(token, "x.lic")
        contents = {
            build_member_name(header.build_hash): sealed,
            license_member_name(claims.license_id): token,
            "chains/face_mesh.yaml": CHAIN_FILES["yaml"].encode(),
            MLBOM_NAME: b'{"bomFormat":"CycloneDX","specVersion":"1.6"}',
            NOTICE_NAME: b"digits: apache-2.0\n",
        }
        build_path, license_path = (
            build_member_name(header.build_hash),
            license_member_name(claims.license_id),
        )
        self.manifest = make_manifest(
            [FileEntry(name, len(blob), drm.sha256_tag(blob)) for name, blob in contents.items()],
            [BuildEntry(build_path, header.build_hash, header.target)],
            [LicenseEntry.from_claims(license_path, claims)],
        )
        self.manifest_bytes = self.manifest.to_bytes()
        contents[MANIFEST_NAME] = self.manifest_bytes
        contents[SIGNATURE_NAME] = sign_manifest(self.manifest_bytes, self.builder)
        self.members = [Member(name, contents[name]) for name in self.manifest.member_names()]
        self.archive = b"".join(iter_archive((m.name, m.data) for m in self.members))
        self.limits = BundleLimits(
            max_members=16,
            max_member_bytes=64 * 1024,
            max_total_bytes=256 * 1024,
            max_manifest_bytes=16 * 1024,
            max_signature_bytes=1024,
            max_license_bytes=16 * 1024,
        )

    def verify(self, members: list[Member]) -> Any:
        return verify_members(
            members,
            now=NOW + 60,
            root=self.authority.cert,
            builder_key=self.builder.public_key(),
            limits=self.limits,
        )


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    b = Bundle()
    assert verify_bundle(b.archive, now=NOW + 60, root=b.authority.cert, builder_key=b.builder.public_key())
    return b


def _encode(value: Any) -> bytes:
    """Canonical JSON when the value allows it, else plain JSON, so the parser sees it either way."""
    from drm._canonical import dumps

    try:
        return dumps(value)
    except drm.FormatError:
        return json.dumps(value, separators=(",", ":")).encode()


def check_manifest(raw: bytes, bundle: Bundle) -> Manifest | None:
    try:
        manifest = Manifest.from_bytes(raw, bundle.limits)
    except drm.FormatError as exc:
        _bounded_message(exc, len(raw))
        event("manifest refused")
        return None
    event("manifest parsed")
    assert manifest.to_bytes() == raw  # strict parse: only the one canonical encoding is accepted
    return manifest


@FUZZ
@given(data=st.data())
def test_fuzz_bundle_manifest_structure(bundle: Bundle, data: st.DataObject) -> None:
    """The manifest of a real bundle, mutated at any depth, re-signed by the builder (so the checks
    behind the signature see it), then verified against the real members."""
    raw = _encode(mutate_tree(json.loads(bundle.manifest_bytes), data))
    manifest = check_manifest(raw, bundle)
    signed = [Member(MANIFEST_NAME, raw), Member(SIGNATURE_NAME, sign_manifest(raw, bundle.builder))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            verified = bundle.verify(signed + bundle.members[2:])
        except drm.EdgemartError as exc:
            _bounded_message(exc, len(raw))
            return
    # Only a manifest that describes exactly these members passes, whatever the builder signed.
    assert manifest == bundle.manifest and verified.manifest == bundle.manifest


@FUZZ
@given(data=st.data())
def test_fuzz_bundle_manifest_bytes(bundle: Bundle, data: st.DataObject) -> None:
    """Manifest bytes with characters spliced, cut, flipped or truncated; and random bytes."""
    raw = data.draw(
        st.one_of(
            st.builds(mutate_text, st.just(bundle.manifest_bytes.decode()), st.data()).map(
                lambda t: t.encode("utf-8", "surrogatepass")
            ),
            st.binary(max_size=400),
        ),
        label="manifest",
    )
    manifest = check_manifest(raw, bundle)
    assert manifest is None or raw == bundle.manifest_bytes or manifest != bundle.manifest


@FUZZ
@given(data=st.data())
def test_fuzz_bundle_members(bundle: Bundle, data: st.DataObject) -> None:
    """Member-level edits under a genuine signature: replace, truncate, drop, duplicate, reorder or add."""
    members = list(bundle.members)
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        i = data.draw(st.integers(0, len(members) - 1), label="member")
        action = data.draw(st.sampled_from(["replace", "truncate", "drop", "dup", "swap", "add"]), label="op")
        if action == "replace":
            members[i] = Member(members[i].name, data.draw(st.binary(max_size=200), label="data"))
        elif action == "truncate":
            members[i] = Member(members[i].name, members[i].data[: data.draw(st.integers(0, 300))])
        elif action == "drop" and len(members) > 1:
            del members[i]
        elif action == "dup":
            members.insert(i, members[i])
        elif action == "swap":
            j = data.draw(st.integers(0, len(members) - 1), label="other")
            members[i], members[j] = members[j], members[i]
        elif action == "add":
            name = data.draw(st.sampled_from(["chains/extra.yaml", "licenses/x.lic", "NOTICE"]), label="name")
            members.insert(i, Member(name, data.draw(st.binary(max_size=50), label="data")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            bundle.verify(members)
        except drm.EdgemartError as exc:
            _bounded_message(exc, 1024)
            return
    assert members == bundle.members


@FUZZ
@given(data=st.data())
def test_fuzz_bundle_archive_bytes(bundle: Bundle, data: st.DataObject) -> None:
    """The archive (tar or gzip'd tar) with bytes flipped, spliced, cut or truncated; and random bytes.
    The tar reader stays within its limits; a changed archive never verifies."""
    archive = bundle.archive
    if data.draw(st.booleans(), label="gzip"):
        archive = b"".join(iter_gzip([archive]))
    blob = bytearray(archive)
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        at = data.draw(st.integers(0, len(blob)), label="at")
        action = data.draw(st.sampled_from(["flip", "splice", "cut", "truncate"]), label="op")
        if action == "flip" and at < len(blob):
            blob[at] ^= data.draw(st.integers(1, 255), label="xor")
        elif action == "splice":
            blob[at:at] = data.draw(st.binary(min_size=1, max_size=600), label="bytes")
        elif action == "cut":
            del blob[at : at + data.draw(st.integers(1, 1024), label="n")]
        elif action == "truncate":
            del blob[at:]
    raw = data.draw(st.one_of(st.just(bytes(blob)), st.binary(max_size=2048)), label="archive")
    try:
        members = read_bundle(raw, bundle.limits)
    except drm.EdgemartError as exc:
        _bounded_message(exc, len(raw))
    else:
        assert len(members) <= bundle.limits.max_members
        assert sum(len(m.data) for m in members) <= bundle.limits.max_total_bytes
        assert all(len(m.data) <= bundle.limits.max_member_bytes for m in members)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            verified = verify_bundle(
                raw,
                now=NOW + 60,
                root=bundle.authority.cert,
                builder_key=bundle.builder.public_key(),
                limits=bundle.limits,
            )
        except drm.EdgemartError as exc:
            _bounded_message(exc, len(raw))
            return
    assert [Member(n, d) for n, d in verified.members.items()] == bundle.members
