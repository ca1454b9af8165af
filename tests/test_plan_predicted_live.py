"""Live: the control plane plans on the routers' predicted output lengths (`route_by:
predicted`) and the routers follow the predicted cell for requests without `max_tokens`
(issue 12).

A real router on loopback with its ranker loaded (the shipped model), vLLM-shaped
engines in their own processes, the embedded state store the control plane and the
router share, real control rounds on a clock the test drives.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import httpx
import pytest

from router.controlplane import ControlPlane, ControlPlaneConfig, PrintActuator, parse_config
from router.plan_routing import ROUTING_KEY
from router.state import FileStateStore, InstanceRecord, StateStore
from router.workload_recorder import STORE_KEY_PREFIX
from scheduler.planner.histogram import LengthHistogram
from scheduler.planner.predicted import grid_noise_sd
from scheduler.planner.problem import grid_buckets
from tests.test_controlplane import MODEL
from tests.test_router_support import fake_engines, running_router
from tokenyard.config import ConfigError

INPUT_EDGES = [0, 1_000_000]
FINE_OUTPUT_EDGES = [0, 2, 100_000, 1_000_000]  # the routers' histogram: both planes' edges are among these
PROMPT = "Summarise the plot of Hamlet."
SLOT_S = 10.0


def _config(output_edges: list[int], capacity: dict[str, list[float]], **extra: Any) -> ControlPlaneConfig:
    pools = [{"name": name, "gpu": "A100-80GB", "usd_per_hour": 3.67, "capacity_rps": [row], "max_replicas": 16}
             for name, row in capacity.items()]
    return parse_config({
        "store": "file:///unused", "input_edges": INPUT_EDGES, "output_edges": output_edges, "pools": pools,
        "actuator": "print", "resolve_interval_s": 0.001, "headroom": 0.0, "route_by": "predicted",
        # no loop band: the re-solve prices pools at the planner's headroom, as these cases assume
        "autoscaler": {"interval_s": 10.0, "window_s": 20.0, "dwell_s": 3600.0, "idle_s": 3600.0, "headroom": 0.0,
                       "scale_down_headroom": 0.0},
        "metrics": {"port": None}, **extra}, "cp.yaml")


async def _put_rates(store: StateStore, now_s: float, rates_by_col: dict[int, float]) -> None:
    """A router replica's histogram (router/workload_recorder.py's document) on the fine edges."""
    hist = LengthHistogram(tuple(INPUT_EDGES), tuple(FINE_OUTPUT_EDGES), SLOT_S, 60)
    current = int(now_s // SLOT_S)
    for back in (1, 2):
        for col, rate in rates_by_col.items():
            hist.counts[(current - back, "default", 0, col)] = round(rate * SLOT_S)
    await store.put_load(STORE_KEY_PREFIX + "synthetic", {"replica": "synthetic", "models": {MODEL: hist.as_dict()}},
                         ttl_s=600)


async def _ask(client: httpx.AsyncClient, url: str) -> httpx.Response:
    return await client.post(url + "/v1/chat/completions", headers={"authorization": "Bearer k"},
                             json={"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]})


def test_requests_without_max_tokens_follow_the_predicted_cell(tmp_path: Path) -> None:
    """The router's ranker predicts this prompt's answer at more than 2 and fewer than
    100,000 tokens. Pool `short` can only serve the first output column of each plan,
    `long` only the second, and the traffic of each round is mostly in the column the
    prompt is *not* predicted into, so the row's mix points the other way. Round A
    (columns split at 100,000) puts the prediction in column 0: every request goes to
    `short`; round B (split at 2) in column 1: every request goes to `long`."""
    round_a = _config([0, 100_000, 1_000_000], {"short": [1.0, 0.0], "long": [0.0, 1.0]}, rank_noise_sd=0.0)
    round_b = _config([0, 2, 1_000_000], {"short": [1.0, 0.0], "long": [0.0, 1.0]}, rank_noise_sd=0.0)
    now = [1_800_000_000.0]
    first_table = {"input_edges": INPUT_EDGES, "output_edges": [0, 1_000_000], "cells": [],
                   "rows": [{"input": 0, "pools": {"short": 1.0, "long": 1.0}}]}
    doc = {"tenants": {"t": {"api_keys": ["k"], "slo_class": "interactive"}}, "rank": {},
           "policy": {"selection": {"default": "default"}, "profiles": {"default": {"filters": [
               "model", "healthy", "not_draining", {"length_bucket": {"table": first_table}}]}}}}

    async def main() -> None:
        store = FileStateStore(tmp_path / "state.db")
        with fake_engines((), ()) as (short, long_):
            records = [InstanceRecord("s0", short.url, MODEL, gpu="A100-80GB", pool="short"),
                       InstanceRecord("l0", long_.url, MODEL, gpu="A100-80GB", pool="long")]
            async with running_router(records, doc, store=store) as server, httpx.AsyncClient(timeout=20) as client:
                router, url = server.router, f"http://127.0.0.1:{server.port}"
                assert router.ranker is not None
                body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]}
                for input_tokens in (1, 8, 16, 32, 64):  # wherever the router's count lands
                    rank, _ = router.ranker.score_body(body, input_tokens)
                    assert 2 < math.expm1(rank) < 100_000
                sent = {"short": 0, "long": 0}
                # (plan, fine-column rates: mostly where the prompt is not predicted, the pool it must go to)
                for config, rates, pool, row_leans_to in ((round_a, {1: 0.2, 2: 6.0}, "short", "long"),
                                                          (round_b, {0: 6.0, 1: 0.2}, "long", "short")):
                    now[0] += 100.0
                    await _put_rates(store, now[0], rates)
                    plane = ControlPlane(config, store, PrintActuator({"short": 1, "long": 1}, emit=lambda _: None),
                                         clock=lambda: now[0])
                    await plane.tick()
                    assert plane.plan is not None and plane.plan.key_shares is not None
                    published = (await store.get_loads())[ROUTING_KEY]["table"]
                    assert published["output_source"] == "predicted_rank"
                    row = {p: w for entry in published["rows"] for p, w in entry["pools"].items()}
                    assert max(row, key=row.__getitem__) == row_leans_to  # the row's mix would mostly miss
                    assert await router.follow_routing()
                    answers = await asyncio.gather(*[_ask(client, url) for _ in range(8)])
                    assert [a.status_code for a in answers] == [200] * 8
                    sent[pool] += 8
                    assert (await short.stats())["requests_total"] == sent["short"]
                    assert (await long_.stats())["requests_total"] == sent["long"]
        await store.close()

    asyncio.run(main())


def test_a_plan_on_a_ranker_of_measured_tau_sizes_for_its_misrouting(tmp_path: Path) -> None:
    """`rank_tau`: the noise is calibrated on the live grid (the same model as `tokenyard plan
    --route-by predicted --rank-tau`). `a10g` cannot serve the long column. With exact
    predictions the short key goes to it; a ranker of tau 0.4 sends a third of the long
    requests to the short key too, so the plan keeps that key on `a100`, which serves both."""
    capacity = {"a10g": [4.0, 0.0], "a100": [2.0, 4.0]}
    prices = {"pools": [{"name": name, "gpu": name.upper(), "usd_per_hour": price, "capacity_rps": [capacity[name]],
                         "max_replicas": 16} for name, price in (("a10g", 1.01), ("a100", 3.67))]}
    edges = [0, 64, 1024]
    rates = [3.0, 1.0]
    assert grid_noise_sd(grid_buckets(INPUT_EDGES, edges, [rates]), 0.4) > 1.0

    now_s = 1_800_000_000.0

    async def main() -> dict[str, dict[str, float]]:
        short_key: dict[str, dict[str, float]] = {}
        for name, extra in (("exact", {"rank_noise_sd": 0.0}), ("tau", {"rank_tau": 0.4})):
            store = FileStateStore(tmp_path / f"{name}.db")
            hist = LengthHistogram(tuple(INPUT_EDGES), tuple(edges), SLOT_S, 60)
            for back in (1, 2):
                for col, rate in enumerate(rates):
                    hist.counts[(int(now_s // SLOT_S) - back, "default", 0, col)] = round(rate * SLOT_S)
            await store.put_load(STORE_KEY_PREFIX + "r", {"replica": "r", "models": {MODEL: hist.as_dict()}}, 600)
            plane = ControlPlane(_config(edges, capacity, **extra, **prices), store,
                                 PrintActuator({"a10g": 0, "a100": 0}, emit=lambda _: None), clock=lambda: now_s)
            await plane.tick()
            assert plane.plan is not None and plane.plan.key_shares is not None
            assert (await store.get_loads())[ROUTING_KEY]["table"]["output_source"] == "predicted_rank"
            short_key[name] = dict(plane.plan.key_shares[("default", 0, 0)])
            await store.close()
        return short_key

    short_key = asyncio.run(main())
    assert short_key == {"exact": {"a10g": 1.0}, "tau": {"a100": 1.0}}


def test_a_sliver_left_out_of_the_keys_does_not_re_solve_every_round(tmp_path: Path) -> None:
    """With noisy predictions a rare bucket can carry under 0.5% of every key it lands in
    and is left out of them (no share in the plan). It had traffic when the plan was
    solved, so it is not new traffic to scale from zero for: the next round keeps the plan."""
    edges = [0, 64, 256, 1024]
    config = _config(edges, {"p": [100.0, 50.0, 25.0]}, rank_noise_sd=2.0, resolve_interval_s=3600.0)
    now_s = 1_800_000_000.0

    async def main() -> None:
        store = FileStateStore(tmp_path / "state.db")
        hist = LengthHistogram(tuple(INPUT_EDGES), tuple(edges), SLOT_S, 60)
        for back in (1, 2):
            for col, count in enumerate((2000, 200, 1)):
                hist.counts[(int(now_s // SLOT_S) - back, "default", 0, col)] = count
        await store.put_load(STORE_KEY_PREFIX + "r", {"replica": "r", "models": {MODEL: hist.as_dict()}}, 600)
        clock = [now_s]
        plane = ControlPlane(config, store, PrintActuator({"p": 1}, emit=lambda _: None), clock=lambda: clock[0])
        await plane.tick()
        assert plane.plan is not None and not plane.plan.shares[2] and plane.plan.buckets[2].rate_rps > 0
        clock[0] += 1.0  # the same slots, the same rates
        await plane.tick()
        assert plane.last_solve_s == now_s
        await store.close()

    asyncio.run(main())


@pytest.mark.parametrize(("extra", "message"), [
    ({"route_by": "predicted"}, "route_by: predicted: expected exactly one of rank_tau"),
    ({"route_by": "predicted", "rank_tau": 0.5, "rank_noise_sd": 1.0}, "expected exactly one"),
    ({"route_by": "predicted", "rank_tau": 1.5}, r"rank_tau: expected a Kendall tau in \(0, 1\]"),
    ({"route_by": "predicted", "rank_noise_sd": -1}, "rank_noise_sd: expected a value >= 0"),
    ({"rank_tau": 0.5}, "rank_tau: only with route_by: predicted"),
    ({"route_by": "guess"}, "route_by: expected one of cell, predicted"),
])
def test_route_by_errors_say_where(extra: dict[str, Any], message: str) -> None:
    raw = {"store": "file:///unused", "input_edges": [0, 10], "output_edges": [0, 10],
           "pools": [{"name": "p", "gpu": "L4", "usd_per_hour": 1.0, "capacity_rps": [[1.0]]}], **extra}
    with pytest.raises(ConfigError, match=message):
        parse_config(raw, "cp.yaml")
