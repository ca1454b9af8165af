"""Tenants' API keys: salted hashes only, and created / rotated / revoked through the CLI
against a real control plane, effective in two router replicas (real HTTP, real Redis at
127.0.0.1:6379 under a unique prefix, and the SQLite file) within a second."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from cli.main import main
from router.admin_grpc import start_control_server
from router.auth import ControlAuth, Principal, TokenTable, token_digest, write_token_file
from router.keys import KeyStore, key_id_of, new_key, verify
from router.registry import InstanceRegistry
from router.state import RedisStateStore, open_store
from scheduler.types import Decision, RequestInfo
from tests.test_router_support import fake_engines, running_router

REDIS_URL = "redis://127.0.0.1:6379/0"


def test_only_a_salted_hash_is_kept() -> None:
    api_key, record = new_key("acme")
    assert verify(api_key, record) and key_id_of(api_key) == record.key_id
    secret = api_key.split(".", 1)[1]
    assert secret not in record.to_json() and api_key not in record.to_json()
    assert not verify(api_key[:-1] + ("A" if api_key[-1] != "A" else "B"), record)
    other_key, other = new_key("acme")
    assert other.salt != record.salt and not verify(other_key, record)
    assert not verify("sk-not-ours", record)


async def eventually(cond: Callable[[], object], what: str, timeout_s: float = 1.0) -> float:
    start = time.monotonic()
    while True:
        if await cond():  # type: ignore[misc]
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"not within {timeout_s}s: {what}")
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("backend", ["file", "redis"])
async def test_keys_through_the_cli_reach_both_replicas_within_a_second(
        backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TOKENYARD_CONTEXTS", str(tmp_path / "contexts.yaml"))
    prefix = f"tytest:{uuid.uuid4().hex[:10]}:"
    url = f"file://{tmp_path}/state.db" if backend == "file" else f"{REDIS_URL}?prefix={prefix}"
    token_file = tmp_path / "tokens.yaml"
    token = write_token_file(token_file, "ops", ["admin"])
    control_store = open_store(url)
    registry = InstanceRegistry(control_store)
    await registry.start()

    async def decide(info: RequestInfo) -> Decision:
        raise AssertionError("no picks here")

    control = await start_control_server(
        "127.0.0.1", 0, registry=registry, store=control_store, decide=decide,
        auth=ControlAuth.with_tokens(TokenTable([(token_digest(token), Principal("ops"))])))
    flags = ["--address", f"127.0.0.1:{control.bound_port}", "--token-file", str(token_file), "-o", "json"]

    async def cli(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = await asyncio.to_thread(main, [*argv, *flags])
        out, err = capsys.readouterr()
        return code, out, err

    body = {"model": "llama-3-8b", "prompt": "p", "max_tokens": 2}
    # A configured key, so that an unknown key is refused (not the anonymous tenant).
    doc = {"tenants": {"globex": {"api_keys": ["sk-globex-configured"]}}}
    try:
        with fake_engines(()) as (engine,):
            async with running_router([engine.record("e0")], doc, store=open_store(url), background=True) as a, \
                    running_router([engine.record("e0")], doc, store=open_store(url), background=True) as b, \
                    httpx.AsyncClient() as http:

                def works(key: str, want: int) -> Callable[[], object]:
                    async def check() -> bool:
                        codes = [(await http.post(s.url + "/v1/completions", json=body,
                                                  headers={"Authorization": f"Bearer {key}"})).status_code
                                 for s in (a, b)]
                        return codes == [want, want]
                    return check

                assert await works("ty-0123456789ab." + "x" * 43, 401)()  # type: ignore[operator]
                code, out, err = await cli("keys", "create", "acme")
                assert code == 0 and "not shown again" in err
                created = json.loads(out)
                first_key = created["api_key"]
                took = await eventually(works(first_key, 200), "the new key accepted by both replicas")
                assert took < 1.0
                assert a.router.tenants.tenants["acme"].slo_class == "default"

                code, out, _ = await cli("keys", "rotate", created["key_id"], "--yes")
                second_key = json.loads(out)["api_key"]
                await eventually(works(first_key, 401), "the rotated-out key refused by both replicas")
                await eventually(works(second_key, 200), "the rotated-in key accepted by both replicas")

                code, out, _ = await cli("keys", "list", "--tenant", "acme")
                listed = json.loads(out)
                assert [(k["key_id"] == created["key_id"], bool(k["revoked"])) for k in listed] == [
                    (True, True), (False, False)]
                assert "api_key" not in out and second_key.split(".", 1)[1] not in out

                code, _, _ = await cli("keys", "revoke", key_id_of(second_key) or "", "--yes")
                assert code == 0
                await eventually(works(second_key, 401), "the revoked key refused by both replicas")
                code, _, err = await cli("keys", "revoke", "000000000000", "--yes")
                assert code == 5 and "does not exist" in err
                code, _, err = await cli("keys", "create", "bad name")
                assert code == 3 and "tenant: expected a tenant name" in err

        # The store holds hashes only: no secret of either key appears in it.
        stored = " ".join(r.to_json() for r in await KeyStore(control_store).all())
        for key in (first_key, second_key):
            assert key.split(".", 1)[1] not in stored
    finally:
        await control.stop(grace=None)
        await registry.close()
        if isinstance(control_store, RedisStateStore):
            await control_store.delete_all()
        await control_store.close()
