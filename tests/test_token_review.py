"""Kubernetes ServiceAccount tokens on the control port: the real `kubernetes` client sends a
TokenReview to the loopback API server (router/k8s_loopback.py, the real wire format), and
the Admin service (real gRPC) grants the roles the config maps the ServiceAccount or its
groups to. Refused and logged: an unknown token, a known one mapped to no role or a role
too small, a token for another audience; the API server down refuses too (fail closed),
uncached, while the static tokens keep working. Answers are cached for the TTL and no
longer, in a bounded cache."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from kubernetes import client

from router.admin_grpc import start_control_server
from router.auth import Principal, TokenTable, control_channel, parse_control_auth, token_digest
from router.k8s_loopback import LoopbackKubeAPI
from router.registry import InstanceRegistry
from router.state import InstanceRecord, open_store
from router.token_review import RoleRule, TokenReviewer, TokenReviewSettings
from scheduler.types import Decision, RequestInfo
from tokenyard.config import ConfigError
from tokenyard.v1 import admin_pb2, admin_pb2_grpc

ADMIN_TOKEN = "static-admin-token-0123456789abcdef"
ONCALL = "sa-token-ops-oncall-" + "a" * 40
PLATFORM = "sa-token-platform-ci-" + "b" * 40
NOBODY = "sa-token-other-x-" + "c" * 40
SA_GROUPS = ("system:serviceaccounts", "system:authenticated")
ROLES = [{"service_account": "ops/oncall", "roles": ["operator"]},
         {"group": "system:serviceaccounts:platform", "roles": ["viewer"]}]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def kube() -> Any:
    with LoopbackKubeAPI() as api:
        api.add_token(ONCALL, "system:serviceaccount:ops:oncall", (*SA_GROUPS, "system:serviceaccounts:ops"))
        api.add_token(PLATFORM, "system:serviceaccount:platform:ci", (*SA_GROUPS, "system:serviceaccounts:platform"))
        api.add_token(NOBODY, "system:serviceaccount:other:x", (*SA_GROUPS, "system:serviceaccounts:other"))
        yield api


class Control:
    """A control server whose auth is parsed from a `control:` section, as a router's is."""

    def __init__(self, section: dict[str, Any], tmp: Path) -> None:
        tokens = tmp / "tokens.yaml"
        tokens.write_text(f"tokens: [{{principal: breakglass, roles: [admin], token: {ADMIN_TOKEN}}}]\n")
        self.auth = parse_control_auth({"tokens_file": str(tokens), **section}, "127.0.0.1", "control")
        self.tmp = tmp

    async def __aenter__(self) -> Control:
        self.store = open_store(f"file://{self.tmp}/state.db")
        self.registry = InstanceRegistry(self.store)
        await self.registry.start()
        self.registry.upsert(InstanceRecord("e0", "http://127.0.0.1:9", "m"))

        async def decide(info: RequestInfo) -> Decision:
            raise AssertionError("no picks here")

        self.server = await start_control_server("127.0.0.1", 0, registry=self.registry, store=self.store,
                                                 decide=decide, auth=self.auth)
        self.address = f"127.0.0.1:{self.server.bound_port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop(grace=None)
        await self.registry.close()
        await self.store.close()

    async def call(self, token: str, method: str, request: Any) -> grpc.StatusCode:
        async with control_channel(self.address, token) as channel:
            stub = admin_pb2_grpc.AdminStub(channel)  # type: ignore[no-untyped-call]
            try:
                await getattr(stub, method)(request, timeout=10)
            except grpc.aio.AioRpcError as exc:
                self.last_error = exc.details() or ""
                return exc.code()
            return grpc.StatusCode.OK


@pytest.fixture
async def control(kube: LoopbackKubeAPI, tmp_path: Path) -> AsyncIterator[Control]:
    async with Control({"token_review": {"api_url": kube.host, "roles": ROLES}}, tmp_path) as found:
        yield found


LIST = ("ListInstances", admin_pb2.ListInstancesRequest())
CORDON = ("CordonInstance", admin_pb2.CordonInstanceRequest(instance_id="e0", cordoned=True, reason="sa test"))
APPLY = ("ApplyPolicy", admin_pb2.ApplyPolicyRequest(name="acme", spec_json="{}", reason="x"))


