"""The simulator agrees with the live system: the same workload through real emulated
engines (HTTP, real clock, in their own process) and through the simulator gives TTFT and
TPOT percentiles within 10% (the issue's bar), at small scale. bench/sim_fidelity.py runs
it at a larger scale and prints the table."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sim.cluster import parse_cluster
from sim.fidelity import (
    capped_workload,
    compare,
    engine_specs,
    engines_in_subprocess,
    format_agreement,
    replay_live,
)
from sim.simulator import simulate
from sim.traces import read_trace
from sim.workload import TraceRequest

# Two GPU types with iterations long enough (L4, A10G) that the client's own HTTP and
# event-loop costs (a few ms on a loaded 2-core machine) stay small against TTFT.
CLUSTER = {
    "default_model": "llama-3-8b",
    "pools": [
        {"name": "l4", "gpu": "L4", "model": "llama-3-8b", "count": 1,
         "engine": {"max_num_seqs": 64, "max_num_batched_tokens": 4096}},
        {"name": "a10g", "gpu": "A10G", "model": "llama-3-8b", "count": 1,
         "engine": {"max_num_seqs": 64, "max_num_batched_tokens": 4096}},
    ],
    "dispatch": {"scorers": ["least_outstanding"], "picker": "max_score"},
}


def workload(shared_data: Path, limit: int) -> list[TraceRequest]:
    trace = read_trace(shared_data / "traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv", limit=limit)
    return capped_workload(trace, max_input_tokens=1500, max_output_tokens=24)


def test_simulator_agrees_with_live_emulated_engines(shared_data: Path) -> None:
    cluster = parse_cluster(CLUSTER, "fidelity-test")
    requests = workload(shared_data, limit=40)
    simulated = simulate(cluster, requests).records
    assert all(not r.rejected for r in simulated)
    # Place live requests exactly where the simulator placed them: the comparison is of
    # engine timing, not of two dispatch runs that saw different load.
    assignment = {r.request_id: r.instance_id for r in simulated}
    with engines_in_subprocess(engine_specs(cluster)) as endpoints:
        live = asyncio.run(replay_live(endpoints, requests, assignment))
    assert [r.output_tokens for r in live] == [r.output_tokens for r in requests]
    # TTFT over all requests; TPOT per engine: the two GPU types' TPOTs form two separate
    # modes, and a pooled median falls in the gap between them, where one request whose
    # decode meets one more prefill live moves it by 10% while every other agrees to 0.1 ms.
    placed = {r.request_id: r.instance_id for r in simulated}
    groups = [("all", "ttft", live, simulated)] + [
        (instance, "tpot", [r for r in live if placed[r.request_id] == instance],
         [r for r in simulated if r.instance_id == instance])
        for instance in sorted(set(placed.values()))
    ]
    for label, metric, live_part, sim_part in groups:
        rows = [row for row in compare(live_part, sim_part, percentiles=(50, 90)) if row.metric == metric]
        print(label)
        print(format_agreement(rows))
        worst = max(rows, key=lambda row: row.relative_error)
        assert worst.relative_error <= 0.10, f"{label}\n{format_agreement(rows)}"
