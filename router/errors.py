"""The router's error shapes: OpenAI's nested error body, and engine errors of either vLLM
shape (nested, or the older flat `object: error`) rewritten to it, in plain answers and
inside SSE streams."""

from __future__ import annotations

from typing import Any

import orjson

_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                413: "invalid_request_error", 429: "rate_limit_error", 500: "internal_error",
                502: "upstream_error", 503: "service_unavailable", 504: "timeout"}


def error_body(status: int, message: str, *, err_type: str | None = None, param: str | None = None,
               code: Any = None) -> bytes:
    """OpenAI's error shape (which vLLM's current servers also use)."""
    return orjson.dumps({"error": {"message": message, "type": err_type or _ERROR_TYPES.get(status, "error"),
                                   "param": param, "code": code if code is not None else status}})


def normalize_engine_error(body: bytes, status: int) -> bytes:
    """Engine errors in either vLLM shape (nested, or the older flat `object: error`) -> nested."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "replace").strip()[:500] or f"engine answered HTTP {status}"
        return error_body(status, text)
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        return body
    if isinstance(doc, dict) and (doc.get("object") == "error" or "message" in doc):
        return error_body(status, str(doc.get("message", "")), err_type=doc.get("type"), param=doc.get("param"),
                          code=doc.get("code"))
    if isinstance(doc, dict) and isinstance(doc.get("detail"), str | list):  # FastAPI's default shape
        return error_body(status, str(doc["detail"]))
    return error_body(status, body.decode("utf-8", "replace")[:500])


def normalize_sse_errors(data: bytes) -> bytes:
    """Rewrite flat-shape error events inside a chunk of SSE events to the nested shape."""
    out = []
    for line in data.split(b"\n"):
        if line.startswith(b"data: {"):
            try:
                doc = orjson.loads(line[6:])
            except orjson.JSONDecodeError:
                doc = None
            if isinstance(doc, dict) and doc.get("object") == "error":
                line = b"data: " + normalize_engine_error(line[6:], int(doc.get("code") or 500))
        out.append(line)
    return b"\n".join(out)
