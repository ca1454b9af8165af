"""Validation of a request body: the fields the router itself relies on (the engine validates
the rest). A violation is a `BadRequest` naming the field (OpenAI's `param`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from scheduler.types import InstanceState

#: Deepest JSON nesting a request body may have. OpenAI-shaped requests nest a few levels
#: (tool schemas perhaps twenty); orjson refuses to serialise past 254 levels, which the
#: router does when it forwards the body, so anything deeper is refused here as a 400.
MAX_JSON_DEPTH = 128


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _require_int(body: dict[str, Any], name: str, minimum: int) -> None:
    value = body.get(name)
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise BadRequest(f"'{name}' must be an integer >= {minimum}, got {value!r}", name)


def json_depth_exceeds(doc: Any, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """True when `doc` nests deeper than `max_depth` (iterative: no recursion to exhaust)."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            return True
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, dict | list))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node if isinstance(v, dict | list))
    return False


def validate(body: Any, chat: bool, raw: bytes | None = None) -> None:
    """The fields the router itself relies on; the engine validates the rest.

    `raw`, the JSON text `body` was parsed from, lets the depth check be skipped when the
    text has no more opening brackets than the depth limit (every level of nesting needs
    one): two C-speed counts instead of a walk over every value of every request."""
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    shallow = raw is not None and raw.count(b"{") + raw.count(b"[") <= MAX_JSON_DEPTH
    if not shallow and json_depth_exceeds(body):
        raise BadRequest(f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required and must be a non-empty string", "model")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' is required and must be a non-empty list", "messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise BadRequest(f"'messages[{i}]' must be an object with a string 'role'", f"messages[{i}]")
        _require_int(body, "max_completion_tokens", 1)
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str | list) or (isinstance(prompt, list) and not prompt):
            raise BadRequest("'prompt' is required: a string, a list of strings or a list of token ids", "prompt")
    _require_int(body, "max_tokens", 1)
    _require_int(body, "n", 1)
    if "stream" in body and not isinstance(body["stream"], bool | None):
        raise BadRequest(f"'stream' must be true or false, got {body['stream']!r}", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options")


def max_context_tokens(instances: Iterable[InstanceState]) -> int | None:
    """The most prompt tokens any of `instances` could ever hold in its KV cache; None
    when one of them does not report its capacity (then nothing is known to never fit)."""
    best = 0
    for instance in instances:
        if instance.kv_blocks_total <= 0:
            return None
        best = max(best, instance.kv_blocks_total * max(1, instance.block_size_tokens))
    return best or None
