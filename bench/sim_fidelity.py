"""Simulator fidelity at a larger scale: the same workload through live emulated engines
(HTTP, real clock, in their own process) and through the simulator; TTFT/TPOT percentiles
side by side, and the same comparison with the engines' own server-side view removed of the
client's HTTP costs (measured in the same run with a zero-latency engine).

    python bench/sim_fidelity.py [--requests 300] [--rate-scale 2]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import httpx
import numpy as np

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

SHARED_DATA_DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data"

CLUSTER = {
    "default_model": "llama-3-8b",
    "pools": [
        {"name": "a100", "gpu": "A100-80GB", "model": "llama-3-8b", "count": 2,
         "engine": {"max_num_seqs": 128, "max_num_batched_tokens": 4096}},
        {"name": "l4", "gpu": "L4", "model": "llama-3-8b", "count": 2,
         "engine": {"max_num_seqs": 64, "max_num_batched_tokens": 4096}},
    ],
    "dispatch": {"scorers": ["least_outstanding"], "picker": "max_score"},
}


def front_end_cost_ms(prompt_tokens: int) -> float:
    """Median time to the first streamed token from a zero-latency engine (HTTP + parsing)."""
    with engines_in_subprocess([{"gpu": "L4", "model": "llama-3-8b", "instance_id": "z", "time_scale": 0.0}]) as eps:
        samples = []
        with httpx.Client() as client:
            for i in range(30):
                body = {"model": "llama-3-8b", "prompt": [1000 + (i * 7 + j) % 30000 for j in range(prompt_tokens)],
                        "max_tokens": 2, "ignore_eos": True, "stream": True}
                start = time.perf_counter()
                with client.stream("POST", eps[0].base_url + "/v1/completions", json=body) as response:
                    for line in response.iter_lines():
                        if '"text":' in line:
                            break
                samples.append((time.perf_counter() - start) * 1000)
    return float(np.median(samples[5:]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rate-scale", type=float, default=2.0)
    parser.add_argument("--data", type=Path, default=SHARED_DATA_DEFAULT)
    args = parser.parse_args()
    cluster = parse_cluster(CLUSTER, "bench")
    trace = read_trace(args.data / "traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv",
                       rate_scale=args.rate_scale, limit=args.requests)
    requests = capped_workload(trace, max_input_tokens=4096, max_output_tokens=128)
    simulated = simulate(cluster, requests).records
    assignment = {r.request_id: r.instance_id for r in simulated}
    with engines_in_subprocess(engine_specs(cluster)) as endpoints:
        live = asyncio.run(replay_live(endpoints, requests, assignment))
    rows = compare(live, simulated)
    print(f"{len(requests)} Azure-conversation requests at {args.rate_scale}x rate on 2x A100-80GB + 2x L4 "
          f"(llama-3-8b), client-side live vs simulated:")
    print(format_agreement(rows))
    mean_prompt = int(np.mean([r.input_tokens for r in requests]))
    print(f"front-end cost (HTTP + request parsing, zero-latency engine, {mean_prompt}-token prompt): "
          f"{front_end_cost_ms(mean_prompt):.2f} ms median")
    return 0


if __name__ == "__main__":
    sys.exit(main())
