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
of framework is overhead the router adds to each request). It is served by
router/http_server.py (on tokenyard/asgi_server.py, the one bounded HTTP/1.1 server); error shapes are in
router/errors.py and body validation in router/validation.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from typing import Any

import orjson

from router.admission import PluginMetrics, RouterAdmission
from router.config import RouterConfig
from router.dispatcher import Dispatcher
from router.errors import error_body, normalize_engine_error, normalize_sse_errors
from router.health import HealthMonitor
from router.keys import KeyCache, KeyStore, sync_router_keys
from router.load import LoadMonitor
from router.metrics import RouterMetrics
from router.migration_loop import build_migration_loop
from router.plan_routing import RoutingFollower
from router.policy_versions import stored_policy_problems
from router.proxy import PoolSet, UpstreamError
from router.rate_limiter import SLOTS, build_rate_limiter, refuse_over_limits
from router.registry import InstanceRegistry
from router.splice import MIGRATED_HEADER, Splicer, Upstream
from router.state import InstanceRecord, StateStore
from router.tenants import AuthError, RetryBudget, Tenant, TenantTable
from router.tiers import build_tier_resolver
from router.validation import BadRequest, max_context_tokens, validate
from router.workload_recorder import UsageMeter, WorkloadRecorder
from scheduler.tiers import TierChoice
from scheduler.types import NoInstanceAvailable, RequestInfo

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

RETRYABLE_STATUS = frozenset((502, 503, 504))
JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_DONE = b"data: [DONE]\n\n"
PICK_INFLIGHT_LEASE_S = 2.0  # a Picker gRPC pick counts as in flight this long (no finish is reported)
EXPLAIN_HEADER = b"x-tokenyard-explain"  # request: "1" asks for the decision's explanation
# request: the emulated engine's fixed output length (sim/engine_http.py), passed through so a
# benchmark can replay a prompt set with known answer lengths through the router; digits only,
# at most 7 (real engines ignore the header)
OUTPUT_TOKENS_HEADER = b"x-tokenyard-output-tokens"
# A stream (or a non-streaming body) with no chunk for this long is ended: an engine that
# is stopped (SIGSTOP) or wedged says nothing. Per SLO class as `SloClass.stall_timeout_s`
# where the policy document sets it; this is the default.
DEFAULT_STALL_TIMEOUT_S = 30.0
# A non-streaming answer is buffered (so that a failure can still be retried elsewhere)
# up to this size; a larger one is streamed through to the client as it arrives.
MAX_BUFFERED_RESPONSE_BYTES = 1 << 20
CLIENT_GONE_STATUS = 499  # nginx's code for "the client closed the request", in metrics only


class _UpstreamBody:
    """The body forwarded to engines; with `priority` set (`doc` holds the document), the
    same body without it is built only when an engine refuses priorities, not per request.
    A plain wrapper, not a `bytes` subclass: mypyc compiles this module (router/native.py)
    and cannot subclass `bytes`."""

    __slots__ = ("data", "doc", "_plain")

    def __init__(self, data: bytes, doc: dict[str, Any] | None) -> None:
        self.data = data
        self.doc = doc  # None: no priority in it
        self._plain: bytes | None = None

    def plain(self) -> bytes:
        if self._plain is None:
            doc = self.doc or {}
            self._plain = orjson.dumps({k: v for k, v in doc.items() if k != "priority"})
        return self._plain


class _Hold:
    """A provisional in-flight count on an instance (`registry.inflight_started` already
    called), ended once: by `_forward`'s first attempt, or when the request ends first."""

    __slots__ = ("registry", "instance_id")

    def __init__(self, registry: InstanceRegistry, instance_id: str) -> None:
        self.registry = registry
        self.instance_id: str | None = instance_id

    def __call__(self) -> None:
        if self.instance_id is not None:
            self.registry.inflight_finished(self.instance_id)
            self.instance_id = None


