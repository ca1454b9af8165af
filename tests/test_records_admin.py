"""`tokenyard policy apply --dry-run=server` without `--trace`: the router's Admin
`RecentRecords` call (real gRPC on loopback, bearer tokens and roles) returns the records of
real HTTP requests it served, and the CLI replays them in the simulator under the current
and the new policy. Bounds and errors: a router without records, a bad window, roles."""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path

import grpc
import httpx
import pytest
import yaml

from cli.admin import EXIT_INVALID, EXIT_USAGE
from cli.main import main
from router.auth import control_channel
from router.state import open_store
from tests.conftest import free_port
from tests.test_router_support import fake_engines, running_router
from tokenyard.v1 import admin_pb2, admin_pb2_grpc

TOKENS = {"ops": ("admin", secrets.token_urlsafe(24)), "watcher": ("viewer", secrets.token_urlsafe(24)),
          "gateway": ("picker", secrets.token_urlsafe(24))}


def _control(tmp: Path) -> tuple[dict[str, object], dict[str, Path]]:
    tokens_file = tmp / "control-tokens.yaml"
    tokens_file.write_text(yaml.safe_dump({"tokens": [{"principal": name, "roles": [role], "token": token}
                                                      for name, (role, token) in TOKENS.items()]}))
    files = {}
    for name, (_, token) in TOKENS.items():
        files[name] = tmp / f"{name}.token"
        files[name].write_text(token + "\n")
    return {"host": "127.0.0.1", "port": free_port(), "tokens_file": str(tokens_file)}, files


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def _recent(address: str, token: str, **request: float) -> list[dict[str, object]]:
    channel = control_channel(address, token)
    try:
        stub = admin_pb2_grpc.AdminStub(channel)  # type: ignore[no-untyped-call]
        rows: list[dict[str, object]] = []
        async for chunk in stub.RecentRecords(admin_pb2.RecentRecordsRequest(**request), timeout=10):
            rows.extend(json.loads(line) for line in chunk.records_json)
        return rows
    finally:
        await channel.close()


async def test_dry_run_replays_the_routers_last_hour(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    control, token_files = _control(tmp_path)
    doc = {"records": {"path": str(tmp_path / "records.jsonl")}, "control": control,
           "tenants": {"acme": {"api_keys": ["sk-acme"], "slo_class": "default"}},
           "anonymous": {"slo_class": "default"}}
    store = open_store(f"file://{tmp_path}/state.db")
    policy = tmp_path / "acme.yaml"
    policy.write_text(yaml.safe_dump({"name": "acme", "spec": {"slo_class": "batch"}}))
    address = f"127.0.0.1:{control['port']}"
    with fake_engines(()) as (engine,):
        async with running_router([engine.record("e0")], doc, store=store) as server, \
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as client:
            for i in range(40):
                key = "sk-acme" if i % 2 else None
                reply = await client.post("/v1/chat/completions", headers={"authorization": f"Bearer {key}"} if key
                                          else {}, json={"model": "llama-3-8b", "max_tokens": 16 + i,
                                                         "messages": [{"role": "user", "content": f"question {i}"}]})
                assert reply.status_code == 200, reply.text
            await asyncio.sleep(0.3)  # the writer thread appends within milliseconds
            rows = await _recent(address, TOKENS["watcher"][1])  # a viewer may read them
            assert len(rows) == 40 and {r["tenant"] for r in rows} == {"acme", "anonymous"}
            assert len(await _recent(address, TOKENS["watcher"][1], max_records=5)) == 5  # bounded: the newest
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await _recent(address, TOKENS["gateway"][1])
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await _recent(address, TOKENS["watcher"][1], window_s=-5)
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "window_s" in (bad.value.details() or "")

            common = ["--address", address, "--token-file", str(token_files["ops"])]
            code, out, err = await cli(capsys, "policy", "apply", "-f", str(policy), "--dry-run=server", *common)
            assert code == 0, err
            assert "+slo_class: batch" in out
            assert "simulated 40 requests of the router's records of the last 1h" in out
            assert "slo_attainment" in out and "cost_usd" in out and "nothing stored" in out
            assert "every request is taken as theirs" not in out  # acme's own requests were found
            code, out, err = await cli(capsys, "policy", "apply", "-f", str(policy), "--dry-run=server",
                                       "--window", "30m", "--sim-requests", "10", *common)
            assert code == 0 and "simulated 10 requests" in out and "cut the window" in out, err
            code, _, err = await cli(capsys, "policy", "apply", "-f", str(policy), "--dry-run=server",
                                     "--window", "soon", *common)
            assert code == EXIT_USAGE and "--window: expected a duration like 1h" in err


async def test_a_router_without_records_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    control, token_files = _control(tmp_path)
    store = open_store(f"file://{tmp_path}/state.db")
    policy = tmp_path / "acme.yaml"
    policy.write_text(yaml.safe_dump({"name": "acme", "spec": {"slo_class": "batch"}}))
    async with running_router([], {"control": control}, store=store):
        address = f"127.0.0.1:{control['port']}"
        with pytest.raises(grpc.aio.AioRpcError) as none:
            await _recent(address, TOKENS["watcher"][1])
        assert none.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        code, _, err = await cli(capsys, "policy", "apply", "-f", str(policy), "--dry-run=server",
                                 "--address", address, "--token-file", str(token_files["ops"]))
        assert code == EXIT_INVALID and "keeps no request records: add a `records:" in err
