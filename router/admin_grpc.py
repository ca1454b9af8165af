"""The tokenyard.v1 Admin gRPC service, and `start_control_server` (Admin + Picker).

Admin changes the control plane at run time: tenant SLO policies (kept in the
`StateStore`, so every replica answers the same), the pool listing (from the registry),
and instances: self-registration with leases (`router.discovery.AdminRegistration`),
deregistration, draining and the registry listing.

A stored policy is the JSON form of `SloPolicy`:
`{"tenant", "slo_class", "ttft_slo_ms", "tpot_slo_ms", "priority", "dispatch_policy"}`
(`policy_to_dict` / `policy_from_dict`); the router's tenant lookup reads that form.

Bad input is INVALID_ARGUMENT with a message naming the field; unknown tenants and
instances are NOT_FOUND; an unreachable store is UNAVAILABLE. Every call is authenticated
(router/auth.py: bearer token -> principal with roles; TLS when configured); a registered
URL must be `http://` (the router's engine client speaks plain HTTP/1.1) and, with
`registration_cidrs` configured, resolve only to addresses inside them, so a caller cannot
point the router at an endpoint of its choosing.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any, NoReturn
from urllib.parse import urlsplit

import grpc

from router.auth import AuthInterceptor, ControlAuth, current_principal, in_cidrs
from router.discovery import AdminRegistration, UnknownInstance
from router.fleet_admin import FleetAdminMixin, cordon_message
from router.keys_admin import KeysAdminMixin
from router.migration_loop import MigrationLoop
from router.policy_admin import PolicyAdminMixin
from router.records_admin import RecordsAdminMixin
from router.registry import InstanceRegistry
from router.state import InstanceRecord, StateStore, StateStoreError, store_unavailable
from scheduler.tiers import TierChoice
from scheduler.types import Decision, RequestInfo, SloClass
from tokenyard.grpc_limits import server_options
from tokenyard.v1 import admin_pb2, admin_pb2_grpc

log = logging.getLogger(__name__)

#: Proto name of each registry source ("admin" instances are "registered" on the wire).
SOURCE_NAMES = {"static": "static", "kubernetes": "kubernetes", "admin": "registered"}

_MAX_ID_CHARS = 253  # a DNS name's limit, as for Kubernetes object names


def default_pool_name(gpu: str, model: str) -> str:
    """Pool of an instance that names none: `<gpu>-<model basename>`, e.g. a100-llama-3-8b."""
    base = model.rsplit("/", 1)[-1]
    return re.sub(r"[^a-z0-9.]+", "-", f"{gpu}-{base}".lower()).strip("-")


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")


def policy_to_dict(policy: admin_pb2.SloPolicy) -> dict[str, Any]:
    return {"tenant": policy.tenant, "slo_class": policy.slo_class, "ttft_slo_ms": policy.ttft_slo_ms,
            "tpot_slo_ms": policy.tpot_slo_ms, "priority": policy.priority,
            "dispatch_policy": policy.dispatch_policy}


def policy_from_dict(tenant: str, raw: Mapping[str, Any]) -> admin_pb2.SloPolicy:
    return admin_pb2.SloPolicy(
        tenant=tenant, slo_class=str(raw.get("slo_class", "")),
        ttft_slo_ms=float(raw.get("ttft_slo_ms", 0.0)), tpot_slo_ms=float(raw.get("tpot_slo_ms", 0.0)),
        priority=int(raw.get("priority", 0)), dispatch_policy=str(raw.get("dispatch_policy", "")))


class AdminService(PolicyAdminMixin, KeysAdminMixin, FleetAdminMixin, RecordsAdminMixin, admin_pb2_grpc.AdminServicer):
    """Constructed with the registry, the store and the lease keeper of self-registered
    instances. `slo_classes` / `dispatch_policies` are the names PutPolicy accepts (None:
    any); `desired_pool_sizes` is the planner's target per pool (None: the registered
    count); `migration` is the router's migration loop (None: migration is off); `records`
    the router's request records (router/records.py; None: it keeps none)."""

    def __init__(self, registry: InstanceRegistry, store: StateStore | None,
                 registration: AdminRegistration, *,
                 slo_classes: Mapping[str, SloClass] | Collection[str] | None = None,
                 dispatch_policies: Collection[str] | None = None,
                 desired_pool_sizes: Callable[[], Mapping[str, int]] | None = None,
                 registration_cidrs: Collection[Any] = (),
                 migration: MigrationLoop | None = None,
                 monotonic: Callable[[], float] = time.monotonic, records: Any = None) -> None:
        self.registry = registry
        self.migration = migration
        self.records = records
        self.registration_cidrs = tuple(registration_cidrs)
        self.store = store
        self.registration = registration
        self.slo_classes = sorted(slo_classes) if slo_classes is not None else None
        self.dispatch_policies = sorted(dispatch_policies) if dispatch_policies is not None else None
        self.desired_pool_sizes = desired_pool_sizes
        self._monotonic = monotonic

    def _require_store(self) -> StateStore:
        if self.store is None:
            raise StateStoreError("this router has no state store, so it keeps no policies")
        return self.store

    # -- policies ------------------------------------------------------------------------
    async def GetPolicy(self, request: admin_pb2.GetPolicyRequest, context: grpc.aio.ServicerContext) -> admin_pb2.SloPolicy:
        if not request.tenant:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "tenant: required")
        raw = await self._store_call(context, lambda s: s.get_policy(request.tenant))
        if raw is None:
            await _abort(context, grpc.StatusCode.NOT_FOUND, f"tenant {request.tenant!r} has no policy")
        return policy_from_dict(request.tenant, raw)

    async def PutPolicy(self, request: admin_pb2.PutPolicyRequest, context: grpc.aio.ServicerContext) -> admin_pb2.SloPolicy:
        if not request.HasField("policy"):
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "policy: required")
        policy = request.policy
        problem = self._policy_problem(policy)
        if problem:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
        # A new version like any other (history, diff, the same validation); the reason says
        # it came through the unversioned call.
        spec = {"slo_class": policy.slo_class or "default", "ttft": {"ms": policy.ttft_slo_ms},
                "tpot": {"ms": policy.tpot_slo_ms}, "priority": policy.priority}
        if policy.dispatch_policy:
            spec["profile"] = policy.dispatch_policy
        await self._versions_call(context, lambda v: v.commit(
            policy.tenant, self.validated_spec(policy.tenant, spec, "policy"), expected_version=None,
            author=_who(), reason="PutPolicy (unversioned call)"))
        log.info("policy stored", extra={"tenant": policy.tenant, "slo_class": policy.slo_class,
                                         "dispatch_policy": policy.dispatch_policy, "principal": _who()})
        return policy

    def _policy_problem(self, policy: admin_pb2.SloPolicy) -> str | None:
        if not policy.tenant:
            return "policy.tenant: required (the key of the policy)"
        if len(policy.tenant) > _MAX_ID_CHARS:
            return f"policy.tenant: at most {_MAX_ID_CHARS} characters"
        if not policy.ttft_slo_ms > 0:
            return f"policy.ttft_slo_ms: expected > 0, got {policy.ttft_slo_ms}"
        if not policy.tpot_slo_ms > 0:
            return f"policy.tpot_slo_ms: expected > 0, got {policy.tpot_slo_ms}"
        if self.slo_classes is not None and policy.slo_class and policy.slo_class not in self.slo_classes:
            return (f"policy.slo_class: unknown SLO class {policy.slo_class!r}; known: "
                    f"{', '.join(self.slo_classes)}")
        if (self.dispatch_policies is not None and policy.dispatch_policy
                and policy.dispatch_policy not in self.dispatch_policies):
            return (f"policy.dispatch_policy: unknown dispatch policy {policy.dispatch_policy!r}; known: "
                    f"{', '.join(self.dispatch_policies)}")
        return None

    async def DeletePolicy(self, request: admin_pb2.DeletePolicyRequest, context: grpc.aio.ServicerContext) -> admin_pb2.DeletePolicyResponse:
        if not request.tenant:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "tenant: required")
        async def remove(versions: Any) -> bool:
            current = await versions.current(request.tenant)
            if current is None or current.spec is None:
                return False
            _, changed = await versions.commit(request.tenant, None, expected_version=None, author=_who(),
                                               reason="DeletePolicy (unversioned call)")
            return bool(changed)

        deleted = await self._versions_call(context, remove)
        return admin_pb2.DeletePolicyResponse(deleted=bool(deleted))

    async def ListPolicies(self, request: admin_pb2.ListPoliciesRequest, context: grpc.aio.ServicerContext) -> admin_pb2.ListPoliciesResponse:
        policies = await self._store_call(context, lambda s: s.list_policies())
        return admin_pb2.ListPoliciesResponse(
            policies=[policy_from_dict(t, policies[t]) for t in sorted(policies)])

    async def _store_call(self, context: grpc.aio.ServicerContext,
                          call: Callable[[StateStore], Awaitable[Any]]) -> Any:
        try:
            return await call(self._require_store())
        except Exception as exc:
            message = store_unavailable(exc)
            if message is None:
                raise
            await _abort(context, grpc.StatusCode.UNAVAILABLE, message)

    # -- pools ---------------------------------------------------------------------------
    async def ListPools(self, request: admin_pb2.ListPoolsRequest, context: grpc.aio.ServicerContext) -> admin_pb2.ListPoolsResponse:
        members: dict[str, list[tuple[InstanceRecord, Any]]] = {}
        for record in self.registry.records():
            found = self.registry.find(record.instance_id)
            if found is not None:
                members.setdefault(record.pool, []).append(found)
        desired = dict(self.desired_pool_sizes()) if self.desired_pool_sizes is not None else {}
        pools = []
        for name in sorted(members):
            group = members[name]
            # A pool is meant to be identical instances; report its most common shape.
            gpu, model, tp = Counter((r.gpu, r.model, r.tp) for r, _ in group).most_common(1)[0][0]
            ready = sum(1 for _, s in group if s.healthy and not s.draining and not s.cordoned)
            pools.append(admin_pb2.Pool(name=name, gpu=gpu, model=model, tensor_parallel=tp,
                                        desired_count=desired.get(name, len(group)), ready_count=ready))
        return admin_pb2.ListPoolsResponse(pools=pools)

    # -- instances -----------------------------------------------------------------------
    async def RegisterInstance(self, request: admin_pb2.RegisterInstanceRequest, context: grpc.aio.ServicerContext) -> admin_pb2.RegisterInstanceResponse:
        if not request.HasField("instance"):
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "instance: required")
        reg = request.instance
        problem = _registration_problem(reg)
        if problem:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
        if self.registration_cidrs:
            problem = await _outside_cidrs(reg.url, self.registration_cidrs)
            if problem is None and reg.worker_address:  # the router dials that one too
                problem = await _host_outside_cidrs("instance.worker_address",
                                                    reg.worker_address.rpartition(":")[0], self.registration_cidrs)
            if problem:
                log.warning("registration refused", extra={"instance": reg.instance_id, "principal": _who(),
                                                           "reason": problem})
                await _abort(context, grpc.StatusCode.PERMISSION_DENIED, problem)
        gpu = reg.gpu or "unknown"
        record = InstanceRecord(
            instance_id=reg.instance_id, url=reg.url.rstrip("/"), model=reg.model, gpu=gpu,
            pool=reg.pool or default_pool_name(gpu, reg.model), tp=reg.tensor_parallel or 1,
            grpc_address=reg.worker_address or None, labels=dict(reg.labels), source="admin")
        existing = self.registry.find(reg.instance_id)
        if existing is not None and existing[0].source != "admin":
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         f"instance.instance_id: {reg.instance_id!r} is already known from "
                         f"{SOURCE_NAMES.get(existing[0].source, existing[0].source)} discovery")
        if existing is not None:  # re-registration keeps an operator's drain and cordon
            record.draining = existing[0].draining
            record.cordon = existing[0].cordon
        ttl_s = await self._lease_call(
            context, lambda: self.registration.register(record, request.lease_ttl_ms / 1000.0 or None))
        log.info("instance registered", extra={"instance": record.instance_id, "url": record.url,
                                               "principal": _who()})
        return admin_pb2.RegisterInstanceResponse(lease_ttl_ms=int(round(ttl_s * 1000)))

    async def _lease_call(self, context: grpc.aio.ServicerContext, call: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await call()
        except UnknownInstance as exc:
            await _abort(context, grpc.StatusCode.NOT_FOUND, str(exc))
        except Exception as exc:
            message = store_unavailable(exc)
            if message is None:
                raise
            await _abort(context, grpc.StatusCode.UNAVAILABLE, message)

    async def DeregisterInstance(self, request: admin_pb2.DeregisterInstanceRequest, context: grpc.aio.ServicerContext) -> admin_pb2.DeregisterInstanceResponse:
        if not request.instance_id:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "instance_id: required")
        found = self.registry.find(request.instance_id)
        if found is not None and found[0].source != "admin":
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         f"instance_id: {request.instance_id!r} comes from "
                         f"{SOURCE_NAMES.get(found[0].source, found[0].source)} discovery, not a "
                         "registration; drain it instead")
        removed = await self._lease_call(context, lambda: self.registration.deregister(request.instance_id))
        return admin_pb2.DeregisterInstanceResponse(removed=bool(removed))

    async def DrainInstance(self, request: admin_pb2.DrainInstanceRequest, context: grpc.aio.ServicerContext) -> admin_pb2.DrainInstanceResponse:
        if not request.instance_id:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "instance_id: required")
        if not self.registry.set_draining(request.instance_id, request.draining):
            await _abort(context, grpc.StatusCode.NOT_FOUND, f"instance {request.instance_id!r} is not registered")
        log.info("instance drain set", extra={"instance": request.instance_id, "draining": request.draining,
                                              "principal": _who()})
        return admin_pb2.DrainInstanceResponse(instance=self._info(request.instance_id))

    async def Heartbeat(self, request: admin_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext) -> admin_pb2.HeartbeatResponse:
        if not request.instance_id:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "instance_id: required")
        ttl_s = await self._lease_call(context, lambda: self.registration.heartbeat(request.instance_id))
        return admin_pb2.HeartbeatResponse(lease_ttl_ms=int(round(ttl_s * 1000)))

    async def ListInstances(self, request: admin_pb2.ListInstancesRequest, context: grpc.aio.ServicerContext) -> admin_pb2.ListInstancesResponse:
        out = []
        for record in sorted(self.registry.records(), key=lambda r: r.instance_id):
            if request.pool and record.pool != request.pool:
                continue
            if request.model and record.model != request.model:
                continue
            out.append(self._info(record.instance_id))
        return admin_pb2.ListInstancesResponse(instances=out)

    def _info(self, instance_id: str) -> admin_pb2.InstanceInfo:
        record, state = self.registry.get(instance_id)
        load_ms = 0
        if state.updated_s > 0:  # the registry's clock is monotonic; the wire wants epoch
            load_ms = int((time.time() - (self._monotonic() - state.updated_s)) * 1000)
        lease_s = self.registration.lease_expiry_s(instance_id) if record.source == "admin" else None
        return admin_pb2.InstanceInfo(
            registration=admin_pb2.InstanceRegistration(
                instance_id=record.instance_id, url=record.url, model=record.model, gpu=record.gpu,
                pool=record.pool, tensor_parallel=record.tp, labels=record.labels,
                worker_address=record.grpc_address or ""),
            source=SOURCE_NAMES.get(record.source, record.source),
            healthy=state.healthy, draining=state.draining, running=state.running,
            waiting=state.waiting, kv_blocks_used=state.kv_blocks_used,
            kv_blocks_total=state.kv_blocks_total, router_inflight=state.router_inflight,
            load_updated_unix_ms=load_ms,
            lease_expires_unix_ms=int(lease_s * 1000) if lease_s else 0,
            cordon=cordon_message(record.cordon))


