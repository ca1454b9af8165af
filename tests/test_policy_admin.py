"""Versioned tenant policies: the compare-and-set store on both backends (real SQLite file,
real Redis at 127.0.0.1:6379 under a unique prefix) and the Admin RPCs on a real grpc.aio
server with bearer tokens of each role."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from router.admin_grpc import start_control_server
from router.auth import ControlAuth, Principal, TokenTable, control_channel, token_digest
from router.policy_versions import PolicySpecError, PolicyVersions, VersionConflict, parse_document
from router.registry import InstanceRegistry
from router.state import RedisStateStore, StateStore, open_store
from scheduler.types import Decision, RequestInfo
from tokenyard.v1 import admin_pb2, admin_pb2_grpc

REDIS_URL = "redis://127.0.0.1:6379/0"
TOKENS = {"admin": "policy-admin-token-0123456789", "viewer": "policy-viewer-token-0123456789",
          "operator": "policy-operator-token-012345678"}


def control_auth() -> ControlAuth:
    """Principals named per test: denials are logged once per principal and method a while."""
    run = uuid.uuid4().hex[:6]
    return ControlAuth.with_tokens(TokenTable(
        [(token_digest(t), Principal(f"test-{role}-{run}", frozenset({role}))) for role, t in TOKENS.items()]))
SPEC = {"slo_class": "interactive", "ttft": {"ms": 800}, "profile": "headroom"}


@pytest.fixture(params=["file", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StateStore]:
    if request.param == "file":
        found = open_store(f"file://{tmp_path}/state.db")
        yield found
        await found.close()
        return
    prefix = f"tytest:{uuid.uuid4().hex[:10]}:"
    found = open_store(f"{REDIS_URL}?prefix={prefix}")
    yield found
    assert isinstance(found, RedisStateStore)
    await found.delete_all()
    await found.close()


async def test_versions_history_and_mirror(store: StateStore) -> None:
    versions = PolicyVersions(store)
    first, changed = await versions.commit("acme", SPEC, expected_version=0, author="ann", reason="onboard acme")
    assert (first.version, changed) == (1, True)
    assert "+slo_class: interactive" in first.diff
    same, changed = await versions.commit("acme", SPEC, expected_version=1, author="ann", reason="again")
    assert (same.version, changed) == (1, False)
    second, _ = await versions.commit("acme", {**SPEC, "priority": 2}, expected_version=1, author="bob",
                                      reason="lower acme")
    assert second.version == 2 and "+priority: 2" in second.diff
    mirrored = await store.get_policy("acme")  # what the router's tenant table reads
    assert mirrored is not None and mirrored["priority"] == 2 and mirrored["dispatch_policy"] == "headroom"
    gone, _ = await versions.commit("acme", None, expected_version=2, author="bob", reason="offboard")
    assert gone.spec is None and await store.get_policy("acme") is None
    history = await versions.history("acme")
    assert [(v.version, v.author, v.reason) for v in history] == [
        (1, "ann", "onboard acme"), (2, "bob", "lower acme"), (3, "bob", "offboard")]
    assert await versions.list_current() == []
    assert (await versions.get("acme", 2)) == second


async def test_second_writer_gets_a_conflict_nothing_lost(store: StateStore) -> None:
    versions = PolicyVersions(store)
    await versions.commit("acme", SPEC, expected_version=None, author="a", reason="start")
    # Both read version 1; exactly one may write on top of it.
    results = await asyncio.gather(
        versions.commit("acme", {**SPEC, "priority": 1}, expected_version=1, author="a", reason="one"),
        versions.commit("acme", {**SPEC, "priority": 2}, expected_version=1, author="b", reason="two"),
        return_exceptions=True)
    conflicts = [r for r in results if isinstance(r, VersionConflict)]
    assert len(conflicts) == 1 and conflicts[0].current == 2
    assert "version 2, not 1" in str(conflicts[0])
    # Unconditional writers retry a lost race: every one of them lands as its own version.
    await asyncio.gather(*(versions.commit("acme", {**SPEC, "priority": 10 + i}, expected_version=None,
                                           author=f"w{i}", reason=f"w{i}") for i in range(12)))
    history = await versions.history("acme", 100)
    assert [v.version for v in history] == list(range(1, 15))
    assert {v.author for v in history[2:]} == {f"w{i}" for i in range(12)}


async def test_reason_and_name_required(store: StateStore) -> None:
    versions = PolicyVersions(store)
    with pytest.raises(PolicySpecError, match="reason: required"):
        await versions.commit("acme", SPEC, expected_version=None, author="a", reason="  ")
    with pytest.raises(PolicySpecError, match="name: expected a tenant name"):
        await versions.commit("no spaces", SPEC, expected_version=None, author="a", reason="x")


def test_document_errors_name_the_path() -> None:
    with pytest.raises(PolicySpecError, match=r"f\.yaml\.spec\.ttft\.ms: Input should be greater than 0"):
        parse_document({"name": "acme", "spec": {"ttft": {"ms": -1}}}, "f.yaml")
    with pytest.raises(PolicySpecError, match=r"spec\.rate_limits\.rpm: unknown key; allowed: requests_per_minute"):
        parse_document({"name": "acme", "spec": {"rate_limits": {"rpm": 5}}}, "f.yaml")
    with pytest.raises(PolicySpecError, match=r"f\.yaml: unknown key 'nmae'"):
        parse_document({"nmae": "acme"}, "f.yaml")


# -- the RPCs -----------------------------------------------------------------------------
class ControlPlane:
    def __init__(self, store: StateStore) -> None:
        self.store = store
        self.registry = InstanceRegistry(store)

    async def __aenter__(self) -> ControlPlane:
        async def decide(info: RequestInfo) -> Decision:
            raise AssertionError("no picks here")

        await self.registry.start()
        self.server = await start_control_server(
            "127.0.0.1", 0, registry=self.registry, store=self.store, decide=decide,
            slo_classes=["interactive", "default", "batch"], dispatch_policies=["default", "headroom"], auth=control_auth())
        self.channels = {role: control_channel(f"127.0.0.1:{self.server.bound_port}", token)
                         for role, token in TOKENS.items()}
        self.stubs = {role: admin_pb2_grpc.AdminStub(ch) for role, ch in self.channels.items()}
        return self

    async def __aexit__(self, *exc: object) -> None:
        for channel in self.channels.values():
            await channel.close()
        await self.server.stop(grace=None)
        await self.registry.close()


def apply(spec: dict[str, object], reason: str = "test", **kwargs: object) -> admin_pb2.ApplyPolicyRequest:
    return admin_pb2.ApplyPolicyRequest(name="acme", spec_json=json.dumps(spec), reason=reason, **kwargs)


async def test_rpcs_end_to_end(store: StateStore, caplog: pytest.LogCaptureFixture) -> None:
    async with ControlPlane(store) as cp:
        admin, viewer = cp.stubs["admin"], cp.stubs["viewer"]
        dry = await admin.ApplyPolicy(apply(SPEC, dry_run=True, expected_version=0))
        assert dry.dry_run and dry.changed and "+profile: headroom" in dry.policy.diff
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await viewer.GetPolicyVersion(admin_pb2.GetPolicyVersionRequest(name="acme"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND  # the dry run stored nothing

        v1 = await admin.ApplyPolicy(apply(SPEC, expected_version=0))
        assert v1.policy.version == 1 and v1.policy.author.startswith("test-admin-")
        v2 = await admin.ApplyPolicy(apply({**SPEC, "slo_class": "batch"}, expected_version=1))
        with pytest.raises(grpc.aio.AioRpcError) as stale:
            await admin.ApplyPolicy(apply({**SPEC, "priority": 3}, expected_version=1))
        assert stale.value.code() == grpc.StatusCode.ABORTED and "at version 2" in (stale.value.details() or "")

        for bad, message in (({"slo_class": "gold"}, "spec.slo_class: unknown SLO class 'gold'; known: batch"),
                             ({"profile": "fastest"}, "spec.profile: unknown dispatch profile 'fastest'"),
                             ({"ttft": {"ms": 0}}, "spec.ttft.ms: Input should be greater than 0")):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await admin.ApplyPolicy(apply(bad))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in (refused.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as no_reason:
            await admin.ApplyPolicy(apply({**SPEC, "priority": 4}, reason=""))
        assert "reason: required" in (no_reason.value.details() or "")

        back = await admin.RollbackPolicy(admin_pb2.RollbackPolicyRequest(name="acme", to_version=1,
                                                                          reason="batch was wrong"))
        assert back.policy.version == 3 and json.loads(back.policy.spec_json) == SPEC
        assert back.policy.reason == "batch was wrong (rollback to v1)"
        history = await viewer.PolicyHistory(admin_pb2.PolicyHistoryRequest(name="acme"))
        assert [v.version for v in history.versions] == [1, 2, 3]
        assert history.versions[1].diff == v2.policy.diff
        assert "-slo_class: interactive" in v2.policy.diff and "+slo_class: batch" in v2.policy.diff
        listed = await viewer.ListCurrentPolicies(admin_pb2.ListCurrentPoliciesRequest())
        assert [(p.name, p.version) for p in listed.policies] == [("acme", 3)]
        legacy = await viewer.GetPolicy(admin_pb2.GetPolicyRequest(tenant="acme"))
        assert (legacy.slo_class, legacy.dispatch_policy) == ("interactive", "headroom")

        # Roles: a viewer reads but cannot write; an operator cannot change policies either.
        for role in ("viewer", "operator"):
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await cp.stubs[role].ApplyPolicy(apply({**SPEC, "priority": 9}))
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert any("control call denied" in r.getMessage() for r in caplog.records)

        removed = await admin.RemovePolicy(admin_pb2.RemovePolicyRequest(name="acme", expected_version=3,
                                                                         reason="offboard"))
        assert removed.policy.deleted and removed.policy.version == 4
        assert not (await viewer.ListCurrentPolicies(admin_pb2.ListCurrentPoliciesRequest())).policies


async def test_unversioned_put_policy_is_a_version(store: StateStore) -> None:
    async with ControlPlane(store) as cp:
        await cp.stubs["admin"].PutPolicy(admin_pb2.PutPolicyRequest(policy=admin_pb2.SloPolicy(
            tenant="acme", slo_class="batch", ttft_slo_ms=5000, tpot_slo_ms=200, priority=1)))
        got = await cp.stubs["viewer"].GetPolicyVersion(admin_pb2.GetPolicyVersionRequest(name="acme"))
        assert got.version == 1 and got.reason == "PutPolicy (unversioned call)"
        deleted = await cp.stubs["admin"].DeletePolicy(admin_pb2.DeletePolicyRequest(tenant="acme"))
        assert deleted.deleted
        history = await cp.stubs["viewer"].PolicyHistory(admin_pb2.PolicyHistoryRequest(name="acme"))
        assert [v.deleted for v in history.versions] == [False, True]


async def test_router_keeps_last_good_policy_when_stored_one_is_invalid(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from router.app import Router
    from router.config import parse_router_config

    store = open_store(f"file://{tmp_path / 'state.db'}")
    config = parse_router_config({"tenants": {"acme": {"api_keys": ["sk-acme"], "slo_class": "interactive"}}},
                                 "r.yaml")
    router = Router(config, store=store)
    await router.start(background=False)
    try:
        await PolicyVersions(store).commit("acme", {"slo_class": "batch", "priority": 5}, expected_version=None,
                                           author="t", reason="t")
        await router.apply_policies()
        acme = router.tenants.tenants["acme"]
        assert (acme.slo_class, acme.priority) == ("batch", 5)
        # Written around the validation (an older router, a hand edit): never applied.
        await store.put_policy("acme", {"tenant": "acme", "slo_class": "gold", "priority": 1})
        await router.apply_policies()
        assert (acme.slo_class, acme.priority) == ("batch", 5)
        assert any("keeping the last good one" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)
    finally:
        await router.stop()


def test_the_documented_policy_file_is_valid() -> None:
    import re

    import yaml

    text = (Path(__file__).resolve().parents[1] / "docs" / "admin.md").read_text()
    block = re.findall(r"```yaml\n(.*?)```", text, re.S)[0]
    name, spec = parse_document(yaml.safe_load(block), "docs/admin.md")
    assert name == "acme" and spec.profile == "headroom" and spec.rate_limits.max_concurrent == 32
