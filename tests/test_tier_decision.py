"""The tier decision (scheduler/tiers.py): thresholds from the held-out table, load-aware
offloading in order of predicted quality loss, the reverse, config errors."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.tiers import (
    ALWAYS_LARGE,
    TIER_POLICIES,
    LoadAware,
    ThresholdPoint,
    Thresholds,
    TierClassPolicy,
    TierConfigError,
    build_tier_router,
    cascade_escalates,
    class_thresholds,
    pressure,
    threshold_for_budget,
    threshold_for_pgr,
)
from scheduler.types import InstanceState, RequestInfo, SloClass

# a held-out table: threshold t sends share t of requests large, recovering PGR sqrt(t)
TABLE = tuple(ThresholdPoint(k / 10, k / 10, (k / 10) ** 0.5) for k in range(11))
SLO = SloClass("default", ttft_slo_ms=1000.0, tpot_slo_ms=100.0)


def _router(policy: str = "load_aware", **extra: object):
    doc = {"alias": "auto", "small_model": "qwen2.5-1.5b", "large_model": "llama-3-8b", "policy": policy,
           "default": {"quality_target": 0.9, "quality_floor": 0.5}, **extra}
    return build_tier_router(doc, TABLE)


def _instances(large_waiting: int, small_waiting: int = 0) -> list[InstanceState]:
    return [
        InstanceState("big-0", "llama-3-8b", gpu="A100-80GB", waiting=large_waiting, kv_blocks_total=10_000),
        InstanceState("small-0", "qwen2.5-1.5b", gpu="L4", waiting=small_waiting, kv_blocks_total=10_000),
    ]


def _request(p: float, tenant: str = "default") -> RequestInfo:
    return RequestInfo("r", "auto", input_tokens=800, p_small_ok=p, tenant=tenant)


def test_thresholds_from_quality_and_budget() -> None:
    assert threshold_for_pgr(TABLE, 0.5) == pytest.approx(0.3)  # sqrt(0.3) = 0.548 is the first >= 0.5
    assert threshold_for_pgr(TABLE, 1.01) == ALWAYS_LARGE
    assert threshold_for_budget(TABLE, 0.25) == pytest.approx(0.2)
    limits = class_thresholds(TierClassPolicy(cost_budget=0.1, quality_floor=0.5), TABLE)
    assert limits == Thresholds(normal=pytest.approx(0.3), floor=pytest.approx(0.3))  # the floor wins over the budget


def test_pressure_is_piecewise_linear() -> None:
    assert pressure(500, 1000, 0.6, 1.0) == 0.0
    assert pressure(800, 1000, 0.6, 1.0) == pytest.approx(0.5)
    assert pressure(5000, 1000, 0.6, 1.0) == 1.0


def test_idle_cluster_routes_by_normal_threshold_and_busy_large_offloads() -> None:
    router = _router()
    rng = random.Random(0)
    idle = _instances(0)
    normal = router.limits(_request(0.5)).normal
    assert normal == pytest.approx(0.9)
    assert router.decide(_request(0.95), idle, SLO, rng).model == "qwen2.5-1.5b"
    assert router.decide(_request(0.6), idle, SLO, rng).model == "llama-3-8b"
    busy = _instances(large_waiting=400)
    assert router.load(_request(0.6), busy).large_ttft_ms > 1000
    choice = router.decide(_request(0.6), busy, SLO, rng)
    assert choice.model == "qwen2.5-1.5b" and choice.threshold == pytest.approx(router.limits(_request(0.6)).floor)
    # within the floor: a request below the floor's threshold stays large however busy
    assert router.decide(_request(0.2), busy, SLO, rng).model == "llama-3-8b"
    # the reverse: a saturated small tier sends even confident requests large
    assert router.decide(_request(0.95), _instances(0, small_waiting=2000), SLO, rng).model == "llama-3-8b"


@settings(max_examples=200, deadline=None)
@given(st.floats(0, 1), st.floats(0, 1), st.floats(0, 0.9), st.floats(0, 1))
def test_load_aware_threshold_stays_within_floor_and_moves_monotonically(
    small_p: float, large_p: float, floor: float, span: float
) -> None:
    limits = Thresholds(normal=floor + span * (1 - floor), floor=floor)
    policy = LoadAware()
    value = policy.threshold(limits, small_p, large_p)
    assert limits.floor - 1e-12 <= value <= ALWAYS_LARGE
    # more large-tier pressure never raises the threshold (offloads more, smallest loss first)
    assert policy.threshold(limits, small_p, min(1.0, large_p + 0.1)) <= value + 1e-12


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=40), st.integers(0, 600))
def test_the_small_set_is_the_highest_scores(scores: list[float], waiting: int) -> None:
    router = _router()
    rng = random.Random(0)
    instances = _instances(large_waiting=waiting)
    small = [p for p in scores if router.decide(_request(p), instances, SLO, rng).tier == "small"]
    large = [p for p in scores if p not in small]
    assert not small or not large or min(small) >= max(large)


def test_random_offload_and_fixed_policies() -> None:
    rng = random.Random(0)
    busy = _instances(large_waiting=400)
    offload = _router("random_offload")
    picks = [offload.decide(_request(0.0), busy, SLO, rng).tier for _ in range(400)]
    assert 0.55 < picks.count("small") / 400 < 0.85  # at the floor threshold 0.3, ~70% go small at random
    assert _router("always_small").decide(_request(0.0), busy, SLO, rng).tier == "small"
    assert _router("always_large").decide(_request(1.0), _instances(0), SLO, rng).tier == "large"
    assert _router("quality_only").decide(_request(0.6), busy, SLO, rng).tier == "large"
    assert {"always_large", "always_small", "quality_only", "load_aware", "random_offload", "cascade"} <= set(TIER_POLICIES)


def test_cascade_marks_the_band_between_floor_and_normal() -> None:
    router = _router("cascade")
    rng = random.Random(0)
    choice = router.decide(_request(0.6), _instances(0), SLO, rng)
    assert choice.tier == "small" and choice.escalate
    assert not router.decide(_request(0.95), _instances(0), SLO, rng).escalate
    assert router.decide(_request(0.1), _instances(0), SLO, rng).tier == "large"
    assert cascade_escalates("length", 10, None) and cascade_escalates("stop", 5, -2.5)
    assert not cascade_escalates("stop", 5, -0.3)


def test_tenant_policy_overrides_class() -> None:
    router = _router(tenants={"acme": {"quality_floor": 0.95, "quality_target": 1.0}})
    busy = _instances(large_waiting=400)
    assert router.decide(_request(0.6, tenant="acme"), busy, SLO, random.Random(0)).tier == "large"


def test_unscored_request_goes_large() -> None:
    info = RequestInfo("r", "auto", input_tokens=10)
    assert _router().decide(info, _instances(0), SLO, random.Random(0)).tier == "large"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"small_model": "a"}, r"tiers.large_model: expected a model name"),
        ({"small_model": "a", "large_model": "b", "policy": "magic"}, r"unknown tier policy 'magic'; known: "),
        ({"small_model": "a", "large_model": "b", "colour": 1}, r"unknown key\(s\) \['colour'\]"),
        ({"small_model": "a", "large_model": "b", "default": {"quality_floor": 2}}, r"tiers.default.quality_floor: expected a number in \[0, 1\]"),
        ({"small_model": "a", "large_model": "b", "classes": {"x": {"quality_target": 0.5, "cost_budget": 0.5}}}, "not both"),
        ({"small_model": "a", "large_model": "b", "alias": "a"}, "tiers.alias"),
        ({"small_model": "a", "large_model": "b", "pressure": {"start": 2, "full": 1}}, "start < full"),
    ],
)
def test_config_errors_name_the_key(doc: dict, message: str) -> None:
    with pytest.raises(TierConfigError, match=message):
        build_tier_router(doc, TABLE)


def test_prefill_rate_is_a_decayed_event_rate() -> None:
    from scheduler.prefill_rate import (
        PREFILL_RATE_TAU_S,
        note_dispatch,
        note_prefill,
        prefill_tokens_per_s,
    )

    state = InstanceState("big-0", "llama-3-8b")
    note_dispatch(state, 2000, now_s=10.0)
    assert state.router_inflight == 1
    assert prefill_tokens_per_s(state, 10.0) == pytest.approx(2000 / PREFILL_RATE_TAU_S)
    # decays with e-folding time tau, and a reader does not change it
    assert prefill_tokens_per_s(state, 10.0 + PREFILL_RATE_TAU_S) == pytest.approx(2000 / PREFILL_RATE_TAU_S / 2.718281828)
    assert prefill_tokens_per_s(state, 10.0 + 50 * PREFILL_RATE_TAU_S) < 1e-6
    note_prefill(state, 1000, now_s=10.0 + PREFILL_RATE_TAU_S)
    assert state.prefill_tokens_per_s == pytest.approx((2000 / 2.718281828 + 1000) / PREFILL_RATE_TAU_S)
    # steady arrivals of R tokens/s converge to R
    steady = InstanceState("s", "llama-3-8b")
    for k in range(2000):
        note_prefill(steady, 100, now_s=k * 0.01)  # 10,000 tokens/s
    assert prefill_tokens_per_s(steady, 19.99) == pytest.approx(10_000, rel=0.01)
    note_prefill(steady, 0, now_s=30.0)  # nothing dispatched: unchanged
    assert steady.prefill_rate_at_s == pytest.approx(19.99)


def test_prefill_heavy_large_tier_offloads_by_predicted_tpot_and_long_prompts_first() -> None:
    """No queue anywhere, so the TTFT pressure is 0; the large instance takes prompt tokens
    at a rate that fills most of its time with prefill, so its decode steps (TPOT) stretch:
    the TPOT pressure moves the threshold, and more for a long prompt (its own prefill counts)."""
    router, ttft_only = _router(), _router(pressure={"tpot": False})
    rng = random.Random(0)
    idle = _instances(0)
    heavy = _instances(0)
    heavy[0].running = 8
    heavy[0].prefill_tokens_per_s, heavy[0].prefill_rate_at_s = 9_000.0, 5.0
    short = RequestInfo("r", "auto", input_tokens=200, p_small_ok=0.7, arrival_s=5.0)
    long = RequestInfo("r", "auto", input_tokens=6000, p_small_ok=0.7, arrival_s=5.0)
    assert router.load(short, heavy, SLO).large_ttft_ms < 0.2 * SLO.ttft_slo_ms  # TTFT sees nothing
    assert router.load(short, heavy, SLO).large_tpot_ms > 2 * router.load(short, idle, SLO).large_tpot_ms
    assert router.load(short, idle, SLO).large_pressure == 0.0
    for request in (short, long):  # TTFT alone sees nothing: 0.7 < the normal threshold 0.9
        assert ttft_only.decide(request, heavy, SLO, rng).model == "llama-3-8b"
    choice = router.decide(long, heavy, SLO, rng)
    assert choice.model == "qwen2.5-1.5b" and choice.threshold == pytest.approx(0.3)  # down to the floor
    short_choice = router.decide(short, heavy, SLO, rng)  # some pressure, not enough to send 0.7 small
    assert short_choice.model == "llama-3-8b" and 0.3 < short_choice.threshold < 0.9
    # the rate decays: a minute later the same instance is idle again
    later = RequestInfo("r", "auto", input_tokens=6000, p_small_ok=0.7, arrival_s=65.0)
    assert router.decide(later, heavy, SLO, rng).model == "llama-3-8b"


@pytest.mark.parametrize("tpot, message", [
    ("yes", "tiers.pressure.tpot: expected true, false or {start, full}"),
    ({"start": 1.0, "full": 0.5}, "tiers.pressure.tpot: expected 0 <= start < full"),
    ({"begin": 0.1}, "tiers.pressure.tpot: expected true, false or {start, full}"),
])
def test_tpot_pressure_config_errors(tpot: object, message: str) -> None:
    with pytest.raises(TierConfigError, match=message.replace("{", r"\{").replace("}", r"\}")):
        _router(pressure={"tpot": tpot})