def _registration_problem(reg: admin_pb2.InstanceRegistration) -> str | None:
    if not reg.instance_id:
        return "instance.instance_id: required"
    if len(reg.instance_id) > _MAX_ID_CHARS:
        return f"instance.instance_id: at most {_MAX_ID_CHARS} characters"
    if not reg.model:
        return "instance.model: required"
    parts = urlsplit(reg.url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme == "https":
        return (f"instance.url: https is not supported: the router's engine client speaks plain HTTP/1.1; "
                f"register the engine's http://host:port (TLS to engines belongs in a mesh sidecar), got "
                f"{reg.url!r}")
    if parts.scheme != "http" or not parts.hostname or port is None:
        return f"instance.url: expected http://host:port, got {reg.url!r}"
    if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
        return f"instance.url: expected http://host:port[/path] without credentials, query or fragment, got {reg.url!r}"
    if reg.worker_address:
        host, sep, wport = reg.worker_address.rpartition(":")
        if not sep or not host or not wport.isdigit():
            return f"instance.worker_address: expected host:port, got {reg.worker_address!r}"
    return None


def _who() -> str:
    principal = current_principal.get()
    return principal.name if principal is not None else ""


async def _outside_cidrs(url: str, cidrs: Collection[Any]) -> str | None:
    """Why `url`'s host is not inside the registration CIDRs (None: it is); names resolve."""
    return await _host_outside_cidrs("instance.url", urlsplit(url).hostname or "", cidrs)


async def _host_outside_cidrs(field: str, host: str, cidrs: Collection[Any]) -> str | None:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host.strip("[]"), None, type=0)
    except OSError as exc:
        return f"{field}: host {host!r} does not resolve: {exc}"
    addresses = sorted({str(info[4][0]) for info in infos})
    if in_cidrs(addresses, list(cidrs)):
        return None
    return (f"{field}: {host} ({', '.join(addresses) or 'no address'}) is outside the registration CIDRs "
            f"{', '.join(map(str, cidrs))}")


