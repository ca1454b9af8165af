"""Router parts on their own: config errors, CLI, load parsing and scraping, SLO headroom,
the dispatcher's candidate window, tenant policies from the store, the Picker service."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from router.app import Router
from router.config import parse_router_config
from router.dispatcher import Dispatcher, new_request_info, prefix_hashes
from router.load import UNKNOWN_KV_BLOCKS, LoadMonitor, parse_vllm_metrics
from router.metrics import RouterMetrics
from router.registry import InstanceRegistry
from router.state import InstanceRecord, open_store
from router.tenants import AuthError, Tenant, TenantTable
from scheduler.dispatch import ClusterView, build_policy
from scheduler.types import InstanceState, RequestInfo
from tests.conftest import REPO_ROOT
from tests.test_router_support import emulated_engine, fake_engines, running_router
from tokenyard.config import ConfigError


@pytest.mark.parametrize(("doc", "where", "expected"), [
    ({"listn": {}}, "router.yaml", "unknown key(s) listn; allowed: anonymous"),
    ({"tenants": {"acme": {"api_keys": ["k"], "slo_class": "gold"}}}, "router.yaml: tenants.acme.slo_class",
     "expected one of batch, default, interactive"),
    ({"tenants": {"a": {"api_keys": ["k"]}, "b": {"api_keys": ["k"]}}}, "router.yaml: tenants.b.api_keys[0]",
     "already belongs to tenant 'a'"),
    ({"policies": {"p": {"scorers": ["fastest"]}}}, "router.yaml: policies.p",
     "unknown scorer 'fastest'; known:"),
    ({"dispatch": {"by_slo_class": {"batch": "nope"}}}, "router.yaml: dispatch.by_slo_class.batch",
     "unknown policy 'nope'; known: default"),
    ({"retries": {"max_attempts": 0}}, "router.yaml: retries.max_attempts", "expected a value >= 1"),
    ({"store": "postgres://x"}, "router.yaml: store", "expected file:///abs/path.json or redis://"),
    ({"discovery": {"static": [{"url": "127.0.0.1:8000", "model": "m"}]}},
     "router.yaml: discovery.static[0].url", "expected http://host:port"),
    ({"metrics": {"plugin_sample_every": -1}}, "router.yaml: metrics.plugin_sample_every", "expected a value >= 0"),
    ({"metrics": {"plugin_sample": 4}}, "router.yaml: metrics", "plugin_sample"),
])
def test_config_errors_name_the_file_the_key_path_and_what_is_allowed(doc: dict, where: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_router_config(doc, "router.yaml")
    assert info.value.where.startswith(where), info.value.where
    assert expected in str(info.value)


def test_plugin_latency_sampling_is_configured_by_metrics_plugin_sample_every() -> None:
    from router.admission import PluginMetrics

    assert parse_router_config({}, "r.yaml").plugin_sample_every == 16
    every_4 = Router(parse_router_config({"metrics": {"plugin_sample_every": 4}}, "r.yaml"))
    observers = {id(p.observer) for p in every_4.dispatcher.layer.all_policies()}
    observer = every_4.dispatcher.layer.all_policies()[0].observer
    assert len(observers) == 1 and isinstance(observer, PluginMetrics) and observer.sample_every == 4
    assert [observer.sample() for _ in range(8)] == [False, False, False, True] * 2
    off = Router(parse_router_config({"metrics": {"plugin_sample_every": 0}}, "r.yaml"))
    assert all(p.observer is None for p in off.dispatcher.layer.all_policies())


def test_config_defaults_and_deadlines() -> None:
    config = parse_router_config({"deadlines_ms": {"batch": 1234}}, "r.yaml")
    assert config.deadline_s("batch") == pytest.approx(1.234)
    assert config.deadline_s("interactive") == 30.0  # 10 x 1 s TTFT SLO, floored at 30 s
    # Non-streaming: the first byte comes after the last token; 2 x TPOT SLO per token.
    assert config.deadline_s("interactive", stream=False, max_output_tokens=100) == pytest.approx(30.0 + 20.0)
    assert config.anonymous_slo_class == "default"
    keyed = parse_router_config({"tenants": {"a": {"api_keys": ["k"]}}}, "r.yaml")
    assert keyed.anonymous_slo_class is None  # keys configured: no anonymous access


def test_cli_refuses_a_bad_config_with_the_key_path(tmp_path: Path) -> None:
    config = tmp_path / "router.yaml"
    config.write_text("listen: {port: 8000}\ndispatch: {max_candidates: -3}\n")
    result = subprocess.run([sys.executable, "-m", "cli.main", "router", "--config", str(config)],
                            capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert result.returncode == 2
    assert f"{config}: dispatch.max_candidates: expected a value >= 0" in result.stderr


def test_parse_vllm_metrics_current_and_deprecated_names() -> None:
    current = parse_vllm_metrics(
        '# HELP vllm:num_requests_running x\nvllm:num_requests_running{model_name="m"} 3.0\n'
        'vllm:num_requests_waiting{model_name="m"} 2.0\nvllm:kv_cache_usage_perc{model_name="m"} 0.25\n'
        'vllm:cache_config_info{block_size="32",num_gpu_blocks="4000",model_name="m"} 1.0\n'
        'vllm:gpu_cache_usage_perc{model_name="m"} 0.9\n')
    assert (current.running, current.waiting, current.kv_usage) == (3, 2, 0.25)  # current name wins
    assert (current.kv_blocks_total, current.block_size_tokens) == (4000, 32)
    old = parse_vllm_metrics('vllm:num_requests_running{model_name="m"} 1\n'
                             'vllm:gpu_cache_usage_perc{model_name="m"} 0.5\nvllm:num_requests_waiting 7\n')
    assert (old.running, old.waiting, old.kv_usage, old.kv_blocks_total) == (1, 7, 0.5, None)


async def test_scrape_of_a_real_emulated_engine_and_of_an_old_vllm() -> None:
    registry = InstanceRegistry()
    monitor = LoadMonitor(registry, RouterMetrics(), timeout_s=2.0)
    async with emulated_engine("llama-3-8b", "A100-80GB") as engine:
        registry.upsert(InstanceRecord("emu", engine.base_url, "llama-3-8b"))
        assert await monitor.scrape_once("emu", engine.base_url)
        state = registry.get("emu")[1]
        assert state.kv_blocks_total == engine.engine.core.num_kv_blocks
        assert state.block_size_tokens == 16 and state.updated_s > 0
    with fake_engines(("--metrics-names", "old")) as (old,):
        registry.upsert(old.record("old"))
        assert await monitor.scrape_once("old", old.url)
        assert registry.get("old")[1].kv_blocks_total == UNKNOWN_KV_BLOCKS
    assert not await monitor.scrape_once("old", old.url)  # the engine is gone: a failed scrape
    await monitor.stop()


def test_slo_headroom_prefers_the_faster_gpu_and_the_shorter_queue() -> None:
    policy = build_policy({"scorers": [{"slo_headroom": {"ttft_slo_ms": {"interactive": 500}}}]})
    request = RequestInfo("r", "llama-3-8b", input_tokens=2000, slo_class="interactive")
    a100 = InstanceState("a100", "llama-3-8b", gpu="A100-80GB", running=8)
    h100 = InstanceState("h100", "llama-3-8b", gpu="H100-80GB", running=8)
    assert policy.decide(ClusterView([a100, h100]), request).instance_id == "h100"
    h100.waiting = 20  # a long queue on the fast GPU tips it over
    assert policy.decide(ClusterView([a100, h100]), request).instance_id == "a100"
    full = InstanceState("full", "llama-3-8b", gpu="H100-80GB", kv_blocks_total=1000, kv_blocks_used=1000)
    free = InstanceState("free", "llama-3-8b", gpu="A100-80GB", kv_blocks_total=1000, kv_blocks_used=0)
    decision = policy.decide(ClusterView([full, free]), request)
    assert decision.instance_id == "free"
    unknown = InstanceState("odd", "llama-3-8b", gpu="TPU-v9")
    assert policy.decide(ClusterView([unknown]), request).instance_id == "odd"
    with pytest.raises(ValueError, match="ttft_slo_ms.gold"):
        build_policy({"scorers": [{"slo_headroom": {"ttft_slo_ms": {"gold": -1}}}]})


def test_dispatcher_window_falls_back_to_a_full_scan_and_indexes_by_model() -> None:
    registry = InstanceRegistry()
    for i in range(100):
        registry.upsert(InstanceRecord(f"i{i:03d}", f"http://127.0.0.1:{1000 + i}", "llama-3-8b", draining=i != 99))
    registry.upsert(InstanceRecord("q", "http://127.0.0.1:2000", "qwen2.5-1.5b"))
    dispatcher = Dispatcher(parse_router_config({"dispatch": {"max_candidates": 16}}), registry)
    body = {"model": "llama-3-8b", "prompt": "p" * 200, "user": "alice"}
    info = dispatcher.request_info(body, False, Tenant("t"), "r1", None)
    assert info.session_id == "alice" and info.input_tokens == 50
    for _ in range(20):
        assert dispatcher.decide_local(info, dispatcher.policies["default"]).instance_ids == ("i099",)
    assert dispatcher.models() == ["llama-3-8b", "qwen2.5-1.5b"]
    assert dispatcher.serves("LLAMA-3-8B") and not dispatcher.serves("gpt-4")


def test_new_request_info_builds_what_the_dataclass_constructor_builds() -> None:
    """The router's RequestInfo without the frozen dataclass's __init__: equal, same hash,
    every field set (a field added to RequestInfo and not to the fast path fails here)."""
    import dataclasses

    args = ("r1", "m", 12, None, "t", "batch", "s", (1, 2), 3.5)
    fast = new_request_info(*args)
    slow = RequestInfo(request_id="r1", model="m", input_tokens=12, max_output_tokens=None, tenant="t",
                       slo_class="batch", session_id="s", prefix_hashes=(1, 2), arrival_s=3.5)
    assert type(fast) is RequestInfo and fast == slow and hash(fast) == hash(slow)
    assert dataclasses.asdict(fast) == dataclasses.asdict(slow)
    assert [f.name for f in dataclasses.fields(RequestInfo)] == [
        "request_id", "model", "input_tokens", "max_output_tokens", "tenant", "slo_class", "session_id",
        "prefix_hashes", "predicted_rank", "p_small_ok", "arrival_s"]
    assert dataclasses.replace(fast, predicted_rank=0.5).predicted_rank == 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.model = "other"  # type: ignore[misc]


@pytest.mark.parametrize("anonymous", [False, True])
def test_authenticate_by_the_exact_header_answers_as_the_parsed_lookup(anonymous: bool) -> None:
    """TenantTable's dict of exact `Bearer KEY` headers gives what parsing the header gives."""
    keys = {"a": ["sk-a", " sk-pad ", "sk-\u00e9", "sk-\u20ac", "sk two"], "b": ["sk-b", "sk-\u00a0"]}
    headers = [None, b"", b"Bearer", b"Bearer ", b"Bearer sk-a", b"bearer sk-a", b"BEARER  sk-a ", b"Bearer sk-b",
               b"Bearer sk-pad", b"Bearer  sk-pad ", b"Bearer sk-\xe9", b"Bearer sk-\xe2\x82\xac", b"Bearer sk two",
               b"Bearer sk-\xa0", b"Bearer sk-", b"Basic sk-a", b"Bearer sk-c", b"Bearer\tsk-a"]

    def table() -> TenantTable:
        return TenantTable([(Tenant(name), list(names)) for name, names in keys.items()],
                           anonymous=Tenant("anon") if anonymous else None)

    fast, parsed = table(), table()
    parsed._by_header.clear()
    assert fast._by_header  # the fast path is there to compare
    for header in headers:
        answers = []
        for tenants in (fast, parsed):
            try:
                answers.append(tenants.authenticate(header).name)
            except AuthError as refused:
                answers.append(f"refused: {refused}")
        assert answers[0] == answers[1], header


