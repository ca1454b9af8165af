"""Admin and Picker gRPC services on a real grpc.aio server, called with the generated stubs.

State goes through real stores: Redis at 127.0.0.1:6379 (unique prefix per test) and the
file backend; two registries over the same Redis stand for two router replicas.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from router.admin_grpc import default_pool_name, start_control_server
from router.auth import ControlAuth, Principal, TokenTable, control_channel, token_digest
from router.discovery import AdminRegistration
from router.registry import InstanceRegistry
from router.state import InstanceRecord, RedisStateStore, StateStore, open_store
from scheduler.dispatch import ClusterView, build_policy
from scheduler.types import Decision, NoInstanceAvailable, RequestInfo
from tokenyard.v1 import admin_pb2, admin_pb2_grpc, picker_pb2, picker_pb2_grpc

REDIS_URL = "redis://127.0.0.1:6379/0"
ADMIN_TOKEN = "test-admin-token-0123456789"
AUTH = ControlAuth.with_tokens(TokenTable([(token_digest(ADMIN_TOKEN), Principal("test-admin"))]))


def admin_channel(port: int) -> grpc.aio.Channel:
    return control_channel(f"127.0.0.1:{port}", ADMIN_TOKEN)


async def eventually(cond: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not reached within {timeout_s}s: {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def redis_url():
    prefix = f"tytest:{uuid.uuid4().hex[:10]}:"
    yield f"{REDIS_URL}?prefix={prefix}"
    cleaner = RedisStateStore(REDIS_URL, prefix=prefix)
    await cleaner.delete_all()
    await cleaner.close()


class Replica:
    """One router replica: store, registry, lease keeper, control server, client stubs."""

    def __init__(self, store: StateStore, decide: Callable[[RequestInfo], object] | None = None,
                 lease_ttl_s: float = 30.0) -> None:
        self.store = store
        self.registry = InstanceRegistry(store, resync_s=1.0)
        self.registration = AdminRegistration(lease_ttl_s=lease_ttl_s, sweep_interval_s=0.05)
        self.decisions: list[RequestInfo] = []
        self._decide = decide

    async def decide(self, info: RequestInfo) -> Decision:
        self.decisions.append(info)
        assert self._decide is not None
        return self._decide(info)  # type: ignore[return-value]

    async def __aenter__(self) -> Replica:
        await self.registry.start()
        await self.registration.start(self.registry)
        self.server = await start_control_server(
            "127.0.0.1", 0, registry=self.registry, store=self.store, decide=self.decide,
            registration=self.registration, slo_classes=["interactive", "default", "batch"],
            dispatch_policies=["default", "headroom"], tenant_for_api_key={"sk-acme": "acme", "": "default"}.get,
            auth=AUTH)
        self.channel = admin_channel(self.server.bound_port)
        self.admin = admin_pb2_grpc.AdminStub(self.channel)
        self.picker = picker_pb2_grpc.PickerStub(self.channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()
        await self.server.stop(0)
        await self.registration.stop()
        await self.registry.close()
        await self.store.close()


def registration(iid: str, port: int, model: str = "llama-3-8b", **kw: object) -> admin_pb2.InstanceRegistration:
    return admin_pb2.InstanceRegistration(instance_id=iid, url=f"http://127.0.0.1:{port}", model=model, **kw)  # type: ignore[arg-type]


async def test_self_registration_is_seen_by_both_replicas_drained_and_expires(redis_url: str) -> None:
    async with Replica(open_store(redis_url), lease_ttl_s=1.0) as a, \
            Replica(open_store(redis_url), lease_ttl_s=1.0) as b:
        reply = await a.admin.RegisterInstance(admin_pb2.RegisterInstanceRequest(
            instance=registration("eng-1", 8101, gpu="A100", tensor_parallel=2, labels={"zone": "z1"},
                                  worker_address="127.0.0.1:9101")))
        assert reply.lease_ttl_ms == 1000
        record, state = a.registry.get("eng-1")
        assert (record.source, record.gpu, record.tp, record.pool) == ("admin", "A100", 2, "a100-llama-3-8b")
        assert record.grpc_address == "127.0.0.1:9101" and record.labels == {"zone": "z1"}
        # The other replica learns it through the store.
        await eventually(lambda: "eng-1" in b.registry, "replica b sees the registration")
        listed = await b.admin.ListInstances(admin_pb2.ListInstancesRequest())
        assert [i.registration.instance_id for i in listed.instances] == ["eng-1"]
        info = listed.instances[0]
        assert info.source == "registered" and info.registration.url == "http://127.0.0.1:8101"
        assert info.registration.tensor_parallel == 2 and not info.draining

        # Drain through replica b: both replicas stop sending it traffic.
        drained = await b.admin.DrainInstance(admin_pb2.DrainInstanceRequest(instance_id="eng-1", draining=True))
        assert drained.instance.draining
        await eventually(lambda: a.registry.get("eng-1")[1].draining, "replica a sees the drain")

        # Heartbeats through either replica keep it alive past several lease lengths.
        for i in range(6):
            replica = a if i % 2 else b
            beat = await replica.admin.Heartbeat(admin_pb2.HeartbeatRequest(instance_id="eng-1"))
            assert beat.lease_ttl_ms == 1000
            await asyncio.sleep(0.2)
        assert "eng-1" in a.registry and "eng-1" in b.registry
        # Heartbeats stop: the lease expires and both replicas drop it.
        await eventually(lambda: "eng-1" not in a.registry and "eng-1" not in b.registry,
                         "expired registration removed everywhere")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await a.admin.Heartbeat(admin_pb2.HeartbeatRequest(instance_id="eng-1"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "register" in (err.value.details() or "")


async def test_deregister_and_pools(redis_url: str) -> None:
    async with Replica(open_store(redis_url)) as a:
        for i, (gpu, pool) in enumerate([("L4", ""), ("L4", ""), ("H100", "big")]):
            await a.admin.RegisterInstance(admin_pb2.RegisterInstanceRequest(
                instance=registration(f"e{i}", 8200 + i, gpu=gpu, pool=pool), lease_ttl_ms=30000))
        a.registry.upsert(InstanceRecord("static-0", "http://127.0.0.1:8299", "llama-3-8b", gpu="L4",
                                         pool=default_pool_name("L4", "llama-3-8b")))
        a.registry.mark_health("e1", False)
        pools = (await a.admin.ListPools(admin_pb2.ListPoolsRequest())).pools
        assert [(p.name, p.gpu, p.model, p.desired_count, p.ready_count) for p in pools] == [
            ("big", "H100", "llama-3-8b", 1, 1), ("l4-llama-3-8b", "L4", "llama-3-8b", 3, 2)]
        only_big = await a.admin.ListInstances(admin_pb2.ListInstancesRequest(pool="big"))
        assert [i.registration.instance_id for i in only_big.instances] == ["e2"]
        assert only_big.instances[0].lease_expires_unix_ms > 0

        assert (await a.admin.DeregisterInstance(admin_pb2.DeregisterInstanceRequest(instance_id="e0"))).removed
        assert not (await a.admin.DeregisterInstance(admin_pb2.DeregisterInstanceRequest(instance_id="e0"))).removed
        assert "e0" not in a.registry
        with pytest.raises(grpc.aio.AioRpcError) as err:  # not a registration: drain it instead
            await a.admin.DeregisterInstance(admin_pb2.DeregisterInstanceRequest(instance_id="static-0"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "static" in (err.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await a.admin.DrainInstance(admin_pb2.DrainInstanceRequest(instance_id="nope", draining=True))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("backend", ["file", "redis"])
async def test_policies_roundtrip_through_the_store(backend: str, redis_url: str, tmp_path: Path) -> None:
    url = f"file://{tmp_path}/state.json" if backend == "file" else redis_url
    async with Replica(open_store(url)) as a:
        acme = admin_pb2.SloPolicy(tenant="acme", slo_class="interactive", ttft_slo_ms=500,
                                   tpot_slo_ms=50, priority=0, dispatch_policy="headroom")
        stored = await a.admin.PutPolicy(admin_pb2.PutPolicyRequest(policy=acme))
        assert stored == acme
        await a.admin.PutPolicy(admin_pb2.PutPolicyRequest(policy=admin_pb2.SloPolicy(
            tenant="globex", slo_class="batch", ttft_slo_ms=60000, tpot_slo_ms=1000, priority=2)))
        assert await a.admin.GetPolicy(admin_pb2.GetPolicyRequest(tenant="acme")) == acme
        listed = await a.admin.ListPolicies(admin_pb2.ListPoliciesRequest())
        assert [p.tenant for p in listed.policies] == ["acme", "globex"]
        # It is in the store itself, where another replica (or a restart) finds it.
        reopened = open_store(url)
        assert (await reopened.get_policy("acme"))["dispatch_policy"] == "headroom"  # type: ignore[index]
        await reopened.close()
        assert (await a.admin.DeletePolicy(admin_pb2.DeletePolicyRequest(tenant="acme"))).deleted
        assert not (await a.admin.DeletePolicy(admin_pb2.DeletePolicyRequest(tenant="acme"))).deleted
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await a.admin.GetPolicy(admin_pb2.GetPolicyRequest(tenant="acme"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "acme" in (err.value.details() or "")


@pytest.mark.parametrize("call, field", [
    ("PutPolicy", "policy.tenant"),
    ("PutPolicy:ttft", "policy.ttft_slo_ms"),
    ("PutPolicy:class", "policy.slo_class"),
    ("PutPolicy:dispatch", "policy.dispatch_policy"),
    ("Register:url", "instance.url"),
    ("Register:model", "instance.model"),
    ("Register:worker", "instance.worker_address"),
    ("Register:none", "instance"),
    ("Heartbeat", "instance_id"),
    ("Pick:model", "model"),
    ("Pick:prefix", "prefix_block_tokens"),
])
async def test_bad_input_is_invalid_argument_naming_the_field(redis_url: str, call: str, field: str) -> None:
    good = dict(tenant="t", slo_class="batch", ttft_slo_ms=1, tpot_slo_ms=1)
    async with Replica(open_store(redis_url)) as a:
        calls = {
            "PutPolicy": lambda: a.admin.PutPolicy(admin_pb2.PutPolicyRequest(policy=admin_pb2.SloPolicy(ttft_slo_ms=1, tpot_slo_ms=1))),
            "PutPolicy:ttft": lambda: a.admin.PutPolicy(admin_pb2.PutPolicyRequest(policy=admin_pb2.SloPolicy(**{**good, "ttft_slo_ms": -5}))),
            "PutPolicy:class": lambda: a.admin.PutPolicy(admin_pb2.PutPolicyRequest(policy=admin_pb2.SloPolicy(**{**good, "slo_class": "gold"}))),
            "PutPolicy:dispatch": lambda: a.admin.PutPolicy(admin_pb2.PutPolicyRequest(policy=admin_pb2.SloPolicy(**good, dispatch_policy="fastest"))),
            "Register:url": lambda: a.admin.RegisterInstance(admin_pb2.RegisterInstanceRequest(instance=admin_pb2.InstanceRegistration(instance_id="x", model="m", url="10.0.0.1:8000"))),
            "Register:model": lambda: a.admin.RegisterInstance(admin_pb2.RegisterInstanceRequest(instance=admin_pb2.InstanceRegistration(instance_id="x", url="http://10.0.0.1:8000"))),
            "Register:worker": lambda: a.admin.RegisterInstance(admin_pb2.RegisterInstanceRequest(instance=registration("x", 8000, worker_address="nope"))),
            "Register:none": lambda: a.admin.RegisterInstance(admin_pb2.RegisterInstanceRequest()),
            "Heartbeat": lambda: a.admin.Heartbeat(admin_pb2.HeartbeatRequest()),
            "Pick:model": lambda: a.picker.Pick(picker_pb2.PickRequest()),
            "Pick:prefix": lambda: a.picker.Pick(picker_pb2.PickRequest(model="m", prefix_block_hashes=[1, 2], prefix_block_tokens=10)),
        }
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await calls[call]()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (err.value.details() or "").startswith(f"{field}:"), err.value.details()
        if call == "PutPolicy:class":
            assert "interactive" in (err.value.details() or "")  # lists the known ones
        assert "x" not in a.registry


async def test_pick_returns_what_decide_chose(redis_url: str) -> None:
    def decide(info: RequestInfo) -> Decision:
        if info.model == "busy":
            raise NoInstanceAvailable("filter not_draining removed the last instances")
        # The request's session picks the order: a decision the test can predict.
        order = ("c", "a", "b") if info.session_id == "s-1" else ("b", "c", "a")
        return Decision(instance_ids=order, priority=3, reason="test:session-order")

    async with Replica(open_store(redis_url), decide) as a:
        for name, port, gpu in (("a", 8301, "L4"), ("b", 8302, "A100"), ("c", 8303, "H100")):
            a.registry.upsert(InstanceRecord(name, f"http://127.0.0.1:{port}", "llama-3-8b", gpu=gpu, pool=gpu.lower()))
        a.registry.upsert(InstanceRecord("z", "http://127.0.0.1:8309", "busy"))
        reply = await a.picker.Pick(picker_pb2.PickRequest(
            model="llama-3-8b", api_key="sk-acme", estimated_prompt_tokens=900, max_output_tokens=64,
            headers={"x-session-id": "s-1"}, prefix_block_hashes=[11, 22], prefix_block_tokens=32,
            exclude_instance_ids=["a"]))
        assert [(e.instance_id, e.address, e.gpu, e.pool) for e in reply.endpoints] == [
            ("c", "127.0.0.1:8303", "H100", "h100"), ("b", "127.0.0.1:8302", "A100", "a100")]
        assert (reply.priority, reply.reason, reply.tenant, reply.model) == (3, "test:session-order", "acme", "llama-3-8b")
        info = a.decisions[-1]
        assert (info.model, info.input_tokens, info.max_output_tokens, info.tenant, info.session_id,
                info.prefix_hashes) == ("llama-3-8b", 900, 64, "acme", "s-1", (11, 22))
        assert info.request_id  # made up when the gateway sends none

        other = await a.picker.Pick(picker_pb2.PickRequest(model="llama-3-8b", request_id="r-9"))
        assert [e.instance_id for e in other.endpoints] == ["b", "c", "a"] and a.decisions[-1].request_id == "r-9"

        for request, code, text in [
            (picker_pb2.PickRequest(model="llama-3-8b", api_key="sk-wrong"), grpc.StatusCode.UNAUTHENTICATED, "api_key"),
            (picker_pb2.PickRequest(model="busy"), grpc.StatusCode.UNAVAILABLE, "not_draining"),
            (picker_pb2.PickRequest(model="llama-3-8b", exclude_instance_ids=["a", "b", "c"]),
             grpc.StatusCode.UNAVAILABLE, "excluded"),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await a.picker.Pick(request)
            assert err.value.code() == code and text in (err.value.details() or "")


async def test_pick_with_the_scheduler_policy(tmp_path: Path) -> None:
    """End to end with the real dispatch policy: the least-loaded serving instance wins."""
    policy = build_policy({"filters": ["model", "healthy", "not_draining"], "scorers": ["least_outstanding"]})
    holder: dict[str, InstanceRegistry] = {}

    def decide(info: RequestInfo) -> Decision:
        return policy.decide(ClusterView(holder["reg"].instances(), 0.0), info)

    async with Replica(open_store(f"file://{tmp_path}/state.json"), decide) as a:
        holder["reg"] = a.registry
        for name, port in (("a", 8401), ("b", 8402), ("c", 8403)):
            a.registry.upsert(InstanceRecord(name, f"http://127.0.0.1:{port}", "llama-3-8b"))
        a.registry.upsert(InstanceRecord("q", "http://127.0.0.1:8409", "qwen-7b"))
        a.registry.update_load("a", running=5)
        a.registry.update_load("c", running=1)
        a.registry.set_draining("b", True)
        reply = await a.picker.Pick(picker_pb2.PickRequest(model="llama-3-8b"))
        assert reply.endpoints[0].instance_id == "c"
        assert "b" not in [e.instance_id for e in reply.endpoints]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await a.picker.Pick(picker_pb2.PickRequest(model="mistral-7b"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "llama-3-8b, qwen-7b" in (err.value.details() or "")


async def test_control_server_port_handling_and_own_lease_keeper() -> None:
    registry = InstanceRegistry()

    async def decide(info: RequestInfo) -> Decision:
        return Decision(instance_ids=("x",))

    first = await start_control_server("127.0.0.1", 0, registry=registry, store=None, decide=decide, auth=AUTH)
    port = first.bound_port
    try:
        with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
            await start_control_server("127.0.0.1", port, registry=registry, store=None, decide=decide, auth=AUTH)
        # Without a store there are no policies: UNAVAILABLE, saying why.
        async with admin_channel(port) as channel:
            admin = admin_pb2_grpc.AdminStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await admin.ListPolicies(admin_pb2.ListPoliciesRequest())
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "no state store" in (err.value.details() or "")
            # Registration works with the lease keeper the server started for itself.
            await admin.RegisterInstance(admin_pb2.RegisterInstanceRequest(instance=registration("r1", 8501)))
            assert registry.get("r1")[0].source == "admin"
    finally:
        await first.stop(0)
    await asyncio.wait_for(first.sweeper_stopper, 5)
    assert first.registration._sweeper.done()

    # Router worker processes share one control port with reuse_port.
    a = await start_control_server("127.0.0.1", 0, registry=registry, store=None, decide=decide, auth=AUTH, reuse_port=True)
    b = await start_control_server("127.0.0.1", a.bound_port, registry=registry, store=None, decide=decide, auth=AUTH,
                                   reuse_port=True)
    assert b.bound_port == a.bound_port
    await a.stop(0)
    await b.stop(0)
