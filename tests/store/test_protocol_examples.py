"""docs/PROTOCOL.md §9 replayed against a real store: every example exchange, in document order.

Each ``<!-- replay: NAME -->`` marker is followed by a request and a response block. Placeholders ``{name}`` are
filled from the scenario (tokens, a fresh device's CSR, a packaged listing, a signed usage log); a placeholder in
a response is captured the first time and compared afterwards. The status, the headers shown and, for JSON
bodies, the shape (member names at every level, JSON types, booleans) must match."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519

import drm

PROTOCOL = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"
_EXAMPLE = re.compile(
    r"<!-- replay: (?P<name>[\w-]+) -->\s*```http\n(?P<req>.*?)```\s*```http\n(?P<resp>.*?)```", re.S
)
_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_WHOLE = re.compile(r"^\{(\w+)\}$")


def examples() -> list[tuple[str, str, str]]:
    found = [(m["name"], m["req"], m["resp"]) for m in _EXAMPLE.finditer(PROTOCOL.read_text())]
    assert found, "no replayable examples in docs/PROTOCOL.md"
    return found


def _split(block: str) -> tuple[str, dict[str, str], str]:
    head, _, body = block.partition("\n\n")
    first, *lines = head.strip("\n").split("\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip()] = value.strip()
    return first, headers, body.strip()


def _fill(text: str, ctx: dict[str, Any]) -> str:
    return _PLACEHOLDER.sub(lambda m: str(ctx[m[1]]) if m[1] in ctx else m[0], text)


def _fill_json(value: Any, ctx: dict[str, Any]) -> Any:
    if isinstance(value, dict):
        return {k: _fill_json(v, ctx) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill_json(v, ctx) for v in value]
    if isinstance(value, str):
        whole = _WHOLE.match(value)
        return ctx[whole[1]] if whole and whole[1] in ctx else _fill(value, ctx)
    return value


def _shape(example: Any, actual: Any, ctx: dict[str, Any], where: str) -> None:
    if isinstance(example, dict):
        assert isinstance(actual, dict), f"{where}: expected an object, got {actual!r}"
        assert set(example) == set(actual), (
            f"{where}: members {sorted(actual)} != documented {sorted(example)}"
        )
        for k in example:
            _shape(example[k], actual[k], ctx, f"{where}.{k}")
    elif isinstance(example, list):
        assert isinstance(actual, list), f"{where}: expected an array"
        if example:
            assert actual, f"{where}: documented items, got an empty array"
            for i, item in enumerate(actual):
                _shape(example[0], item, ctx, f"{where}[{i}]")
    elif isinstance(example, bool):
        assert actual is example, f"{where}: {actual!r} != {example!r}"
    elif isinstance(example, int):
        assert isinstance(actual, int) and not isinstance(actual, bool), (
            f"{where}: {actual!r} is not an integer"
        )
    elif example is None:
        assert actual is None, f"{where}: {actual!r} is not null"
    else:
        assert isinstance(actual, str), f"{where}: {actual!r} is not a string"
        _string(example, actual, ctx, where)


def _string(example: str, actual: str, ctx: dict[str, Any], where: str) -> None:
    whole = _WHOLE.match(example)
    if whole:
        name = whole[1]
        if name in ctx:
            assert actual == str(ctx[name]), f"{where}: {actual!r} != {name} {ctx[name]!r}"
        else:
            ctx[name] = actual
    elif "…" not in example and not _PLACEHOLDER.search(example):
        assert actual == example, f"{where}: {actual!r} != {example!r}"
    elif _PLACEHOLDER.search(example) and "…" not in example:
        # literal text around placeholders: known ones must match, unknown ones are captured
        parts, pos = [], 0
        for m in _PLACEHOLDER.finditer(example):
            parts.append(re.escape(example[pos : m.start()]))
            parts.append(re.escape(str(ctx[m[1]])) if m[1] in ctx else f"(?P<{m[1]}>.+?)")
            pos = m.end()
        parts.append(re.escape(example[pos:]))
        found = re.fullmatch("".join(parts), actual)
        assert found, f"{where}: {actual!r} does not match {example!r}"
        ctx.update(found.groupdict())


@pytest.fixture(scope="module")
def scenario(shared_store: Any, digits_base: Path) -> dict[str, Any]:
    store = shared_store
    r = store.upload("sally", digits_base, name="protocol model", targets="onnx-fp32")
    assert r.status_code == 202, r.json
    store.wait()
    keys = drm.DeviceKeys.generate()
    fleet = x25519.X25519PrivateKey.generate().public_key()
    return {
        "store": store,
        "keys": keys,
        "buyer_token": store.tokens["bob"],
        "seller_token": store.tokens["sally"],
        "other_buyer_token": store.tokens["betty"],
        "builder_token": store.tokens["bill"],
        "admin_token": store.tokens["ada"],
        "csr_pem": keys.csr().decode(),
        "listing": r.json["listing"]["id"],
        "target": "onnx-fp32",
        "fleet_key_pem": fleet.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode(),
        "fleet_key_id": drm.key_id(fleet.public_bytes_raw()),
    }


def _usage_logs(ctx: dict[str, Any]) -> None:
    keys: drm.DeviceKeys = ctx["keys"]
    lines: list[bytes] = []
    for seq, (runs, detail) in enumerate(((64, "reserve:64"), (3, "release:61"), (3, ""), (3, ""))):
        lines.append(
            drm.make_record(
                keys.sign,
                prev_line=lines[-1] if lines else None,
                seq=seq,
                device_id=keys.device_id,
                t=1_760_000_000 + seq,
                event="run" if seq < 2 else "sync",
                license_id=ctx["license_id"],
                build_hash=ctx["build_hash"],
                runs=runs,
                detail=detail,
            )
        )
    ctx["usage_log"] = (b"\n".join(lines) + b"\n").decode()
    rec = json.loads(lines[1])
    rec["rec"]["runs"] = 0
    edited = [lines[0], json.dumps(rec, separators=(",", ":"), sort_keys=True).encode(), *lines[2:]]
    ctx["edited_usage_log"] = (b"\n".join(edited) + b"\n").decode()


def test_protocol_examples_replay_against_the_store(scenario: dict[str, Any]) -> None:
    ctx = dict(scenario)
    client = scenario["store"].client
    names = []
    for name, req, resp in examples():
        names.append(name)
        if "license_id" in ctx and "usage_log" not in ctx:
            _usage_logs(ctx)
        first, headers, body = _split(req)
        method, path, _ = _fill(first, ctx).split(" ")
        headers = {k: _fill(v, ctx) for k, v in headers.items()}
        data: bytes | None = None
        if body:
            if headers.get("Content-Type") == "application/json":
                data = json.dumps(_fill_json(json.loads(body), ctx)).encode()
            else:
                data = _fill(body, ctx).encode()
        got = client.open(path, method=method, headers=headers, data=data)
        status_line, want_headers, want_body = _split(resp)
        status = int(status_line.split(" ")[1])
        assert got.status_code == status, f"{name}: {got.status_code} {got.get_data(as_text=True)[:300]}"
        for key, value in want_headers.items():
            actual = got.headers.get(key)
            assert actual is not None, f"{name}: header {key} missing"
            if key == "Content-Type":
                assert actual.split(";")[0] == value, f"{name}: Content-Type {actual}"
            else:
                _string(value, actual, ctx, f"{name}: header {key}")
        if want_body.startswith(("{", "[")):
            _shape(json.loads(want_body), json.loads(got.get_data()), ctx, name)
    assert {"enroll", "eval-license", "build", "revocations", "usage-sync", "revoke"} <= set(names)
    assert {"seat-activation", "seat-activation-again", "seat-activation-past-seats"} <= set(names)
    # The activation the example captured is the store's signed token for that device and license.
    act = drm.parse_activation(str(ctx["activation_token"]).encode())
    assert (act.device_id, act.license_id, act.seat) == (ctx["device_id"], ctx["fleet_license_id"], 1)
