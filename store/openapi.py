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
    op["responses"] = {str(k): v for k, v in responses.items()}
    for code in ("400", "401", "404"):
        op["responses"].setdefault(code, {"$ref": "#/components/responses/Error"})
    return op


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
                }
            },
        },
        "security": [{"bearer": []}],
    }
