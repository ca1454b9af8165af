"""Security of the control plane: tokens, roles, TLS, tenant keys on Pick, what may register.

Real grpc.aio servers on loopback called with the generated stubs; the denial log is read
from the real logging records.
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import yaml

from router.admin_grpc import start_control_server
from router.auth import (
    ControlAuth,
    Principal,
    TokenTable,
    control_channel,
    parse_control_auth,
    token_digest,
    write_token_file,
)
from router.discovery import AdminRegistration
from router.registry import InstanceRegistry
from router.state import InstanceRecord
from scheduler.types import Decision, RequestInfo
from tokenyard.config import ConfigError
from tokenyard.logs import RateLimitedLog
from tokenyard.v1 import admin_pb2, admin_pb2_grpc, picker_pb2, picker_pb2_grpc

TOKENS = {"admin": "admin-token-aaaaaaaaaaaaaaaa", "viewer": "viewer-token-bbbbbbbbbbbbbbb",
          "operator": "operator-token-ccccccccccccc", "picker": "picker-token-dddddddddddddd"}


def table() -> TokenTable:
    return TokenTable([(token_digest(tok), Principal(f"p-{role}", frozenset({role}))) for role, tok in TOKENS.items()])


class Control:
    def __init__(self, auth: ControlAuth, tenant_for_api_key: object = None) -> None:
        self.auth = auth
        self.registry = InstanceRegistry()
        self.registration = AdminRegistration(sweep_interval_s=0.05)
        self.decisions: list[RequestInfo] = []
        self.tenant_for_api_key = tenant_for_api_key

    async def decide(self, info: RequestInfo) -> Decision:
        self.decisions.append(info)
        return Decision(instance_ids=tuple(sorted(r.instance_id for r in self.registry.records())))

    async def __aenter__(self) -> Control:
        await self.registry.start()
        await self.registration.start(self.registry)
        self.server = await start_control_server(
            "127.0.0.1", 0, registry=self.registry, store=None, decide=self.decide, registration=self.registration,
            auth=self.auth, tenant_for_api_key=self.tenant_for_api_key)  # type: ignore[arg-type]
        self.address = f"127.0.0.1:{self.server.bound_port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop(0)
        await self.registration.stop()
        await self.registry.close()


def reg(instance_id: str, url: str, worker: str = "") -> admin_pb2.RegisterInstanceRequest:
    return admin_pb2.RegisterInstanceRequest(instance=admin_pb2.InstanceRegistration(
        instance_id=instance_id, url=url, model="llama-3-8b", worker_address=worker))


async def code_of(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_no_wrong_and_valid_token(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="router.auth")
    async with Control(ControlAuth.with_tokens(table())) as c:
        async with grpc.aio.insecure_channel(c.address) as bare:
            stub = admin_pb2_grpc.AdminStub(bare)
            # No token: every method of both services is refused, the registry untouched.
            assert await code_of(stub.RegisterInstance(reg("evil", "http://127.0.0.1:9"))) == \
                grpc.StatusCode.UNAUTHENTICATED
            assert await code_of(stub.DrainInstance(admin_pb2.DrainInstanceRequest(instance_id="x"))) == \
                grpc.StatusCode.UNAUTHENTICATED
            assert await code_of(picker_pb2_grpc.PickerStub(bare).Pick(picker_pb2.PickRequest(model="m"))) == \
                grpc.StatusCode.UNAUTHENTICATED
        async with control_channel(c.address, "not-a-token-of-this-router") as wrong:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await admin_pb2_grpc.AdminStub(wrong).PutPolicy(admin_pb2.PutPolicyRequest())
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "unknown bearer token" in (err.value.details() or "")
        assert "evil" not in c.registry
        async with control_channel(c.address, TOKENS["admin"]) as good:
            assert await code_of(admin_pb2_grpc.AdminStub(good).RegisterInstance(
                reg("ok", "http://127.0.0.1:9"))) == grpc.StatusCode.OK
        assert "ok" in c.registry
    denials = [r for r in caplog.records if r.getMessage() == "control call denied"]
    assert denials, "a denied call must be logged"
    text = " ".join(str(r.__dict__) for r in caplog.records)
    assert "not-a-token-of-this-router" not in text and TOKENS["admin"] not in text  # tokens never logged


async def test_roles_decide_what_a_principal_may_call() -> None:
    async with Control(ControlAuth.with_tokens(table())) as c:
        c.registry.upsert(InstanceRecord(
            "e1", "http://127.0.0.1:9", "llama-3-8b"))
        expected = {
            # role: (ListInstances, DrainInstance, PutPolicy, Pick)
            "viewer": (grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.PERMISSION_DENIED,
                       grpc.StatusCode.PERMISSION_DENIED),
            "operator": (grpc.StatusCode.OK, grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED,
                         grpc.StatusCode.PERMISSION_DENIED),
            "picker": (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.PERMISSION_DENIED,
                       grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.OK),
            # admin may do everything; PutPolicy gets past auth and fails on the missing store.
            "admin": (grpc.StatusCode.OK, grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.OK),
        }
        policy = admin_pb2.SloPolicy(tenant="t", ttft_slo_ms=1, tpot_slo_ms=1)
        for role, codes in expected.items():
            async with control_channel(c.address, TOKENS[role]) as channel:
                admin = admin_pb2_grpc.AdminStub(channel)
                got = (await code_of(admin.ListInstances(admin_pb2.ListInstancesRequest())),
                       await code_of(admin.DrainInstance(admin_pb2.DrainInstanceRequest(instance_id="e1"))),
                       await code_of(admin.PutPolicy(admin_pb2.PutPolicyRequest(policy=policy))),
                       await code_of(picker_pb2_grpc.PickerStub(channel).Pick(picker_pb2.PickRequest(model="llama-3-8b"))))
            assert got == codes, role


async def test_pick_takes_the_tenants_key_not_a_tenant_name() -> None:
    keys = {"sk-acme-key": "acme", "sk-globex-key": "globex"}
    async with Control(ControlAuth.with_tokens(table()), tenant_for_api_key=keys.get) as c:
        c.registry.upsert(InstanceRecord(
            "e1", "http://127.0.0.1:9", "llama-3-8b"))
        async with control_channel(c.address, TOKENS["picker"]) as channel:
            picker = picker_pb2_grpc.PickerStub(channel)
            # A bare tenant name without its key: refused (it used to be taken as given).
            assert await code_of(picker.Pick(picker_pb2.PickRequest(model="llama-3-8b", tenant="acme"))) == \
                grpc.StatusCode.UNAUTHENTICATED
            # One tenant's key naming another tenant: refused.
            assert await code_of(picker.Pick(picker_pb2.PickRequest(
                model="llama-3-8b", tenant="globex", api_key="sk-acme-key"))) == grpc.StatusCode.PERMISSION_DENIED
            reply = await picker.Pick(picker_pb2.PickRequest(model="llama-3-8b", api_key="sk-globex-key",
                                                             session_id="s-1"))
            assert reply.tenant == "globex" and c.decisions[-1].tenant == "globex"


async def test_registration_refuses_https_credentials_and_foreign_networks() -> None:
    auth = ControlAuth.with_tokens(table(), registration_cidrs=tuple(
        ipaddress.ip_network(n) for n in ("127.0.0.0/8",)))
    async with Control(auth) as c, control_channel(c.address, TOKENS["operator"]) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        cases = [
            (reg("a", "https://127.0.0.1:8443"), grpc.StatusCode.INVALID_ARGUMENT, "https is not supported"),
            (reg("b", "http://user:pw@127.0.0.1:80"), grpc.StatusCode.INVALID_ARGUMENT, "without credentials"),
            (reg("c", "http://10.1.2.3:8000"), grpc.StatusCode.PERMISSION_DENIED, "outside the registration CIDRs"),
            (reg("d", "http://127.0.0.1:8000", worker="10.9.9.9:50051"), grpc.StatusCode.PERMISSION_DENIED,
             "instance.worker_address"),
            (reg("e", "http://no-such-host.invalid:8000"), grpc.StatusCode.PERMISSION_DENIED, "does not resolve"),
        ]
        for request, code, text in cases:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await admin.RegisterInstance(request)
            assert err.value.code() == code and text in (err.value.details() or ""), err.value.details()
        await admin.RegisterInstance(reg("ok", "http://localhost:8000", worker="127.0.0.1:50051"))
        assert [r.instance_id for r in c.registry.records()] == ["ok"]


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=30)
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make a certificate")
async def test_tls_when_configured(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    write_token_file(tmp_path / "tokens.yaml", "ops", ["viewer"])
    token = yaml.safe_load((tmp_path / "tokens.yaml").read_text())["tokens"][0]["token"]
    auth = parse_control_auth({"tokens_file": str(tmp_path / "tokens.yaml"),
                               "tls": {"cert_file": str(cert), "key_file": str(key)}}, "0.0.0.0", "control")
    async with Control(auth) as c:
        async with control_channel(c.address, token, ca_file=str(cert), server_name="localhost") as channel:
            listed = await admin_pb2_grpc.AdminStub(channel).ListInstances(admin_pb2.ListInstancesRequest(), timeout=10)
            assert list(listed.instances) == []
        async with grpc.aio.insecure_channel(c.address) as plain:  # plaintext to a TLS port: no answer
            assert await code_of(admin_pb2_grpc.AdminStub(plain).ListInstances(
                admin_pb2.ListInstancesRequest(), timeout=5)) == grpc.StatusCode.UNAVAILABLE


def test_control_config_is_secure_by_default(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tokens_file"):
        parse_control_auth({}, "127.0.0.1", "r.yaml: control")
    with pytest.raises(ConfigError, match="r.yaml: control.host: 0.0.0.0 is not a loopback address"):
        parse_control_auth({"tokens_file": "t.yaml"}, "0.0.0.0", "r.yaml: control")
    assert parse_control_auth({"tokens_file": "t.yaml", "allow_plaintext": True}, "0.0.0.0", "c").tls is None
    with pytest.raises(ConfigError, match=r"registration_cidrs\[0\]: expected a CIDR"):
        parse_control_auth({"tokens_file": "t", "registration_cidrs": ["ten/8"]}, "127.0.0.1", "c")
    bad = tmp_path / "bad.yaml"
    for text, message in [("tokens: []", "expected {tokens"), ("tokens: [{principal: a, token: short}]", "16"),
                          ("tokens: [{principal: a, token: 0123456789abcdef, roles: [root]}]", "unknown role 'root'"),
                          ("tokens: [{principal: a, token_sha256: xyz}]", "64 hex digits"), ("{", "not valid YAML")]:
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            TokenTable.from_file(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        TokenTable.from_file(tmp_path / "missing.yaml")


def test_tokens_from_a_secret_mount_and_as_digests(tmp_path: Path) -> None:
    mount = tmp_path / "secret"
    (mount / "..2026_01_01").mkdir(parents=True)  # what the kubelet puts next to the keys
    (mount / "envoy").write_text("envoy-token-0123456789\n")
    (mount / "envoy.roles").write_text("picker\n")
    (mount / "ops").write_text("ops-token-0123456789ab")
    tokens = TokenTable.from_dir(mount)
    assert tokens.principal("envoy-token-0123456789") == Principal("envoy", frozenset({"picker"}))
    assert tokens.principal("ops-token-0123456789ab") == Principal("ops", frozenset({"admin"}))
    assert tokens.principal("envoy") is None and len(tokens) == 2
    digest_file = tmp_path / "d.yaml"
    digest_file.write_text(f"tokens: [{{principal: ci, roles: [viewer], token_sha256: {token_digest('x' * 20)}}}]")
    principal = TokenTable.from_file(digest_file).principal("x" * 20)
    assert principal is not None and principal.may("viewer") and not principal.may("operator")


def test_rate_limited_log_counts_what_it_held_back(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limited = RateLimitedLog(logging.getLogger("t.rl"), interval_s=10.0, max_keys=2, monotonic=lambda: now[0])
    caplog.set_level(logging.INFO, logger="t.rl")
    logged = []
    for step in range(100):  # one call every 0.5 s for 50 s
        now[0] = step * 0.5
        logged.append(limited.warning("redis", "down", {"error": "refused"}))
    assert sum(logged) == 5  # at 0, 10, 20, 30, 40 s
    records = [r for r in caplog.records if r.name == "t.rl"]
    assert [getattr(r, "suppressed", 0) for r in records] == [0, 19, 19, 19, 19]
    for key in ("a", "b", "c"):  # keys are bounded: the oldest is forgotten
        limited.info(key, "x")
    assert len(limited._last) == 2


def test_front_door_off_loopback_without_keys_is_refused_unless_said_on_purpose(tmp_path: Path) -> None:
    """A router on 0.0.0.0 with no tenant keys would serve anyone as the anonymous tenant:
    refused unless `listen.allow_anonymous: true`, keys, or `anonymous: false` say otherwise."""
    from router.config import parse_router_config

    with pytest.raises(ConfigError, match=r"r.yaml: listen.host: 0.0.0.0 is not a loopback address and no tenant"):
        parse_router_config({"listen": {"host": "0.0.0.0"}}, "r.yaml")
    with pytest.raises(ConfigError, match="listen.host: :: is not a loopback"):
        parse_router_config({"listen": {"host": "::"}, "anonymous": {"slo_class": "default"}}, "r.yaml")
    assert parse_router_config({"listen": {"host": "127.0.0.1"}}, "r.yaml").anonymous_slo_class == "default"
    assert parse_router_config({"listen": {"host": "0.0.0.0", "allow_anonymous": True}}, "r.yaml").host == "0.0.0.0"
    assert parse_router_config({"listen": {"host": "0.0.0.0"}, "anonymous": False}, "r.yaml").anonymous_slo_class is None
    keyed = parse_router_config({"listen": {"host": "0.0.0.0"}, "tenants": {"a": {"api_keys": ["sk-a"]}}}, "r.yaml")
    assert keyed.anonymous_slo_class is None
    with pytest.raises(ConfigError, match="r.yaml: listen.allow_anonymous: expected true or false"):
        parse_router_config({"listen": {"host": "0.0.0.0", "allow_anonymous": "yes"}}, "r.yaml")
    # `tokenyard router --host` re-checks after the override, before anything binds.
    config = tmp_path / "router.yaml"
    config.write_text("listen: {host: 127.0.0.1, port: 8000}\n")
    result = subprocess.run([sys.executable, "-m", "cli.main", "router", "--config", str(config), "--no-native",
                             "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 2, result.stderr
    assert "tokenyard router: --host 0.0.0.0:" in result.stderr and "allow_anonymous" in result.stderr
    assert "Traceback" not in result.stderr
