"""The Envoy ext_proc endpoint picker: Tokenyard as the scheduler of a Gateway API gateway.

Implements the Gateway API Inference Extension's endpoint picker protocol (proposal 004,
v1.0.0) on Envoy's `envoy.service.ext_proc.v3.ExternalProcessor` service, so any gateway
that speaks it (Envoy Gateway, Istio, kgateway, GKE) proxies the bytes while Tokenyard
decides where each request goes:

- FULL_DUPLEX_STREAMED bodies: the request body arrives in chunks; nothing is answered
  until the last one, then the decision goes out as the request-headers response and the
  (unchanged) body is streamed back; response bodies are streamed straight through.
- The decision: the `x-gateway-destination-endpoint` header and the same value under
  `envoy.lb` in the dynamic metadata, an ordered, comma-separated fallback list
  (`ip:port,ip:port`) the gateway walks on retries. A subset hint
  (`envoy.lb.subset_hint` / `x-gateway-destination-endpoint-subset`) restricts it.
- The served endpoint comes back with the response headers, in the metadata context
  (`envoy.lb` / `x-gateway-destination-endpoint-served`) or, from a plain Envoy, the
  `upstream.address` response attribute; the in-flight count and the policy's
  `on_dispatch` follow it (they were placed on the first pick and move if a fallback served).
- An ImmediateResponse of 503 when no endpoint is ready, 429 to shed (scheduler.shedding),
  the router's own 400/401/404/413 for bad requests, and 408 when the request is not
  complete within `request_timeout_s`, in OpenAI's error shape.
- gRPC health checking with the protocol's services: `liveness`, `readiness` and
  `envoy.service.ext_proc.v3.ExternalProcessor`.

Every decision is the router's: `router.dispatcher.Dispatcher` with the tenant's policy,
the same call the HTTP front door and the Picker gRPC service make; a body naming the tier
alias (`model: auto`) gets its tier from the same `router.tiers.TierResolver.resolve`
first, and the gateway forwards the body with the chosen model's name in it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import orjson
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from router.app import DEFAULT_STALL_TIMEOUT_S
from router.auth import AuthInterceptor
from router.errors import error_body
from router.picker_grpc import address_of
from router.tenants import AuthError, Tenant
from router.validation import BadRequest, validate
from scheduler.shedding import ShedPolicy, should_shed
from scheduler.types import NoInstanceAvailable, RequestInfo
from tokenyard.grpc_limits import server_options
from tokenyard.logs import RateLimitedLog
from tokenyard.worker_auth import is_loopback

if TYPE_CHECKING:
    from router.app import Router

log = logging.getLogger(__name__)
_past_deadline_log = RateLimitedLog(log, interval_s=10.0)  # a client holding exchanges open sets the pace

DESTINATION_KEY = "x-gateway-destination-endpoint"
SERVED_KEY = "x-gateway-destination-endpoint-served"
LB_NAMESPACE = "envoy.lb"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
EXTPROC_ATTRIBUTES = "envoy.filters.http.ext_proc"  # where Envoy puts the requested attributes
LIVENESS_SERVICE = "liveness"
READINESS_SERVICE = "readiness"
EXTPROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
EXTPROC_METHOD = f"/{EXTPROC_SERVICE}/Process"
# Envoy's gRPC messages for streamed bodies stay under 64 KiB; chunks of the body we send
# back keep that margin.
BODY_CHUNK_BYTES = 62_000
_COMPLETION_PATHS = {"/v1/chat/completions": True, "/v1/completions": False}


@dataclass(frozen=True, slots=True)
class ExtProcSettings:
    max_endpoints: int = 4  # primary plus fallbacks in the destination list
    shed: ShedPolicy = field(default_factory=ShedPolicy)
    # From the request headers to a complete body: a client trickling its body cannot hold
    # an exchange open forever (responses, once decided, may stream as long as they take).
    request_timeout_s: float = 60.0
    # Who may call the picker: None serves it unauthenticated, which `start_extproc_server`
    # allows only on loopback unless `allow_unauthenticated` says the network is closed
    # (a NetworkPolicy admitting only the gateway). With tokens, the gateway sends
    # `authorization: Bearer <token>` (Envoy: grpc_service.initial_metadata) of a principal
    # with role `picker` (or admin).
    tokens: Any = None  # router.auth.TokenTable
    allow_unauthenticated: bool = False


class Refused(Exception):
    """A request answered by the picker itself (ImmediateResponse)."""

    def __init__(self, status: int, body: bytes, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.body = body


def _header_map(headers: pb.HttpHeaders) -> dict[str, str]:
    out: dict[str, str] = {}
    for header in headers.headers.headers:
        out[header.key.lower()] = header.raw_value.decode("latin-1") if header.raw_value else header.value
    return out


def _metadata_string(request: pb.ProcessingRequest, namespace: str, key: str) -> Any:
    struct = request.metadata_context.filter_metadata.get(namespace)
    if struct is None or key not in struct.fields:
        return None
    value = struct.fields[key]
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "list_value":
        return [v.string_value for v in value.list_value.values if v.WhichOneof("kind") == "string_value"]
    return None


def served_endpoint(request: pb.ProcessingRequest) -> str | None:
    """The endpoint that served the request, as the gateway reports it (see module doc)."""
    served = _metadata_string(request, LB_NAMESPACE, SERVED_KEY)
    if isinstance(served, str) and served:
        return served
    attributes = request.attributes.get(EXTPROC_ATTRIBUTES)
    if attributes is not None and "upstream.address" in attributes.fields:
        address = attributes.fields["upstream.address"].string_value
        return address or None
    return None


def immediate(status: int, body: bytes, detail: str) -> pb.ProcessingResponse:
    return pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=status), body=body, details=detail[:200],
        headers=pb.HeaderMutation(set_headers=[base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key="content-type", raw_value=b"application/json"))])))


def destination_responses(endpoints: Sequence[str], body: bytes, body_done: bool,
                          rewritten: bool = False) -> list[pb.ProcessingResponse]:
    """The request-headers response with the decision, then the body streamed back (its
    length set when it is complete, or when the picker rewrote it: the client's own
    content-length no longer holds)."""
    value = ",".join(endpoints)
    metadata = struct_pb2.Struct()
    metadata.update({LB_NAMESPACE: {DESTINATION_KEY: value}})
    headers = [base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=DESTINATION_KEY, raw_value=value.encode()))]
    if body_done or rewritten:
        headers.append(base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(
            key="content-length", raw_value=str(len(body)).encode())))
    out = [pb.ProcessingResponse(
        request_headers=pb.HeadersResponse(response=pb.CommonResponse(
            header_mutation=pb.HeaderMutation(set_headers=headers), clear_route_cache=True)),
        dynamic_metadata=metadata)]
    chunks = [body[i:i + BODY_CHUNK_BYTES] for i in range(0, len(body), BODY_CHUNK_BYTES)] or [b""]
    for i, chunk in enumerate(chunks):
        last = body_done and i == len(chunks) - 1
        out.append(pb.ProcessingResponse(request_body=pb.BodyResponse(response=pb.CommonResponse(
            body_mutation=pb.BodyMutation(streamed_response=pb.StreamedBodyResponse(body=chunk, end_of_stream=last))))))
    return out


def passthrough_body(request: pb.HttpBody, response: bool) -> pb.ProcessingResponse:
    mutation = pb.CommonResponse(body_mutation=pb.BodyMutation(streamed_response=pb.StreamedBodyResponse(
        body=request.body, end_of_stream=request.end_of_stream)))
    if response:
        return pb.ProcessingResponse(response_body=pb.BodyResponse(response=mutation))
    return pb.ProcessingResponse(request_body=pb.BodyResponse(response=mutation))


class _Exchange:
    """One HTTP request/response through the gateway: the state of one ext_proc stream."""

    def __init__(self, picker: EndpointPicker) -> None:
        self.picker = picker
        self.router = picker.router
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.decided = False
        self.info: RequestInfo | None = None
        self.policy: Any = None
        self.tenant: Tenant | None = None
        self.primary: str | None = None
        self.counted: str | None = None  # the instance whose in-flight count this request holds
        self.started_s = time.monotonic()
        self.status = 0
        self.done = False
        self.refused = False  # answered by the picker itself: the exchange is over
        self.allowed: set[str] | None = None  # the gateway's subset hint, from whichever message had it
        self.answer_by_s: float | None = None  # a decided request's deadline (monotonic); None: none set
        self.stream = False
        self.stall_s: float | None = None  # longest gap between a stream's messages once it answers

    # -- request side -------------------------------------------------------------------
    async def on_message(self, request: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        kind = request.WhichOneof("request")
        if not self.decided and request.HasField("metadata_context"):
            subset = self.picker.subset(request)
            if subset is not None:
                self.allowed = subset
        try:
            if kind == "request_headers":
                self.headers = _header_map(request.request_headers)
                if request.request_headers.end_of_stream:  # no body: GET /v1/models and alike
                    return self._decide_bodyless()
                return []
            if kind == "request_body":
                if self.decided:  # a body after the decision (trailers mode): pass it on
                    return [passthrough_body(request.request_body, response=False)]
                self._append(request.request_body.body)
                if not request.request_body.end_of_stream:
                    return []
                return await self._decide(body_done=True)
            if kind == "request_trailers":
                out = [] if self.decided else await self._decide(body_done=False)
                return [*out, pb.ProcessingResponse(request_trailers=pb.TrailersResponse())]
        except Refused as refused:
            self.done = self.refused = True
            self.status = refused.status
            self._count_done(refused.status)
            return [immediate(refused.status, refused.body, str(refused))]
        if kind == "response_headers":
            return [self._on_response_headers(request)]
        if kind == "response_body":
            if request.response_body.end_of_stream:
                self.finish()
            return [passthrough_body(request.response_body, response=True)]
        if kind == "response_trailers":
            self.finish()
            return [pb.ProcessingResponse(response_trailers=pb.TrailersResponse())]
        return []

    def _append(self, chunk: bytes) -> None:
        limit = self.router.config.max_request_bytes
        if len(self.body) + len(chunk) > limit:
            message = f"request body exceeds the limit of {limit} bytes"
            raise Refused(413, error_body(413, message, code="request_too_large"), message)
        self.body += chunk

    def _authenticate(self) -> Tenant:
        authorization = self.headers.get("authorization")
        try:
            return self.router.tenants.authenticate(authorization.encode("latin-1") if authorization else None)
        except AuthError as exc:
            raise Refused(401, error_body(401, str(exc), code="invalid_api_key"), str(exc)) from None

    def _decide_bodyless(self) -> list[pb.ProcessingResponse]:
        self.tenant = self._authenticate()
        ready = [s for s in self.router.registry.instances() if s.healthy and not s.draining and not s.cordoned]
        allowed = self.allowed
        if allowed is not None:
            ready = [s for s in ready if self.picker.address(s.instance_id) in allowed]
        if not ready:
            message = "no ready endpoint"
            raise Refused(503, error_body(503, message, code="no_instance_available"), message)
        self.decided = True
        chosen = random.sample(ready, min(len(ready), self.picker.settings.max_endpoints))
        endpoints = [a for a in (self.picker.address(s.instance_id) for s in chosen) if a]
        return destination_responses(endpoints, b"", body_done=False)[:1]

    async def _decide(self, body_done: bool) -> list[pb.ProcessingResponse]:
        tenant = self.tenant = self._authenticate()
        path = self.headers.get(":path", "").split("?", 1)[0]
        chat = _COMPLETION_PATHS.get(path, True)
        try:
            body = orjson.loads(bytes(self.body))
            validate(body, chat)
        except orjson.JSONDecodeError as exc:
            message = f"invalid JSON in the request body: {exc}"
            raise Refused(400, error_body(400, message), message) from None
        except BadRequest as exc:
            raise Refused(400, error_body(400, str(exc), param=exc.param), str(exc)) from None
        dispatcher = self.router.dispatcher
        request_id = self.headers.get("x-request-id") or uuid.uuid4().hex
        tiers = self.router.tiers
        rewritten = False
        if tiers is not None:  # `model: auto` -> the tier's model, the front door's decision (router/tiers.py)
            choice = tiers.resolve(body, tenant.name, dispatcher.slo_class(tenant), request_id, dispatcher)
            if choice is not None:
                self.router.metrics.tier_chosen(choice.tier, choice.model)
                # The engine is sent its own model's name, as from the front door.
                self.body = bytearray(orjson.dumps(body))
                rewritten = True
        model = body["model"]
        if not dispatcher.serves(model):
            served = ", ".join(dispatcher.models()) or "none yet"
            message = f"The model `{model}` does not exist. Served models: {served}"
            raise Refused(404, error_body(404, message, err_type="NotFoundError", param="model", code=404), message)
        info = self.info = dispatcher.request_info(body, chat, tenant, request_id, self.headers.get("x-session-id"))
        self.policy = dispatcher.policies[dispatcher.policy_name(tenant)]
        priority = dispatcher.slo_class(tenant).priority if tenant.priority is None else tenant.priority
        if should_shed(dispatcher.candidates(model), priority, self.picker.settings.shed):
            message = f"every instance serving {model!r} is at its load limit; sheddable request refused"
            raise Refused(429, error_body(429, message, code="overloaded"), message)
        try:
            decision = await dispatcher.decide(info, self.policy)
        except NoInstanceAvailable as exc:
            message = f"no instance can serve this request: {exc}"
            raise Refused(503, error_body(503, message, code="no_instance_available"), message) from None
        allowed = self.allowed
        endpoints: list[str] = []
        for iid in decision.instance_ids:
            address = self.picker.address(iid)
            if address is None or (allowed is not None and address not in allowed):
                continue
            if not endpoints:
                self.primary = iid
            endpoints.append(address)
            if len(endpoints) >= self.picker.settings.max_endpoints:
                break
        if not endpoints:
            message = "no ready endpoint in the gateway's subset" if allowed is not None else "no ready endpoint"
            raise Refused(503, error_body(503, message, code="no_instance_available"), message)
        self.decided = True
        # The front door's bounds (router/app.py): one deadline from admission to the first
        # byte of a stream (the last byte otherwise), then the class's stall timeout
        # between a stream's chunks.
        self.stream = body.get("stream") is True
        self.answer_by_s = self.started_s + self.router.config.deadline_s(tenant.slo_class, self.stream,
                                                                          info.max_output_tokens)
        self.stall_s = float(dispatcher.slo_class(tenant).stall_timeout_s or DEFAULT_STALL_TIMEOUT_S)
        self._count_start(self.primary)
        self.router.metrics.inflight.inc()
        return destination_responses(endpoints, bytes(self.body), body_done, rewritten)

    # -- response side ------------------------------------------------------------------
    def _on_response_headers(self, request: pb.ProcessingRequest) -> pb.ProcessingResponse:
        headers = _header_map(request.response_headers)
        if self.stream:  # the first byte is here: from now on the stall timeout bounds the stream
            self.answer_by_s = None
        status = headers.get(":status", "0")
        self.status = int(status) if status.isdigit() else 0
        served = served_endpoint(request)
        if served is not None and self.info is not None:
            iid = self.picker.instance_for(served)
            if iid is not None and iid != self.counted:
                self._count_stop()
                self._count_start(iid)
                if iid != self.primary:
                    self.router._spawn(self.router.dispatcher.moved(self.info, iid))
        if request.response_headers.end_of_stream:
            self.finish()
        return pb.ProcessingResponse(response_headers=pb.HeadersResponse())

    def _count_start(self, instance_id: str | None) -> None:
        if instance_id is None or self.info is None:
            return
        self.counted = instance_id
        self.router.registry.inflight_started(instance_id, self.info.input_tokens)
        self.policy.on_dispatch(self.info, instance_id)

    def _count_stop(self) -> None:
        if self.counted is None or self.info is None:
            return
        self.router.registry.inflight_finished(self.counted)
        self.policy.on_finish(self.info, self.counted)
        self.counted = None

    def _count_done(self, status: int) -> None:
        tenant = self.tenant.name if self.tenant is not None else "unknown"
        model = self.info.model if self.info is not None else ""
        self.router.metrics.request_done(tenant, model, status)

    def finish(self) -> None:
        """The exchange ended (response complete, or the stream closed): release its counts."""
        if self.done:
            return
        self.done = True
        if self.decided and self.info is not None:
            self._count_stop()
            self.router.metrics.inflight.dec()
            self._count_done(self.status or 499)


class EndpointPicker(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]  # envoy's stubs are untyped
    """The ext_proc service over a started `router.app.Router`."""

    def __init__(self, router: Router, settings: ExtProcSettings | None = None) -> None:
        self.router = router
        self.settings = settings or ExtProcSettings()
        self._snapshot: Any = None
        self._by_id: dict[str, str] = {}
        self._by_address: dict[str, str] = {}

    def _index(self) -> None:
        snapshot = self.router.registry.instances()
        if snapshot is self._snapshot:
            return
        self._by_id = {}
        for record in self.router.registry.records():
            self._by_id[record.instance_id] = address_of(record.url)
        self._by_address = {address: iid for iid, address in self._by_id.items()}
        self._snapshot = snapshot

    def address(self, instance_id: str) -> str | None:
        self._index()
        return self._by_id.get(instance_id)

    def instance_for(self, address: str) -> str | None:
        self._index()
        return self._by_address.get(address)

    @staticmethod
    def subset(request: pb.ProcessingRequest) -> set[str] | None:
        value = _metadata_string(request, SUBSET_NAMESPACE, SUBSET_KEY)
        if value is None:
            return None
        return {value} if isinstance(value, str) else set(value)

    async def Process(self, request_iterator: AsyncIterator[pb.ProcessingRequest],  # noqa: N802 (gRPC name)
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ProcessingResponse]:
        exchange = _Exchange(self)
        requests = aiter(request_iterator)
        deadline_s = time.monotonic() + self.settings.request_timeout_s
        try:
            while True:
                try:
                    if exchange.decided and exchange.answer_by_s is None and exchange.stall_s is None:
                        request = await anext(requests)  # a bodyless request: the gateway's own timeouts
                    elif exchange.decided:
                        left_s = (exchange.stall_s or 0.0) if exchange.answer_by_s is None else \
                            max(0.0, exchange.answer_by_s - time.monotonic())
                        try:
                            request = await asyncio.wait_for(anext(requests), left_s)
                        except TimeoutError:
                            # Past its deadline: end the exchange (the gateway fails the request)
                            # and release the instance's in-flight count it held.
                            exchange.status = 504
                            _past_deadline_log.warning(exchange.primary or "", "ext_proc exchange past its deadline; ended",
                                                       extra={"instance_id": exchange.primary or "", "status": 504})
                            return
                    else:
                        request = await asyncio.wait_for(anext(requests), max(0.0, deadline_s - time.monotonic()))
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    message = f"the request was not complete within {self.settings.request_timeout_s:g} s"
                    exchange.status = 408
                    yield immediate(408, error_body(408, message, code="request_timeout"), message)
                    return
                for response in await exchange.on_message(request):
                    yield response
                if exchange.refused:
                    return  # an ImmediateResponse ends the exchange
        finally:
            exchange.finish()


@dataclass
class ExtProcServer:
    server: grpc.aio.Server
    health: Any
    port: int

    async def stop(self, grace_s: float = 2.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


async def start_extproc_server(router: Router, host: str, port: int,
                               settings: ExtProcSettings | None = None) -> ExtProcServer:
    """Serve the picker and gRPC health on host:port (0: a free port) over a started router."""
    settings = settings or ExtProcSettings()
    interceptors = []
    if settings.tokens is not None:
        interceptors.append(AuthInterceptor(settings.tokens, {EXTPROC_METHOD: "picker"},
                                            open_prefixes=("/grpc.health.v1.Health/",)))
    elif not (settings.allow_unauthenticated or is_loopback(host)):
        raise OSError(f"ext_proc picker: refusing to serve {host}:{port} without authentication; give it "
                      "tokens (--extproc-tokens-file, or the control section's tokens) or, behind a "
                      "NetworkPolicy that admits only the gateway, --extproc-allow-unauthenticated")
    max_message = router.config.max_request_bytes + 64 * 1024
    # No max_concurrent_streams: a gateway multiplexes every request's exchange on few connections.
    server = grpc.aio.server(options=server_options(("grpc.max_receive_message_length", max_message),
                                                    ("grpc.max_send_message_length", max_message)),
                             interceptors=interceptors)
    pb_grpc.add_ExternalProcessorServicer_to_server(EndpointPicker(router, settings), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"ext_proc picker: cannot listen on {host}:{port}")
    await server.start()
    serving = health_pb2.HealthCheckResponse.SERVING
    # The router has started (discovery listed), so the picker is ready; no leader election
    # here: every replica picks (decisions share state through the store).
    for service in ("", LIVENESS_SERVICE, READINESS_SERVICE, EXTPROC_SERVICE):
        await health_servicer.set(service, serving)
    log.info("ext_proc endpoint picker listening", extra={"address": f"{host}:{bound}"})
    return ExtProcServer(server, health_servicer, bound)