class Router:
    """The ASGI app plus what it needs: registry, store, dispatcher, health, load."""

    def __init__(self, config: RouterConfig, *, registry: InstanceRegistry | None = None,
                 store: StateStore | None = None, seed: int | None = None) -> None:
        self.config = config
        self.store = store
        self.registry = registry or InstanceRegistry(store)
        self.metrics = RouterMetrics()
        self.metrics.expose_instance_inflight(
            lambda: [(state.instance_id, state.router_inflight) for state in self.registry.instances()])
        # The metric children every answered request updates, bound here: each
        # `metrics.child(...)` or `inc()` is a Python call from the compiled request path,
        # a dict hit in it is not (bench/router_instructions.py, issue #17 stop 23).
        self._inflight_gauge = self.metrics.inflight.unlabelled()
        self._decide_hist = self.metrics.decide_seconds.unlabelled()
        self._answered: dict[tuple[str, str, int], Any] = {}  # (tenant, model, status) -> requests child
        self._first_byte: dict[tuple[str, str], Any] = {}  # (tenant, model) -> first-byte histogram child
        self._attempts_ok: dict[str, Any] = {}  # instance -> attempts{outcome="ok"} child
        self.dispatcher = Dispatcher(config, self.registry, store, seed=seed)
        if config.plugin_sample_every:
            self.dispatcher.layer.set_observer(PluginMetrics(self.metrics, config.plugin_sample_every))
        layer = self.dispatcher.layer
        self.admission = (RouterAdmission(self.dispatcher, self.metrics, layer.new_admission_queue())
                          if layer.admission_enabled else None)
        self.tiers = build_tier_resolver(config.tiers, seed=seed) if config.tiers else None
        self.rate_limiter = build_rate_limiter(store)  # per-tenant buckets of Admin policies
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
                                timeout_s=config.scrape_timeout_s, worker_token=config.worker_token)
        self.splicer = Splicer.for_router(self)  # streams across migrations and engine deaths
        self.migration = build_migration_loop(config.policy.migration, self.registry,  # None: off
                                              token=config.worker_token, metrics=self.metrics)
        self.discoveries: list[Any] = []
        self.control_server: Any = None
        self.ranker = _build_ranker(config)  # router.rank: predicted_rank, rank priority, its features
        self.records = _build_records(config, self.metrics)  # router.records: one line per request; None: off
        self._ids = itertools.count(1)
        self._id_prefix = f"ty-{os.getpid():x}-{int(time.time()) & 0xffffff:x}-"
        # Every replica records the workload it serves, for the control plane's planner.
        self.workload = WorkloadRecorder(store) if store is not None else None
        self.routing = RoutingFollower(self.dispatcher.layer)  # the control plane's plan routing
        # Requests counted in the workload when they were held at zero (not again when answered).
        self._counted_at_hold: set[str] = set()
        if self.admission is not None and self.workload is not None:
            self.admission.on_held_at_zero = self._demand_at_zero
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
        # The completion routes, run by __call__ itself (chat?, path): one coroutine less.
        self._completion_routes: dict[Any, tuple[bool, str]] = {
            self._routes[("POST", "/v1/chat/completions")]: (True, "/v1/chat/completions"),
            self._routes[("POST", "/v1/completions")]: (False, "/v1/completions"),
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
            if self.migration is not None:
                self.migration.start()
        if self.config.control_port is not None:
            from router.admin_grpc import start_control_server
            from router.discovery import AdminRegistration

            registration = next((d for d in self.discoveries if isinstance(d, AdminRegistration)), None)
            self.control_server = await start_control_server(
                self.config.control_host or "127.0.0.1", self.config.control_port,
                registry=self.registry, store=self.store, decide=self.decide_for_picker,
                registration=registration, slo_classes=self.config.slo_classes,
                dispatch_policies=sorted(self.dispatcher.policies), tenant_for_api_key=self._tenant_for_pick,
                auth=self.config.control_auth, migration=self.migration, records=self.records,
                resolve_tier=self.resolve_tier_for_picker if self.tiers is not None else None)
            if self.config.control_auth.reviewer is not None:
                from router.token_review import TokenReviewCollector

                self.metrics.registry.register(TokenReviewCollector(self.config.control_auth.reviewer))
        if self.store is not None:
            self.key_cache = KeyCache(KeyStore(self.store))  # API keys of the Admin service
            self.tenants.stored_lookup = self.key_cache.tenant_for
            await sync_router_keys(self)
            await self.apply_policies()
            await self.follow_routing()
            if background:
                self._spawn(self._follow_policies())
                self._spawn(self._resync_policies())
                if self.workload is not None:
                    self.workload.start()
        self.started = True

    async def apply_policies(self) -> None:
        """Apply the tenants' policies stored through the Admin service over the config's."""
        assert self.store is not None
        stored = await self.store.list_policies()
        for name, tenant in self.tenants.tenants.items():
            slo_class, policy = self._tenant_defaults.get(name, (tenant.slo_class, tenant.policy))
            priority = None
            doc = stored.get(name)
            if doc and self._invalid_stored_policy(name, doc):
                continue  # keep the tenant's last good policy (logged loudly)
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
            tenant.rate_limits = doc.get("rate_limits") or None if doc else None

    def _invalid_stored_policy(self, name: str, doc: dict[str, Any]) -> bool:
        """A stored policy naming an SLO class or profile this router lacks is never applied."""
        problems = stored_policy_problems(doc, self.config.slo_classes, self.dispatcher.policies)
        if problems:
            log.error("stored tenant policy is invalid; keeping the last good one",
                      extra={"tenant": name, "version": doc.get("version"), "problem": "; ".join(problems)})
        return bool(problems)

    async def _follow_policies(self) -> None:
        """Re-apply on every policy change notice from the store."""
        assert self.store is not None
        while True:
            try:
                async for change in self.store.watch():
                    if change.kind in ("keys", "any"):
                        await sync_router_keys(self)
                    if change.kind in ("policy", "keys", "any"):
                        await self.apply_policies()
                return  # the store was closed
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("following tenant policies failed; retrying", extra={"error": str(exc)})
                await asyncio.sleep(1.0)

    async def _resync_policies(self, every_s: float = 5.0) -> None:
        """Pub/sub is at-most-once: re-read the policies now and then regardless (and the
        control plane's routing table, which is only ever read this way)."""
        while True:
            await asyncio.sleep(every_s)
            with contextlib.suppress(Exception):
                await sync_router_keys(self)
                await self.apply_policies()
                await self.follow_routing()

    async def follow_routing(self) -> bool:
        """Apply the control plane's newest routing table to the length_bucket filters (only
        read when some profile has one); True when a new one was applied."""
        if self.store is None or not self.routing.active:
            return False
        return await self.routing.refresh(self.store)

    async def stop(self) -> None:
        if self.admission is not None:
            await self.admission.stop()
        if self.control_server is not None:
            await self.control_server.stop(grace=1.0)
        for discovery in self.discoveries:
            with contextlib.suppress(Exception):
                await discovery.stop()
        if self.migration is not None:
            await self.migration.stop()
        await self.health.stop()
        await self.load.stop()
        if self.ranker is not None:
            self.ranker.close()
        if self.records is not None:
            await asyncio.to_thread(self.records.close)  # writes what is queued
        for task in list(self._background):
            task.cancel()
        for task in list(self._background):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.pools.close()
        await self.registry.close()
        if self.workload is not None:
            await self.workload.stop()
        if self.store is not None:
            await self.store.close()

    async def decide_for_picker(self, info: RequestInfo) -> Any:
        """The Picker gRPC service's decision: same policy as HTTP requests of that tenant."""
        tenant = self.tenants.tenants.get(info.tenant) or self.tenants.anonymous or Tenant(info.tenant)
        policy = self.dispatcher.policies[self.dispatcher.policy_name(tenant)]
        decision = await self.dispatcher.decide(info, policy)
        priority = self.dispatcher.priority(info, tenant)
        # The gateway forwards the request itself and reports no finish: the pick counts as
        # dispatched (stateful parts see it) and in flight for a lease, as an HTTP request would.
        chosen = decision.instance_id
        policy.on_dispatch(info, chosen)
        self.registry.inflight_started(chosen, info.input_tokens)

        def lease_over() -> None:
            self.registry.inflight_finished(chosen)
            policy.on_finish(info, chosen)

        asyncio.get_running_loop().call_later(PICK_INFLIGHT_LEASE_S, lease_over)
        return type(decision)(decision.instance_ids, priority, decision.reason, decision.scores)

    def resolve_tier_for_picker(self, info: RequestInfo, prompt: str) -> tuple[RequestInfo, TierChoice | None]:
        """A Pick request naming the tier alias, as the chosen tier's model: the front door's
        decision (router/tiers.py) on the prompt text the gateway sent."""
        tiers = self.tiers
        if tiers is None or not tiers.router.handles(info.model):
            return info, None
        tenant = self.tenants.tenants.get(info.tenant) or self.tenants.anonymous or Tenant(info.tenant)
        slo = self.config.slo_classes.get(info.slo_class) or self.dispatcher.slo_class(tenant)
        choice = tiers.decide_info(info, prompt, slo, self.dispatcher)
        self.metrics.tier_chosen(choice.tier, choice.model)
        return dataclasses.replace(info, model=choice.model), choice

    def _tenant_for_pick(self, api_key: str) -> str | None:
        """The Picker's tenant lookup: the same rules as the HTTP front door's."""
        try:
            return self.tenants.authenticate(b"Bearer " + api_key.encode("utf-8") if api_key else None).name
        except AuthError:
            return None

    def _on_membership(self, event: str, record: InstanceRecord) -> None:
        # An updated record with a new URL simply gets a new pool (pools are per URL).
        if event == "removed":
            self.health.forget(record.instance_id)
            self._attempts_ok.pop(record.instance_id, None)  # a fleet that churns pods must not grow it
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
            completion = self._completion_routes.get(handler)
            held: list[tuple[str, str]] | None = None
            if completion is not None:
                # The tenant concurrency slots a request takes (`_rate_limited`) go back
                # however it ends. Done here rather than in a wrapper coroutine: every resume
                # of the request walks each frame of its await chain (issue #17).
                held = []
                reset = SLOTS.set(held)
            try:
                if completion is not None:
                    await self._completion(scope, receive, send, *completion)
                else:
                    await handler(scope, receive, send)
            except Exception:
                # The server answers the 500 (or closes a started response); it is counted here.
                self.metrics.request_done("unknown", "", 500)
                raise
            finally:
                if held is not None:
                    SLOTS.reset(reset)
                    for tenant, slot_id in held:
                        await self.rate_limiter.release(tenant, slot_id)
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
        healthy = sum(1 for s in states if s.healthy and not s.draining and not s.cordoned)
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
            if self.tiers is not None:  # the tier alias, a model a tenant may ask for (docs/tiers.md)
                alias = self.tiers.router.alias
                data.append({"id": alias, "object": "model", "created": created, "owned_by": "tokenyard",
                             "root": alias, "parent": None})
            self._models_cache = (snapshot, orjson.dumps({"object": "list", "data": data}))
        await self._send_json(send, 200, self._models_cache[1])

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._with_slots(self._completion(scope, receive, send, True, "/v1/chat/completions"))

    async def _completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._with_slots(self._completion(scope, receive, send, False, "/v1/completions"))

    async def _with_slots(self, work: Awaitable[None]) -> None:
        """The tenant concurrency slots a request took (`_rate_limited`) go back however it ends."""
        held: list[tuple[str, str]] = []
        reset = SLOTS.set(held)
        try:
            await work
        finally:
            SLOTS.reset(reset)
            for tenant, slot_id in held:
                await self.rate_limiter.release(tenant, slot_id)

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
        explain = False
        output_tokens = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"content-length":
                content_length = value
            elif name == b"x-session-id":
                session_id = value.decode("latin-1")
            elif name == b"x-request-id":
                request_id = value.decode("latin-1")
            elif name == EXPLAIN_HEADER:
                explain = value == b"1"
            elif name == OUTPUT_TOKENS_HEADER and value.isdigit() and len(value) <= 7:
                output_tokens = value
        request_id = request_id or self._id_prefix + str(next(self._ids))
        rid_header = [(b"x-request-id", request_id.encode("latin-1"))]
        try:
            tenant = self.tenants.authenticate(authorization)
        except AuthError as refused:  # one name per exception type in a function: mypyc types each name once
            self.metrics.request_done("unknown", "", 401)
            await self._send_json(send, 401, error_body(401, str(refused), code="invalid_api_key"), rid_header)
            return
        limit = self.config.max_request_bytes
        if content_length is not None and content_length.isdigit() and int(content_length) > limit:
            self.metrics.request_done(tenant.name, "", 413)
            await self._send_json(send, 413, error_body(413, f"request body exceeds the limit of {limit} bytes",
                                                               code="request_too_large"), rid_header)
            return
        raw = await self._read_body(receive, limit)
        if raw is None:
            self.metrics.request_done(tenant.name, "", 413)
            await self._send_json(send, 413, error_body(413, f"request body exceeds the limit of {limit} bytes",
                                                               code="request_too_large"), rid_header)
            return
        try:
            body = orjson.loads(raw)
            validate(body, chat, raw)
        except orjson.JSONDecodeError as not_json:
            self.metrics.request_done(tenant.name, "", 400)
            await self._send_json(send, 400, error_body(400, f"invalid JSON in the request body: {not_json}"),
                                  rid_header)
            return
        except BadRequest as invalid:
            self.metrics.request_done(tenant.name, "", 400)
            await self._send_json(send, 400, error_body(400, str(invalid), param=invalid.param), rid_header)
            return
        if tenant.rate_limits and await refuse_over_limits(self, send, tenant, body, rid_header):
            return
        if self.tiers is not None:  # `model: auto` -> the small or the large tier's model
            choice = self.tiers.resolve(body, tenant.name, self.dispatcher.slo_class(tenant), request_id,
                                        self.dispatcher)
            if choice is not None:
                self.metrics.tier_chosen(choice.tier, choice.model)
        model = body["model"]
        candidates = self.dispatcher.candidates(model)
        if candidates and candidates[0].model != model:
            # Matched case-insensitively: forwarded, and counted, as the fleet spells it.
            model = body["model"] = candidates[0].model
        if not candidates:
            self.metrics.request_done(tenant.name, "<unknown>", 404)  # client-chosen names stay out of labels
            served = ", ".join(self.dispatcher.models()) or "none yet"
            await self._send_json(send, 404, error_body(
                404, f"The model `{model}` does not exist. Served models: {served}", err_type="NotFoundError",
                param="model", code=404), rid_header)
            return
        tenant.retry_budget.on_request()
        policy = self.dispatcher.policies[self.dispatcher.policy_name(tenant)]
        info = self.dispatcher.request_info(body, chat, tenant, request_id, session_id)
        awaited_nothing = self.ranker is None and self.admission is None
        if self.ranker is not None:
            info = await self.ranker.annotate(info, body)
        if self.config.forward_priority:
            # The operator's policy decides queue order: a client cannot jump the queue by
            # sending its own `priority`.
            body["priority"] = self.dispatcher.priority(info, tenant)
        upstream_body = _UpstreamBody(orjson.dumps(body), body if body.get("priority", 0) != 0 else None)
        stream = body.get("stream") is True
        deadline_s = started_s + self.config.deadline_s(tenant.slo_class, stream, info.max_output_tokens)
        reserved = None
        if self.admission is not None:  # flow control: the one hook before dispatch
            refusal, reserved = await self.admission.admit(info, receive)
            if refusal is not None:
                self._counted_at_hold.discard(info.request_id)
                await self._refuse(send, refusal, tenant, model, rid_header)
                if self.records is not None:
                    self.records.refused(self, info, tenant, started_s, body, stream, refusal.status, refusal.message)
                return
        try:
            t0 = time.perf_counter()
            dispatcher = self.dispatcher
            if info.session_id is None or not dispatcher.affinity_active:
                # Nothing to await without session affinity: no coroutine for the decision.
                # The model's candidates read above still hold unless the ranker or the
                # admission queue awaited since (membership may have changed meanwhile).
                decision = dispatcher.decide_local(info, policy, explain, candidates if awaited_nothing else None)
            else:
                decision = await dispatcher.decide(info, policy, explain)
            self._decide_hist.observe(time.perf_counter() - t0)
        except NoInstanceAvailable as unplaceable:
            if self.admission is not None:
                self.admission.unreserve(reserved)
            self._counted_at_hold.discard(info.request_id)
            status = await self._refuse_unplaceable(send, unplaceable, info, tenant, chat, rid_header)
            if self.records is not None:
                self.records.refused(self, info, tenant, started_s, body, stream, status,
                                     f"no instance: {unplaceable}")
            return
        if decision.explanation is not None:
            explained = orjson.dumps(decision.explanation.to_dict())
            log.debug("decision explained", extra={"request_id": request_id, "explanation": explained.decode()})
            rid_header.append((EXPLAIN_HEADER, explained))
        headers = b"Content-Type: application/json\r\nX-Request-Id: " + request_id.encode("latin-1") + b"\r\n"
        if output_tokens:
            headers += b"X-Tokenyard-Output-Tokens: " + output_tokens + b"\r\n"
        budget = self._budget(tenant, info, started_s, deadline_s, None if stream else deadline_s)
        inflight_gauge = self._inflight_gauge
        inflight_gauge.value += 1
        extensions = scope.get("extensions") or {}
        gone = extensions.get("tokenyard.disconnected")
        # The request counts as in flight on its pick from now until _forward counts its
        # first attempt: under a server without the disconnect future _forward runs as a
        # task (so a client leaving can cancel it), and without this the requests arriving
        # before that task starts would all see the instance free (the admission queue's
        # saturation check reads these counts). Run inline (the built-in server), _forward
        # counts its first attempt before anything else runs: no provisional count then,
        # unless admission reserved one.
        held = reserved
        if held is None and gone is None:
            held = decision.instance_id
            self.registry.inflight_started(held)
        hold = _Hold(self.registry, held) if held is not None else None
        meter = self._meter(send)
        client_left = False
        try:
            if gone is not None:
                # The built-in server resolves `gone` when the client's connection goes: its
                # callback cancels this very task, so forwarding runs inline, with no task
                # of its own per request (a task's creation, registration and extra step
                # were ~8% of the router's profile; bench/router_instructions.py, #17).
                client_left = await self._forward_inline(gone, self._forward(
                    meter or send, receive, path, upstream_body, headers, stream, info, policy, decision, tenant,
                    budget, started_s, rid_header, hold), extensions.get("tokenyard.task"))
            else:
                forward = asyncio.ensure_future(self._forward(
                    meter or send, receive, path, upstream_body, headers, stream, info, policy, decision, tenant,
                    budget, started_s, rid_header, hold))
                client_left = not await _unless_client_leaves(forward, receive)
            if client_left:
                # The client left: the attempt was cancelled, which closed the engine
                # connection, and the engine cancels the request (both modes).
                self.metrics.request_done(tenant.name, info.model, CLIENT_GONE_STATUS)
        finally:
            if hold is not None:
                hold()  # cancelled before it started
            inflight_gauge.value -= 1
            if info.request_id in self._counted_at_hold:
                self._counted_at_hold.discard(info.request_id)  # counted as demand when it was held
            elif meter is not None and self.workload is not None:
                self.workload.finished(info.model, tenant.slo_class, info.input_tokens, meter)
            if meter is not None and self.records is not None:  # the one hook of the request records
                self.records.answered(self, info, tenant, meter, started_s, body, stream, client_left)
            if self.admission is not None:
                self.admission.release()  # capacity freed: held requests may go

    @staticmethod
    async def _forward_inline(gone: asyncio.Future[None], work: Coroutine[Any, Any, None],
                              task: asyncio.Task[Any] | None = None) -> bool:
        """Run `work` in this task; True when the client left first (`gone` resolved), which
        cancelled it: the attempt's CancelledError closed the engine connection, and the
        engine cancels the request. A cancellation of the task from elsewhere propagates.
        `task`: this task, as the server names it (scope extension `tokenyard.task`): in
        Python 3.11 `asyncio.current_task()` is a Python call and a getpid() syscall per
        request (strace, docs/benchmarks.md issue 17)."""
        if task is None:
            task = asyncio.current_task()
            assert task is not None
        state = [False, False]  # [work over, client left]

        def on_gone(_: asyncio.Future[None]) -> None:
            if not state[0]:
                state[1] = True
                task.cancel()

        if gone.done():
            work.close()
            return True
        gone.add_done_callback(on_gone)
        try:
            await work  # re-raises what the request path raised (counted as a 500 by __call__)
        except asyncio.CancelledError:
            if not state[1] or task.cancelling() > 1:
                raise  # cancelled by someone else too, not only by the client leaving
            task.uncancel()
            return True
        finally:
            state[0] = True
            gone.remove_done_callback(on_gone)
        return False

    def _demand_at_zero(self, info: RequestInfo) -> None:
        """A request held because its model has no instance up: count it in the workload
        histogram now (output length: its max_tokens, else 1), so the control plane scales
        the pool up from zero while the request waits."""
        assert self.workload is not None
        if len(self._counted_at_hold) < 65536:  # bounded by the admission queue's depth anyway
            self.workload.record(info.model, info.slo_class, info.input_tokens, info.max_output_tokens or 1)
            self._counted_at_hold.add(info.request_id)
    def _meter(self, send: Send) -> UsageMeter | None:
        """The `send` that meters the answer for the workload histogram and the records."""
        if self.workload is None and self.records is None:
            return None
        if self.records is None:
            return UsageMeter(send)
        return UsageMeter(send, detail=True, inflight_of=self._router_inflight)

    def _router_inflight(self, instance_id: str) -> int | None:
        found = self.registry.find(instance_id)
        return None if found is None else found[1].router_inflight

    async def _refuse(self, send: Send, refusal: Any, tenant: Tenant, model: str,
                      rid_header: list[tuple[bytes, bytes]]) -> None:
        """Answer a request the admission queue turned away (429 + Retry-After, or 503)."""
        self.metrics.request_done(tenant.name, model, refusal.status)
        if refusal.status == 499:
            return  # the client left; there is no one to answer
        headers = list(rid_header)
        code = "overloaded" if refusal.status == 429 else "no_instance_available"
        if refusal.retry_after_s is not None:
            headers.append((b"retry-after", str(max(1, round(refusal.retry_after_s))).encode()))
        await self._send_json(send, refusal.status, error_body(refusal.status, refusal.message, code=code), headers)

    async def _refuse_unplaceable(self, send: Send, exc: NoInstanceAvailable, info: RequestInfo, tenant: Tenant,
                                  chat: bool, rid_header: list[tuple[bytes, bytes]]) -> int:
        """No instance took the request: 400 when it can never fit any, else a retryable 503
        (the status sent)."""
        capacity = max_context_tokens(self.dispatcher.candidates(info.model))
        if capacity is not None and info.input_tokens > capacity:
            self.metrics.request_done(tenant.name, info.model, 400)
            await self._send_json(send, 400, error_body(
                400, f"This model's maximum context length is {capacity} tokens. However, your prompt has "
                     f"about {info.input_tokens} tokens. Please reduce the length of the prompt.",
                param="messages" if chat else "prompt", code="context_length_exceeded"), rid_header)
            return 400
        self.metrics.request_done(tenant.name, info.model, 503)
        await self._send_json(send, 503, error_body(503, f"no instance can serve this request: {exc}",
                                                    code="no_instance_available"), rid_header)
        return 503

    def _budget(self, tenant: Tenant, info: RequestInfo, started_s: float, first_byte_s: float,
                last_byte_s: float | None = None) -> _Budget:
        """One deadline from admission to the last byte, whatever the engine does, and the
        SLO class's stall timeout between chunks. `last_byte_s`: that deadline when the
        caller has it already (a non-streaming request's first byte comes with its last)."""
        slo_class = self.dispatcher.slo_class(tenant)
        if last_byte_s is None:
            last_byte_s = started_s + self.config.deadline_s(tenant.slo_class, False, info.max_output_tokens)
        return _Budget(first_byte_s, last_byte_s,
                       float(getattr(slo_class, "stall_timeout_s", None) or DEFAULT_STALL_TIMEOUT_S))

    async def _forward(self, send: Send, receive: Receive, path: str, upstream_body: _UpstreamBody, headers: bytes,
                       stream: bool, info: RequestInfo, policy: Any, decision: Any, tenant: Tenant,
                       budget: _Budget, started_s: float, rid_header: list[tuple[bytes, bytes]],
                       hand_over: Callable[[], None] | None = None) -> None:
        """Try the decision's instances in order. `hand_over` ends the caller's provisional
        in-flight count (None: there is none); it is called once the first attempt is
        counted (or none will be)."""
        config = self.config
        failures: list[str] = []
        attempts = 0
        deadline_hit = False
        deadline_s = budget.first_byte_s
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
            self.registry.inflight_started(instance_id, info.input_tokens)
            if hand_over is not None:
                hand_over()
            policy.on_dispatch(info, instance_id)
            try:
                outcome = await self._attempt(send, receive, record, path, upstream_body, headers, stream, timeout_s,
                                              info, tenant, budget, started_s, rid_header)
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

    async def _attempt(self, send: Send, receive: Receive, record: InstanceRecord, path: str,
                       upstream_body: _UpstreamBody,
                       headers: bytes, stream: bool, timeout_s: float, info: RequestInfo, tenant: Tenant,
                       budget: _Budget, started_s: float, rid_header: list[tuple[bytes, bytes]]) -> str | None:
        """One try on one instance. None: the client got an answer; else why it failed
        before anything reached the client (retryable)."""
        instance_id = record.instance_id
        attempt_ends_s = time.monotonic() + timeout_s
        payload = upstream_body.data
        if upstream_body.doc is not None and instance_id in self._no_priority:
            payload = upstream_body.plain()
        response: Upstream | None = None
        try:
            response = await self.pools.get(record.url).request(
                "POST", path, payload, headers, headers_timeout_s=timeout_s)
            if response.status in RETRYABLE_STATUS:
                response.abort()
                self.health.on_failure(instance_id, f"HTTP {response.status}")
                self.metrics.child(self.metrics.attempts, instance_id, str(response.status)).inc()
                return f"HTTP {response.status}"
            if stream and response.status == 200:
                first = await response.next_chunk(max(0.001, min(attempt_ends_s, budget.last_byte_s)
                                                      - time.monotonic()))
                # Nothing has gone to the client yet: a stream that ends at once (and cannot be
                # continued elsewhere) is this attempt's failure, and the next instance is tried.
                response, first = await self.splicer.wrap(response, first, instance_id, record.model, path,
                                                          payload, headers)
            else:
                limit = MAX_BUFFERED_RESPONSE_BYTES
                parts, complete = await _read_bounded(response, budget.until(attempt_ends_s), budget.stall_s, limit)
                if not complete and response.status != 200:
                    response.abort()
                    raise UpstreamError("protocol", f"error answer (HTTP {response.status}) over {limit} bytes")
        except ValueError as bad_url:  # a URL the engine client cannot speak (https://): fail over, never a 500
            self.health.on_failure(instance_id, str(bad_url))
            self.metrics.child(self.metrics.attempts, instance_id, "unsupported_url").inc()
            return str(bad_url)
        except UpstreamError as exc:
            if exc.kind != "timeout" or time.monotonic() < attempt_ends_s - 0.001 or \
                    self.config.first_byte_timeout_s is not None:
                self.health.on_failure(instance_id, str(exc))
            self.metrics.child(self.metrics.attempts, instance_id, exc.kind).inc()
            return str(exc)
        except asyncio.CancelledError:  # the client left: closing the connection cancels it on the engine
            if response is not None:
                response.abort()
            raise
        self.health.on_success(instance_id)
        attempts_ok = self._attempts_ok.get(instance_id)
        if attempts_ok is None:
            attempts_ok = self._attempts_ok[instance_id] = self.metrics.child(self.metrics.attempts, instance_id, "ok")
        attempts_ok.value += 1
        first_byte_key = (tenant.name, info.model)
        first_byte = self._first_byte.get(first_byte_key)
        if first_byte is None:
            first_byte = self._first_byte[first_byte_key] = self.metrics.child(self.metrics.first_byte,
                                                                               *first_byte_key)
        first_byte.observe(time.monotonic() - started_s)
        instance_header = (b"x-tokenyard-instance", instance_id.encode("latin-1"))
        if not (stream and response.status == 200):
            if not complete:
                await self._relay_body(send, response, parts, budget, instance_id, [rid_header[0], instance_header])
                self._count_answer(tenant.name, info.model, response.status)
                return None
            body = b"".join(parts)
            if response.status == 200 and response.header(MIGRATED_HEADER) is not None:
                # The request migrated while it ran: the rest comes from its destination.
                try:
                    body = await self.splicer.follow_body(body, instance_id, record.model, path, payload, headers,
                                                          budget.until(attempt_ends_s), MAX_BUFFERED_RESPONSE_BYTES)
                except UpstreamError as exc:
                    self.metrics.child(self.metrics.attempts, instance_id, exc.kind).inc()
                    return f"after a migration: {exc}"
            if (response.status == 400 and upstream_body.doc is not None and payload is upstream_body.data
                    and b"riority scheduling is not enabled" in body):
                # vLLM refuses a non-zero priority unless it runs --scheduling-policy priority:
                # remember that this engine runs FCFS and send it requests without one.
                self._no_priority.add(instance_id)
                log.info("engine runs without priority scheduling; priorities not forwarded to it",
                         extra={"instance": instance_id})
                return await self._attempt(send, receive, record, path, upstream_body, headers, stream,
                                           max(0.001, attempt_ends_s - time.monotonic()), info, tenant, budget,
                                           started_s, rid_header)
            if response.status >= 400:
                body = normalize_engine_error(body, response.status)
            content_type = response.header(b"content-type") or b"application/json"
            await send({"type": "http.response.start", "status": response.status, "headers": [
                (b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                *rid_header, instance_header]})
            await send({"type": "http.response.body", "body": body})
            self._count_answer(tenant.name, info.model, response.status)
            return None
        await self._relay(send, response, first, instance_id, budget, [*rid_header, instance_header])
        self._count_answer(tenant.name, info.model, 200)
        return None

    def _count_answer(self, tenant: str, model: str, status: int) -> None:
        """`metrics.request_done` for an answered request, through a child bound here."""
        key = (tenant, model, status)
        child = self._answered.get(key)
        if child is None:
            child = self._answered[key] = self.metrics.child(self.metrics.requests, tenant, model, str(status))
        child.value += 1

    async def _relay_body(self, send: Send, response: Any, parts: list[bytes], budget: _Budget, instance_id: str,
                          extra_headers: list[tuple[bytes, bytes]]) -> None:
        """A large non-streaming answer, streamed through as it arrives (never held whole).
        Past the first byte a failure can only end the connection: the response is left
        incomplete, which makes the server close it, so the client sees a truncation, never
        a body that looks whole."""
        headers = [(b"content-type", response.header(b"content-type") or b"application/json"), *extra_headers]
        length = response.header(b"content-length")
        if length is not None:
            headers.append((b"content-length", length))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        for part in parts:
            await send({"type": "http.response.body", "body": part, "more_body": True})
        parts.clear()
        try:
            while (chunk := await response.next_chunk(budget.chunk_timeout_s())) is not None:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except UpstreamError as exc:
            self.metrics.midstream_errors.labels(instance_id).inc()
            log.warning("answer broke after the first byte", extra={"instance": instance_id, "error": str(exc)})
            return
        except asyncio.CancelledError:
            response.abort()
            raise
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _relay(self, send: Send, response: Any, first: bytes | None, instance_id: str, budget: _Budget,
                     extra_headers: list[tuple[bytes, bytes]]) -> None:
        """Relay an SSE stream chunk by chunk. Only an incomplete trailing event is held back
        (vLLM writes whole events, so normally nothing is), so that a failure can end the
        stream with a clean error event instead of half an event. The stream ends by the
        request's deadline and after `stall_s` without a chunk, whatever the engine does."""
        content_type = response.header(b"content-type") or b"text/event-stream"
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", content_type), (b"cache-control", b"no-cache"), *extra_headers]})
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
                    if len(tail) > MAX_BUFFERED_RESPONSE_BYTES:  # no event is that long: garbage
                        raise UpstreamError("protocol", f"an SSE event over {MAX_BUFFERED_RESPONSE_BYTES} bytes")
                if response.ended:
                    # The engine's stream is over: its last events and the end of the
                    # response leave in one write (not a write for the final empty chunk).
                    break
                if data:
                    if b'"object": "error"' in data or b'"object":"error"' in data:
                        data = normalize_sse_errors(data)
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                chunk = await response.next_chunk(budget.chunk_timeout_s())
            else:
                data = b""
            if data and (b'"object": "error"' in data or b'"object":"error"' in data):
                data = normalize_sse_errors(data)
            data += tail
            if data:
                await send({"type": "http.response.body", "body": data, "more_body": False})
                return
        except UpstreamError as exc:
            response.abort()
            past_deadline = time.monotonic() >= budget.last_byte_s - 0.001
            self.metrics.midstream_errors.labels(instance_id).inc()
            if past_deadline:
                message = (f"the request's deadline of {budget.total_ms():.0f} ms passed mid-stream; the engine "
                           f"request was cancelled")
                code = "deadline_exceeded"
            else:
                self.health.on_failure(instance_id, f"mid-stream: {exc}")
                message, code = f"the engine {instance_id} failed mid-stream: {exc}", "upstream_stream_error"
            log.warning("stream ended after the first byte", extra={"instance": instance_id, "error": str(exc),
                                                                     "deadline": past_deadline})
            event = error_body(504 if past_deadline else 502, message, code=code)
            await send({"type": "http.response.body", "body": b"data: " + event + b"\n\n" + SSE_DONE,
                        "more_body": True})
        except asyncio.CancelledError:
            response.abort()  # closing the engine connection makes the engine cancel it
            raise
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _build_ranker(config: RouterConfig) -> Any:
    """The output-length ranker when the config has a `rank` section (router.rank)."""
    if config.rank is None:
        return None
    from router.rank import RequestRanker

    return RequestRanker(config.rank, keep_features=config.records is not None)


def _build_records(config: RouterConfig, metrics: RouterMetrics) -> Any:
    """The request records when the config has a `records` section (router.records)."""
    if config.records is None:
        return None
    from router.records import RequestRecords

    def slo_targets_s(slo_class: str) -> tuple[float, float]:
        slo = config.slo_classes.get(slo_class)
        return (float("inf"), float("inf")) if slo is None else (slo.ttft_slo_ms / 1000, slo.tpot_slo_ms / 1000)

    return RequestRecords(config.records, metrics.registry, slo_targets_s=slo_targets_s)


class _Budget:
    """A request's time budget: first byte by `first_byte_s`, last byte by `last_byte_s`
    (both monotonic), and never more than `stall_s` between two chunks."""

    __slots__ = ("first_byte_s", "last_byte_s", "stall_s", "_start_s")

    def __init__(self, first_byte_s: float, last_byte_s: float, stall_s: float) -> None:
        self.first_byte_s = first_byte_s
        self.last_byte_s = max(first_byte_s, last_byte_s)
        self.stall_s = stall_s
        self._start_s = time.monotonic()

    def until(self, attempt_ends_s: float) -> float:
        return min(self.last_byte_s, max(attempt_ends_s, self.first_byte_s))

    def chunk_timeout_s(self) -> float:
        return max(0.001, min(self.stall_s, self.last_byte_s - time.monotonic()))

    def total_ms(self) -> float:
        return (self.last_byte_s - self._start_s) * 1000


async def _read_bounded(response: Any, until_s: float, stall_s: float, limit: int) -> tuple[list[bytes], bool]:
    """Body chunks until the end (True) or past `limit` bytes (False: the rest is unread);
    UpstreamError("timeout") past `until_s` or after `stall_s` without a chunk."""
    parts: list[bytes] = []
    size = 0
    while True:
        chunk = await response.next_chunk(max(0.001, min(stall_s, until_s - time.monotonic())))
        if chunk is None:
            return parts, True
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            return parts, False


async def _unless_client_leaves(work: asyncio.Future[None], receive: Receive) -> bool:
    """Await `work`; if the client disconnects first (an ASGI server other than the
    built-in one: a task blocked in receive() watches), cancel it. False when the client left."""
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        gone.cancel()
        raise
    if work.done():
        gone.cancel()
        work.result()  # re-raises what the request path raised (counted as a 500 by __call__)
        return True
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await work
    return False


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
