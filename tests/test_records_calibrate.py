"""`tokenyard calibrate --from ROUTER_RECORDS.jsonl` on live records: a router in front of a
real emulated engine (HTTP, timed in real time by the engine model under factors we chose),
real streamed traffic at several concurrencies and prompt lengths, the router's request
records, then the calibration: its error drops and its fitted factors move from the
packaged ones toward those the engine really ran with."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
from pathlib import Path

import httpx
import pytest

from cli.main import main
from router.state import InstanceRecord
from scheduler.catalog import default_catalog
from scheduler.engine_model import factors_for
from tests.test_router_support import running_router

GPU, MODEL = "A100-80GB", "llama-3-8b"
LEVELS = ((1, 20), (2, 300), (4, 20), (8, 300), (12, 20), (16, 150))  # (clients, prompt words)


async def _one(client: httpx.AsyncClient, prompt_words: int, output_tokens: int) -> None:
    body = {"model": MODEL, "stream": True, "max_tokens": output_tokens, "ignore_eos": True,
            "messages": [{"role": "user", "content": " ".join(["tide"] * prompt_words)}]}
    async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
        assert reply.status_code == 200
        async for _ in reply.aiter_bytes():
            pass


async def test_calibrate_from_live_router_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sim.emulated_engine import EmulatedEngine, EmulatedEngineConfig
    from sim.engine_http import EngineServer

    packaged = factors_for(default_catalog().gpu(GPU))
    # The deployment is slower than our table says: a heavier fixed step and weaker HBM.
    true = dataclasses.replace(packaged, iteration_overhead_s=packaged.iteration_overhead_s * 4,
                               memory_efficiency=packaged.memory_efficiency * 0.6)
    factors = tmp_path / "true-factors.json"
    factors.write_text(json.dumps({"gpus": {GPU: true.as_dict()}, "default": packaged.as_dict()}))
    engine = EngineServer(EmulatedEngine(EmulatedEngineConfig(gpu=GPU, model=MODEL, time_scale=1.0,
                                                              factors_file=str(factors))), "127.0.0.1", 0)
    await engine.start()
    records = tmp_path / "records.jsonl"
    rng = random.Random(7)
    try:
        async with running_router([InstanceRecord("e0", f"http://127.0.0.1:{engine.port}", MODEL, gpu=GPU)],
                                  {"records": {"path": str(records)}}) as server, \
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=60) as client:
            # Closed loops of `concurrency` clients, each sending its next request when the
            # last one ends: the steady state the engine model's serving TPOT describes
            # (new prompts keep joining the running batch). Prompt length varies by level.
            for concurrency, prompt_words in LEVELS:
                async def client_loop(concurrency: int = concurrency, words: int = prompt_words) -> None:
                    for _ in range(max(2, 4 // concurrency)):
                        await _one(client, words, rng.randint(40, 56))

                await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    finally:
        await engine.stop()
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    assert rows and all(r["status"] == 200 and r["first_token_s"] is not None for r in rows)
    out = tmp_path / "fitted.json"
    code = main(["calibrate", "--from", str(records), "--gpu", GPU, "--model", MODEL, "--write", str(out), "--json"])
    assert code == 0, capsys.readouterr().err
    fit = json.loads(out.read_text())
    (tpot,) = [e for e in fit["errors"] if e["metric"] == "tpot"]
    assert tpot["median_ape_pct_after"] < 0.5 * tpot["median_ape_pct_before"], tpot
    fitted = fit["gpus"][GPU]
    for name in fit["fitted"]:  # each fitted factor went from the packaged value toward the true one
        start, end, goal = getattr(packaged, name), fitted[name], getattr(true, name)
        if name in ("iteration_overhead_s", "memory_efficiency"):
            assert abs(end - goal) < abs(start - goal), (name, start, end, goal)
    assert "iteration_overhead_s" in fit["fitted"] or "memory_efficiency" in fit["fitted"]