def test_prefix_hashes_are_stable_and_shared_by_shared_prefixes() -> None:
    base = "You are a helpful assistant. " * 10
    first, second = prefix_hashes(base + "Question one?"), prefix_hashes(base + "Another question entirely")
    shared = len(base) // 64
    assert first[:shared] == second[:shared] and len(first) >= shared
    assert prefix_hashes(base) == prefix_hashes(base)
    # Python's hash() is salted per process; these must agree across router replicas.
    out = subprocess.run([sys.executable, "-c", "from router.dispatcher import prefix_hashes; "
                          f"print(prefix_hashes({base!r})[0])"], capture_output=True, text=True, cwd=REPO_ROOT)
    assert int(out.stdout) == prefix_hashes(base)[0]


async def test_tenant_policy_from_the_store_changes_class_and_priority(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path / 'state.json'}")
    doc = {"tenants": {"acme": {"api_keys": ["sk-acme"], "slo_class": "interactive"}}}
    with fake_engines(()) as (engine,):
        async with running_router([engine.record("e0")], doc, store=store) as server, \
                httpx.AsyncClient(headers={"Authorization": "Bearer sk-acme"}) as http:
            body = {"model": "llama-3-8b", "prompt": "p", "max_tokens": 2}
            assert (await http.post(server.url + "/v1/completions", json=body)).status_code == 200
            await store.put_policy("acme", {"tenant": "acme", "slo_class": "batch", "ttft_slo_ms": 0,
                                            "tpot_slo_ms": 0, "priority": 7, "dispatch_policy": "default"})
            await server.router.apply_policies()
            assert server.router.tenants.tenants["acme"].slo_class == "batch"
            assert (await http.post(server.url + "/v1/completions", json=body)).status_code == 200
            await store.delete_policy("acme")
            await server.router.apply_policies()
            assert server.router.tenants.tenants["acme"].slo_class == "interactive"
            assert (await engine.stats())["priorities"] == [0, 7]


