"""End to end through the router with the official openai client: real engines on loopback.

The emulated engines (sim/) serve the model tiers; the fake engine (bench/peers) is used
where a test needs byte-exact output or a knob (held streams, the flat error shape).
"""

from __future__ import annotations

import socket

import httpx
import openai
import pytest

from router.state import InstanceRecord
from tests.test_router_support import emulated_engine, fake_engines, running_router

TENANTS = {
    "tenants": {
        "acme": {"api_keys": ["sk-acme"], "slo_class": "interactive"},
        "nightly": {"api_keys": ["sk-nightly"], "slo_class": "batch"},
    },
    "limits": {"max_request_bytes": 20_000},
}


async def test_openai_client_streaming_and_not_over_a_heterogeneous_fleet() -> None:
    async with emulated_engine("qwen2.5-1.5b", "L4") as slm, emulated_engine("llama-3-8b", "A100-80GB") as llm:
        records = [InstanceRecord("slm-0", slm.base_url, "qwen2.5-1.5b", gpu="L4"),
                   InstanceRecord("llm-0", llm.base_url, "llama-3-8b", gpu="A100-80GB")]
        async with running_router(records, TENANTS) as server:
            client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="sk-acme", max_retries=0)
            models = await client.models.list()
            assert sorted(m.id for m in models.data) == ["llama-3-8b", "qwen2.5-1.5b"]

            reply = await client.chat.completions.create(
                model="qwen2.5-1.5b", messages=[{"role": "user", "content": "hello there"}], max_tokens=6)
            assert reply.choices[0].message.content
            assert reply.usage is not None and reply.usage.completion_tokens == 6

            stream = await client.chat.completions.create(
                model="llama-3-8b", messages=[{"role": "user", "content": "stream please"}], max_tokens=5,
                stream=True, stream_options={"include_usage": True})
            pieces, usage = [], None
            async for chunk in stream:
                if chunk.choices:
                    pieces.append(chunk.choices[0].delta.content or "")
                if chunk.usage is not None:
                    usage = chunk.usage
            assert "".join(pieces)
            assert usage is not None and usage.completion_tokens == 5

            completion = await client.completions.create(model="llama-3-8b", prompt="Once upon", max_tokens=4)
            assert completion.choices[0].text
            text_stream = await client.completions.create(model="qwen2.5-1.5b", prompt="Once", max_tokens=3,
                                                          stream=True)
            texts = [c.choices[0].text async for c in text_stream if c.choices]
            assert len(texts) >= 1

            # Both tiers were used, each by its own model's requests.
            served = {s.instance_id: s for s in server.router.registry.instances()}
            assert served["slm-0"].router_inflight == 0 and served["llm-0"].router_inflight == 0
            async with httpx.AsyncClient() as http:
                metrics = (await http.get(server.url + "/metrics")).text
            assert 'tokenyard_router_requests_total{code="200",model="qwen2.5-1.5b",tenant="acme"}' in metrics


async def test_relayed_stream_bytes_equal_the_engine_bytes() -> None:
    with fake_engines(()) as (engine,):
        async with running_router([engine.record("e0")], {"dispatch": {"forward_priority": False}}) as server:
            body = {"model": "llama-3-8b", "messages": [{"role": "user", "content": "x"}], "max_tokens": 12,
                    "stream": True, "stream_options": {"include_usage": True}}
            async with httpx.AsyncClient() as client:
                direct = await client.post(engine.url + "/v1/chat/completions", json=body)
                relayed = await client.post(server.url + "/v1/chat/completions", json=body)
            assert relayed.status_code == 200
            assert relayed.content == direct.content
            assert relayed.content.endswith(b"data: [DONE]\n\n")
            assert b'"usage"' in relayed.content
            assert relayed.headers["content-type"].startswith("text/event-stream")