async def start_control_server(
    host: str, port: int, *, registry: InstanceRegistry, store: StateStore | None,
    decide: Callable[[RequestInfo], Awaitable[Decision]], auth: ControlAuth,
    registration: AdminRegistration | None = None,
    slo_classes: Mapping[str, SloClass] | Collection[str] | None = None,
    dispatch_policies: Collection[str] | None = None,
    tenant_for_api_key: Callable[[str], str | None] | None = None,
    desired_pool_sizes: Callable[[], Mapping[str, int]] | None = None,
    reuse_port: bool = False,
    migration: MigrationLoop | None = None,
    resolve_tier: Callable[[RequestInfo, str], tuple[RequestInfo, TierChoice | None]] | None = None,
    records: Any = None,
) -> grpc.aio.Server:
    """Serve Admin and Picker on host:port (0 picks a free port: read `server.bound_port`).

    Pass the `AdminRegistration` from the configured discovery sources where there is
    one; otherwise one with default leases is started here, and stopped when the server
    stops. `reuse_port=True` lets several router worker processes serve the same port
    (their state is shared through the store); otherwise a taken port is an error.
    `auth` is required: every call needs a bearer token of `auth`'s table; with `auth.tls`
    the port speaks TLS only. `resolve_tier` resolves the tier alias of Pick requests
    (router.picker_grpc.PickerService).
    """
    from router.picker_grpc import PickerService
    from tokenyard.v1 import picker_pb2_grpc

    if auth is None:
        raise ValueError("control server: auth is required (router.auth.ControlAuth: bearer tokens); the control "
                         "plane never runs unauthenticated")
    tokens = auth.load_tokens()  # before anything starts: a bad tokens file is a clean error
    credentials = auth.server_credentials()
    own_registration = registration is None
    if registration is None:
        registration = AdminRegistration()
        await registration.start(registry)
    server = grpc.aio.server(
        interceptors=[AuthInterceptor(tokens, reviewer=auth.load_reviewer())],
        # Bounded input: a control message is small; 1 MiB is far above any real one.
        # Connection limits: tokenyard/grpc_limits.py (a peer that never calls is never refused).
        options=server_options(("grpc.so_reuseport", 1 if reuse_port else 0),
                               ("grpc.max_receive_message_length", 1 << 20), ("grpc.max_concurrent_streams", 256)))
    admin_pb2_grpc.add_AdminServicer_to_server(  # type: ignore[no-untyped-call]  # generated grpc module, unannotated
        AdminService(registry, store, registration, slo_classes=slo_classes,
                     dispatch_policies=dispatch_policies, desired_pool_sizes=desired_pool_sizes,
                     registration_cidrs=auth.registration_cidrs, migration=migration, records=records), server)
    picker_pb2_grpc.add_PickerServicer_to_server(  # type: ignore[no-untyped-call]  # generated grpc module, unannotated
        PickerService(registry, decide, tenant_for_api_key=tenant_for_api_key,
                      resolve_tier=resolve_tier), server)
    try:
        address = f"{host}:{port}"
        bound = (server.add_secure_port(address, credentials) if credentials is not None
                 else server.add_insecure_port(address))
    except RuntimeError:  # grpc's way of saying the bind failed
        bound = 0
    if bound == 0:
        if own_registration:
            await registration.stop()
        raise OSError(f"control server: cannot listen on {host}:{port} (address in use or not "
                      "local; set control.port to a free port)")
    await server.start()
    server.bound_port = bound
    server.registration = registration
    if own_registration:
        # The sweeper we started ends with the server, however the caller stops it.
        async def stop_sweeper_on_termination() -> None:
            await server.wait_for_termination()
            await registration.stop()

        server.sweeper_stopper = asyncio.ensure_future(stop_sweeper_on_termination())
    log.info("control server listening", extra={"address": f"{host}:{bound}", "services": "Admin, Picker",
                                                "tls": credentials is not None, "principals": len(tokens)})
    return server

