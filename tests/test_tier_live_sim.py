"""Tier routing in both drivers: the simulator decides the tier before dispatch on a
prompt-joined trace, and the router maps `model: auto` to the pools' models (real
emulated engines on loopback)."""

from __future__ import annotations

import random

import httpx
import pytest

from router.config import parse_router_config
from router.state import InstanceRecord
from scheduler.tiers import ThresholdPoint, build_tier_router
from sim.cluster import parse_cluster
from sim.simulator import simulate
from sim.tier_trace import ScoredPrompt, burst, quality, with_prompts
from sim.workload import TraceRequest
from tests.test_router_support import emulated_engine, running_router
from tokenyard.config import ConfigError

TABLE = tuple(ThresholdPoint(k / 10, k / 10, (k / 10) ** 0.5) for k in range(11))
SMALL, LARGE = "qwen2.5-1.5b", "llama-3-8b"


def _cluster(large: int = 1):
    engine = {"max_num_seqs": 32, "max_num_batched_tokens": 4096}
    return parse_cluster({
        "default_model": LARGE,
        "pools": [{"name": "small", "gpu": "L4", "model": SMALL, "count": 2, "engine": engine},
                  {"name": "large", "gpu": "A100-80GB", "model": LARGE, "count": large, "engine": engine}],
        "dispatch": {"filters": ["model", "healthy", "not_draining"], "scorers": ["least_outstanding"]},
        "slo_classes": {"default": {"ttft_ms": 1000, "tpot_ms": 200}},
    }, "t.yaml")


def _router(policy: str):
    return build_tier_router({"small_model": SMALL, "large_model": LARGE, "policy": policy,
                              "default": {"quality_target": 0.9, "quality_floor": 0.3}}, TABLE)


def _trace(n: int, gap_s: float) -> tuple[list[TraceRequest], dict[str, ScoredPrompt]]:
    rng = random.Random(3)
    prompts = [ScoredPrompt(f"prompt {k}", rng.random(), float(rng.random() < 0.6), 1.0) for k in range(50)]
    arrivals = [TraceRequest(f"r{k}", k * gap_s, 600, 150) for k in range(n)]
    joined = list(with_prompts(arrivals, prompts, seed=1))
    return [r for r, _ in joined], {r.request_id: p for r, p in joined}


def test_simulator_decides_the_tier_before_dispatch() -> None:
    requests, scored = _trace(120, 1.0)  # one request a second: an idle cluster
    assert all(r.model == "auto" and r.p_small_ok is not None for r in requests)
    served = {}
    for policy in ("always_small", "always_large", "quality_only"):
        result = simulate(_cluster(), requests, tier_router=_router(policy))
        served[policy] = {r.request_id: r.model for r in result.records}
        assert not any(r.rejected for r in result.records)
    assert set(served["always_small"].values()) == {SMALL}
    assert set(served["always_large"].values()) == {LARGE}
    normal = _router("quality_only").limits(requests[0]).normal
    for req in requests:  # idle: the decision is the threshold alone
        assert served["quality_only"][req.request_id] == (SMALL if req.p_small_ok >= normal else LARGE)
    assert quality(served["always_large"], scored, SMALL) == 1.0
    assert quality(served["quality_only"], scored, SMALL) > quality(served["always_small"], scored, SMALL)


def test_load_aware_offloads_in_a_burst_and_keeps_more_slo() -> None:
    requests, scored = _trace(300, 0.25)
    bursty = burst(requests, 3.0, 10.0, 40.0)
    assert max(r.arrival_s for r in bursty) < max(r.arrival_s for r in requests)
    outcome = {}
    for policy in ("quality_only", "load_aware"):
        result = simulate(_cluster(), bursty, tier_router=_router(policy))
        small = sum(r.model == SMALL for r in result.records)
        ttft_ok = sum(r.first_token_s is not None and r.first_token_s - r.arrival_s <= 1.0 for r in result.records)
        outcome[policy] = (small, ttft_ok)
    assert outcome["load_aware"][0] > outcome["quality_only"][0]
    assert outcome["load_aware"][1] > outcome["quality_only"][1]


def test_burst_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="factor >= 1"):
        burst([], 0.5, 0.0, 1.0)


async def test_router_maps_the_alias_to_each_tenants_tier() -> None:
    doc = {
        "tenants": {"thrifty": {"api_keys": ["sk-thrifty"]}, "picky": {"api_keys": ["sk-picky"]}},
        "tiers": {"alias": "auto", "small_model": SMALL, "large_model": LARGE, "policy": "quality_only",
                  "tenants": {"thrifty": {"cost_budget": 0.0}, "picky": {"quality_target": 1.0}}},
    }
    async with emulated_engine(SMALL, "L4") as small, emulated_engine(LARGE, "A100-80GB") as large:
        records = [InstanceRecord("s0", small.base_url, SMALL, gpu="L4"), InstanceRecord("l0", large.base_url, LARGE)]
        async with running_router(records, doc) as server, httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            for key, expected in (("sk-thrifty", SMALL), ("sk-picky", LARGE)):
                for body in ({"model": "auto", "prompt": "What is 2+2?", "max_tokens": 4},
                             {"model": "auto", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}):
                    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
                    response = await client.post(path, json=body, headers={"Authorization": f"Bearer {key}"})
                    assert response.status_code == 200, response.text
                    assert response.json()["model"] == expected
            direct = await client.post("/v1/completions", json={"model": LARGE, "prompt": "x", "max_tokens": 2},
                                       headers={"Authorization": "Bearer sk-thrifty"})
            assert direct.json()["model"] == LARGE  # only the alias is routed by tier


def test_router_config_rejects_a_bad_tiers_section() -> None:
    with pytest.raises(ConfigError, match=r"t.yaml: tiers: .*tiers.policy: unknown tier policy 'best'"):
        parse_router_config({"tiers": {"small_model": SMALL, "large_model": LARGE, "policy": "best"}}, "t.yaml")
    with pytest.raises(ConfigError, match=r"tiers.model_file: .*cannot read"):
        parse_router_config({"tiers": {"small_model": SMALL, "large_model": LARGE, "model_file": "/nope.json"}}, "t.yaml")


def test_tokenyard_up_serves_the_auto_alias() -> None:
    from cli.up import router_document

    entries = [{"url": "http://127.0.0.1:1", "model": SMALL, "gpu": "L4"}]
    config = parse_router_config(router_document(entries, "127.0.0.1", 0, "file:///tmp/x.json"), "up")
    assert config.tiers["alias"] == "auto" and config.tiers["small_model"] == SMALL