async def test_picker_grpc_answers_with_the_routers_decision(tmp_path: Path) -> None:
    from tokenyard.v1 import picker_pb2, picker_pb2_grpc

    records = [InstanceRecord("busy", "http://127.0.0.1:1", "llama-3-8b"),
               InstanceRecord("idle", "http://127.0.0.1:2", "llama-3-8b")]
    from router.auth import control_channel, write_token_file

    token = write_token_file(tmp_path / "tokens.yaml", "envoy", ["picker"])
    router = Router(parse_router_config({"control": {"port": 0, "tokens_file": str(tmp_path / "tokens.yaml")}},
                                        "r.yaml"),
                    store=open_store(f"file://{tmp_path / 'state.json'}"))
    await router.start(background=False)
    try:
        for record in records:
            router.registry.upsert(record)
        for _ in range(3):
            router.registry.inflight_started("busy")
        port = router.control_server.bound_port
        async with control_channel(f"127.0.0.1:{port}", token) as channel:
            stub = picker_pb2_grpc.PickerStub(channel)
            reply = await stub.Pick(picker_pb2.PickRequest(request_id="r1", model="llama-3-8b"), timeout=10)
        assert "idle" in str(reply)
        assert str(reply).index("idle") < str(reply).index("busy")
    finally:
        await router.stop()


