"""`tokenyard instances migrate` end to end: a router with migration enabled in its policy
document and its control port open, two emulated engines that speak the Worker service
(worker tokens), streams in flight on the source. The operator's move goes through the
router's migration loop (whose own thresholds are set so it never moves anything by
itself), the CLI waits for the outcome, the client's stream continues unbroken on the
destination; refusals say why with their exit codes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from cli.admin_errors import EXIT_NOT_FOUND, EXIT_REFUSED
from cli.main import main
from router.auth import write_token_file
from router.state import InstanceRecord, cordon_note
from sim.engine_http import EngineServer
from tests.test_migration import engine
from tests.test_migration_router import chat_body, parse, records, sse
from tests.test_router_support import running_router
from tokenyard.worker_auth import write_worker_token

KV_BLOCKS = 60
MAX_TOKENS = 200
# The loop's own policy never finds a destination (none keeps a reserve that large), so only
# the operator moves.
NEVER_BY_ITSELF = {"enabled": True, "interval_s": 0.05, "params": {"destination_reserve_blocks": 1_000_000}}


async def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def _collect(client: httpx.AsyncClient, url: str, request_id: str) -> tuple[list[str], dict[str, int] | None]:
    async with client.stream("POST", url + "/v1/chat/completions", json=chat_body(MAX_TOKENS),
                             headers={"x-request-id": request_id}) as response:
        assert response.status_code == 200
        texts, usage, _ = parse([line async for line in sse(response)])
    return texts, usage


def _doc(tmp_path: Path, migration: dict[str, Any] | None) -> tuple[dict[str, Any], Path]:
    tokens = tmp_path / "control-tokens.yaml"
    write_token_file(tokens, "oncall", ["operator"])
    doc: dict[str, Any] = {"load": {"scrape_interval_s": 0.05, "worker_token_file": str(tmp_path / "worker-token")},
                           "control": {"host": "127.0.0.1", "port": 0, "tokens_file": str(tokens)},
                           # the CLI runs in a thread of this process: on a loaded machine its
                           # imports can hold the engines' event loop past the 1 s default
                           "retries": {"connect_timeout_s": 10.0}}
    if migration is not None:
        doc["policy"] = {"migration": migration}
    return doc, tokens


async def test_an_operator_moves_a_running_request_and_the_stream_goes_on(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    token = write_worker_token(tmp_path / "worker-token")
    servers = [EngineServer(engine(name, engine={"num_kv_blocks": KV_BLOCKS}), "127.0.0.1", 0, grpc_port=0,
                            worker_token=token) for name in ("src", "dst")]
    for srv in servers:
        await srv.start()
    src, dst = servers
    doc, tokens = _doc(tmp_path, NEVER_BY_ITSELF)
    try:
        async with running_router(records(servers)[:1], doc=doc, background=True) as server, \
                httpx.AsyncClient(timeout=30) as client:
            router = server.router
            flags = ("--address", f"127.0.0.1:{router.control_server.bound_port}", "--token-file", str(tokens))
            streams = [asyncio.ensure_future(_collect(client, server.url, f"req-{i}")) for i in range(2)]
            while src.engine.core.num_running < 2:
                await asyncio.sleep(0.01)
            router.registry.upsert(records(servers)[1])
            await asyncio.sleep(0.2)  # a load scrape of dst, so the loop sees it healthy
            code, out, err = await _cli(capsys, "instances", "migrate", "--from", "src", "--reason", "INC-3",
                                        "-o", "json", *flags)
            assert code == 0, (out, err)
            moved = json.loads(out)
            assert moved["committed"] and moved["state"] == "COMMITTED" and moved["error"] == ""
            assert moved["from"] == "src" and moved["to"] == "dst" and moved["request_id"] in ("req-0", "req-1")
            assert moved["blocks_copied"] > 0 and moved["duration_ms"] > 0
            assert router.migration is not None and router.migration.stats.committed == 1
            assert router.migration.busy == set()
            # A named request that is not running there: NOT_FOUND, with what could move.
            code, _, err = await _cli(capsys, "instances", "migrate", "--from", "src", "--request", "ghost", *flags)
            assert code == EXIT_NOT_FOUND and "'ghost' is not running" in err
            # A cordoned destination takes no move in; none left to pick.
            router.registry.set_cordon("dst", cordon_note("t", "hold"))
            code, _, err = await _cli(capsys, "instances", "migrate", "--from", "src", "--to", "dst", *flags)
            assert code == EXIT_REFUSED and "cordoned" in err
            code, _, err = await _cli(capsys, "instances", "migrate", "--from", "src", *flags)
            assert code == EXIT_REFUSED and "no destination" in err
            code, _, err = await _cli(capsys, "instances", "migrate", "--from", "src", "--to", "src", *flags)
            assert code == EXIT_REFUSED and "is the source" in err
            code, _, err = await _cli(capsys, "instances", "migrate", "--from", "nowhere", *flags)
            assert code == EXIT_NOT_FOUND and "'nowhere' is not registered" in err
            router.registry.upsert(InstanceRecord("plain", "http://127.0.0.1:9", "llama-3-8b"))
            code, _, err = await _cli(capsys, "instances", "migrate", "--from", "plain", *flags)
            assert code == EXIT_REFUSED and "no Worker address" in err
            results = await asyncio.wait_for(asyncio.gather(*streams), 25)
            for texts, usage in results:  # both clients got their whole answer, once
                assert len(texts) == MAX_TOKENS and usage is not None and usage["completion_tokens"] == MAX_TOKENS
            assert router.splicer.stats.migrations_spliced == 1
            metrics = (await client.get(server.url + "/metrics")).text
            assert 'tokenyard_router_migrations_total{outcome="committed",reason="operator"} 1.0' in metrics
    finally:
        for srv in servers:
            await srv.stop()


async def test_migrate_is_refused_when_migration_is_off(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_worker_token(tmp_path / "worker-token")
    doc, tokens = _doc(tmp_path, None)
    async with running_router([InstanceRecord("a", "http://127.0.0.1:9", "m", grpc_address="127.0.0.1:8")],
                              doc=doc) as server:
        flags = ("--address", f"127.0.0.1:{server.router.control_server.bound_port}", "--token-file", str(tokens))
        code, _, err = await _cli(capsys, "instances", "migrate", "--from", "a", *flags)
        assert code == EXIT_REFUSED and "migration is not enabled" in err
