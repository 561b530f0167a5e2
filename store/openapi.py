"""/openapi.json assembled from the registered routes: each API view's docstring carries its operation
as YAML after a ``---`` line, so the spec cannot list a route that does not exist or miss one that does."""

from __future__ import annotations

import re
from typing import Any

import yaml
from flask import Flask

_PARAM = re.compile(r"<(?:[a-z_]+:)?([A-Za-z_][A-Za-z0-9_]*)>")


def operation_from_doc(doc: str | None) -> dict[str, Any]:
    if not doc:
        return {}
    summary_line = doc.strip().splitlines()[0]
    head, sep, tail = doc.partition("\n    ---\n") if "\n    ---\n" in doc else doc.partition("\n---\n")
    op: dict[str, Any] = {"description": summary_line}
    if sep:
        loaded = yaml.safe_load(tail)
        if isinstance(loaded, dict):
            op.update(loaded)
    op.setdefault("summary", summary_line)
    responses = op.setdefault("responses", {200: {"description": "OK"}})
    op["responses"] = {str(k): _response(v) for k, v in responses.items()}
    for code in ("400", "401", "404"):
        op["responses"].setdefault(code, {"$ref": "#/components/responses/Error"})
    return op


def _response(resp: Any) -> Any:
    """``{description, schema: Name | {...}}`` (docstring shorthand) -> an application/json response."""
    if not isinstance(resp, dict) or "schema" not in resp:
        return resp
    resp = dict(resp)
    schema = resp.pop("schema")
    if isinstance(schema, str):
        schema = {"$ref": f"#/components/schemas/{schema}"}
    resp["content"] = {"application/json": {"schema": schema}}
    return resp


_INT = {"type": "integer"}
_STR = {"type": "string"}
_NSTR = {"type": "string", "nullable": True}
_NINT = {"type": "integer", "nullable": True}


def _obj(required: dict[str, Any], **optional: Any) -> dict[str, Any]:
    return {"type": "object", "required": list(required), "properties": {**required, **optional}}


def _list_of(name: str) -> dict[str, Any]:
    return _obj({"items": {"type": "array", "items": {"$ref": f"#/components/schemas/{name}"}}})


def _page_of(name: str) -> dict[str, Any]:
    return _obj(
        {
            "items": {"type": "array", "items": {"$ref": f"#/components/schemas/{name}"}},
            "page": {"type": "integer", "minimum": 1},
            "pages": {"type": "integer", "minimum": 0},
        }
    )


SCHEMAS: dict[str, Any] = {
    "Build": _obj(
        {
            "target": _STR,
            "version": _INT,
            "status": {"type": "string", "enum": ["queued", "running", "done", "failed"]},
            "progress": {"type": "number", "minimum": 0, "maximum": 1},
            "message": _NSTR,
            "build_hash": _NSTR,
            "quality": {"type": "object", "nullable": True},
            "error": _NSTR,
            "build_url": _NSTR,
        },
        format=_NSTR,
        size=_NINT,
    ),
    "Listing": _obj(
        {
            "id": _STR,
            "name": _STR,
            "seller": _STR,
            "license": _STR,
            "status": _STR,
            "decision": {"type": "object", "nullable": True},
            "eval_days": _INT,
            "eval_runs": _INT,
            "version": {"type": "integer", "description": "the current version (newest listed, else newest)"},
            "builds": {"type": "array", "items": {"$ref": "#/components/schemas/Build"}},
            "versions": {"type": "array", "items": {"$ref": "#/components/schemas/Version"}},
        },
        visibility={"type": "string", "enum": ["public", "private"]},
        created_at=_INT,
        card=_NSTR,
        targets={"type": "array", "items": _STR},
    ),
    "Version": _obj(
        {
            "number": _INT,
            "status": {"type": "string", "enum": ["pending", "listed", "blocked", "failed", "rejected"]},
            "license": _STR,
            "decision": {"type": "object", "nullable": True},
            "model": {"type": "object"},
            "created_at": _INT,
            "builds": {"type": "array", "items": {"$ref": "#/components/schemas/Build"}},
        },
        targets={"type": "array", "items": _STR},
        card={**_NSTR, "description": "this version's model card (in GET /listings/{listing_id})"},
    ),
    "ListingPage": _page_of("Listing"),
    "Job": _obj(
        {
            "id": _STR,
            "state": {"type": "string", "enum": ["queued", "running", "done", "failed", "dead"]},
            "progress": {"type": "number", "minimum": 0, "maximum": 1},
            "message": _NSTR,
            "error": _NSTR,
            "failure": {
                "type": "object",
                "nullable": True,
                "description": "why a failed or dead job ended, and what to do next",
                "properties": {"code": _NSTR, "reason": _STR, "next_step": _NSTR},
            },
            "listing": _STR,
            "version": _INT,
            "target": _STR,
            "attempts": _INT,
            "max_attempts": _INT,
            "run_after": _NINT,
            "worker": _NSTR,
        }
    ),
    "JobPage": _page_of("Job"),
    "Token": _obj(
        {
            "id": _INT,
            "prefix": _STR,
            "role": _STR,
            "created_at": _INT,
            "last_used_at": _NINT,
            "revoked_at": _NINT,
        }
    ),
    "TokenList": _list_of("Token"),
    "NewToken": _obj({"token": _STR, "id": _INT, "prefix": _STR, "role": _STR}),
    "Device": _obj({"device_id": _STR, "name": _NSTR, "enrolled_at": _INT}),
    "DeviceList": _list_of("Device"),
    "Enrolled": _obj({"device_id": _STR, "certificate": _STR, "root": _STR}),
    "License": _obj(
        {
            "license_id": _STR,
            "kind": {"type": "string", "enum": ["eval", "production"]},
            "listing": _STR,
            "version": _INT,
            "target": _STR,
            "build_hash": _STR,
            "build_url": _STR,
            "device_id": _NSTR,
            "fleet_key_id": _NSTR,
            "issued_at": _INT,
            "not_after": _NINT,
            "max_runs": _NINT,
            "revoked": {"type": "boolean"},
        },
        license=_STR,
        seats=_NINT,
    ),
    "LicenseList": _list_of("License"),
    "Me": _obj({"id": _INT, "name": _STR, "role": _STR}),
    "UsageResult": _obj(
        {"ok": {"type": "boolean"}, "accepted": _INT},
        first_bad=_NINT,
        reason=_NSTR,
    ),
}


def build_spec(app: Flask) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if not rule.rule.startswith("/api/"):
            continue
        path = _PARAM.sub(r"{\1}", rule.rule)
        view = app.view_functions[rule.endpoint]
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            op = operation_from_doc(view.__doc__)
            op["operationId"] = rule.endpoint.replace(".", "_") + (
                "" if method in ("GET", "POST") else "_" + method.lower()
            )
            declared = {p.get("name") for p in op.get("parameters", []) if isinstance(p, dict)}
            for name in rule.arguments:
                if name not in declared:
                    op.setdefault("parameters", []).append(
                        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                    )
            paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "edgemart store API", "version": "1"},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {
                "Error": {
                    "description": "error",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                }
            },
            "schemas": {
                **SCHEMAS,
                "Error": {
                    "type": "object",
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message", "problems"],
                            "properties": {
                                "code": {"type": "string"},
                                "message": {"type": "string"},
                                "problems": {"type": "array", "items": {}},
                            },
                        }
                    },
                },
            },
        },
        "security": [{"bearer": []}],
    }
