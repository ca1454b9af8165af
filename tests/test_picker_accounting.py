"""Picker gRPC decisions are dispatches like HTTP ones: the profile sees `on_dispatch`, and
the pick counts in flight on its instance for a lease (a gateway reports no finish)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import router.app as app_module
from router.app import Router
from router.auth import control_channel, write_token_file
from router.config import parse_router_config
from router.state import InstanceRecord, open_store
from tokenyard.v1 import picker_pb2, picker_pb2_grpc


async def test_picks_call_on_dispatch_and_count_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_module, "PICK_INFLIGHT_LEASE_S", 0.3)
    token = write_token_file(tmp_path / "tokens.yaml", "gateway", ["picker"])
    doc = {"control": {"port": 0, "tokens_file": str(tmp_path / "tokens.yaml")},
           "policy": {"profiles": {"default": {"scorers": [], "picker": "round_robin"}}}}
    router = Router(parse_router_config(doc, "r.yaml"), store=open_store(f"file://{tmp_path / 'state.json'}"))
    await router.start(background=False)
    try:
        for name in ("a", "b", "c"):
            router.registry.upsert(InstanceRecord(name, f"http://127.0.0.1:{ord(name)}", "llama-3-8b"))
        async with control_channel(f"127.0.0.1:{router.control_server.bound_port}", token) as channel:
            stub = picker_pb2_grpc.PickerStub(channel)
            chosen = []
            for n in range(3):
                reply = await stub.Pick(picker_pb2.PickRequest(request_id=f"r{n}", model="llama-3-8b"), timeout=10)
                chosen.append(reply.endpoints[0].instance_id)
        assert chosen == ["a", "b", "c"]  # round-robin advanced: each pick was reported as a dispatch
        assert [router.registry.get(i)[1].router_inflight for i in "abc"] == [1, 1, 1]
        await asyncio.sleep(0.5)
        assert [router.registry.get(i)[1].router_inflight for i in "abc"] == [0, 0, 0]  # the lease ran out
    finally:
        await router.stop()


def splitting_target(prompts: list[str]) -> float:
    """A quality target whose threshold (packaged tier model) falls between these prompts'
    scores, so some go small and some large whatever the model ranks first."""
    from scheduler.predictors.tier import load_predictor

    predictor = load_predictor()
    scores = sorted(predictor.score(p) for p in prompts)
    rows = sorted(predictor.thresholds, key=lambda r: r.threshold)
    return next(r.pgr for r in rows if scores[0] < r.threshold <= scores[-1])


async def test_pick_resolves_the_tier_alias_with_the_front_doors_decision(tmp_path: Path) -> None:
    """A PickRequest for `auto` with its prompt: the tier and model answered are the ones
    `TierResolver` decides for that text (the HTTP front door's call); without a prompt
    the request is unscored and goes large; a concrete model is not tiered."""
    small, large = "qwen2.5-1.5b", "llama-3-8b"
    prompts = ["What is 2+2?", "Write a haiku about autumn.",
               "Prove that there are infinitely many primes, step by step, and explain each step.",
               "Which of the following is NOT a noble gas?\nA. Neon\nB. Argon\nC. Nitrogen\nD. Xenon"]
    token = write_token_file(tmp_path / "tokens.yaml", "gateway", ["picker"])
    doc = {"control": {"port": 0, "tokens_file": str(tmp_path / "tokens.yaml")},
           "tenants": {"t": {"api_keys": ["sk-t"]}, "thrifty": {"api_keys": ["sk-thrifty"]}},
           "tiers": {"alias": "auto", "small_model": small, "large_model": large, "policy": "quality_only",
                     "default": {"quality_target": splitting_target(prompts)},
                     "tenants": {"thrifty": {"cost_budget": 0.0}}}}
    router = Router(parse_router_config(doc, "r.yaml"), store=open_store(f"file://{tmp_path / 'state.json'}"))
    await router.start(background=False)
    try:
        router.registry.upsert(InstanceRecord("s1", "http://127.0.0.1:7001", small))
        router.registry.upsert(InstanceRecord("l1", "http://127.0.0.1:7002", large))
        tiers = router.tiers
        assert tiers is not None
        threshold = tiers.router.default.normal
        async with control_channel(f"127.0.0.1:{router.control_server.bound_port}", token) as channel:
            stub = picker_pb2_grpc.PickerStub(channel)
            seen = set()
            for n, prompt in enumerate(prompts):
                reply = await stub.Pick(picker_pb2.PickRequest(request_id=f"r{n}", model="auto", api_key="sk-t",
                                                               prompt=prompt), timeout=10)
                expected = small if tiers.predictor.score(prompt) >= threshold else large
                assert (reply.model, reply.endpoints[0].model) == (expected, expected)
                assert reply.tier == ("small" if expected == small else "large")
                assert reply.reason.startswith("quality_only: p_small_ok")
                seen.add(expected)
            assert seen == {small, large}
            thrifty = await stub.Pick(picker_pb2.PickRequest(model="auto", api_key="sk-thrifty", prompt=prompts[2]),
                                      timeout=10)
            assert (thrifty.model, thrifty.tier) == (small, "small")
            unscored = await stub.Pick(picker_pb2.PickRequest(model="auto", api_key="sk-t"), timeout=10)
            assert (unscored.model, unscored.tier) == (large, "large")
            direct = await stub.Pick(picker_pb2.PickRequest(model=small, api_key="sk-t", prompt=prompts[2]), timeout=10)
            assert (direct.model, direct.tier) == (small, "")
    finally:
        await router.stop()