def test_cli_router_with_two_workers_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    import os
    import signal
    import time

    from tests.conftest import free_port

    with fake_engines(()) as (engine,):
        port = free_port()
        config = tmp_path / "router.yaml"
        config.write_text(f"listen: {{port: {port}}}\nstore: file://{tmp_path / 'state.json'}\n"
                          f"discovery: {{static: [{{url: '{engine.url}', model: llama-3-8b, id: e0}}]}}\n")
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", "router", "--config", str(config),
                                 "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                cwd=REPO_ROOT)
        try:
            assert proc.stdout is not None
            pids = {proc.stdout.readline().rsplit("pid ", 1)[-1].strip(") \n") for _ in range(2)}
            assert len(pids) == 2  # two processes listening on one port
            deadline = time.monotonic() + 30
            answered = 0
            while answered < 10 and time.monotonic() < deadline:
                with httpx.Client() as http:  # a new connection each time: spread over the workers
                    reply = http.post(f"http://127.0.0.1:{port}/v1/completions",
                                      json={"model": "llama-3-8b", "prompt": "p", "max_tokens": 2})
                if reply.status_code == 200:
                    answered += 1
            assert answered == 10
            os.kill(proc.pid, signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


async def test_load_follows_the_worker_status_stream_when_an_engine_offers_it() -> None:
    import asyncio

    from sim.emulated_engine import EmulatedEngine, EmulatedEngineConfig
    from sim.engine_http import EngineServer

    engine = EmulatedEngine(EmulatedEngineConfig(gpu="H100-80GB", model="llama-3-8b", time_scale=0.0))
    server = EngineServer(engine, "127.0.0.1", 0, grpc_port=0)
    await server.start()
    try:
        record = InstanceRecord("w0", server.base_url, "llama-3-8b", gpu="H100-80GB",
                                grpc_address=server.grpc_address)
        async with running_router([record], {"load": {"scrape_interval_s": 0.05}}, background=True) as router:
            state = router.router.registry.get("w0")[1]
            for _ in range(400):
                if state.kv_blocks_total:
                    break
                await asyncio.sleep(0.025)
            assert state.kv_blocks_total == engine.core.num_kv_blocks  # from Describe/Status, not a scrape
            assert "w0" in router.router.load._workers
            scrape_errors = router.router.metrics.scrape_errors
            assert not any(s.labels.get("instance") == "w0" for m in scrape_errors.collect() for s in m.samples)
    finally:
        await server.stop()


def test_policy_is_chosen_per_tenant_then_per_slo_class() -> None:
    doc = {"policies": {"default": {"scorers": ["least_outstanding"]}, "headroom": {"scorers": ["slo_headroom"]},
                        "pinned": {"scorers": []}},
           "dispatch": {"by_slo_class": {"interactive": "headroom"}}}
    dispatcher = Dispatcher(parse_router_config(doc), InstanceRegistry())
    assert dispatcher.policy_name(Tenant("a", "interactive")) == "headroom"
    assert dispatcher.policy_name(Tenant("b", "batch")) == "default"
    assert dispatcher.policy_name(Tenant("c", "interactive", policy="pinned")) == "pinned"
    scorer = dispatcher.policies["headroom"].scorers[0][0]
    assert scorer.ttft_slo_s["interactive"] == 1.0  # the router's SLO classes reach the scorer
