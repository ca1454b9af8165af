"""The router's front door: an OpenAI-compatible HTTP API in front of the engine fleet.

Routes: POST /v1/chat/completions and /v1/completions (streaming or not), GET /v1/models
(the union of what the fleet serves), /health and /metrics.

One request: authenticate the API key (tenant, SLO class) -> read the body within the
size limit -> validate -> RequestInfo -> the tenant's dispatch policy decides (instances in
order) -> forward to the first; on a failure or timeout before the first byte, retry on
the next (bounded attempts, the tenant's retry budget, the SLO class's deadline) -> relay
the answer. Streams are relayed chunk by chunk as they arrive; once the first byte has
gone out a failure ends the stream with an SSE error event and `data: [DONE]`.

The app is a raw ASGI callable (five fixed routes need no framework; every microsecond
of framework is overhead the router adds to each request). It is served by the built-in
HTTP/1.1 server below (`FrontDoorProtocol`) or by uvicorn (`--http-server uvicorn`); see
FrontDoorProtocol for why the former is the default.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Any

import httptools
import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from router.config import RouterConfig
from router.dispatcher import Dispatcher
from router.health import HealthMonitor
from router.load import LoadMonitor
from router.metrics import RouterMetrics
from router.proxy import PoolSet, UpstreamError, set_nodelay
from router.registry import InstanceRegistry
from router.state import InstanceRecord, StateStore
from router.tenants import AuthError, RetryBudget, Tenant, TenantTable
from scheduler.types import NoInstanceAvailable, RequestInfo

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

RETRYABLE_STATUS = frozenset((502, 503, 504))
JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_DONE = b"data: [DONE]\n\n"
STREAM_IDLE_TIMEOUT_S = 300.0  # a stream with no chunk for this long is ended with an error event
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


def _normalize_sse_errors(data: bytes) -> bytes:
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


class _PrioritizedBody(bytes):
    """The upstream body with `priority` set, able to give the same body without it."""

    plain_doc: dict[str, Any]
    _plain: bytes | None

    def __new__(cls, data: bytes, plain_doc: dict[str, Any]) -> _PrioritizedBody:
        obj = super().__new__(cls, data)
        obj.plain_doc = plain_doc
        obj._plain = None
        return obj

    def plain(self) -> bytes:
        if self._plain is None:
            self._plain = orjson.dumps(self.plain_doc)
        return self._plain


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


def validate(body: Any, chat: bool) -> None:
    """The fields the router itself relies on; the engine validates the rest."""
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
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


class CoalescingTransport:
    """Writes made in one event-loop iteration leave in one send() at the end of it.

    uvicorn writes a response's head and its body separately; on loopback every TCP send
    runs the receiver's whole TCP path in the sender's CPU time, so halving the sends is
    ~10% more requests/s on the 2-core box. Unlike Nagle this never waits for an ACK or
    a timer: the flush is the next callback of the same loop iteration.
    """

    __slots__ = ("_transport", "_pending", "_loop")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._pending: list[bytes] | None = None
        self._loop = loop

    def write(self, data: bytes) -> None:
        if self._pending is None:
            self._pending = [data]
            self._loop.call_soon(self._flush)
        else:
            self._pending.append(data)

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class NoDelayProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with TCP_NODELAY set on every accepted client socket
    (an SSE chunk must not wait for the previous one's ACK on a kept-alive connection),
    and writes coalesced per loop iteration (CoalescingTransport)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        set_nodelay(transport)
        super().connection_made(CoalescingTransport(transport, asyncio.get_running_loop()))  # type: ignore[arg-type]


class Router:
    """The ASGI app plus what it needs: registry, store, dispatcher, health, load."""

    def __init__(self, config: RouterConfig, *, registry: InstanceRegistry | None = None,
                 store: StateStore | None = None, seed: int = 0) -> None:
        self.config = config
        self.store = store
        self.registry = registry or InstanceRegistry(store)
        self.metrics = RouterMetrics()
        self.dispatcher = Dispatcher(config, self.registry, store, seed=seed)
        self.tenants = TenantTable(
            [(Tenant(t.name, t.slo_class, t.policy, RetryBudget(t.retry_ratio, t.retry_min_per_s, t.retry_burst)),
              t.api_keys) for t in config.tenants],
            anonymous=(Tenant("anonymous", config.anonymous_slo_class)
                       if config.anonymous_slo_class is not None else None),
        )
        self._tenant_defaults = {t.name: (t.slo_class, t.policy) for t in self.tenants.tenants.values()}
        self.pools = PoolSet(connect_timeout_s=config.connect_timeout_s)
        self.health = HealthMonitor(self.registry, config.health, self.metrics)
        self.load = LoadMonitor(self.registry, self.metrics, interval_s=config.scrape_interval_s,
                                timeout_s=config.scrape_timeout_s)
        self.discoveries: list[Any] = []
        self.control_server: Any = None
        self.ranker = _build_ranker(config)  # router.rank: predicted_rank, rank priority, rank log
        self._ids = itertools.count(1)
        self._id_prefix = f"ty-{os.getpid():x}-{int(time.time()) & 0xffffff:x}-"
        self._background: set[asyncio.Task[Any]] = set()
        self._no_priority: set[str] = set()  # engines that refuse the priority field (FCFS vLLM)
        self._models_cache: tuple[Any, bytes] | None = None
        self.started = False
        self.registry.add_listener(self._on_membership)
        self._routes: dict[tuple[str, str], Callable[[Scope, Receive, Send], Awaitable[None]]] = {
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/completions"): self._completions,
            ("GET", "/v1/models"): self._models,
            ("GET", "/health"): self._health,
            ("GET", "/metrics"): self._metrics,
        }

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self, *, background: bool = True) -> None:
        """Load membership, start discovery, health checks, load scrapes, the control server."""
        await self.registry.start()
        if self.config.discovery:
            from router.discovery import build_discovery

            self.discoveries = build_discovery(self.config.discovery, f"{self.config.source}: discovery")
            for discovery in self.discoveries:
                await discovery.start(self.registry)
        if background:
            self.health.start()
            self.load.start()
        if self.config.control_port is not None:
            from router.admin_grpc import start_control_server
            from router.discovery import AdminRegistration

            registration = next((d for d in self.discoveries if isinstance(d, AdminRegistration)), None)
            self.control_server = await start_control_server(
                self.config.control_host or "127.0.0.1", self.config.control_port,
                registry=self.registry, store=self.store, decide=self.decide_for_picker,
                registration=registration, slo_classes=self.config.slo_classes,
                dispatch_policies=sorted(self.dispatcher.policies), tenant_for_api_key=self.tenants.tenant_for_key)
        if self.store is not None:
            await self.apply_policies()
            if background:
                self._spawn(self._follow_policies())
                self._spawn(self._resync_policies())
        self.started = True

    async def apply_policies(self) -> None:
        """Apply the tenants' policies stored through the Admin service over the config's."""
        assert self.store is not None
        stored = await self.store.list_policies()
        for name, tenant in self.tenants.tenants.items():
            slo_class, policy = self._tenant_defaults.get(name, (tenant.slo_class, tenant.policy))
            priority = None
            doc = stored.get(name)
            if doc:
                if doc.get("slo_class") in self.config.slo_classes:
                    slo_class = doc["slo_class"]
                if doc.get("dispatch_policy") in self.dispatcher.policies:
                    policy = doc["dispatch_policy"]
                if isinstance(doc.get("priority"), int):
                    priority = doc["priority"]
            if (tenant.slo_class, tenant.policy, tenant.priority) != (slo_class, policy, priority):
                log.info("tenant policy applied", extra={"tenant": name, "slo_class": slo_class,
                                                         "dispatch_policy": policy, "priority": priority})
            tenant.slo_class, tenant.policy, tenant.priority = slo_class, policy, priority

    async def _follow_policies(self) -> None:
        """Re-apply on every policy change notice from the store."""
        assert self.store is not None
        while True:
            try:
                async for change in self.store.watch():
                    if change.kind in ("policy", "any"):
                        await self.apply_policies()
                return  # the store was closed
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("following tenant policies failed; retrying", extra={"error": str(exc)})
                await asyncio.sleep(1.0)

    async def _resync_policies(self, every_s: float = 5.0) -> None:
        """Pub/sub is at-most-once: re-read the policies now and then regardless."""
        while True:
            await asyncio.sleep(every_s)
            with contextlib.suppress(Exception):
                await self.apply_policies()

    async def stop(self) -> None:
        if self.control_server is not None:
            await self.control_server.stop(grace=1.0)
        for discovery in self.discoveries:
            with contextlib.suppress(Exception):
                await discovery.stop()
        await self.health.stop()
        await self.load.stop()
        if self.ranker is not None:
            self.ranker.close()
        for task in list(self._background):
            task.cancel()
        for task in list(self._background):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.pools.close()
        await self.registry.close()
        if self.store is not None:
            await self.store.close()

    async def decide_for_picker(self, info: RequestInfo) -> Any:
        """The Picker gRPC service's decision: same policy as HTTP requests of that tenant."""
        tenant = self.tenants.tenants.get(info.tenant) or self.tenants.anonymous or Tenant(info.tenant)
        policy = self.dispatcher.policies[self.dispatcher.policy_name(tenant)]
        decision = await self.dispatcher.decide(info, policy)
        priority = self.dispatcher.slo_class(tenant).priority if tenant.priority is None else tenant.priority
        return type(decision)(decision.instance_ids, priority, decision.reason, decision.scores)

    def _on_membership(self, event: str, record: InstanceRecord) -> None:
        # An updated record with a new URL simply gets a new pool (pools are per URL).
        if event == "removed":
            self.health.forget(record.instance_id)
            if not any(r.url == record.url for r in self.registry.records()):
                self.pools.drop(record.url)  # requests in flight to it finish first

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- ASGI -----------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            handler = self._routes.get((scope["method"], scope["path"]))
            if handler is None:
                if any(path == scope["path"] for _, path in self._routes):
                    await self._send_json(send, 405, error_body(405, f"method {scope['method']} not allowed on "
                                                                f"{scope['path']}"))
                else:
                    await self._send_json(send, 404, error_body(404, f"no route {scope['path']}; routes: "
                                                                "/v1/chat/completions, /v1/completions, "
                                                                "/v1/models, /health, /metrics"))
                return
            await handler(scope, receive, send)
        elif kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    try:
                        if not self.started:
                            await self.start()
                    except Exception as exc:
                        await send({"type": "lifespan.startup.failed", "message": str(exc)})
                        return
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.stop()
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    @staticmethod
    async def _send_json(send: Send, status: int, body: bytes,
                         extra: list[tuple[bytes, bytes]] | None = None) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if extra:
            headers.extend(extra)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        states = self.registry.instances()
        healthy = sum(1 for s in states if s.healthy and not s.draining)
        await self._send_json(send, 200, orjson.dumps({"status": "ok", "instances": len(states),
                                                       "serving": healthy}))

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = self.metrics.render()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _models(self, scope: Scope, receive: Receive, send: Send) -> None:
        snapshot = self.registry.instances()
        if self._models_cache is None or self._models_cache[0] is not snapshot:
            created = int(time.time())
            data = [{"id": model, "object": "model", "created": created, "owned_by": "tokenyard", "root": model,
                     "parent": None} for model in self.dispatcher.models()]
            self._models_cache = (snapshot, orjson.dumps({"object": "list", "data": data}))
        await self._send_json(send, 200, self._models_cache[1])

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._completion(scope, receive, send, True, "/v1/chat/completions")

    async def _completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._completion(scope, receive, send, False, "/v1/completions")

    async def _read_body(self, receive: Receive, limit: int) -> bytes | None:
        """The whole body, or None once it exceeds `limit` bytes."""
        message = await receive()
        body = message.get("body", b"")
        if not message.get("more_body"):
            return body if len(body) <= limit else None
        parts = [body]
        size = len(body)
        while message.get("more_body"):
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            parts.append(chunk)
        return b"".join(parts)

    # -- the request path -----------------------------------------------------------------
    async def _completion(self, scope: Scope, receive: Receive, send: Send, chat: bool, path: str) -> None:
        started_s = time.monotonic()
        authorization = content_length = session_id = request_id = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"content-length":
                content_length = value
            elif name == b"x-session-id":
                session_id = value.decode("latin-1")
            elif name == b"x-request-id":
                request_id = value.decode("latin-1")
        request_id = request_id or self._id_prefix + str(next(self._ids))
        rid_header = [(b"x-request-id", request_id.encode("latin-1"))]
        try:
            tenant = self.tenants.authenticate(authorization)
        except AuthError as exc:
            self.metrics.request_done("unknown", "", 401)
            await self._send_json(send, 401, error_body(401, str(exc), code="invalid_api_key"), rid_header)
            return
        limit = self.config.max_request_bytes
        too_large = f"request body exceeds the limit of {limit} bytes"
        if content_length is not None and content_length.isdigit() and int(content_length) > limit:
            self.metrics.request_done(tenant.name, "", 413)
            await self._send_json(send, 413, error_body(413, too_large, code="request_too_large"), rid_header)
            return
        raw = await self._read_body(receive, limit)
        if raw is None:
            self.metrics.request_done(tenant.name, "", 413)
            await self._send_json(send, 413, error_body(413, too_large, code="request_too_large"), rid_header)
            return
        try:
            body = orjson.loads(raw)
            validate(body, chat)
        except orjson.JSONDecodeError as exc:
            self.metrics.request_done(tenant.name, "", 400)
            await self._send_json(send, 400, error_body(400, f"invalid JSON in the request body: {exc}"), rid_header)
            return
        except BadRequest as exc:
            self.metrics.request_done(tenant.name, "", 400)
            await self._send_json(send, 400, error_body(400, str(exc), param=exc.param), rid_header)
            return
        model = body["model"]
        if not self.dispatcher.serves(model):
            self.metrics.request_done(tenant.name, "<unknown>", 404)  # client-chosen names stay out of labels
            served = ", ".join(self.dispatcher.models()) or "none yet"
            await self._send_json(send, 404, error_body(
                404, f"The model `{model}` does not exist. Served models: {served}", err_type="NotFoundError",
                param="model", code=404), rid_header)
            return
        tenant.retry_budget.on_request()
        slo = self.dispatcher.slo_class(tenant)
        policy = self.dispatcher.policies[self.dispatcher.policy_name(tenant)]
        info = self.dispatcher.request_info(body, chat, tenant, request_id, session_id)
        if self.ranker is not None:
            info = await self.ranker.annotate(info, body)
        if self.config.forward_priority:
            # The operator's policy decides queue order: a client cannot jump the queue by
            # sending its own `priority`.
            body["priority"] = slo.priority if tenant.priority is None else tenant.priority
            rank_priority = self.ranker.priority(info, slo, info.arrival_s) if self.ranker is not None else None
            if rank_priority is not None and tenant.priority is None:
                body["priority"] = rank_priority
        upstream_body = orjson.dumps(body)
        if "priority" in body and body["priority"] != 0:
            plain = {k: v for k, v in body.items() if k != "priority"}
            upstream_body = _PrioritizedBody(upstream_body, plain)
        stream = body.get("stream") is True
        deadline_s = started_s + self.config.deadline_s(tenant.slo_class, stream, info.max_output_tokens)
        try:
            t0 = time.perf_counter()
            decision = await self.dispatcher.decide(info, policy)
            self.metrics.decide_seconds.observe(time.perf_counter() - t0)
        except NoInstanceAvailable as exc:
            self.metrics.request_done(tenant.name, model, 503)
            await self._send_json(send, 503, error_body(503, f"no instance can serve this request: {exc}",
                                                        code="no_instance_available"), rid_header)
            return
        headers = b"Content-Type: application/json\r\nX-Request-Id: " + request_id.encode("latin-1") + b"\r\n"
        self.metrics.inflight.inc()
        try:
            await self._forward(send, receive, path, upstream_body, headers, stream, info, policy, decision,
                                tenant, deadline_s, started_s, rid_header)
        finally:
            self.metrics.inflight.dec()

    async def _forward(self, send: Send, receive: Receive, path: str, upstream_body: bytes, headers: bytes,
                       stream: bool, info: RequestInfo, policy: Any, decision: Any, tenant: Tenant,
                       deadline_s: float, started_s: float, rid_header: list[tuple[bytes, bytes]]) -> None:
        config = self.config
        failures: list[str] = []
        attempts = 0
        deadline_hit = False
        for instance_id in decision.instance_ids:
            if attempts >= config.max_attempts:
                break
            found = self.registry.find(instance_id)
            if found is None:
                continue
            record, _ = found
            if attempts:
                if not tenant.retry_budget.try_spend():
                    self.metrics.retry_budget_exhausted.labels(tenant.name).inc()
                    failures.append("retry budget of the tenant exhausted")
                    break
                self.metrics.retries.labels(tenant.name).inc()
            attempts += 1
            remaining_s = deadline_s - time.monotonic()
            if remaining_s <= 0:
                deadline_hit = True
                break
            timeout_s = remaining_s
            if config.first_byte_timeout_s is not None and config.first_byte_timeout_s < timeout_s:
                timeout_s = config.first_byte_timeout_s
            self.registry.inflight_started(instance_id)
            policy.on_dispatch(info, instance_id)
            try:
                outcome = await self._attempt(send, receive, record, path, upstream_body, headers, stream, timeout_s,
                                              info, tenant, started_s, rid_header)
            finally:
                self.registry.inflight_finished(instance_id)
                policy.on_finish(info, instance_id)
            if outcome is None:  # answered
                if instance_id != decision.instance_ids[0] and info.session_id is not None:
                    self._spawn(self.dispatcher.moved(info, instance_id))
                return
            if time.monotonic() >= deadline_s:
                deadline_hit = True
                break
            failures.append(f"{instance_id}: {outcome}")
        if deadline_hit:
            budget_ms = (deadline_s - started_s) * 1000
            self.metrics.request_done(tenant.name, info.model, 504)
            await self._send_json(send, 504, error_body(
                504, f"deadline of {budget_ms:.0f} ms for SLO class '{tenant.slo_class}' exceeded before the "
                     f"first byte" + (f" (attempts: {'; '.join(failures)})" if failures else ""),
                code="deadline_exceeded"), rid_header)
            return
        self.metrics.request_done(tenant.name, info.model, 502)
        detail = "; ".join(failures) or "no usable instance"
        await self._send_json(send, 502, error_body(
            502, f"no engine answered after {attempts} attempt(s): {detail}", code="upstream_unavailable"),
            rid_header)

    async def _attempt(self, send: Send, receive: Receive, record: InstanceRecord, path: str, upstream_body: bytes,
                       headers: bytes, stream: bool, timeout_s: float, info: RequestInfo, tenant: Tenant,
                       started_s: float, rid_header: list[tuple[bytes, bytes]]) -> str | None:
        """One try on one instance. None: the client got an answer; else why it failed
        before anything reached the client (retryable)."""
        instance_id = record.instance_id
        attempt_ends_s = time.monotonic() + timeout_s
        payload = upstream_body
        if isinstance(upstream_body, _PrioritizedBody) and instance_id in self._no_priority:
            payload = upstream_body.plain()
        try:
            response = await self.pools.get(record.url).request(
                "POST", path, payload, headers, headers_timeout_s=timeout_s)
            if response.status in RETRYABLE_STATUS:
                response.abort()
                self.health.on_failure(instance_id, f"HTTP {response.status}")
                self.metrics.child(self.metrics.attempts, instance_id, str(response.status)).inc()  # type: ignore[attr-defined]
                return f"HTTP {response.status}"
            if stream and response.status == 200:
                first = await response.next_chunk(max(0.001, attempt_ends_s - time.monotonic()))
            else:
                body = await response.read_all(max(0.001, attempt_ends_s - time.monotonic()))
        except UpstreamError as exc:
            if exc.kind != "timeout" or time.monotonic() < attempt_ends_s - 0.001 or \
                    self.config.first_byte_timeout_s is not None:
                self.health.on_failure(instance_id, str(exc))
            self.metrics.child(self.metrics.attempts, instance_id, exc.kind).inc()  # type: ignore[attr-defined]
            return str(exc)
        self.health.on_success(instance_id)
        self.metrics.child(self.metrics.attempts, instance_id, "ok").inc()  # type: ignore[attr-defined]
        self.metrics.child(self.metrics.first_byte, tenant.name, info.model).observe(  # type: ignore[attr-defined]
            time.monotonic() - started_s)
        instance_header = (b"x-tokenyard-instance", instance_id.encode("latin-1"))
        if not (stream and response.status == 200):
            if (response.status == 400 and isinstance(payload, _PrioritizedBody)
                    and b"riority scheduling is not enabled" in body):
                # vLLM refuses a non-zero priority unless it runs --scheduling-policy priority:
                # remember that this engine runs FCFS and send it requests without one.
                self._no_priority.add(instance_id)
                log.info("engine runs without priority scheduling; priorities not forwarded to it",
                         extra={"instance": instance_id})
                return await self._attempt(send, receive, record, path, upstream_body, headers, stream,
                                           max(0.001, attempt_ends_s - time.monotonic()), info, tenant, started_s,
                                           rid_header)
            if response.status >= 400:
                body = normalize_engine_error(body, response.status)
            content_type = response.header(b"content-type") or b"application/json"
            await send({"type": "http.response.start", "status": response.status, "headers": [
                (b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                rid_header[0], instance_header]})
            await send({"type": "http.response.body", "body": body})
            self.metrics.request_done(tenant.name, info.model, response.status)
            if self.ranker is not None:
                self.ranker.finished(info, body if response.status == 200 else None)
            return None
        await self._relay(send, receive, response, first, instance_id, [rid_header[0], instance_header])
        self.metrics.request_done(tenant.name, info.model, 200)
        return None

    async def _relay(self, send: Send, receive: Receive, response: Any, first: bytes | None, instance_id: str,
                     extra_headers: list[tuple[bytes, bytes]]) -> None:
        """Relay an SSE stream chunk by chunk. Only an incomplete trailing event is held back
        (vLLM writes whole events, so normally nothing is), so that a failure can end the
        stream with a clean error event instead of half an event."""
        content_type = response.header(b"content-type") or b"text/event-stream"
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", content_type), (b"cache-control", b"no-cache"), *extra_headers]})
        watcher = asyncio.ensure_future(self._watch_disconnect(receive, response))
        tail = b""
        chunk = first
        try:
            while chunk is not None:
                data = tail + chunk if tail else chunk
                if data.endswith(b"\n\n"):
                    tail = b""
                else:
                    cut = data.rfind(b"\n\n") + 2
                    data, tail = (data[:cut], data[cut:]) if cut > 1 else (b"", data)
                if data:
                    if b'"object": "error"' in data or b'"object":"error"' in data:
                        data = _normalize_sse_errors(data)
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                chunk = await response.next_chunk(STREAM_IDLE_TIMEOUT_S)
            if tail:
                await send({"type": "http.response.body", "body": tail, "more_body": True})
        except UpstreamError as exc:
            if watcher.done():
                return  # the client left; nothing to tell it
            self.metrics.midstream_errors.labels(instance_id).inc()
            self.health.on_failure(instance_id, f"mid-stream: {exc}")
            log.warning("stream broke after the first byte", extra={"instance": instance_id, "error": str(exc)})
            event = error_body(502, f"the engine {instance_id} failed mid-stream: {exc}", code="upstream_stream_error")
            await send({"type": "http.response.body", "body": b"data: " + event + b"\n\n" + SSE_DONE,
                        "more_body": True})
        finally:
            watcher.cancel()
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _watch_disconnect(receive: Receive, response: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                response.abort()  # closing the engine connection makes the engine cancel it
                return


def _build_ranker(config: RouterConfig) -> Any:
    """The output-length ranker when the config has a `rank` section (router.rank)."""
    if config.rank is None:
        return None
    from router.rank import RequestRanker

    return RequestRanker(config.rank)


class _OwnedSignalsServer(uvicorn.Server):
    """A uvicorn server whose signals are its owner's (several servers share one loop)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


class _Exchange:
    """One parsed request waiting for, or in, its turn on a connection."""

    __slots__ = ("method", "path", "query", "headers", "body", "keep_alive")

    def __init__(self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes,
                 keep_alive: bool) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive


class FrontDoorProtocol(asyncio.Protocol):
    """A minimal HTTP/1.1 server for one ASGI app: the router's default front door.

    Why not uvicorn: measured on the 2-core box with a do-nothing ASGI app (loopback, 32
    kept-alive connections, two runs, same load generator), uvicorn (httptools, uvloop)
    answered 5,700-6,500 req/s and this server 8,600-13,700 req/s: uvicorn creates a task
    and a cycle object per request, validates every header with regexes and writes a
    response head and body separately. This server runs the same ASGI app with one task per
    connection (requests on it run in order), writes a head together with the first body
    bytes, and frames streams as chunked in the same write. End to end the router's own
    work and the engine connection dominate, so the two are within noise of each other in
    bench/router_overhead.py (`tokenyard` vs `tokenyard-uvicorn`, both measured in every
    run); uvicorn stays selectable (`--http-server uvicorn`). Keep-alive with an idle
    timeout, pipelining (in order), `Expect: 100-continue`, write flow control and client
    disconnects are handled;
    WebSocket upgrades are refused.
    """

    def __init__(self, app: Any, owner: RouterServer, max_body_bytes: int, idle_timeout_s: float = 30.0) -> None:
        self.app = app
        self.owner = owner
        self.loop = asyncio.get_running_loop()
        self.max_body_bytes = max_body_bytes
        self.idle_timeout_s = idle_timeout_s
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.pending: collections.deque[_Exchange] = collections.deque()
        self.worker: asyncio.Task[None] | None = None
        self.wakeup: asyncio.Future[None] | None = None
        self.disconnected: asyncio.Future[None] = self.loop.create_future()
        self.writable: asyncio.Future[None] | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.client: tuple[str, int] | None = None
        self.server: tuple[str, int] | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._body_size = 0

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        set_nodelay(transport)
        peer = transport.get_extra_info("peername")
        sockname = transport.get_extra_info("sockname")
        self.client = (str(peer[0]), int(peer[1])) if peer else None
        self.server = (str(sockname[0]), int(sockname[1])) if sockname else None
        self.owner.connections.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.connections.discard(self)
        if not self.disconnected.done():
            self.disconnected.set_result(None)
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        if self.worker is None or self.worker.done():
            return
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            self._reject(400, f"malformed HTTP request: {exc}")

    def pause_writing(self) -> None:
        if self.writable is None or self.writable.done():
            self.writable = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)

    # -- httptools callbacks -------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._body = []
        self._body_size = 0
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        for name, value in self._headers:
            if name == b"expect" and value.lower() == b"100-continue" and self.transport is not None:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        # Past the limit the rest is dropped; the app sees limit + 1 bytes and answers 413.
        if self._body_size <= self.max_body_bytes:
            self._body.append(body[: self.max_body_bytes + 1 - self._body_size])
        self._body_size += len(body)

    def on_message_complete(self) -> None:
        path, _, query = self._url.partition(b"?")
        exchange = _Exchange(self.parser.get_method().decode("ascii"), path.decode("latin-1"), query,
                             self._headers, b"".join(self._body), self.parser.should_keep_alive())
        self.pending.append(exchange)
        if len(self.pending) > 16 and self.transport is not None:
            self.transport.pause_reading()  # a client pipelining without reading answers
        if self.worker is None:
            self.worker = self.loop.create_task(self._serve())
        elif self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)

    # -- serving ---------------------------------------------------------------------------
    def _arm_idle(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        self.idle_timer = self.loop.call_later(self.idle_timeout_s, self._idle_close)

    def _idle_close(self) -> None:
        if not self.pending and self.transport is not None and (self.wakeup is None or not self.wakeup.done()):
            self.transport.close()

    def _reject(self, status: int, message: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            body = error_body(status, message)
            self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                                 b"connection: close\r\n\r\n%s" % (status, _REASONS.get(status, b""), len(body), body))
            self.transport.close()

    async def _serve(self) -> None:
        while not self.disconnected.done():
            if not self.pending:
                if self.owner.closing:
                    break
                self._arm_idle()
                self.wakeup = self.loop.create_future()
                await self.wakeup
                self.wakeup = None
                continue
            exchange = self.pending.popleft()
            if len(self.pending) <= 4 and self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()
            keep_alive = await self._run(exchange)
            if not keep_alive or self.owner.closing:
                break
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    async def _run(self, exchange: _Exchange) -> bool:
        """Run the app for one request; True when the connection can take the next one."""
        transport = self.transport
        assert transport is not None
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": exchange.method, "scheme": "http", "path": exchange.path,
            "raw_path": exchange.path.encode("latin-1"), "query_string": exchange.query, "root_path": "",
            "headers": exchange.headers, "client": self.client, "server": self.server,
        }
        state = {"started": False, "complete": False, "chunked": False, "head": b"", "body_read": False,
                 "keep_alive": exchange.keep_alive}
        disconnected = self.disconnected

        async def receive() -> Message:
            if not state["body_read"]:
                state["body_read"] = True
                return {"type": "http.request", "body": exchange.body, "more_body": False}
            if not disconnected.done() and not state["complete"]:
                await asyncio.shield(disconnected)  # shielded: a cancelled waiter must not cancel it
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            if disconnected.done() or state["complete"]:
                return
            if message["type"] == "http.response.start":
                status = int(message["status"])
                lines = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b""))]
                has_length = False
                for name, value in message.get("headers", ()):
                    if name.lower() == b"content-length":
                        has_length = True
                    lines.append(name + b": " + value + b"\r\n")
                if not has_length:
                    state["chunked"] = True
                    lines.append(b"transfer-encoding: chunked\r\n")
                if not state["keep_alive"]:
                    lines.append(b"connection: close\r\n")
                lines.append(b"\r\n")
                state["head"] = b"".join(lines)
                state["started"] = True
                return
            body = message.get("body", b"")
            more = message.get("more_body", False)
            if state["chunked"]:
                out = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
                if not more:
                    out += b"0\r\n\r\n"
            else:
                out = body
            if state["head"]:
                out = state["head"] + out
                state["head"] = b""
            if out:
                transport.write(out)
            if not more:
                state["complete"] = True
            elif self.writable is not None and not self.writable.done():
                await self.writable  # the client reads slower than the engine writes

        try:
            await self.app(scope, receive, send)
        except Exception:
            log.exception("request failed in the router", extra={"path": exchange.path})
            if not state["started"] and not disconnected.done():
                body = error_body(500, "internal error in the router")
                await send({"type": "http.response.start", "status": 500,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
            else:
                return False
        if not state["complete"]:
            return False  # the app ended without finishing its response
        return bool(state["keep_alive"])


class RouterServer:
    """The router served over HTTP on the running event loop (CLI, `tokenyard up`, tests).

    `http_server`: "builtin" (FrontDoorProtocol, the default) or "uvicorn".
    """

    def __init__(self, router: Router, host: str = "127.0.0.1", port: int = 0, http_server: str = "builtin",
                 reuse_port: bool = False) -> None:
        if http_server not in ("builtin", "uvicorn"):
            raise ValueError(f"http_server: expected builtin or uvicorn, got {http_server!r}")
        self.router = router
        self.host = host
        self.port = port
        self.http_server = http_server
        self.reuse_port = reuse_port  # several worker processes share the port (SO_REUSEPORT)
        self.connections: set[FrontDoorProtocol] = set()
        self.closing = False
        self._server: _OwnedSignalsServer | None = None
        self._builtin: asyncio.Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def client_sockets(self) -> list[socket.socket]:
        """Accepted client sockets (for tests of socket options)."""
        protocols: list[Any] = list(self.connections)
        if self._server is not None:
            protocols = list(self._server.server_state.connections)
        found = []
        for protocol in protocols:
            transport = getattr(protocol, "transport", None)
            sock = transport.get_extra_info("socket") if transport is not None else None
            if sock is not None:
                found.append(sock)
        return found

    async def start(self) -> None:
        if not self.router.started:
            await self.router.start()
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise OSError(f"router: cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from exc
        if self.http_server == "builtin":
            limit = self.router.config.max_request_bytes
            self._builtin = await asyncio.get_running_loop().create_server(
                lambda: FrontDoorProtocol(self.router, self, limit), sock=sock, backlog=4096)
            self.port = int(self._builtin.sockets[0].getsockname()[1])
        else:
            config = uvicorn.Config(self.router, host=self.host, port=self.port, loop="none", http=NoDelayProtocol,
                                    ws="none", lifespan="off", access_log=False, log_config=None,
                                    server_header=False, date_header=False, backlog=4096, timeout_keep_alive=30,
                                    proxy_headers=False)
            self._server = _OwnedSignalsServer(config)
            self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="router-http")
            while not self._server.started:
                if self._task.done():
                    raise OSError(f"router: could not start on {self.host}:{self.port}")
                await asyncio.sleep(0.005)
            self.port = int(self._server.servers[0].sockets[0].getsockname()[1])
        log.info("router listening", extra={"url": self.url, "http_server": self.http_server})

    async def stop(self, grace_s: float = 5.0) -> None:
        self.closing = True
        if self._builtin is not None:
            self._builtin.close()
            for protocol in list(self.connections):  # idle keep-alive connections go now
                idle = not protocol.pending and (protocol.worker is None or protocol.wakeup is not None)
                if idle and protocol.transport is not None:
                    protocol.transport.close()
            workers = [p.worker for p in list(self.connections) if p.worker is not None and not p.worker.done()]
            if workers:
                _, late = await asyncio.wait(workers, timeout=grace_s)
                for task in late:
                    task.cancel()
            for protocol in list(self.connections):
                if protocol.transport is not None:
                    protocol.transport.close()
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.router.stop()
