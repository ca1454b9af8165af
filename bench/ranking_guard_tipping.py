"""Why the starvation guard's effect on one KV-limited A10G (vLLM V1 defaults) is not
monotone in `max_wait_s`: FCFS mean E2E over learned-rank mean E2E, and the number of
preemptions, for several guard values x several draws of the noise model (same tau), at
90/95/100% of the FCFS capacity measured in the same run.

    nice -n 19 python bench/ranking_guard_tipping.py [--data ../shared/data] [--seeds 0,1,2]

Each cell prints `max_wait_s: FCFS/policy ratio / preemptions`. Setup and trace as
`bench/ranking_regimes.py --setups v1-a10g` (2,000 Azure conversation requests, tau 0.37).
What it showed is in docs/benchmarks.md (issue 11, fifth round).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ranking import metrics, rate_per_s, scaled  # noqa: E402
from bench.ranking_regimes import OVERLOAD_RPS, SHARED_DATA_DEFAULT, TRACE, cluster  # noqa: E402
from sim.rank_noise import NoisyRanker, noise_sd_for_tau  # noqa: E402
from sim.simulator import simulate  # noqa: E402
from sim.traces import read_trace  # noqa: E402

GUARDS_S: tuple[float | None, ...] = (10.0, 15.0, 20.0, 30.0, 60.0, 120.0, None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED_DATA_DEFAULT)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--tau", type=float, default=0.37)
    parser.add_argument("--seeds", default="0,1,2", help="noise-model draws")
    parser.add_argument("--loads", default="0.9,0.95,1.0")
    parser.add_argument("--setup", default="v1-a10g")
    args = parser.parse_args()
    requests = read_trace(args.data / TRACE, limit=args.requests).requests()
    sd = noise_sd_for_tau([r.output_tokens for r in requests], args.tau, seed=0)
    overload = scaled(requests, OVERLOAD_RPS / rate_per_s(requests))
    capacity = metrics(simulate(cluster(args.setup, "fcfs"), overload))["throughput_rps"]
    print(f"{args.setup}: FCFS capacity {capacity:.2f} req/s; cells are max_wait_s: FCFS/learned mean E2E / preemptions")
    for load in (float(x) for x in args.loads.split(",")):
        trace = scaled(requests, load * capacity / rate_per_s(requests))
        fcfs = metrics(simulate(cluster(args.setup, "fcfs"), trace))
        print(f"load {load:.2f}: FCFS mean E2E {fcfs['mean_e2e_s']:.1f} s, {fcfs['preemptions']:.0f} preemptions", flush=True)
        for seed in (int(s) for s in args.seeds.split(",")):
            cells = []
            for guard in GUARDS_S:
                policy = {"learned_rank": {"max_wait_s": guard}}
                m = metrics(simulate(cluster(args.setup, policy), trace, ranker=NoisyRanker(sd, seed)))
                cells.append(f"{'none' if guard is None else f'{guard:g}'}: "
                             f"{fcfs['mean_e2e_s'] / m['mean_e2e_s']:.2f}x/{m['preemptions']:.0f}")
            print(f"  noise draw {seed}: " + "  ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
