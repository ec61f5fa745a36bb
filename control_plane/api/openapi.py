"""OpenAPI 3.1 document generated from the route table (api/routes.py), and docs/rest.md from it.

It reads the Route type only: the table is passed in, so this module imports no handler.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from control_plane.api.route import Route
from control_plane.security.scopes import SCOPES

_STATUS_TEXT = {
    200: "OK",
    201: "Created",
    204: "No newer state within the wait",
    206: "Partial content",
    304: "Not modified",
    400: "Bad request",
    401: "Unauthenticated",
    403: "Forbidden",
    404: "Not found",
    409: "Conflict",
    413: "Body too large",
    416: "Range not satisfiable",
    422: "Refused: signature or digest",
    429: "Too many requests (Retry-After)",
    503: "Busy: database sessions in use (Retry-After)",
}

_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "field": {"type": "string"},
            },
        }
    },
}

_REPORT_QUERY = [
    ("model", "Model name (required)", {"type": "string"}),
    ("version", "Versions, comma separated", {"type": "string"}),
    ("by", "site (default), a label key, agent, version, or two of them", {"type": "string"}),
    ("since", "Window length ending now, e.g. 1h (default)", {"type": "string"}),
    ("from", "Window start, RFC 3339", {"type": "string"}),
    ("to", "Window end, RFC 3339", {"type": "string"}),
]
_QUERY = {
    "/api/v1/reports/compare": _REPORT_QUERY,
    "/api/v1/reports/timeseries": [
        *_REPORT_QUERY,
        ("bucket", "Bucket length, 1m to 1d", {"type": "string"}),
    ],
    "/api/v1/agents": [("selector", "Only agents this label selector matches", {"type": "string"})],
    "/api/v1/agents/{id}/desired": [
        ("after", "Only answer with a generation greater than this", {"type": "integer"}),
        ("wait", "Seconds to hold the request open (long-poll)", {"type": "number"}),
    ],
}


def _operation(r: Route) -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
        for n in re.findall(r"{(\w+)}", r.path)
    ]
    params += [
        {"name": n, "in": "query", "required": False, "description": d, "schema": s}
        for n, d, s in _QUERY.get(r.path, [])
    ]
    responses: dict[str, Any] = {}
    # Any route may be rate limited (per caller, or per address for refusals) or find the
    # database busy; health is never limited.
    busy = (503,) if r.path == "/api/v1/health" else (429, 503)
    extra = (401, 403, *busy) if r.auth != "none" else busy
    for code in r.responses + tuple(c for c in extra if c not in r.responses):
        resp: dict[str, Any] = {"description": _STATUS_TEXT.get(code, str(code))}
        if code >= 400:
            resp["content"] = {
                "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
            }
        responses[str(code)] = resp
    op: dict[str, Any] = {
        "operationId": r.handler.__name__,
        "summary": r.summary,
        "description": (r.handler.__doc__ or r.summary).strip(),
        "responses": responses,
        "x-modelfleet-auth": r.auth,
    }
    if r.auth in ("operator", "agent-or-operator", "any"):
        op["x-modelfleet-scope"] = r.scope
    if params:
        op["parameters"] = params
    if r.auth != "none":
        op["security"] = [{"bearer": []}]
    if r.body:
        schema: dict[str, Any] = (
            {"type": "object"}
            if r.body == "application/json"
            else {"type": "string", "contentMediaType": r.body}
        )
        op["requestBody"] = {"required": True, "content": {r.body: {"schema": schema}}}
    return op


def build_openapi(routes: Iterable[Route]) -> dict[str, Any]:
    """The whole document."""
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        paths.setdefault(r.path, {})[r.method.lower()] = _operation(r)
    return {
        "openapi": "3.1.0",
        "info": {"title": "modelfleet control plane", "version": "v1"},
        "paths": paths,
        "components": {
            "schemas": {"Error": _ERROR_SCHEMA},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def to_markdown(doc: dict[str, Any]) -> str:
    """The REST reference (docs/rest.md) rendered from the OpenAPI document."""
    lines = [
        "# REST reference",
        "",
        "Generated from `/api/v1/openapi.json` by `python docs/gen_rest.py`; a test keeps it "
        "current.",
        "",
        "Every route but the public ones takes `Authorization: Bearer <token>`: an operator's "
        "API token, or an agent's own credential for that agent's routes. Errors are "
        '`{"error": {"code", "message", "field"?}}`.',
        "",
        "An operator's token reaches a route only if it carries the route's scope (`admin` "
        "carries all): " + ", ".join(f"`{x}`" for x in SCOPES[:-1]) + f" or `{SCOPES[-1]}`.",
        "",
        "| method | path | who | scope | summary |",
        "| --- | --- | --- | --- | --- |",
    ]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            who, scope = op["x-modelfleet-auth"], op.get("x-modelfleet-scope", "")
            lines.append(f"| {method.upper()} | `{path}` | {who} | {scope} | {op['summary']} |")
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            lines += ["", f"## {method.upper()} {path}", "", op["description"], ""]
            for p in op.get("parameters", []):
                desc = f": {p['description']}" if p.get("description") else ""
                lines.append(f"- {p['in']} parameter `{p['name']}`{desc}")
            if "requestBody" in op:
                media = ", ".join(f"`{m}`" for m in op["requestBody"]["content"])
                lines.append(f"- body: {media}")
            codes = ", ".join(f"{c} {r['description']}" for c, r in op["responses"].items())
            lines.append(f"- responses: {codes}")
    return "\n".join(lines) + "\n"