async def test_error_shapes_401_400_413_404() -> None:
    with fake_engines(()) as (engine,):
        async with running_router([engine.record("e0")], TENANTS) as server:
            bad_key = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
            with pytest.raises(openai.AuthenticationError) as info:
                await bad_key.chat.completions.create(model="llama-3-8b", messages=[{"role": "user", "content": "x"}])
            assert info.value.status_code == 401
            assert info.value.body["code"] == "invalid_api_key"  # type: ignore[index]

            auth = {"Authorization": "Bearer sk-acme"}
            async with httpx.AsyncClient(headers=auth) as client:
                missing = await client.post(server.url + "/v1/chat/completions", json={"model": "llama-3-8b"})
                no_key = await client.post(server.url + "/v1/completions", json={"model": "x", "prompt": "y"},
                                           headers={"Authorization": ""})
                invalid = await client.post(server.url + "/v1/completions", content=b'{"model": ')
                negative = await client.post(server.url + "/v1/completions",
                                             json={"model": "llama-3-8b", "prompt": "p", "max_tokens": -1})
                huge = await client.post(server.url + "/v1/completions",
                                         json={"model": "llama-3-8b", "prompt": "p" * 30_000})
                unknown = await client.post(server.url + "/v1/completions", json={"model": "gpt-9", "prompt": "p"})
            assert no_key.status_code == 401
            assert missing.status_code == 400
            assert missing.json()["error"]["param"] == "messages"
            assert "'messages' is required" in missing.json()["error"]["message"]
            assert invalid.status_code == 400 and "invalid JSON" in invalid.json()["error"]["message"]
            assert negative.status_code == 400 and negative.json()["error"]["param"] == "max_tokens"
            assert huge.status_code == 413 and "20000 bytes" in huge.json()["error"]["message"]
            assert unknown.status_code == 404 and "llama-3-8b" in unknown.json()["error"]["message"]
            for response in (missing, invalid, negative, huge, unknown, no_key):
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}
            assert (await engine.stats())["requests_total"] == 0  # none of them reached the engine


@pytest.mark.parametrize("shape", ["flat", "nested"])
async def test_engine_errors_come_back_nested(shape: str) -> None:
    with fake_engines(("--error-shape", shape)) as (engine,):
        async with running_router([engine.record("e0")]) as server:
            client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
            with pytest.raises(openai.BadRequestError) as info:
                await client.completions.create(model="llama-3-8b", prompt="FAKE_ENGINE_ERROR")
            assert info.value.status_code == 400
            body = info.value.body
            assert isinstance(body, dict) and "engine says no" in body["message"]
            async with httpx.AsyncClient() as http:
                raw = (await http.post(server.url + "/v1/completions",
                                       json={"model": "llama-3-8b", "prompt": "FAKE_ENGINE_ERROR"})).json()
            assert set(raw) == {"error"} and raw["error"]["code"] == 400


async def test_priority_of_the_slo_class_is_forwarded() -> None:
    with fake_engines(()) as (engine,):
        async with running_router([engine.record("e0")], TENANTS) as server:
            for key in ("sk-acme", "sk-nightly"):
                client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
                await client.completions.create(model="llama-3-8b", prompt="p", max_tokens=2)
            # A client cannot jump the queue with its own priority.
            await client.completions.create(model="llama-3-8b", prompt="p", max_tokens=2, extra_body={"priority": -5})
            assert (await engine.stats())["priorities"] == [0, 2, 2]  # interactive, batch, batch


async def test_nodelay_and_first_chunk_before_stream_end_on_kept_alive_connection() -> None:
    with fake_engines(("--hold-first",)) as (engine,):
        async with running_router([engine.record("e0")]) as server, httpx.AsyncClient(
                limits=httpx.Limits(max_connections=1)) as client:
            # A first request leaves the client's connection kept alive; the stream reuses it.
            warm = await client.get(server.url + "/v1/models")
            assert warm.status_code == 200
            body = {"model": "llama-3-8b", "prompt": "p", "max_tokens": 4, "stream": True}
            async with client.stream("POST", server.url + "/v1/completions", json=body) as response:
                lines = response.aiter_lines()
                first = await anext(lines)
                while not first:
                    first = await anext(lines)
                # The engine is still holding the rest of the stream: this chunk was relayed alone.
                assert first.startswith("data: {") and '"t0 "' in first
                client_sockets = server.client_sockets()
                assert client_sockets
                for sock in client_sockets:
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
                upstream = server.router.pools.get(engine.url).connections()
                assert upstream
                for conn in upstream:
                    sock = conn.transport.get_extra_info("socket")
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
                httpx.post(engine.url + "/fake/release")
                rest = [line async for line in lines if line]
            assert rest[-1] == "data: [DONE]"
            assert len(server.client_sockets()) == 1  # the same kept-alive connection throughout
