"""The planner's integer program, Mélange's format and formulation, routing, actuation."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.dispatch import ClusterView, build_policy
from scheduler.planner.actuator import DryRunActuator, apply_plan, plan_steps
from scheduler.planner.melange import melange_baseline, melange_problem, parse_melange_config
from scheduler.planner.problem import PlanError, PlanProblem, PoolOption, grid_buckets
from scheduler.planner.routing import RoutingTable, table_from_plan
from scheduler.planner.schedule import day_schedule
from scheduler.planner.solver import single_type_plans, solve
from scheduler.types import InstanceState, RequestInfo

PUBLISHED = {
    "gpu_info": {"A10G": {"cost": 1.01, "tputs": [[2, 1], [5, 2]]},
                 "A100-80GB": {"cost": 3.67, "tputs": [[20, 20], [40, 20]]}},
    "workload_distribution": [[0.2, 0.1], [0.5, 0.2]],
    "total_request_rate": 30,
    "slice_factor": 8,
}


@pytest.mark.parametrize("slice_factor", [2, 4, 8, 16])
def test_reproduces_melange_published_example(slice_factor: int) -> None:
    config = parse_melange_config({**PUBLISHED, "slice_factor": slice_factor})
    plan = solve(melange_problem(config))
    assert plan.instances() == {"A10G": 2, "A100-80GB": 1}
    assert plan.usd_per_hour == pytest.approx(5.69)
    assert melange_baseline(config).usd_per_hour == pytest.approx(5.69)


def test_whole_buckets_cost_more_and_match_melange() -> None:
    config = parse_melange_config({**PUBLISHED, "slice_factor": 1})
    assert solve(melange_problem(config)).usd_per_hour == pytest.approx(6.70)
    assert melange_baseline(config).usd_per_hour == pytest.approx(6.70)
    # Continuous shares relax the slices: never costlier (here 1 A10G + 1 A100 at exactly 100% load).
    assert solve(melange_problem(config, continuous=True)).usd_per_hour == pytest.approx(4.68)


def test_gpu_info_as_a_list_and_bad_configs() -> None:
    as_list = {**PUBLISHED, "gpu_info": [{"name": n, **v} for n, v in PUBLISHED["gpu_info"].items()]}
    assert solve(melange_problem(parse_melange_config(as_list))).usd_per_hour == pytest.approx(5.69)
    with pytest.raises(PlanError, match=r"gpu_info.A10G.tputs: shape 1x2, expected 2x2"):
        parse_melange_config({**PUBLISHED, "gpu_info": {"A10G": {"cost": 1, "tputs": [[1, 2]]}}})
    with pytest.raises(PlanError, match="slice_factor: expected an integer >= 1"):
        parse_melange_config({**PUBLISHED, "slice_factor": 0})
    with pytest.raises(PlanError, match="unknown key"):
        parse_melange_config({**PUBLISHED, "gpus": {}})


@st.composite
def melange_configs(draw: st.DrawFn) -> dict:
    rows, cols = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    n_gpus = draw(st.integers(1, 3))
    tput = st.floats(0.5, 50, allow_nan=False).map(lambda v: round(v, 2))
    gpu_info = {f"G{g}": {"cost": draw(st.floats(0.5, 10).map(lambda v: round(v, 2))),
                          "tputs": [[draw(tput) for _ in range(cols)] for _ in range(rows)]}
                for g in range(n_gpus)}
    shares = [[draw(st.floats(0, 1).map(lambda v: round(v, 3))) for _ in range(cols)] for _ in range(rows)]
    if sum(map(sum, shares)) == 0:
        shares[0][0] = 1.0
    return {"gpu_info": gpu_info, "workload_distribution": shares,
            "total_request_rate": draw(st.floats(0.5, 60).map(lambda v: round(v, 2))),
            "slice_factor": draw(st.integers(1, 4))}


@settings(max_examples=40, deadline=None)
@given(melange_configs())
def test_never_costlier_than_melange(doc: dict) -> None:
    config = parse_melange_config(doc)
    baseline = melange_baseline(config).usd_per_hour
    assert solve(melange_problem(config)).usd_per_hour <= baseline + 1e-6
    assert solve(melange_problem(config, continuous=True)).usd_per_hour <= baseline + 1e-6


def _problem(**kwargs: object) -> PlanProblem:
    buckets = grid_buckets([0, 512, 4096], [0, 128, 1024], [[4.0, 2.0], [1.0, 0.5]])
    options = (
        PoolOption("small-tp1", "small", 1, 1.0, (2.0, 1.0, 0.0, 0.0)),  # cannot serve long prompts
        PoolOption("big-tp1", "big", 1, 4.0, (10.0, 6.0, 3.0, 2.0)),
        PoolOption("big-tp2", "big", 2, 8.0, (22.0, 13.0, 7.0, 5.0)),
    )
    return dataclasses.replace(PlanProblem(buckets, options), **kwargs)


def test_capacity_constraints_hold_and_shares_sum_to_one() -> None:
    for problem in (_problem(), _problem(headroom_fraction=0.3), _problem(route_by_input=True)):
        plan = solve(problem)
        for share in plan.shares:
            assert sum(share.values()) == pytest.approx(1.0)
        assert "small-tp1" not in plan.shares[2] and "small-tp1" not in plan.shares[3]
        for pool in plan.pools:
            assert pool.load_instances <= pool.instances * (1 - problem.headroom_fraction) + 1e-6
        if problem.route_by_input:
            assert plan.shares[0] == pytest.approx(plan.shares[1])
    assert solve(_problem(headroom_fraction=0.3)).usd_per_hour >= solve(_problem()).usd_per_hour


def test_availability_min_replicas_and_relaxation_errors() -> None:
    unlimited = solve(_problem())
    limited = solve(_problem(availability_gpus={"small": 1}))
    assert limited.gpus_by_type().get("small", 0) <= 1
    assert limited.usd_per_hour >= unlimited.usd_per_hour
    with pytest.raises(PlanError, match=r"availability: .*big: limit 1, raise to \d"):
        solve(_problem(availability_gpus={"big": 1, "small": 0}))
    options = tuple(dataclasses.replace(o, min_replicas=3) for o in _problem().options)
    plan = solve(_problem(options=options))
    assert all(p.instances == 0 or p.instances >= 3 for p in plan.pools)
    with pytest.raises(PlanError, match="empty"):
        solve(_problem(buckets=grid_buckets([0, 1], [0, 1], [[0.0]])))
    unservable = tuple(dataclasses.replace(o, capacity_rps=(1.0, 1.0, 1.0, 0.0)) for o in _problem().options)
    with pytest.raises(PlanError, match=r"SLO: no GPU type meets the SLO for in\[512,4096\) out\[128,1024\)"):
        solve(_problem(options=unservable))


def test_single_type_plans_cost_at_least_the_mix() -> None:
    mix = solve(_problem())
    singles = single_type_plans(_problem())
    assert isinstance(singles["small"], PlanError)  # it cannot serve long prompts
    big = singles["big"]
    assert not isinstance(big, PlanError) and big.usd_per_hour >= mix.usd_per_hour


def test_solves_ten_by_ten_buckets_on_seven_types() -> None:
    edges = [0, *[2 ** k for k in range(6, 16)]]
    rates = [[0.1 * (1 + (i * 7 + j) % 5) for j in range(10)] for i in range(10)]
    buckets = grid_buckets(edges, edges, rates)
    options = tuple(
        PoolOption(f"g{g}-tp1", f"g{g}", 1, 1.0 + g, tuple(2.0 * (g + 1) / (1 + b.row + b.col) for b in buckets))
        for g in range(7)
    )
    plan = solve(PlanProblem(buckets, options, headroom_fraction=0.1))
    assert plan.usd_per_hour > 0 and math.isfinite(plan.solve_s)


def test_routing_table_follows_the_shares() -> None:
    plan = solve(_problem())
    table = table_from_plan(plan, [0, 512, 4096], [0, 128, 1024])
    assert RoutingTable.from_dict(table.as_dict()) == table
    counts: dict[str, int] = {}
    for k in range(4000):
        pool = table.pools_for(f"r{k}", 100, 50)[0]
        counts[pool] = counts.get(pool, 0) + 1
    for pool, share in plan.shares[0].items():
        assert counts.get(pool, 0) / 4000 == pytest.approx(share, abs=0.03)
    assert table.pools_for("x", 100, 50) == table.pools_for("x", 100, 50)  # same request, same pool
    with pytest.raises(PlanError, match="input_edges"):
        RoutingTable.from_dict({"input_edges": [5, 1], "output_edges": [0, 1]})


def test_length_bucket_filter_routes_and_falls_back() -> None:
    plan = solve(_problem(route_by_input=True))
    table = table_from_plan(plan, [0, 512, 4096], [0, 128, 1024]).as_dict()
    policy = build_policy({"filters": ["model", {"length_bucket": {"table": table}}]})
    instances = [InstanceState(f"{p}-0", "m", pool=p) for p in ("small-tp1", "big-tp1", "big-tp2")]
    view = ClusterView(instances)
    long_pools = {policy.decide(view, RequestInfo(f"r{k}", "m", 3000)).instance_id for k in range(50)}
    assert long_pools <= {f"{p}-0" for p in plan.shares[2]}
    only_small = ClusterView([instances[0]])
    assert policy.decide(only_small, RequestInfo("r1", "m", 3000)).instance_id == "small-tp1-0"


def test_apply_drains_before_it_removes() -> None:
    steps = plan_steps({"a": 3, "b": 1}, {"a": 1, "c": 2})
    actions = [(s.action, s.pool, s.replicas) for s in steps]
    assert actions == [("scale_up", "c", 2), ("drain", "a", 2), ("scale_down", "a", 1),
                       ("drain", "b", 1), ("scale_down", "b", 0)]
    actuator = DryRunActuator(replicas={"a": 3, "b": 1})
    apply_plan(actuator, {"a": 1, "c": 2})
    assert actuator.replicas == {"a": 1, "b": 0, "c": 2}
    assert actuator.commands[0].endswith("deployment/tokenyard-c --replicas=2")
    assert actuator.commands[1].startswith("# drain 2 instance(s) of a")


def test_day_schedule_costs_less_than_a_static_peak_fleet() -> None:
    schedule = day_schedule(_problem(), [0.0, 1.0, 7.5, 3.0], 3600.0)
    assert schedule.steps[0].plan.usd_per_hour == 0.0
    assert schedule.scheduled_usd < schedule.static_peak_usd
    assert schedule.static_peak_usd == pytest.approx(4 * schedule.peak_plan.usd_per_hour)
    with pytest.raises(PlanError, match="--rates"):
        day_schedule(_problem(), [0.0], 3600.0)


def test_live_histogram_merges_replicas_and_feeds_pool_loads() -> None:
    from scheduler.planner.autoscale import pool_loads
    from scheduler.planner.histogram import LengthHistogram

    edges_in, edges_out = (0, 512, 4096), (0, 128, 1024)
    replica_a = LengthHistogram(edges_in, edges_out, slot_s=60.0, keep_slots=5)
    replica_b = LengthHistogram(edges_in, edges_out, slot_s=60.0, keep_slots=5)
    for k in range(120):  # two minutes of traffic split over two router replicas
        (replica_a if k % 2 else replica_b).record(k * 1.0, "default", 100, 50)
    replica_a.record(125.0, "default", 3000, 500)  # in the current (partial) slot: not counted yet
    merged = LengthHistogram.from_dict(replica_a.as_dict()).merge(replica_b)
    assert merged.rates(now_s=130.0, window_s=120.0) == {("default", 0, 0): pytest.approx(1.0)}
    plan = solve(_problem())
    rates = merged.rates_by_bucket(plan.buckets, now_s=130.0, window_s=120.0)
    assert rates == {0: pytest.approx(1.0)}
    capacity = {o.name: o.capacity_rps for o in _problem().options}
    loads = pool_loads(rates, plan.shares, capacity)
    assert sum(loads.values()) > 0
    for k in range(10):  # old slots are dropped: the stored histogram stays bounded
        merged.record(1000.0 + k, "default", 100, 50)
    assert min(key[0] for key in merged.counts) >= 1000 // 60 - 5
    with pytest.raises(PlanError, match="different bucket edges"):
        merged.merge(LengthHistogram((0, 10), edges_out))
    with pytest.raises(PlanError, match="histogram: expected"):
        LengthHistogram.from_dict({"input_edges": [0, 1]})
