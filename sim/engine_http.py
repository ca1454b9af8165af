"""vLLM's OpenAI-compatible HTTP API in front of an `EmulatedEngine`: a raw ASGI app on
Tokenyard's one HTTP/1.1 server (tokenyard/asgi_server.py, the router's too).

Routes, shaped as vLLM (v1 engine, 2025) shapes them:

- `POST /v1/chat/completions`, `POST /v1/completions`: streaming (SSE `data: {...}` chunks,
  then `data: [DONE]`; `stream_options.include_usage` adds a final chunk with empty
  `choices` and `usage`; `continuous_usage_stats` puts usage in every chunk) and
  non-streaming (one JSON object with `usage`). Chat streams start with a
  `{"role": "assistant", "content": ""}` delta sent with the first token; the last token's
  chunk carries `finish_reason` ("length" at max_tokens, else "stop") and `stop_reason`.
- `GET /v1/models`, `GET /health` (200, empty body), `GET /version`, `GET /metrics` (this
  engine's registry).
- `GET /tokenyard/stats`, `POST /tokenyard/stats/reset`: not vLLM; loop statistics for
  benchmarks (modelled inter-token time, event-loop lag).

Errors use vLLM's nested shape `{"error": {"message", "type", "param", "code"}}` with `code`
the HTTP status: 400 `BadRequestError` for invalid JSON, missing or wrong-typed fields,
max_tokens < 1, a prompt plus max_tokens over max_model_len (vLLM's wording), a priority
on an fcfs engine (vLLM's wording); 404 `NotFoundError` for an unknown model; 413 for a
body over the limit (vLLM sets none; the emulator does, to protect the process).

Exact lengths (for replaying a trace, or the simulator's cross-check): a completions
`prompt` given as a list of token ids counts exactly that many tokens (and requests whose
id lists share leading 16-token blocks share prefix-cache blocks), and the header
`x-tokenyard-output-tokens: N` fixes the output length (capped by max_tokens).

Limits of the emulation: one prompt and one choice per request (`n` > 1 and batched
prompts are rejected with a 400 that says so), no logprobs (always null), `stop`
sequences and sampling parameters are accepted and ignored, tools are not called.

A client disconnect aborts the request in the engine: a task waits on ASGI `receive()`,
which the server answers with `http.disconnect` when the connection drops.

Sockets: the server runs on the running loop (uvloop when the CLI runs it) and sets
TCP_NODELAY on accepted sockets, so a token chunk never waits for Nagle's algorithm; its
keep-alive timeout is vLLM's 5 s (`keep_alive_s`), so routers see the same reuse races.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import tokenyard
from sim.emulated_engine import EmulatedEngine, EngineDeadError, EngineRequestError
from sim.request_handle import RequestHandle
from sim.textgen import (
    ChatFormatError,
    count_tokens,
    prefix_block_hashes,
    render_chat,
    request_seed,
    tokenize,
)
from tokenyard.asgi_server import Http1Limits, Http1Server

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

OUTPUT_TOKENS_HEADER = b"x-tokenyard-output-tokens"
# Live migration (docs/migration.md): the router attaches to a request that migrated in,
# or re-submits a broken stream as a continuation ("tokens=N; chars=C": the last C
# characters of the prompt, or the final assistant message, are the N tokens streamed).
ATTACH_HEADER = b"x-tokenyard-attach"
CONTINUATION_HEADER = b"x-tokenyard-continuation"
MIGRATED_EVENT = b"event: tokenyard.migrated\ndata: "
# A non-streamed request that migrated out is answered with this header and a JSON body
# `{"tokenyard_migrated": {where it went}, "text": what it generated here, "tokens": N}`;
# the router (router/splice.py `Splicer.follow_body`) fetches the rest from the destination.
MIGRATED_HEADER = b"x-tokenyard-migrated"
_JSON_HEADERS = [(b"content-type", b"application/json")]
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
_DONE = b"data: [DONE]\n\n"


class ApiError(Exception):
    """An error response in vLLM's shape."""

    def __init__(self, message: str, status: int = 400, err_type: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.err_type = err_type
        self.param = param

    def body(self) -> bytes:
        return orjson.dumps(
            {"error": {"message": self.message, "type": self.err_type, "param": self.param, "code": self.status}}
        )


# ----------------------------------------------------------------- validation
_TYPE_NAMES = {int: "a valid integer", bool: "a valid boolean", str: "a valid string",
               dict: "a valid dictionary", list: "a valid list"}


def _type_error(name: str, kind: type, value: Any) -> ApiError:
    return ApiError(
        f"1 validation error for request body: {name}: Input should be {_TYPE_NAMES[kind]} "
        f"[input_value={value!r:.60}, input_type={type(value).__name__}]",
        param=name,
    )


def _get(body: Mapping[str, Any], name: str, kind: type, default: Any = None, *, nullable: bool = True) -> Any:
    value = body.get(name, default)
    if value is None:
        if not nullable and name in body:
            raise _type_error(name, kind, value)
        return default
    if kind is int:
        # JSON true/false are not integers; an integral float (2.0) is, as pydantic allows.
        if isinstance(value, bool):
            raise _type_error(name, kind, value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
    if not isinstance(value, kind):
        raise _type_error(name, kind, value)
    return value


def _positive(name: str, value: int | None) -> int | None:
    if value is not None and value < 1:
        raise ApiError(f"{name} must be at least 1, got {value}.", param=name)
    return value


class _Prompt:
    """A request's prompt as the engine sees it: what seeds the output, length, block hashes."""

    __slots__ = ("text", "tokens", "hashes")

    def __init__(self, text: str, tokens: int, hashes: tuple[int, ...]):
        self.text = text
        self.tokens = tokens
        self.hashes = hashes


class EngineHttpApp:
    """The ASGI application for one engine."""

    def __init__(self, engine: EmulatedEngine) -> None:
        self.engine = engine
        self.max_body_bytes = engine.config.max_request_body_bytes
        self._model_names = set(engine.served_model_names)
        self._routes: dict[tuple[str, str], Callable[[Scope, Receive, Send], Awaitable[None]]] = {
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/completions"): self._completions,
            ("GET", "/v1/models"): self._models,
            ("GET", "/health"): self._health,
            ("GET", "/version"): self._version,
            ("GET", "/metrics"): self._metrics,
            ("GET", "/tokenyard/stats"): self._stats,
            ("POST", "/tokenyard/stats/reset"): self._stats_reset,
        }
        self._paths = {path for _, path in self._routes}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path = scope["path"]
        handler = self._routes.get((scope["method"], path))
        if handler is None:
            if path in self._paths:
                await _send_bytes(send, 405, b'{"detail":"Method Not Allowed"}', _JSON_HEADERS)
            else:
                await _send_bytes(send, 404, b'{"detail":"Not Found"}', _JSON_HEADERS)
            return
        try:
            await handler(scope, receive, send)
        except ApiError as exc:
            await _send_bytes(send, exc.status, exc.body(), _JSON_HEADERS)

    # ------------------------------------------------------------- simple routes
    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        # 503 once the engine loop is gone, as vLLM answers when its engine core died.
        await _send_bytes(send, 200 if self.engine.running else 503, b"", [])

    async def _version(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_bytes(send, 200, orjson.dumps({"version": f"tokenyard-emulated-{tokenyard.__version__}"}),
                          _JSON_HEADERS)

    async def _models(self, scope: Scope, receive: Receive, send: Send) -> None:
        engine = self.engine
        data = [
            {
                "id": name,
                "object": "model",
                "created": engine.created_s,
                "owned_by": "vllm",
                "root": engine.engine_model.model.name,
                "parent": None,
                "max_model_len": engine.max_model_len,
                "permission": [
                    {
                        "id": f"modelperm-{engine.instance_id}",
                        "object": "model_permission",
                        "created": engine.created_s,
                        "allow_create_engine": False,
                        "allow_sampling": True,
                        "allow_logprobs": True,
                        "allow_search_indices": False,
                        "allow_view": True,
                        "allow_fine_tuning": False,
                        "organization": "*",
                        "group": None,
                        "is_blocking": False,
                    }
                ],
            }
            for name in engine.served_model_names
        ]
        await _send_bytes(send, 200, orjson.dumps({"object": "list", "data": data}), _JSON_HEADERS)

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = generate_latest(self.engine.registry)
        await _send_bytes(send, 200, body, [(b"content-type", CONTENT_TYPE_LATEST.encode())])

    async def _stats(self, scope: Scope, receive: Receive, send: Send) -> None:
        stats = self.engine.stats()
        load = self.engine.load()
        stats.update(running=load.running, waiting=load.waiting, kv_blocks_used=load.kv_blocks_used,
                     kv_blocks_total=load.kv_blocks_total)
        await _send_bytes(send, 200, orjson.dumps(stats), _JSON_HEADERS)

    async def _stats_reset(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._read_body(scope, receive)
        self.engine.reset_stats()
        await _send_bytes(send, 200, b"{}", _JSON_HEADERS)

    # ------------------------------------------------------------- completions
    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    raise ApiError(f"content-length: expected an integer, got {value!r}") from None
                if declared > limit:
                    raise _too_large(declared, limit)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ApiError("client disconnected before sending the whole body", 400)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(size, limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _json_body(self, scope: Scope, receive: Receive) -> dict[str, Any]:
        raw = await self._read_body(scope, receive)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ApiError(f"JSON decode error: {exc}", param="body") from None
        if not isinstance(body, dict):
            raise ApiError(
                f"request body: Input should be a valid dictionary or object, got {type(body).__name__}",
                param="body",
            )
        return body

    def _check_model(self, body: Mapping[str, Any]) -> str:
        model = _get(body, "model", str)
        if model is None:
            return self.engine.served_model_names[0]
        if model not in self._model_names:
            raise ApiError(f"The model `{model}` does not exist.", 404, "NotFoundError", "model")
        return str(model)

    def _chat_prompt(self, body: Mapping[str, Any]) -> _Prompt:
        if "messages" not in body:
            raise ApiError("1 validation error for request body: messages: Field required", param="messages")
        messages = _get(body, "messages", list, nullable=False)
        if not messages:
            raise ApiError("messages: expected at least one message", param="messages")
        for index, message in enumerate(messages):
            if not isinstance(message, dict):
                raise ApiError(f"messages[{index}]: Input should be a valid dictionary", param="messages")
        try:
            text = render_chat(messages, bool(body.get("add_generation_prompt", True)))
        except ChatFormatError as exc:
            raise ApiError(str(exc), param="messages") from None
        pieces = tokenize(text)
        return _Prompt(text, len(pieces), prefix_block_hashes(pieces, self.engine.block_size))

    def _completion_prompt(self, body: Mapping[str, Any]) -> _Prompt:
        if "prompt" not in body or body["prompt"] is None:
            raise ApiError("1 validation error for request body: prompt: Field required", param="prompt")
        prompt = body["prompt"]
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            # The tokenizer adds a BOS token, as Llama's does.
            pieces = ["<|begin_of_text|>", *tokenize(prompt)]
            return _Prompt(prompt, len(pieces), prefix_block_hashes(pieces, self.engine.block_size))
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            # Token ids give exact prompt lengths (and, through the ids, exact prefix sharing).
            return _Prompt(",".join(map(str, prompt)), len(prompt), prefix_block_hashes(prompt, self.engine.block_size))
        if isinstance(prompt, list) and len(prompt) > 1:
            raise ApiError(
                f"prompt: the emulated engine takes one prompt per request, got a batch of {len(prompt)}",
                param="prompt",
            )
        raise ApiError(
            "prompt: Input should be a string, a list of token ids, or a list of one of those", param="prompt"
        )

    async def _attach(self, scope: Scope, receive: Receive, send: Send, body: Mapping[str, Any], model: str,
                      chat: bool) -> bool:
        """Serve the rest of a request that migrated in (X-Tokenyard-Attach), without
        reading its prompt again: False if the request carries no such header."""
        request_id = next((v.decode("latin-1") for h, v in scope["headers"] if h == ATTACH_HEADER), None)
        if request_id is None:
            return False
        attached = self.engine.attach(request_id)
        if attached is None:
            raise ApiError(f"no migrated request {request_id!r} to attach to", 404, "NotFoundError")
        stream_options = _get(body, "stream_options", dict)
        include_usage = bool(stream_options and _get(stream_options, "include_usage", bool, False))
        continuous_usage = bool(stream_options and _get(stream_options, "continuous_usage_stats", bool, False))
        await self._serve(receive, send, attached, _get(body, "stream", bool, False), model, chat, include_usage,
                          continuous_usage)
        return True

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await self._json_body(scope, receive)
        model = self._check_model(body)
        if await self._attach(scope, receive, send, body, model, chat=True):
            return
        prompt = self._chat_prompt(body)
        max_tokens = _get(body, "max_completion_tokens", int)
        if max_tokens is None:
            max_tokens = _get(body, "max_tokens", int)
        await self._generate(scope, receive, send, body, model, prompt, max_tokens, chat=True)

    async def _completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await self._json_body(scope, receive)
        model = self._check_model(body)
        if await self._attach(scope, receive, send, body, model, chat=False):
            return
        prompt = self._completion_prompt(body)
        max_tokens = _get(body, "max_tokens", int, 16)  # the OpenAI completions default, as vLLM
        await self._generate(scope, receive, send, body, model, prompt, max_tokens, chat=False)

    async def _generate(
        self, scope: Scope, receive: Receive, send: Send, body: Mapping[str, Any], model: str,
        prompt: _Prompt, max_tokens: int | None, *, chat: bool,
    ) -> None:
        engine = self.engine
        name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        _positive(name, max_tokens)
        stream = _get(body, "stream", bool, False)
        stream_options = _get(body, "stream_options", dict)
        if stream_options is not None and not stream:
            raise ApiError("Stream options can only be defined when `stream=True`.", param="stream_options")
        include_usage = bool(stream_options and _get(stream_options, "include_usage", bool, False))
        continuous_usage = bool(stream_options and _get(stream_options, "continuous_usage_stats", bool, False))
        n = _get(body, "n", int, 1)
        if n != 1:
            raise ApiError(f"n: the emulated engine generates one choice per request, got n={n}", param="n")
        priority = _get(body, "priority", int, 0)
        if priority != 0 and engine.core.config.scheduling_policy != "priority":
            raise ApiError(f"Got priority {priority} but Priority scheduling is not enabled.", param="priority")
        ignore_eos = _get(body, "ignore_eos", bool, False)
        min_tokens = _get(body, "min_tokens", int, 0)
        if min_tokens < 0:
            raise ApiError(f"min_tokens must be greater than or equal to 0, got {min_tokens}.", param="min_tokens")
        seed = _get(body, "seed", int)

        max_len = engine.max_model_len
        if prompt.tokens >= max_len and max_tokens is None or prompt.tokens > max_len:
            raise ApiError(
                f"This model's maximum context length is {max_len} tokens. However, your request has "
                f"{prompt.tokens} input tokens. Please reduce the length of the input messages.",
                param="input_tokens",
            )
        if max_tokens is None:
            max_tokens = max_len - prompt.tokens
        elif prompt.tokens + max_tokens > max_len:
            raise ApiError(
                f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's maximum "
                f"context length is {max_len} tokens and your request has {prompt.tokens} input tokens "
                f"({max_tokens} > {max_len} - {prompt.tokens}). (parameter={name}, value={max_tokens})",
                param=name,
            )
        if min_tokens > max_tokens:
            raise ApiError(
                f"min_tokens must be less than or equal to max_tokens={max_tokens}, got {min_tokens}.",
                param="min_tokens",
            )

        fixed = None
        request_id = None
        continuation = None
        for header, value in scope["headers"]:
            if header == OUTPUT_TOKENS_HEADER:
                try:
                    fixed = int(value)
                except ValueError:
                    fixed = 0
                if fixed < 1:
                    raise ApiError(
                        f"header {OUTPUT_TOKENS_HEADER.decode()}: expected a positive integer, got {value.decode()!r}",
                        param=OUTPUT_TOKENS_HEADER.decode(),
                    )
            elif header == b"x-request-id":
                request_id = value.decode("latin-1")
            elif header == CONTINUATION_HEADER:
                continuation = _continuation(value)
        position = 0
        prompt_tokens = prompt.tokens
        total_max_tokens = max_tokens
        seed_text = prompt.text
        if continuation is not None:
            position, chars = continuation
            original = self._original_prompt(body, chat, chars)
            seed_text = original.text
            prompt_tokens = original.tokens + position
            total_max_tokens = max_tokens + position
        text_seed = request_seed(engine.config.seed if seed is None else seed, seed_text)
        output_tokens, _ = engine.choose_output_tokens(
            total_max_tokens, text_seed ^ 0x5EED, ignore_eos=ignore_eos, min_tokens=min_tokens, fixed=fixed
        )
        output_tokens = max(1, output_tokens - position)
        if request_id is not None and engine.has_request(request_id):
            request_id = None  # a reused client id: let the engine pick a fresh one
        try:
            handle = engine.submit(
                prompt_tokens=prompt_tokens, output_tokens=output_tokens, max_tokens=max_tokens,
                text_seed=text_seed, priority=priority, prefix_hashes=prompt.hashes, request_id=request_id,
                text_position=position,
            )
        except EngineRequestError as exc:
            raise ApiError(str(exc), param="input_tokens") from None
        except (EngineDeadError, RuntimeError) as exc:
            raise ApiError(str(exc), 500, "InternalServerError") from None
        await self._serve(receive, send, handle, stream, model, chat, include_usage, continuous_usage)

    def _original_prompt(self, body: Mapping[str, Any], chat: bool, chars: int) -> _Prompt:
        """The prompt a continuation continues: without the final assistant message (chat)
        or the last `chars` characters (completions)."""
        if chat:
            messages = body.get("messages") or []
            if len(messages) < 2 or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
                raise ApiError(f"{CONTINUATION_HEADER.decode()}: the last message must be the assistant's "
                               "text so far", param="messages")
            return self._chat_prompt({**body, "messages": messages[:-1], "add_generation_prompt": True})
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or chars > len(prompt):
            raise ApiError(f"{CONTINUATION_HEADER.decode()}: expected a string prompt of at least {chars} "
                           "characters", param="prompt")
        return self._completion_prompt({"prompt": prompt[: len(prompt) - chars]})

    async def _serve(self, receive: Receive, send: Send, handle: RequestHandle, stream: bool, model: str,
                     chat: bool, include_usage: bool, continuous_usage: bool) -> None:
        engine = self.engine
        watcher = asyncio.ensure_future(receive())
        watcher.add_done_callback(lambda _: engine.abort(handle.request_id))
        try:
            if stream:
                await self._stream(send, handle, model, chat, include_usage, continuous_usage)
            else:
                await self._complete(send, handle, model, chat)
        finally:
            # Cancelling runs the callback too: a no-op for a finished request.
            watcher.cancel()
            if not handle.done:
                engine.abort(handle.request_id)

    async def _complete(self, send: Send, handle: RequestHandle, model: str, chat: bool) -> None:
        start = handle.consumed  # tokens generated elsewhere before (a request that migrated in)
        await handle.wait_finished()
        if handle.finish_reason == "abort":
            if self.engine.failure is not None:
                raise ApiError(f"the engine loop died: {self.engine.failure}", 500, "InternalServerError")
            return  # the client is gone
        text = "".join(handle.text.take(handle.emitted - start))
        if handle.migrated_to is not None:
            marker = {"tokenyard_migrated": handle.migrated_to, "text": text, "tokens": handle.emitted - start}
            await _send_bytes(send, 200, orjson.dumps(marker), [*_JSON_HEADERS, (MIGRATED_HEADER, b"1")])
            return
        usage = {
            "prompt_tokens": handle.prompt_tokens,
            "total_tokens": handle.prompt_tokens + handle.emitted,
            "completion_tokens": handle.emitted,
            "prompt_tokens_details": None,
        }
        created = int(time.time())
        if chat:
            payload: dict[str, Any] = {
                "id": f"chatcmpl-{handle.request_id}",
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": text,
                            "refusal": None,
                            "annotations": None,
                            "audio": None,
                            "function_call": None,
                            "tool_calls": [],
                            "reasoning_content": None,
                        },
                        "logprobs": None,
                        "finish_reason": handle.finish_reason,
                        "stop_reason": None,
                    }
                ],
                "service_tier": None,
                "system_fingerprint": None,
                "usage": usage,
                "prompt_logprobs": None,
                "kv_transfer_params": None,
            }
        else:
            payload = {
                "id": f"cmpl-{handle.request_id}",
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "text": text,
                        "logprobs": None,
                        "finish_reason": handle.finish_reason,
                        "stop_reason": None,
                        "token_ids": None,
                        "prompt_logprobs": None,
                        "prompt_token_ids": None,
                    }
                ],
                "service_tier": None,
                "system_fingerprint": None,
                "usage": usage,
                "kv_transfer_params": None,
            }
        headers = [*_JSON_HEADERS, (b"x-request-id", handle.request_id.encode())]
        await _send_bytes(send, 200, orjson.dumps(payload), headers)

    async def _stream(
        self, send: Send, handle: RequestHandle, model: str, chat: bool, include_usage: bool, continuous_usage: bool
    ) -> None:
        created = int(time.time())
        model_json = orjson.dumps(model)
        if chat:
            head = (
                b'data: {"id":"chatcmpl-' + handle.request_id.encode() + b'","object":"chat.completion.chunk","created":'
                + str(created).encode() + b',"model":' + model_json
            )
            open_choice = b',"choices":[{"index":0,"delta":{"content":'
            close_choice = b'},"logprobs":null,"finish_reason":null}]'
            role_chunk = head + b',"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]'
        else:
            head = (
                b'data: {"id":"cmpl-' + handle.request_id.encode() + b'","object":"text_completion","created":'
                + str(created).encode() + b',"model":' + model_json
            )
            open_choice = b',"choices":[{"index":0,"text":'
            close_choice = b',"logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,"token_ids":null}]'
            role_chunk = b""
        tail = b"}\n\n" if chat else b',"usage":null}\n\n'
        token_head = head + open_choice
        prompt_tokens = handle.prompt_tokens

        def usage_json(completion: int) -> bytes:
            return (
                b'{"prompt_tokens":' + str(prompt_tokens).encode() + b',"total_tokens":'
                + str(prompt_tokens + completion).encode() + b',"completion_tokens":' + str(completion).encode() + b"}"
            )

        await send({
            "type": "http.response.start", "status": 200,
            "headers": [*_SSE_HEADERS, (b"x-request-id", handle.request_id.encode())],
        })
        sent = handle.consumed  # a request that migrated in streams on from where it was
        while True:
            new = await handle.next_tokens()
            if handle.finish_reason == "abort":
                if self.engine.failure is not None:
                    # vLLM's way: an error event in the stream, then [DONE].
                    error = ApiError(f"the engine loop died: {self.engine.failure}", 500, "InternalServerError")
                    await send({"type": "http.response.body", "body": b"data: " + error.body() + b"\n\n" + _DONE,
                                "more_body": False})
                return  # otherwise the client is gone; nothing more to send
            if new == 0:
                break
            parts: list[bytes] = []
            if sent == 0 and chat:
                parts.append(role_chunk + (b',"usage":' + usage_json(0) + b"}\n\n" if continuous_usage else b"}\n\n"))
            tokens = handle.text.take(new)
            last = len(tokens) - 1
            for index, token in enumerate(tokens):
                sent += 1
                if handle.done and index == last and handle.finish_reason != "migrated":
                    if chat:
                        close = b'},"logprobs":null,"finish_reason":"' + str(handle.finish_reason).encode() + b'","stop_reason":null}]'
                    else:
                        close = (b',"logprobs":null,"finish_reason":"' + str(handle.finish_reason).encode()
                                 + b'","stop_reason":null,"prompt_token_ids":null,"token_ids":null}]')
                else:
                    close = close_choice
                if continuous_usage:
                    end = b',"usage":' + usage_json(sent) + b"}\n\n"
                else:
                    end = tail
                parts.append(b"".join((token_head, orjson.dumps(token), close, end)))
            await send({"type": "http.response.body", "body": b"".join(parts), "more_body": True})
            if handle.done:
                break
        if handle.migrated_to is not None:
            # Not the end: the router splices the rest from the destination (router/splice.py).
            event = MIGRATED_EVENT + orjson.dumps(handle.migrated_to) + b"\n\n"
            await send({"type": "http.response.body", "body": event, "more_body": False})
            return
        final = [_DONE]
        if include_usage:
            choices_key = b',"choices":[],"usage":'
            final.insert(0, head + choices_key + usage_json(sent) + b"}\n\n")
        await send({"type": "http.response.body", "body": b"".join(final), "more_body": False})


