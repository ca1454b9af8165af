"""A minimal vLLM-shaped engine for the router benchmark and the router's fault tests.

Zero latency by default: the answer is computed from the request and written at once, so
what a benchmark measures is the router, not the engine. Speaks what the router forwards
to: POST /v1/chat/completions and /v1/completions (streaming SSE with `data: [DONE]` and
the usage chunk, or one JSON body), GET /v1/models, /health and /metrics (vLLM's metric
names). Written on a raw asyncio protocol with httptools so that it stays faster than
whatever sits in front of it.

Test knobs (command-line flags): --token-delay-s paces streamed tokens, --hold-first
makes every stream wait after its first chunk until a later POST /fake/release,
--error-shape picks the vLLM error shape (nested or the older flat one) that a prompt
containing FAKE_ENGINE_ERROR gets, and --metrics-names old serves the deprecated
vLLM metric names.

    python bench/peers/fake_engine.py --port 8001 --model llama-3-8b
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import time

import httptools

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None  # type: ignore[assignment]


class EngineState:
    def __init__(self, args: argparse.Namespace) -> None:
        self.model = args.model
        self.token_delay_s = args.token_delay_s
        self.default_tokens = args.tokens
        self.error_shape = args.error_shape
        self.metrics_names = args.metrics_names
        self.hold_first = args.hold_first
        self.release = asyncio.Event()
        self.running = 0
        self.requests_total = 0
        self.priorities: list[int] = []


def _error_body(state: EngineState, message: str, status: int) -> bytes:
    if state.error_shape == "flat":
        body = {"object": "error", "message": message, "type": "BadRequestError", "param": None, "code": status}
    else:
        body = {"error": {"message": message, "type": "BadRequestError", "param": None, "code": status}}
    return json.dumps(body).encode()


class EngineProtocol(asyncio.Protocol):
    def __init__(self, state: EngineState) -> None:
        self.state = state
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.queue: asyncio.Queue[tuple[str, bytes, bytes]] | None = None
        self.busy: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.busy is not None:
            self.busy.cancel()

    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode()
        path = self.url.split(b"?", 1)[0].decode()
        body = b"".join(self.body)
        if self.busy is None or self.busy.done():
            handled = self.handle_sync(method, path, body)
            if not handled:
                self.busy = asyncio.get_running_loop().create_task(self.handle_async(path, body))
        else:  # pipelined request while streaming: not used by the router
            assert self.transport is not None
            self.transport.close()

    # -- responses ---------------------------------------------------------------------
    def write(self, status: int, ctype: str, body: bytes) -> None:
        assert self.transport is not None
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}.get(status, "Error")
        self.transport.write(
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: {ctype}\r\ncontent-length: {len(body)}\r\n\r\n".encode()
            + body
        )

    def handle_sync(self, method: str, path: str, body: bytes) -> bool:
        state = self.state
        if method == "GET" and path == "/health":
            self.write(200, "application/json", b"")
        elif method == "GET" and path == "/v1/models":
            doc = {"object": "list", "data": [{"id": state.model, "object": "model", "owned_by": "vllm"}]}
            self.write(200, "application/json", json.dumps(doc).encode())
        elif method == "GET" and path == "/metrics":
            self.write(200, "text/plain; version=0.0.4", self.metrics())
        elif method == "POST" and path == "/fake/release":
            state.release.set()
            self.write(200, "application/json", b"{}")
        elif method == "POST" and path == "/fake/stats":
            self.write(200, "application/json", json.dumps(
                {"requests_total": state.requests_total, "priorities": state.priorities}).encode())
        elif method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
            try:
                request = json.loads(body)
            except ValueError:
                self.write(400, "application/json", _error_body(state, "invalid JSON", 400))
                return True
            state.requests_total += 1
            if "priority" in request:
                state.priorities.append(int(request["priority"]))
            if "FAKE_ENGINE_ERROR" in json.dumps(request.get("messages") or request.get("prompt")):
                self.write(400, "application/json", _error_body(state, "engine says no (FAKE_ENGINE_ERROR)", 400))
                return True
            if request.get("stream") or state.token_delay_s > 0:
                return False
            self.write(200, "application/json", self.completion(path, request))
        else:
            self.write(404, "application/json", _error_body(state, f"no route {method} {path}", 404))
        return True

    def metrics(self) -> bytes:
        state = self.state
        label = f'model_name="{state.model}"'
        if state.metrics_names == "old":
            lines = [
                f"vllm:num_requests_running{{{label}}} {state.running}",
                f"vllm:num_requests_waiting{{{label}}} 0",
                f"vllm:gpu_cache_usage_perc{{{label}}} {min(1.0, state.running / 100):.4f}",
            ]
        else:
            lines = [
                f"vllm:num_requests_running{{{label}}} {state.running}",
                f"vllm:num_requests_waiting{{{label}}} 0",
                f"vllm:kv_cache_usage_perc{{{label}}} {min(1.0, state.running / 100):.4f}",
                f'vllm:cache_config_info{{block_size="16",num_gpu_blocks="10000",{label}}} 1.0',
            ]
        return ("\n".join(lines) + "\n").encode()

    def tokens_for(self, request: dict) -> int:
        max_tokens = request.get("max_tokens") or request.get("max_completion_tokens")
        return int(max_tokens) if max_tokens else self.state.default_tokens

    def completion(self, path: str, request: dict) -> bytes:
        n = self.tokens_for(request)
        text = " ".join(f"t{i}" for i in range(n))
        usage = {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n}
        if path == "/v1/chat/completions":
            doc = {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                   "model": request.get("model"), "choices": [{"index": 0, "message": {
                       "role": "assistant", "content": text}, "finish_reason": "length"}], "usage": usage}
        else:
            doc = {"id": "cmpl-fake", "object": "text_completion", "created": int(time.time()),
                   "model": request.get("model"), "choices": [{"index": 0, "text": text,
                   "finish_reason": "length"}], "usage": usage}
        return json.dumps(doc).encode()

    async def handle_async(self, path: str, body: bytes) -> None:
        state = self.state
        request = json.loads(body)
        state.running += 1
        try:
            if not request.get("stream"):
                n = self.tokens_for(request)
                await asyncio.sleep(state.token_delay_s * n)
                self.write(200, "application/json", self.completion(path, request))
                return
            await self.stream(path, request)
        finally:
            state.running -= 1

    async def stream(self, path: str, request: dict) -> None:
        state = self.state
        transport = self.transport
        assert transport is not None
        transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
                        b"transfer-encoding: chunked\r\n\r\n")
        chat = path == "/v1/chat/completions"
        n = self.tokens_for(request)
        usage = bool((request.get("stream_options") or {}).get("include_usage"))
        events = _stream_events(chat, str(request.get("model")), n, usage)
        if not state.hold_first and state.token_delay_s <= 0:
            for event in events:  # one write per event, as an engine emits one per iteration
                transport.write(event)
        else:
            for i, event in enumerate(events):
                transport.write(event)
                if i == 0 and state.hold_first:
                    await state.release.wait()
                if state.token_delay_s > 0 and i < n - 1:
                    await asyncio.sleep(state.token_delay_s)
        transport.write(b"0\r\n\r\n")


_EVENTS: dict[tuple[bool, str, int, bool], list[bytes]] = {}


def _stream_events(chat: bool, model: str, n: int, usage: bool) -> list[bytes]:
    """The chunked-encoded SSE events of one stream, built once per shape (zero latency
    means the engine must not be the bottleneck of the benchmark)."""
    key = (chat, model, n, usage)
    found = _EVENTS.get(key)
    if found is not None:
        return found
    head = {"id": "chatcmpl-fake" if chat else "cmpl-fake",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model}
    events = []
    for i in range(n):
        if chat:
            delta = {"role": "assistant", "content": f"t{i} "} if i == 0 else {"content": f"t{i} "}
            choice = {"index": 0, "delta": delta, "logprobs": None,
                      "finish_reason": "length" if i == n - 1 else None}
        else:
            choice = {"index": 0, "text": f"t{i} ", "logprobs": None,
                      "finish_reason": "length" if i == n - 1 else None}
        events.append(b"data: " + json.dumps({**head, "choices": [choice]}).encode() + b"\n\n")
    if usage:
        totals = {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n}
        events.append(b"data: " + json.dumps({**head, "choices": [], "usage": totals}).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    framed = [b"%x\r\n%s\r\n" % (len(event), event) for event in events]
    if len(_EVENTS) < 256:
        _EVENTS[key] = framed
    return framed


async def serve(args: argparse.Namespace) -> None:
    state = EngineState(args)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: EngineProtocol(state), args.host, args.port, backlog=4096)
    print(f"fake engine {args.model} on http://{args.host}:{args.port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--tokens", type=int, default=16, help="tokens when the request has no max_tokens")
    parser.add_argument("--token-delay-s", type=float, default=0.0)
    parser.add_argument("--hold-first", action="store_true")
    parser.add_argument("--error-shape", choices=["nested", "flat"], default="nested")
    parser.add_argument("--metrics-names", choices=["current", "old"], default="current")
    args = parser.parse_args()
    if uvloop is not None:
        uvloop.install()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