async def test_a_serviceaccount_token_gets_the_roles_its_account_and_groups_map_to(
        control: Control, kube: LoopbackKubeAPI) -> None:
    ok, denied, unauthenticated = grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED
    assert await control.call(ONCALL, *LIST) == ok
    assert await control.call(ONCALL, *CORDON) == ok  # operator
    assert control.registry.get("e0")[0].cordon["by"] == "system:serviceaccount:ops:oncall"  # type: ignore[index]
    assert await control.call(ONCALL, *APPLY) == denied  # not admin
    assert "lacks role 'admin'" in control.last_error
    assert await control.call(PLATFORM, *LIST) == ok  # viewer through its group
    assert await control.call(PLATFORM, *CORDON) == denied
    assert await control.call(NOBODY, *LIST) == denied  # authenticated, mapped to nothing
    assert await control.call(ADMIN_TOKEN, *APPLY) != unauthenticated  # the static tokens still work
    reviews = kube.token_reviews
    assert reviews == 3  # one per ServiceAccount: the rest came from the cache
    # The CLI sends a mounted ServiceAccount token file as it is.
    from cli.main import main

    sa_file = control.tmp / "token"  # as /var/run/secrets/kubernetes.io/serviceaccount/token holds it
    sa_file.write_text(ONCALL)
    assert await asyncio.to_thread(main, ["instances", "uncordon", "e0", "--reason", "done", "--address",
                                          control.address, "--token-file", str(sa_file)]) == 0
    assert not control.registry.get("e0")[1].cordoned
    assert all(r.startswith("POST /apis/authentication.k8s.io/v1/tokenreviews") for r in kube.requests
               if "tokenreviews" in r)


async def test_an_invalid_token_is_refused_and_logged(control: Control, kube: LoopbackKubeAPI) -> None:
    audit = _Records()
    logging.getLogger("router.auth").addHandler(audit)
    try:
        assert await control.call("forged-token-" + "z" * 40, *LIST) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        logging.getLogger("router.auth").removeHandler(audit)
    assert "invalid bearer token" in control.last_error
    denial = [r for r in audit.records if r.getMessage() == "control call denied"]
    assert denial and "invalid bearer token" in denial[0].reason  # type: ignore[attr-defined]
    assert denial[0].method == "/tokenyard.v1.Admin/ListInstances"  # type: ignore[attr-defined]
    assert kube.token_reviews == 1


async def test_the_api_server_down_refuses_fail_closed_and_is_not_cached(kube: LoopbackKubeAPI,
                                                                         tmp_path: Path) -> None:
    async with Control({"token_review": {"api_url": kube.host, "roles": ROLES, "timeout_s": 1}}, tmp_path) as found:
        assert await found.call(ONCALL, *LIST) == grpc.StatusCode.OK
        reviewer = found.auth.reviewer
        assert reviewer is not None
        kube.stop()
        assert await found.call(PLATFORM, *LIST) == grpc.StatusCode.UNAUTHENTICATED
        assert "token review unavailable" in found.last_error
        assert await found.call(PLATFORM, *LIST) == grpc.StatusCode.UNAUTHENTICATED
        assert reviewer.stats.failures == 2  # asked again: a failure is never cached
        assert await found.call(ONCALL, *LIST) == grpc.StatusCode.OK  # answered before, within its TTL
        assert await found.call(ADMIN_TOKEN, *LIST) == grpc.StatusCode.OK  # break-glass tokens need no API server