def _continuation(value: bytes) -> tuple[int, int]:
    """Parse "tokens=N; chars=C" (both >= 0)."""
    fields: dict[str, int] = {}
    try:
        for part in value.decode("latin-1").split(";"):
            key, _, number = part.strip().partition("=")
            fields[key] = int(number)
        tokens, chars = fields["tokens"], fields["chars"]
    except (ValueError, KeyError):
        tokens = chars = -1
    if tokens < 0 or chars < 0:
        raise ApiError(f"header {CONTINUATION_HEADER.decode()}: expected 'tokens=N; chars=C', got "
                       f"{value.decode('latin-1')!r}", param=CONTINUATION_HEADER.decode())
    return tokens, chars


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(
        f"request body of {size} bytes is over this engine's limit of {limit} bytes "
        "(--max-request-body-bytes)",
        413, "RequestEntityTooLargeError", "body",
    )


async def _send_bytes(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


# ----------------------------------------------------------------- serving
class EngineServer:
    """An emulated engine served on the running event loop: HTTP, and the Worker gRPC service.

        server = EngineServer(EmulatedEngine(config), host="127.0.0.1", port=0, grpc_port=0)
        await server.start()      # the engine loop, the HTTP listener, the gRPC listener
        ... server.port, server.base_url, server.grpc_port ...
        await server.stop()

    Several can run in one loop (`tokenyard up`, tests); each engine has its own metrics
    registry. Ports 0 mean "any free port"; the bound ports are set after `start()`.
    """

    def __init__(
        self, engine: EmulatedEngine, host: str = "127.0.0.1", port: int = 0, *,
        grpc_port: int | None = None, keep_alive_s: int = 5, worker_token: str | None = None,
    ) -> None:
        self.engine = engine
        # The Worker service's bearer token (tokenyard/worker_auth.py); None: loopback only.
        self.worker_token = worker_token
        engine.migration.token = worker_token  # a source engine dials MigrateIn with it
        self.host = host
        self.port = port
        self.grpc_port = grpc_port
        self.keep_alive_s = keep_alive_s  # vLLM's (uvicorn's) keep-alive timeout
        self.app = EngineHttpApp(engine)
        self._http: Http1Server | None = None
        self._grpc: Any = None

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def grpc_address(self) -> str | None:
        return None if self._grpc is None else f"{self.host}:{self.grpc_port}"

    @property
    def connections(self) -> set[Any]:
        """The live HTTP protocol objects (each has `.transport`), for socket-level tests."""
        return set(self._http.connections) if self._http else set()

    async def start(self) -> None:
        await self.engine.start()
        try:
            await self._start_http()
            if self.grpc_port is not None:
                await self._start_grpc(self.grpc_port)
        except BaseException:
            await self.stop()
            raise
        log.info(
            "engine listening",
            extra={"instance_id": self.engine.instance_id, "url": self.base_url, "grpc": self.grpc_address},
        )

    async def _start_http(self) -> None:
        limits = Http1Limits(max_body_bytes=self.app.max_body_bytes, idle_timeout_s=float(self.keep_alive_s),
                             body_limit_hint=" (this engine's --max-request-body-bytes)")
        self._http = Http1Server(self.app, self.host, self.port, limits=limits,
                                 name=f"engine {self.engine.instance_id}")
        await self._http.start()
        self.port = self._http.port

    async def _start_grpc(self, port: int) -> None:
        import grpc

        from sim.worker_grpc import add_worker_servicer, worker_server_options
        from tokenyard.worker_auth import check_bind, server_interceptors

        check_bind(self.host, self.worker_token)  # before binding: never open unauthenticated
        server = grpc.aio.server(options=worker_server_options(), interceptors=server_interceptors(self.worker_token))
        add_worker_servicer(server, self.engine)
        address = f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError as exc:
            bound = 0
            reason = str(exc)
        else:
            reason = "port in use or bad host"
        if bound == 0:
            raise OSError(f"engine {self.engine.instance_id}: cannot serve Worker gRPC on {address} ({reason})")
        await server.start()
        self._grpc = server
        self.grpc_port = bound

    async def stop(self, grace_s: float = 1.0) -> None:
        """Stop accepting, give requests in flight `grace_s` to finish, then abort the rest."""
        grpc_server, self._grpc = self._grpc, None
        if grpc_server is not None:
            await grpc_server.stop(grace_s)
        http, self._http = self._http, None
        if http is not None:
            # Requests in flight get `grace_s`; a long stream would otherwise hold the stop.
            stopping = asyncio.ensure_future(http.stop(grace_s))
            done, _ = await asyncio.wait({stopping}, timeout=grace_s)
            if not done:
                self.engine.abort_all()
            await stopping
        await self.engine.stop()

    async def __aenter__(self) -> EngineServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def prompt_token_count(text: str) -> int:
    """The engine's count of prompt tokens for a completions prompt (for tests and routers)."""
    return count_tokens(text)
