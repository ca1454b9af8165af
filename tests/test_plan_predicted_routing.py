"""Plans that route on the predicted output length (routing keys) and the filter that follows them."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cli.main import main
from scheduler.catalog import default_catalog
from scheduler.dispatch import ClusterView, build_policy
from scheduler.planner.predicted import routing_keys
from scheduler.planner.problem import PlanError, PlanProblem, PoolOption, RoutingKey, grid_buckets
from scheduler.planner.routing import RoutingTable, table_from_plan
from scheduler.planner.solver import solve
from scheduler.types import InstanceState, RequestInfo, SloClass
from sim.capacity import CapacityCache
from sim.plan_run import plan_and_verify
from sim.plan_workload import PlanInputs, Workload
from sim.workload import TraceRequest

INPUT_EDGES = [0, 512, 4096]
OUTPUT_EDGES = [0, 128, 1024]


def _problem(**kwargs: object) -> tuple[PlanProblem, list[list[tuple[int, int]]]]:
    """Short outputs are cheapest on `small`, long ones on `big`: routing by output pays."""
    buckets = grid_buckets(INPUT_EDGES, OUTPUT_EDGES, [[6.0, 2.0], [1.0, 0.5]])
    options = (
        PoolOption("small-tp1", "small", 1, 1.0, (4.0, 0.5, 0.8, 0.1)),
        PoolOption("big-tp1", "big", 1, 4.0, (10.0, 6.0, 3.0, 2.0)),
    )
    shapes = [[(100, 40), (300, 100)], [(100, 300), (200, 900)], [(1000, 60), (3000, 120)], [(2000, 500)]]
    return dataclasses.replace(PlanProblem(buckets, options), **kwargs), shapes


def _keys(sd: float) -> tuple[RoutingKey, ...]:
    problem, shapes = _problem()
    return routing_keys(problem.buckets, shapes, OUTPUT_EDGES, sd)


def test_exact_predictions_are_the_cells_and_cost_what_cell_routing_costs() -> None:
    keys = _keys(0.0)
    assert [(k.row, k.col) for k in keys] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(len(k.members) == 1 and k.members[0][1] == pytest.approx(1.0) for k in keys)
    by_cell, _ = _problem()
    by_keys, _ = _problem(routing_keys=keys)
    assert solve(by_keys).usd_per_hour == pytest.approx(solve(by_cell).usd_per_hour)


@pytest.mark.parametrize("sd", [0.3, 1.0, 3.0])
def test_noisy_keys_cost_between_cell_routing_and_input_routing(sd: float) -> None:
    keys = _keys(sd)
    for key in keys:  # each bucket's traffic is spread over its row's keys, nothing lost
        assert all(0 < f <= 1 for _, f in key.members)
    by_bucket: dict[int, float] = {}
    for key in keys:
        for k, f in key.members:
            by_bucket[k] = by_bucket.get(k, 0.0) + f
    assert all(total == pytest.approx(1.0, abs=0.02) for total in by_bucket.values())
    cell = solve(_problem()[0]).usd_per_hour
    by_input = solve(_problem(route_by_input=True)[0]).usd_per_hour
    plan = solve(_problem(routing_keys=keys)[0])
    assert by_input >= plan.usd_per_hour - 1e-6
    assert plan.usd_per_hour >= cell * 0.98  # only the dropped slivers (< 0.5% of a key) can undercut
    assert cell < by_input  # the instance makes routing by output worth something
    assert plan.key_shares is not None
    for share in plan.key_shares.values():
        assert sum(share.values()) == pytest.approx(1.0)


def test_heavy_noise_loses_what_the_output_split_was_worth() -> None:
    near_exact = solve(_problem(routing_keys=_keys(0.05))[0]).usd_per_hour
    heavy = solve(_problem(routing_keys=_keys(5.0))[0]).usd_per_hour
    assert heavy > near_exact


def test_table_routes_on_predicted_rank_and_round_trips() -> None:
    plan = solve(_problem(routing_keys=_keys(0.0))[0])
    table = table_from_plan(plan, INPUT_EDGES, OUTPUT_EDGES)
    assert table.output_source == "predicted_rank"
    assert RoutingTable.from_dict(table.as_dict()) == table
    policy = build_policy({"filters": ["model", {"length_bucket": {"table": table.as_dict()}}]})
    instances = [InstanceState(f"{p}-0", "m", pool=p) for p in ("small-tp1", "big-tp1")]
    view = ClusterView(instances)
    assert plan.key_shares is not None
    short_pools = set(plan.key_shares[("default", 0, 0)])
    long_pools = set(plan.key_shares[("default", 0, 1)])
    assert short_pools != long_pools  # the plan does split row 0 by output
    for k in range(40):
        short = policy.decide(view, RequestInfo(f"s{k}", "m", 100, predicted_rank=math.log1p(40)))
        long = policy.decide(view, RequestInfo(f"l{k}", "m", 100, predicted_rank=math.log1p(600)))
        assert short.instance_id in {f"{p}-0" for p in short_pools}
        assert long.instance_id in {f"{p}-0" for p in long_pools}
    # No prediction: the row's mix, still a planned pool of the row.
    unranked = policy.decide(view, RequestInfo("u", "m", 100)).instance_id
    assert unranked in {f"{p}-0" for p in short_pools | long_pools}
    with pytest.raises(PlanError, match="output_source"):
        RoutingTable.from_dict({**table.as_dict(), "output_source": "guess"})


def test_bad_keys_and_noise_are_errors_that_say_what() -> None:
    problem, shapes = _problem()
    with pytest.raises(PlanError, match="rank noise"):
        routing_keys(problem.buckets, shapes, OUTPUT_EDGES, -1.0)
    bad = (RoutingKey("default", 0, 0, ((9, 1.0),)),)
    with pytest.raises(PlanError, match=r"routing key default \[0\]\[0\]"):
        solve(dataclasses.replace(problem, routing_keys=bad))


def test_verified_plan_on_predicted_outputs_in_the_simulator(tmp_path: Path) -> None:
    """A real capacity table and a replay: the plan routes on predictions and meets its SLO."""
    catalog = default_catalog()
    rng = random.Random(3)
    requests, t = [], 0.0
    for k in range(240):
        t += rng.expovariate(4.0)
        requests.append(TraceRequest(f"q{k}", t, rng.randint(20, 200), rng.choice([rng.randint(8, 40),
                                                                                    rng.randint(200, 400)])))
    workload = Workload.from_requests(requests, [0, 512], [0, 64, 512])
    inputs = PlanInputs(catalog, catalog.model("llama-3-8b"), (catalog.gpu("L4"), catalog.gpu("A100-80GB")), (1,),
                        {"default": SloClass("default", 3000, 200)}, 0.9, rank_noise_sd=0.3)
    verified = plan_and_verify(workload, requests, None, inputs, CapacityCache(str(tmp_path)), tries=3)
    assert verified.problem.routing_keys is not None
    assert verified.plan.key_shares is not None
    assert verified.accepted, verified.attainment
    assert min(verified.attainment.values()) >= 0.9


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0.1, 5.0), min_size=4, max_size=4), st.lists(st.floats(0.05, 10.0), min_size=8, max_size=8),
       st.sampled_from([0.0, 0.2, 0.8, 2.0]))
def test_keyed_plans_fit_their_pools_and_never_cost_more_than_rows(rates: list[float], caps: list[float],
                                                                  sd: float) -> None:
    problem, shapes = _problem()
    buckets = tuple(dataclasses.replace(b, rate_rps=r) for b, r in zip(problem.buckets, rates, strict=True))
    options = (dataclasses.replace(problem.options[0], capacity_rps=tuple(caps[:4])),
               dataclasses.replace(problem.options[1], capacity_rps=tuple(caps[4:])))
    base = dataclasses.replace(problem, buckets=buckets, options=options, headroom_fraction=0.1)
    keys = routing_keys(buckets, shapes, OUTPUT_EDGES, sd)
    plan = solve(dataclasses.replace(base, routing_keys=keys))
    assert plan.usd_per_hour <= solve(dataclasses.replace(base, route_by_input=True)).usd_per_hour + 1e-6
    assert plan.key_shares is not None
    load = {o.name: 0.0 for o in options}
    for key in keys:  # the routing table's shares, applied to what each key really holds
        share = plan.key_shares[(key.slo_class, key.row, key.col)]
        assert sum(share.values()) == pytest.approx(1.0)
        for pool, weight in share.items():
            option = next(o for o in options if o.name == pool)
            load[pool] += weight * sum(buckets[k].rate_rps * f / option.capacity_rps[k] for k, f in key.members)
    for pool_plan in plan.pools:
        assert load[pool_plan.name] <= pool_plan.instances * 0.9 + 1e-6


def _trace_file(path: Path, n: int = 200) -> Path:
    rng = random.Random(5)
    t, lines = 0.0, ["arrival_s,input_tokens,output_tokens"]
    for _ in range(n):
        t += rng.expovariate(4.0)
        lines.append(f"{t:.4f},{rng.randint(30, 300)},{rng.choice([rng.randint(8, 40), rng.randint(200, 500)])}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_plans_on_predicted_outputs_and_says_what_is_missing(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    trace = _trace_file(tmp_path / "trace.csv")
    base = ["plan", "--trace", str(trace), "--gpus", "L4,A100-80GB", "--slo", "default=3000:200",
            "--input-edges", "0,1024", "--output-edges", "0,64,1024", "--cache-dir", str(tmp_path / "cache"),
            "--no-progress", "--json"]
    assert main([*base, "--route-by", "predicted", "--rank-tau", "0.6", "--verify", "--verify-tries", "3"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["routing"]["default"]["output_source"] == "predicted_rank"
    assert plan["verified"]["accepted"]
    for extra, expected in ((["--route-by", "predicted"], "exactly one of --rank-tau"),
                            (["--rank-tau", "0.5"], "only with --route-by predicted"),
                            (["--route-by", "predicted", "--rank-tau", "1.5"], "--rank-tau: expected a Kendall tau")):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err


def test_simulated_autoscaler_routes_on_the_same_predictions(tmp_path: Path) -> None:
    """With exact predictions, a request whose predicted cell the plan sends wholly to one
    pool is served there (while that pool has an instance), autoscaler in the loop."""
    from scheduler.planner.autoscale import AutoscalerConfig
    from scheduler.planner.problem import bucket_of
    from sim.plan_autoscale import autoscale_from_plan

    catalog = default_catalog()
    rng = random.Random(7)
    requests, t = [], 0.0
    for k in range(400):  # 20 req/s, 20% long answers: short ones are cheapest on L4, long ones on A100
        t += rng.expovariate(20.0)
        requests.append(TraceRequest(f"a{k}", t, rng.randint(20, 60),
                                     rng.randint(600, 900) if rng.random() < 0.2 else rng.randint(8, 40)))
    workload = Workload.from_requests(requests, [0, 512], [0, 64, 1024])
    inputs = PlanInputs(catalog, catalog.model("llama-2-7b"), (catalog.gpu("L4"), catalog.gpu("A100-80GB")), (1,),
                        {"default": SloClass("default", 5000, 120)}, 0.9, rank_noise_sd=0.0)
    verified = plan_and_verify(workload, requests, None, inputs, CapacityCache(str(tmp_path)), tries=3)
    assert verified.plan.key_shares is not None
    config = AutoscalerConfig(interval_s=30, window_s=120, dwell_s=300, idle_s=300, headroom=0.3,
                              scale_down_headroom=0.5, max_step=4)
    run = autoscale_from_plan(verified, inputs, workload, requests, config)
    sole = {(row, col): next(iter(share)) for (_, row, col), share in verified.plan.key_shares.items()
            if len(share) == 1}
    by_id = {r.request_id: r for r in requests}
    checked = followed = 0
    for record in run.result.records:
        req = by_id[record.request_id]
        key = (bucket_of(workload.input_edges, req.input_tokens), bucket_of(workload.output_edges, req.output_tokens))
        if key in sole and record.pool:
            checked += 1
            followed += record.pool == sole[key]
    shares = verified.plan.key_shares
    assert shares[("default", 0, 0)] != shares[("default", 0, 1)], shares  # the plan splits by output
    assert checked > 100 and followed >= 0.95 * checked, (followed, checked, sole)
