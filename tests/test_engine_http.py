"""The emulated engine's HTTP API against real clients (httpx, the official openai package)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sim.emulated_engine import EmulatedEngine, EmulatedEngineConfig
from sim.engine_core import EngineConfig
from sim.engine_http import EngineServer
from tests.conftest import REPO_ROOT, free_port

MODEL = "llama-3-8b"
LONG_TEXT = " ".join(f"word{i % 50} of a long shared system prompt" for i in range(120))


@contextlib.asynccontextmanager
async def serve(time_scale: float = 0.0, **engine_kwargs: Any) -> AsyncIterator[EngineServer]:
    extra = {k: engine_kwargs.pop(k) for k in ("output_len_dist", "max_request_body_bytes", "seed") if k in engine_kwargs}
    engine = EmulatedEngine(
        EmulatedEngineConfig(engine=EngineConfig(**engine_kwargs), time_scale=time_scale, **extra)
    )
    server = EngineServer(engine, "127.0.0.1", 0)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def openai_client(server: EngineServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=20)


async def metric_families(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/metrics")
    assert response.status_code == 200
    return {f.name: f for f in text_string_to_metric_families(response.text)}


def sample(families: dict[str, Any], family: str, suffix: str = "", **labels: str) -> float:
    name = family + suffix
    for s in families[family].samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    raise AssertionError(f"no sample {name} {labels} in {families[family].samples[:3]}")


# ----------------------------------------------------------------- well-formed answers
async def test_openai_client_non_streaming_chat_and_completions() -> None:
    async with serve(output_len_dist="fixed:7") as server:
        client = openai_client(server)
        chat = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Tell me about KV caches."}], max_tokens=20
        )
        assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-")
        assert chat.model == MODEL
        choice = chat.choices[0]
        assert choice.message.role == "assistant" and choice.message.content
        assert choice.finish_reason == "stop"  # the distribution's 7 tokens, under max_tokens
        assert chat.usage is not None and chat.usage.completion_tokens == 7
        assert chat.usage.total_tokens == chat.usage.prompt_tokens + 7
        assert chat.usage.prompt_tokens > 8  # the template's markers plus the words

        completion = await client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5)
        assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
        assert completion.choices[0].finish_reason == "length"
        assert completion.usage is not None and completion.usage.completion_tokens == 5
        assert completion.usage.prompt_tokens == 5  # BOS + 4 words
        await client.close()


async def test_openai_client_streaming_chat_and_completions_with_usage() -> None:
    async with serve(output_len_dist="fixed:9") as server:
        client = openai_client(server)
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Stream please."}], max_tokens=50,
            stream=True, stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        assert chunks[0].choices[0].delta.role == "assistant"
        content = [c for c in chunks if c.choices and c.choices[0].delta.content]
        assert len(content) == 9
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        usage_chunk = chunks[-1]
        assert usage_chunk.choices == [] and usage_chunk.usage is not None
        assert usage_chunk.usage.completion_tokens == 9
        assert all(c.usage is None for c in chunks[:-1])

        stream = await client.completions.create(
            model=MODEL, prompt="Count with me", max_tokens=4, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        texts = [c for c in chunks if c.choices]
        assert len(texts) == 4 and texts[-1].choices[0].finish_reason == "length"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
        assert chunks[-1].usage.prompt_tokens == 4
        await client.close()


async def test_raw_sse_framing_and_done_marker() -> None:
    async with serve(output_len_dist="fixed:3") as server, httpx.AsyncClient(base_url=server.base_url) as client:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            raw = (await response.aread()).decode()
        events = raw.split("\n\n")
        assert events[-1] == "" and events[-2] == "data: [DONE]"
        payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
        assert all(e.startswith("data: ") for e in events[:-1])
        assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert all(p["object"] == "chat.completion.chunk" and p["id"] == payloads[0]["id"] for p in payloads)
        assert payloads[-1]["choices"][0]["finish_reason"] == "stop"
        assert "usage" not in payloads[-1]  # no include_usage: no usage anywhere

        body = {"model": MODEL, "prompt": "hi", "stream": True, "max_tokens": 2,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
        async with client.stream("POST", "/v1/completions", json=body) as response:
            raw = (await response.aread()).decode()
        payloads = [json.loads(e.removeprefix("data: ")) for e in raw.split("\n\n")[:-2]]
        assert [p["usage"]["completion_tokens"] for p in payloads] == [1, 2, 2]


async def test_same_request_same_text_and_seed_changes_it() -> None:
    async with serve(output_len_dist="uniform:5:40") as server, httpx.AsyncClient(base_url=server.base_url) as client:
        body = {"model": MODEL, "prompt": "Deterministic please", "max_tokens": 100}
        first = (await client.post("/v1/completions", json=body)).json()
        again = (await client.post("/v1/completions", json=body)).json()
        assert first["choices"][0]["text"] == again["choices"][0]["text"]
        assert first["usage"] == again["usage"]
        seeded = (await client.post("/v1/completions", json={**body, "seed": 99})).json()
        assert seeded["choices"][0]["text"] != first["choices"][0]["text"]
        # Streaming gives the same text as the non-streaming answer.
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            raw = (await response.aread()).decode()
        streamed = "".join(
            json.loads(e.removeprefix("data: "))["choices"][0]["text"] for e in raw.split("\n\n")[:-2]
        )
        assert streamed == first["choices"][0]["text"]


async def test_output_length_header_ignore_eos_and_min_tokens() -> None:
    async with serve(output_len_dist="fixed:10") as server, httpx.AsyncClient(base_url=server.base_url) as client:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 30}
        answer = (await client.post("/v1/completions", json=body, headers={"x-tokenyard-output-tokens": "17"})).json()
        assert answer["usage"]["completion_tokens"] == 17
        answer = (await client.post("/v1/completions", json=body, headers={"x-tokenyard-output-tokens": "90"})).json()
        assert answer["usage"]["completion_tokens"] == 30 and answer["choices"][0]["finish_reason"] == "length"
        answer = (await client.post("/v1/completions", json={**body, "ignore_eos": True})).json()
        assert answer["usage"]["completion_tokens"] == 30
        answer = (await client.post("/v1/completions", json={**body, "min_tokens": 20})).json()
        assert answer["usage"]["completion_tokens"] == 20
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 30,
                "max_completion_tokens": 6, "ignore_eos": True}
        answer = (await client.post("/v1/chat/completions", json=chat)).json()
        assert answer["usage"]["completion_tokens"] == 6  # max_completion_tokens wins, as in vLLM
        bad = await client.post("/v1/completions", json=body, headers={"x-tokenyard-output-tokens": "many"})
        assert bad.status_code == 400 and "x-tokenyard-output-tokens" in bad.json()["error"]["message"]


async def test_token_id_prompts_give_exact_lengths_and_prefix_hits() -> None:
    async with serve() as server, httpx.AsyncClient(base_url=server.base_url) as client:
        shared = list(range(1000, 1064))  # four full 16-token blocks
        first = await client.post("/v1/completions", json={"prompt": [*shared, 1, 2, 3], "max_tokens": 5},
                                  headers={"x-tokenyard-output-tokens": "4"})
        assert first.json()["usage"] == {"prompt_tokens": 67, "total_tokens": 71, "completion_tokens": 4,
                                         "prompt_tokens_details": None}
        before = await metric_families(client)
        await client.post("/v1/completions", json={"prompt": [*shared, 7, 8], "max_tokens": 2})
        after = await metric_families(client)
        hits = sample(after, "vllm:prefix_cache_hits", "_total") - sample(before, "vllm:prefix_cache_hits", "_total")
        assert hits == 64
        other = await client.post("/v1/completions", json={"prompt": [*shared, 1, 2, 4], "max_tokens": 5},
                                  headers={"x-tokenyard-output-tokens": "4"})
        assert other.json()["choices"][0]["text"] != first.json()["choices"][0]["text"]


async def test_models_and_health() -> None:
    async with serve() as server:
        client = openai_client(server)
        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL]
        assert models.data[0].owned_by == "vllm"
        await client.close()
        async with httpx.AsyncClient(base_url=server.base_url) as http:
            health = await http.get("/health")
            assert health.status_code == 200 and health.content == b""
            assert (await http.get("/v1/models")).json()["data"][0]["max_model_len"] == 8192
            assert (await http.get("/nowhere")).status_code == 404
            assert (await http.get("/v1/completions")).status_code == 405


# ----------------------------------------------------------------- metrics
async def test_metrics_have_vllm_names_labels_and_move_under_load() -> None:
    async with serve(time_scale=0.5, output_len_dist="fixed:40") as server, \
            httpx.AsyncClient(base_url=server.base_url, timeout=20) as client:
        before = await metric_families(client)
        expected = {
            "vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
            "vllm:kv_cache_usage_perc": "gauge", "vllm:cache_config_info": "gauge",
            "vllm:prefix_cache_queries": "counter", "vllm:prefix_cache_hits": "counter",
            "vllm:num_preemptions": "counter", "vllm:prompt_tokens": "counter",
            "vllm:generation_tokens": "counter", "vllm:request_success": "counter",
            "vllm:time_to_first_token_seconds": "histogram", "vllm:inter_token_latency_seconds": "histogram",
            "vllm:request_time_per_output_token_seconds": "histogram",
            "vllm:e2e_request_latency_seconds": "histogram", "vllm:request_queue_time_seconds": "histogram",
        }
        for name, kind in expected.items():
            assert before[name].type == kind, name
            assert all(s.labels.get("model_name") == MODEL for s in before[name].samples), name
        info = before["vllm:cache_config_info"].samples[0]
        assert info.labels["block_size"] == "16"
        assert int(info.labels["num_gpu_blocks"]) == server.engine.core.num_kv_blocks
        assert sample(before, "vllm:num_requests_running") == 0

        body = {"model": MODEL, "messages": [{"role": "system", "content": LONG_TEXT},
                                             {"role": "user", "content": "first"}], "max_tokens": 100}
        tasks = [asyncio.create_task(client.post("/v1/chat/completions", json=body)) for _ in range(6)]
        during = None
        for _ in range(400):
            await asyncio.sleep(0.01)
            families = await metric_families(client)
            if sample(families, "vllm:num_requests_running") >= 1:
                during = families
                break
        assert during is not None, "running never rose above 0 while 6 requests were in flight"
        assert sample(during, "vllm:kv_cache_usage_perc") > 0
        answers = [(await t).json() for t in tasks]
        after = await metric_families(client)
        generated = sum(a["usage"]["completion_tokens"] for a in answers)
        assert sample(after, "vllm:generation_tokens", "_total") == generated == 240
        prompt = sum(a["usage"]["prompt_tokens"] for a in answers)
        assert sample(after, "vllm:prompt_tokens", "_total") == prompt
        assert sample(after, "vllm:time_to_first_token_seconds", "_count") == 6
        assert sample(after, "vllm:inter_token_latency_seconds", "_count") == 6 * 39
        assert sample(after, "vllm:e2e_request_latency_seconds", "_count") == 6
        assert sample(after, "vllm:request_success", "_total", finished_reason="stop") == 6
        assert sample(after, "vllm:num_requests_running") == 0
        # The same system prompt again: its blocks come from the prefix cache.
        hits_before = sample(after, "vllm:prefix_cache_hits", "_total")
        await client.post("/v1/chat/completions", json={**body, "messages": [body["messages"][0],
                                                                          {"role": "user", "content": "second"}]})
        final = await metric_families(client)
        assert sample(final, "vllm:prefix_cache_hits", "_total") - hits_before >= 16 * 20
        assert sample(final, "vllm:prefix_cache_queries", "_total") > sample(after, "vllm:prefix_cache_queries", "_total")


async def test_reported_tpot_grows_with_batch_and_ttft_with_prompt_length() -> None:
    # Loose shape checks on the engine's own histograms (no timing thresholds): modelled
    # decode for llama-3-8b on an A100 is ~15 ms per token alone and ~33 ms at 48 in a
    # batch; a 2400-token prefill takes ~4x a 300-token one.
    async with serve(time_scale=1.0, output_len_dist="fixed:25") as server, \
            httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
        async def itl_mean(concurrency: int) -> float:
            before = await metric_families(client)
            body = {"model": MODEL, "prompt": "Measure me", "max_tokens": 25}
            await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(concurrency)))
            after = await metric_families(client)
            count = sample(after, "vllm:inter_token_latency_seconds", "_count") - sample(
                before, "vllm:inter_token_latency_seconds", "_count")
            total = sample(after, "vllm:inter_token_latency_seconds", "_sum") - sample(
                before, "vllm:inter_token_latency_seconds", "_sum")
            assert count == concurrency * 24
            return total / count

        alone = await itl_mean(1)
        batched = await itl_mean(48)
        assert batched > 1.3 * alone, (alone, batched)

        async def ttft(words: int) -> float:
            before = await metric_families(client)
            await client.post("/v1/completions", json={"model": MODEL, "prompt": "go " * words, "max_tokens": 1})
            after = await metric_families(client)
            return sample(after, "vllm:time_to_first_token_seconds", "_sum") - sample(
                before, "vllm:time_to_first_token_seconds", "_sum")

        short = await ttft(300)
        long = await ttft(2400)
        assert long > 2 * short, (short, long)


# ----------------------------------------------------------------- scheduling
async def test_priority_request_queued_later_finishes_earlier() -> None:
    async with serve(time_scale=0.2, max_num_seqs=1, scheduling_policy="priority") as server, \
            httpx.AsyncClient(base_url=server.base_url, timeout=20) as client:
        engine = server.engine
        finished: list[str] = []

        async def run(name: str, priority: int, tokens: int) -> None:
            body = {"model": MODEL, "prompt": f"request {name}", "max_tokens": 100, "priority": priority}
            response = await client.post("/v1/completions", json=body,
                                         headers={"x-tokenyard-output-tokens": str(tokens)})
            assert response.status_code == 200, response.text
            finished.append(name)

        blocker = asyncio.create_task(run("blocker", 0, 60))
        while engine.load().running < 1:
            await asyncio.sleep(0.005)
        low = asyncio.create_task(run("low", 10, 3))
        while engine.load().waiting < 1:
            await asyncio.sleep(0.005)
        high = asyncio.create_task(run("high", -5, 3))
        while engine.load().waiting < 2 and not blocker.done():
            await asyncio.sleep(0.005)
        assert not blocker.done(), "the blocker finished before both requests were queued"
        await asyncio.gather(blocker, low, high)
        assert finished == ["blocker", "high", "low"]


async def test_fcfs_engine_rejects_a_priority_like_vllm() -> None:
    async with serve() as server, httpx.AsyncClient(base_url=server.base_url) as client:
        response = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "priority": 3})
        assert response.status_code == 400
        assert response.json()["error"]["message"] == "Got priority 3 but Priority scheduling is not enabled."
        ok = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "priority": 0})
        assert ok.status_code == 200


async def test_client_disconnect_aborts_the_request() -> None:
    async with serve(time_scale=0.1) as server, httpx.AsyncClient(base_url=server.base_url, timeout=20) as client:
        engine = server.engine
        body = {"model": MODEL, "prompt": "a long answer", "max_tokens": 4000, "ignore_eos": True, "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as response:
            lines = response.aiter_lines()
            while not (await anext(lines)).startswith("data: "):
                pass
            assert engine.load().running == 1
        # Leaving the block closes the connection with the body unread.
        for _ in range(500):
            if engine.load().running == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.load().running == 0 and engine.load().kv_blocks_used == 0
        families = await metric_families(client)
        assert sample(families, "vllm:request_success", "_total", finished_reason="abort") == 1

        # Non-streaming too: the client gives up (timeout) and the engine lets go.
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/v1/completions", json={**body, "stream": False}, timeout=0.3)
        for _ in range(500):
            if engine.load().running == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.load().running == 0


async def test_stop_does_not_wait_for_a_long_stream() -> None:
    server = EngineServer(EmulatedEngine(EmulatedEngineConfig(time_scale=1.0)), "127.0.0.1", 0)
    await server.start()
    async with httpx.AsyncClient(base_url=server.base_url, timeout=20) as client:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 8000, "ignore_eos": True, "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as response:
            lines = response.aiter_lines()
            while not (await anext(lines)).startswith("data: "):
                pass
            # 8000 tokens at ~15 ms would take two minutes; stop gives it 0.2 s.
            await asyncio.wait_for(server.stop(grace_s=0.2), 10)
            assert server.engine.requests_in_flight == 0
            with pytest.raises(httpx.HTTPError):
                async for _ in lines:
                    pass


async def test_a_dead_engine_loop_fails_requests_cleanly_and_health_says_so() -> None:
    async with serve(time_scale=0.2) as server, httpx.AsyncClient(base_url=server.base_url, timeout=20) as client:
        core = server.engine.core
        original = core.complete
        calls = 0

        def failing_complete(batch: Any, end_s: float) -> Any:
            nonlocal calls
            calls += 1
            if calls == 3:
                raise RuntimeError("injected fault")
            return original(batch, end_s)

        core.complete = failing_complete  # type: ignore[method-assign]
        body = {"model": MODEL, "prompt": "x", "max_tokens": 50, "ignore_eos": True}
        streamed, plain = await asyncio.gather(
            client.post("/v1/completions", json={**body, "stream": True}),
            client.post("/v1/completions", json=body),
        )
        events = streamed.text.split("\n\n")
        assert events[-2] == "data: [DONE]"
        error = json.loads(events[-3].removeprefix("data: "))["error"]
        assert error["code"] == 500 and "injected fault" in error["message"]
        assert plain.status_code == 500 and "injected fault" in plain.json()["error"]["message"]
        assert (await client.get("/health")).status_code == 503
        again = await client.post("/v1/completions", json=body)
        assert again.status_code == 500 and "engine loop died" in again.json()["error"]["message"]


# ----------------------------------------------------------------- bad requests
@pytest.mark.parametrize(
    ("path", "body", "status", "fragment", "param"),
    [
        ("/v1/chat/completions", b"{not json", 400, "JSON decode error", "body"),
        ("/v1/chat/completions", b"[1, 2]", 400, "valid dictionary", "body"),
        ("/v1/chat/completions", {"model": MODEL}, 400, "messages: Field required", "messages"),
        ("/v1/chat/completions", {"messages": "hi"}, 400, "messages: Input should be a valid list", "messages"),
        ("/v1/chat/completions", {"messages": [{"content": "x"}]}, 400, "messages[0].role", "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"},
         400, "max_tokens: Input should be a valid integer", "max_tokens"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": -3},
         400, "max_tokens must be at least 1, got -3.", "max_tokens"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens must be at least 1, got 0.",
         "max_tokens"),
        ("/v1/completions", {"max_tokens": 3}, 400, "prompt: Field required", "prompt"),
        ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream: Input should be a valid boolean",
         "stream"),
        ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400,
         "Stream options can only be defined when `stream=True`.", "stream_options"),
        ("/v1/completions", {"prompt": "x", "n": 2}, 400, "one choice per request", "n"),
        ("/v1/completions", {"prompt": ["a", "b"]}, 400, "one prompt per request", "prompt"),
        ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "The model `gpt-4` does not exist.", "model"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 8192}, 400,
         "'max_tokens' or 'max_completion_tokens' is too large: 8192. This model's maximum context length is "
         "8192 tokens and your request has 2 input tokens (8192 > 8192 - 2).", "max_tokens"),
        ("/v1/completions", {"prompt": "go " * 9000}, 400,
         "This model's maximum context length is 8192 tokens. However, your request has 9002 input tokens.",
         "input_tokens"),
    ],
)
async def test_bad_requests_get_vllm_shaped_errors(
    path: str, body: Any, status: int, fragment: str, param: str
) -> None:
    async with serve() as server, httpx.AsyncClient(base_url=server.base_url) as client:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = await client.post(path, content=content, headers={"content-type": "application/json"})
        assert response.status_code == status
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert fragment in error["message"]
        assert error["code"] == status and error["param"] == param
        assert error["type"] == ("NotFoundError" if status == 404 else "BadRequestError")


async def test_oversize_body_gets_413_and_the_openai_client_reads_our_errors() -> None:
    async with serve(max_request_body_bytes=2048) as server:
        async with httpx.AsyncClient(base_url=server.base_url) as client:
            response = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 5000})
            assert response.status_code == 413
            assert "limit of 2048 bytes (this engine's --max-request-body-bytes)" in response.json()["error"]["message"]
        client = openai_client(server)
        with pytest.raises(openai.BadRequestError) as caught:
            await client.completions.create(model=MODEL, prompt="x", max_tokens=-1)
        assert "max_tokens must be at least 1" in str(caught.value)
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
        await client.close()


# ----------------------------------------------------------------- sockets and processes
async def test_accepted_sockets_have_tcp_nodelay_on_a_kept_alive_connection() -> None:
    async with serve() as server, httpx.AsyncClient(base_url=server.base_url) as client:
        for _ in range(2):
            assert (await client.get("/health")).status_code == 200
        connections = server.connections
        assert len(connections) == 1  # both requests on one kept-alive connection
        for protocol in connections:
            sock = protocol.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


async def test_several_engines_in_one_process_serve_independently() -> None:
    async with serve(output_len_dist="fixed:2") as a, serve(output_len_dist="fixed:5") as b:
        assert a.port != b.port
        async with httpx.AsyncClient() as client:
            body = {"model": MODEL, "prompt": "x", "max_tokens": 50}
            first = (await client.post(f"{a.base_url}/v1/completions", json=body)).json()
            second = (await client.post(f"{b.base_url}/v1/completions", json=body)).json()
        assert first["usage"]["completion_tokens"] == 2 and second["usage"]["completion_tokens"] == 5


async def test_engine_server_also_serves_the_worker_grpc_service() -> None:
    import grpc

    from tokenyard.v1 import worker_pb2, worker_pb2_grpc

    engine = EmulatedEngine(EmulatedEngineConfig(model="qwen2.5-7b", gpu="L4", time_scale=0.0))
    async with EngineServer(engine, "127.0.0.1", 0, grpc_port=0) as server:
        assert server.grpc_port and server.grpc_address == f"127.0.0.1:{server.grpc_port}"
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            description = await worker_pb2_grpc.WorkerStub(channel).Describe(worker_pb2.DescribeRequest(), timeout=5)
        assert description.instance_id == engine.instance_id and description.gpu == "L4"
        async with httpx.AsyncClient(base_url=server.base_url) as client:
            assert (await client.get("/version")).json()["version"].startswith("tokenyard-emulated-")
    with pytest.raises(OSError, match="cannot listen"):
        async with EngineServer(EmulatedEngine(), "127.0.0.1", server.port) as a, \
                EngineServer(EmulatedEngine(), "127.0.0.1", a.port):
            pass


def test_cli_serves_on_uvloop_and_stops_on_sigterm() -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "--log-format", "json", "engine", "--gpu", "H100-80GB",
         "--model", "qwen2.5-7b", "--port", str(port), "--time-scale", "0", "--served-model-name", "small"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            assert time.monotonic() < deadline, "engine did not come up in 20 s"
            time.sleep(0.05)
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=10,
                            json={"model": "small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert answer.status_code == 200 and answer.json()["model"] == "small"
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=10)
    assert code == 0
    logs = process.stderr.read().decode() if process.stderr else ""
    assert '"msg": "engine ready"' in logs and "qwen2.5-7b@H100-80GB" in logs