async def test_answers_are_cached_for_the_ttl_only_in_a_bounded_cache(kube: LoopbackKubeAPI) -> None:
    now = [0.0]
    settings = TokenReviewSettings(roles=(RoleRule(frozenset({"operator"}), service_account="ops/*"),),
                                   cache_ttl_s=30.0, cache_max_entries=2)
    reviewer = TokenReviewer(settings, client.ApiClient(client.Configuration(host=kube.host)), clock=lambda: now[0])
    first = await reviewer.review(ONCALL)
    assert first.name == "system:serviceaccount:ops:oncall" and first.roles == {"operator"}
    kube.revoke_token(ONCALL)
    now[0] = 29.0
    assert (await reviewer.review(ONCALL)).roles == {"operator"}  # still cached
    assert kube.token_reviews == 1
    now[0] = 30.5
    assert (await reviewer.review(ONCALL)).refusal  # the TTL passed: asked again, and refused now
    assert kube.token_reviews == 2
    for token in (PLATFORM, NOBODY, "x" * 50):
        await reviewer.review(token)
    assert len(reviewer._cache) == 2 and reviewer.stats.reviews == 5
    assert (await reviewer.review("y" * 20_000)).refusal.startswith("bearer token longer")
    assert kube.token_reviews == 5  # an absurd token never reaches the API server
    # Audiences: a token issued for the API server is not one for tokenyard.
    narrow = TokenReviewer(TokenReviewSettings(roles=settings.roles, audiences=("tokenyard",)),
                           client.ApiClient(client.Configuration(host=kube.host)))
    kube.add_token(ONCALL, "system:serviceaccount:ops:oncall")
    assert "audiences" in (await narrow.review(ONCALL)).refusal
    kube.add_token("for-us-" + "d" * 40, "system:serviceaccount:ops:bot", audiences=("tokenyard",))
    assert (await narrow.review("for-us-" + "d" * 40)).roles == {"operator"}


def test_a_config_with_token_review_needs_no_token_file_and_bad_ones_name_the_key() -> None:
    auth = parse_control_auth({"token_review": {"roles": ROLES, "cache_ttl_s": 10}}, "127.0.0.1", "control")
    assert len(auth.load_tokens()) == 0 and auth.token_review is not None and auth.token_review.cache_ttl_s == 10
    assert auth.load_reviewer() is auth.load_reviewer()
    cases = [
        ({"roles": []}, "control.token_review.roles: expected at least one"),
        ({"roles": [{"service_account": "oncall", "roles": ["admin"]}]},
         "control.token_review.roles[0].service_account: expected NAMESPACE/NAME"),
        ({"roles": [{"group": "g", "user": "u", "roles": ["admin"]}]}, "expected exactly one of service_account"),
        ({"roles": [{"group": "g", "roles": ["root"]}]}, "control.token_review.roles[0].roles: unknown role 'root'"),
        ({"roles": ROLES, "cache_ttl_s": 3600}, "control.token_review.cache_ttl_s: expected at most 600"),
        ({"roles": ROLES, "ttl": 1}, "control.token_review"),
    ]
    for section, needle in cases:
        with pytest.raises(ConfigError) as info:
            parse_control_auth({"token_review": section}, "127.0.0.1", "control")
        assert needle in str(info.value), str(info.value)
    with pytest.raises(ConfigError, match="token_review"):
        parse_control_auth({}, "127.0.0.1", "control")


def test_principal_without_roles_may_nothing() -> None:
    assert not Principal("system:serviceaccount:a:b", frozenset()).may("viewer")
    assert TokenTable([(token_digest(ADMIN_TOKEN), Principal("x"))]).principal(ADMIN_TOKEN) is not None
    asyncio.run(asyncio.sleep(0))


async def test_a_router_with_token_review_counts_its_checks_in_metrics(kube: LoopbackKubeAPI, tmp_path: Path) -> None:
    import httpx

    from tests.test_router_support import running_router

    doc = {"control": {"host": "127.0.0.1", "port": 0, "token_review": {"api_url": kube.host, "roles": ROLES}}}
    async with running_router([], doc=doc) as server, httpx.AsyncClient() as http:
        address = f"127.0.0.1:{server.router.control_server.bound_port}"
        for token in (ONCALL, ONCALL, "forged-" + "q" * 40):
            async with control_channel(address, token) as channel:
                stub = admin_pb2_grpc.AdminStub(channel)  # type: ignore[no-untyped-call]
                try:
                    await stub.ListInstances(admin_pb2.ListInstancesRequest(), timeout=10)
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
        text = (await http.get(server.url + "/metrics")).text
    for outcome, value in (("reviewed", 2), ("cache_hit", 1), ("refused", 1), ("failed", 0)):
        assert f'tokenyard_control_token_reviews_total{{outcome="{outcome}"}} {value}.0' in text, text[-800:]
