"""The tokenyard.v1 Picker gRPC service: endpoint picking for external gateways.

A gateway (Envoy, a Gateway API Inference Extension implementation) sends a request's
metadata; the service turns it into the scheduler's `RequestInfo`, asks the same
`decide` callable the router's HTTP front door uses, and answers the ordered endpoints.
Per call it does O(1) registry lookups plus the decision; it walks the fleet only to
explain an error (which models are served).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import NoReturn
from urllib.parse import urlsplit

import grpc

from router.registry import InstanceRegistry
from scheduler.tiers import TierChoice
from scheduler.types import Decision, NoInstanceAvailable, RequestInfo
from tokenyard.v1 import picker_pb2, picker_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_PREFIX_BLOCK_TOKENS = 16
_SESSION_HEADERS = ("x-session-id", "x-session", "session-id")


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")


def address_of(url: str) -> str:
    """`http://host:port/...` -> `host:port` (the Endpoint.address form)."""
    parts = urlsplit(url)
    return parts.netloc or url


class PickerService(picker_pb2_grpc.PickerServicer):
    """`decide(RequestInfo) -> Decision` is the router's; `tenant_for_api_key` maps the
    request's `api_key` to its tenant ("" when the request has none: the anonymous tenant
    where the router allows one; None: refused). The tenant always comes from the key: a
    `tenant` field naming another tenant is refused, so a gateway cannot borrow another
    tenant's class, policy or sessions. Without `tenant_for_api_key` (no tenants at all),
    `tenant` is taken as given. At most `max_endpoints` endpoints are answered.
    `resolve_tier(info, prompt)` (the router's, when it has a tier alias) turns a request
    naming the alias into one naming the chosen tier's model, before the decision."""

    def __init__(self, registry: InstanceRegistry, decide: Callable[[RequestInfo], Awaitable[Decision]],
                 *, tenant_for_api_key: Callable[[str], str | None] | None = None,
                 max_endpoints: int = 8,
                 resolve_tier: Callable[[RequestInfo, str], tuple[RequestInfo, TierChoice | None]] | None = None,
                 ) -> None:
        self.registry = registry
        self.resolve_tier = resolve_tier
        # A decision may rank the whole fleet; a gateway only ever tries a few fallbacks.
        self.max_endpoints = max_endpoints
        self.decide = decide
        self.tenant_for_api_key = tenant_for_api_key
        self._addresses: dict[str, str] = {}  # url -> host:port, parsed once per instance

    async def Pick(self, request: picker_pb2.PickRequest, context: grpc.aio.ServicerContext) -> picker_pb2.PickResponse:
        info = await self._request_info(request, context)
        choice = None
        if self.resolve_tier is not None:
            info, choice = self.resolve_tier(info, request.prompt)
        try:
            decision = await self.decide(info)
        except NoInstanceAvailable as exc:
            served = sorted({s.model for s in self.registry.instances()})
            if info.model.lower() not in {m.lower() for m in served}:
                await _abort(context, grpc.StatusCode.NOT_FOUND,
                             f"model: no instance serves {info.model!r}; served: {', '.join(served) or 'none'}")
            await _abort(context, grpc.StatusCode.UNAVAILABLE, str(exc))
        except PermissionError as exc:
            await _abort(context, grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except ValueError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        excluded = set(request.exclude_instance_ids)
        endpoints: list[picker_pb2.Endpoint] = []
        for iid in decision.instance_ids:
            if len(endpoints) >= self.max_endpoints:
                break
            if iid in excluded:
                continue
            found = self.registry.find(iid)
            if found is None:
                continue  # removed between the decision and now
            record = found[0]
            address = self._addresses.get(record.url)
            if address is None:
                address = self._addresses[record.url] = address_of(record.url)
            endpoints.append(picker_pb2.Endpoint(instance_id=iid, address=address, pool=record.pool,
                                                 gpu=record.gpu, model=record.model))
        if not endpoints:
            await _abort(context, grpc.StatusCode.UNAVAILABLE,
                         f"every instance chosen for model {info.model!r} is excluded or gone "
                         f"(exclude_instance_ids: {', '.join(sorted(excluded)) or 'none'})")
        return picker_pb2.PickResponse(
            endpoints=endpoints, priority=decision.priority, model=endpoints[0].model,
            tier=choice.tier if choice is not None else "",
            reason=decision.reason if choice is None else f"{choice.reason}; {decision.reason}",
            tenant=info.tenant, slo_class=info.slo_class)

    async def _request_info(self, request: picker_pb2.PickRequest, context: grpc.aio.ServicerContext) -> RequestInfo:
        if not request.model:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "model: required")
        tenant = request.tenant or "default"
        if self.tenant_for_api_key is not None:
            mapped = self.tenant_for_api_key(request.api_key)
            if mapped is None:
                await _abort(context, grpc.StatusCode.UNAUTHENTICATED,
                             "api_key: maps to no tenant" if request.api_key else
                             "api_key: required (the tenant's API key, as its clients send it)")
            if request.tenant and request.tenant != mapped:
                await _abort(context, grpc.StatusCode.PERMISSION_DENIED,
                             "tenant: does not match the tenant of api_key (leave it empty)")
            tenant = mapped
        block_tokens = request.prefix_block_tokens or DEFAULT_PREFIX_BLOCK_TOKENS
        if request.prefix_block_hashes and block_tokens % DEFAULT_PREFIX_BLOCK_TOKENS:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         f"prefix_block_tokens: expected a multiple of the engine block size "
                         f"({DEFAULT_PREFIX_BLOCK_TOKENS} tokens), got {request.prefix_block_tokens}")
        headers = request.headers
        session_id = request.session_id or next(
            (headers[h] for h in _SESSION_HEADERS if headers.get(h)), None)
        return RequestInfo(
            request_id=request.request_id or headers.get("x-request-id") or uuid.uuid4().hex,
            model=request.model,
            input_tokens=request.estimated_prompt_tokens,
            max_output_tokens=request.max_output_tokens or None,
            tenant=tenant,
            slo_class=request.slo_class or "default",
            session_id=session_id,
            prefix_hashes=tuple(request.prefix_block_hashes),
        )
