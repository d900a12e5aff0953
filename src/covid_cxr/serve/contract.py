"""The API's contract, as clients and `/docs.json` see it: every answer typed, every status declared,
every error one shape.

BentoML writes `/docs.json` from the API methods: their request bodies, an untyped 200 and its own
400 / 404 / 500 entries. `ContractMiddleware` completes that document as it is served (nothing of
BentoML is patched): each image route gets its typed success answer and exactly the error statuses
the service returns (guard.STATUS, 401 with a token, 503 while loading or overloaded), all with the
`ErrorBody` schema; /metadata and the probes get theirs. It also gives every 4xx that BentoML's own
request validation writes (`{"error": "1 validation error for Input", "detail": [...]}`) the
project's shape, `{"error": code, "detail": text}`, so a client never parses two kinds of error.
"""
from __future__ import annotations

import json
from typing import Any

from covid_cxr.config import CLASSES
from covid_cxr.model.verdict import REASONS
from covid_cxr.serve.guard import IMAGE_ROUTES, STATUS

JSON = "application/json"
ERROR_STATUSES = sorted({400, 401, 413, 415, 422, 503} | set(STATUS.values()))
ERROR_TEXT = {400: "Bad request: empty file, missing or wrong field, text instead of a file",
              401: "Missing or wrong bearer token (only when the server has one)",
              413: "Upload over the size limit, or an image over the pixel limit",
              415: "Not an image, an animated image, or not a multipart/form body",
              422: "A truncated, corrupt or too small image",
              503: "The model is still loading, failed to load, or its queue is full: retry later"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def schemas() -> dict[str, dict[str, Any]]:
    """The answers' JSON schemas (OpenAPI 3.0)."""
    nullable_str = {"type": "string", "nullable": True}
    answer = {
        "type": "object",
        "required": ["label", "probabilities", "verdict", "reason", "message", "novelty", "in_distribution", "model"],
        "properties": {
            "label": {"type": "string", "enum": list(CLASSES), "description": "the most probable class"},
            "probabilities": {"type": "object", "required": list(CLASSES),
                              "properties": {c: {"type": "number", "minimum": 0, "maximum": 1} for c in CLASSES}},
            "verdict": {"type": "string", "enum": ["ok", "refer"],
                        "description": "refer: the label must not be taken as the answer"},
            "reason": {**nullable_str, "enum": [*REASONS, None]},
            "message": nullable_str,
            "novelty": {"type": "number", "nullable": True},
            "in_distribution": {"type": "boolean"},
            "model": {"type": "string"},
        },
    }
    explained = {"allOf": [_ref("Answer"), {
        "type": "object",
        "required": ["explained_class", "cam_method", "image_png", "heatmap_png", "disclaimer"],
        "properties": {
            "explained_class": {"type": "string", "enum": list(CLASSES)},
            "cam_method": {"type": "string"},
            "image_png": {"type": "string", "format": "byte"},
            "heatmap_png": {"type": "string", "format": "byte"},
            "disclaimer": {"type": "string"},
        }}]}
    error = {"type": "object", "required": ["error", "detail"],
             "properties": {"error": {"type": "string"}, "detail": {"type": "string"},
                            "index": {"type": "integer", "description": "/predict_batch: the file at fault"}}}
    metadata = {"type": "object", "required": ["name", "model", "bento", "production", "ready", "classes"],
                "properties": {"name": {"type": "string"}, "model": {"type": "string"},
                               "bento": nullable_str, "production": {"type": "boolean", "nullable": True},
                               "ready": {"type": "boolean"},
                               "classes": {"type": "array", "items": {"type": "string"}}}}
    return {"Answer": answer, "ExplainedAnswer": explained, "ErrorBody": error, "Metadata": metadata}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _errors() -> dict[str, Any]:
    return {str(s): _json(_ref("ErrorBody"), ERROR_TEXT[s]) for s in ERROR_STATUSES}


SUCCESS = {
    "/predict": lambda: _json(_ref("Answer"), "The answer for the film"),
    "/predict_batch": lambda: _json({"type": "array", "items": _ref("Answer")}, "One answer per file, in order"),
    "/explain": lambda: _json(_ref("ExplainedAnswer"), "The answer with a Grad-CAM heat map"),
    "/report": lambda: {"description": "The analysis report, as a download",
                        "content": {"application/pdf": {"schema": {"type": "string", "format": "binary"}},
                                    "image/png": {"schema": {"type": "string", "format": "binary"}}}},
}
PROBES = {"/healthz": "Alive", "/livez": "Alive", "/readyz": "Ready: the model is loaded and warm"}


def complete(spec: dict[str, Any]) -> dict[str, Any]:
    """BentoML's generated OpenAPI document -> the complete one (see the module docstring)."""
    spec = json.loads(json.dumps(spec))
    spec.setdefault("components", {}).setdefault("schemas", {}).update(schemas())
    paths = spec.get("paths", {})
    for route in IMAGE_ROUTES:
        op = (paths.get(route) or {}).get("post")
        if op is not None:
            op["responses"] = {"200": SUCCESS[route](), **_errors()}
    meta = (paths.get("/metadata") or {}).get("get")
    if meta is not None:
        meta["responses"] = {"200": _json(_ref("Metadata"), "The model, its evaluation and the service's limits"),
                             "401": _json(_ref("ErrorBody"), ERROR_TEXT[401])}
    for route, text in PROBES.items():
        op = (paths.get(route) or {}).get("get")
        if op is not None:
            op["responses"] = {"200": {"description": text, "content": {"text/plain": {"schema": {"type": "string"}}}},
                               "503": {"description": "Not ready", "content": {
                                   "text/plain": {"schema": {"type": "string"}}, JSON: {"schema": _ref("ErrorBody")}}}}
    metrics = (paths.get("/metrics") or {}).get("get")
    if metrics is not None:
        metrics["responses"] = {"200": {"description": "Prometheus metrics",
                                        "content": {"text/plain": {"schema": {"type": "string"}}}},
                                "401": _json(_ref("ErrorBody"), ERROR_TEXT[401])}
    return spec


def error_shape(body: Any) -> dict[str, Any] | None:
    """BentoML's request-validation body -> `{"error", "detail"}`; None when `body` needs no change."""
    if isinstance(body, dict) and isinstance(body.get("error"), str) and isinstance(body.get("detail"), str):
        return None
    if isinstance(body, list) and len(body) == 1:       # BentoML's `({"error": str(exc)},)`
        body = body[0]
    if not isinstance(body, dict):
        return {"error": "bad_request", "detail": str(body)}
    detail = body.get("detail")
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        first = detail[0]
        code = str(first.get("type") or "bad_request")
        where = ".".join(str(x) for x in first.get("loc") or ())
        if code == "missing":
            return {"error": "missing_field",
                    "detail": f"the multipart field `{where}` is required" if where else "a required field is missing"}
        return {"error": code, "detail": str(first.get("msg") or body.get("error"))}
    return {"error": "bad_request", "detail": str(body.get("error") or detail or body)}


class ContractMiddleware:
    """ASGI middleware: completes GET /docs.json, and reshapes BentoML's own 4xx bodies on the
    image routes (see the module docstring). Every other response passes through untouched."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path == "/docs.json" and scope.get("method") == "GET":
            return await self._rewrite(scope, receive, send, lambda status: status == 200,
                                       lambda status, body: (status, complete(body)))
        if path in IMAGE_ROUTES:
            return await self._rewrite(scope, receive, send, lambda status: 400 <= status < 500,
                                       lambda status, body: (status, shaped) if (shaped := error_shape(body)) else None)
        return await self.app(scope, receive, send)

    async def _rewrite(self, scope: dict, receive: Any, send: Any, wanted, change) -> None:
        """Buffer a JSON answer whose status is `wanted(status)` and pass it through `change(status, body)
        -> (status, body) | None`; every other answer streams through untouched."""
        start: dict | None = None
        chunks: list[bytes] = []
        passthrough = False

        async def capture(msg: dict) -> None:
            nonlocal start, passthrough
            if passthrough:
                return await send(msg)
            if msg["type"] == "http.response.start":
                headers = dict(msg.get("headers") or [])
                if not wanted(msg["status"]) or not headers.get(b"content-type", b"").startswith(JSON.encode()):
                    passthrough = True
                    return await send(msg)
                start = msg
                return None
            if msg["type"] == "http.response.body":
                chunks.append(msg.get("body", b""))
                if not msg.get("more_body"):
                    await _finish()
                return None
            return await send(msg)

        async def _finish() -> None:
            body = b"".join(chunks)
            out = None
            try:
                out = change(start["status"], json.loads(body))
            except ValueError:
                pass
            status = start["status"]
            if out is not None:
                status, obj = out
                body = json.dumps(obj).encode()
            headers = [(k, v) for k, v in start.get("headers") or [] if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, capture)
