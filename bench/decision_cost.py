"""Decision cost of the decision layer: window + profile + admission, at 16, 64 and 1,000
instances, against a full scan by the same profile measured in the same run.

Per fleet size and profile, in process, on random loads (in-flight counts move as
requests are placed and finish, as in a driver):
- `full scan`: `DispatchPolicy.decide` over every instance of the model (the baseline),
- `window 16`: `DecisionLayer.decide` (the candidate window of 16, the default),
- `window 16 + admission`: the saturation check and `AdmissionQueue.offer`, then the
  decision, on a fleet with free capacity (what every request pays),
- `admission, saturated`: the saturation check that finds every instance saturated, and
  the offer that queues the request (100 held), plus one `release` of the held queue.

    python bench/decision_cost.py                  # ~1 minute
    python bench/decision_cost.py --requests 2000

Prints a Markdown table (median and p99 microseconds, and the ratio to the full scan).
Target (issue #8): median < 100 us at 1,000 instances with the window.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scheduler.admission import AdmissionQueue  # noqa: E402
from scheduler.layer import DecisionLayer, group_by_model  # noqa: E402
from scheduler.policy_document import load_policy_document  # noqa: E402
from scheduler.types import InstanceState, RequestInfo  # noqa: E402

MODEL = "llama-3-8b"
SIZES = (16, 64, 1000)
PROFILES = {
    "least_outstanding": {"scorers": ["least_outstanding"]},
    "slo_headroom + least_outstanding": {"scorers": ["slo_headroom", {"least_outstanding": {"weight": 0.5}}]},
}


def fleet(n: int, rng: random.Random) -> list[InstanceState]:
    return [InstanceState(f"i{k:04d}", MODEL, gpu=rng.choice(["A100-80GB", "H100-80GB", "L4"]),
                          running=rng.randrange(64), waiting=rng.randrange(4), kv_blocks_used=rng.randrange(5000),
                          kv_blocks_total=5000) for k in range(n)]


def timed(fn: Callable[[int], object], requests: int) -> tuple[float, float]:
    samples = []
    for n in range(requests):
        start = time.perf_counter_ns()
        fn(n)
        samples.append((time.perf_counter_ns() - start) / 1000.0)
    samples.sort()
    return statistics.median(samples), samples[int(0.99 * (len(samples) - 1))]


def measure(size: int, profile: dict[str, object], requests: int) -> dict[str, tuple[float, float]]:
    rng = random.Random(size)
    doc = load_policy_document({
        "profiles": {"default": profile},
        "window": {"max_candidates": 16},
        "admission": {"enabled": True, "max_queue_depth": 10_000,
                      "saturation": {"max_queued_per_instance": 8, "max_kv_usage": 0.99}},
    })
    states = fleet(size, rng)
    group = group_by_model(states)[MODEL]
    layer = DecisionLayer(doc)
    policy = layer.profiles["default"]
    queue = AdmissionQueue(doc.admission, doc.build_queue_sort())
    infos = [RequestInfo(f"r{n}", MODEL, rng.randrange(50, 4000), slo_class=rng.choice(["interactive", "batch"]))
             for n in range(requests)]
    placed: list[str] = []
    by_id = {s.instance_id: s for s in states}

    def place(instance_id: str) -> None:
        by_id[instance_id].router_inflight += 1
        placed.append(instance_id)
        if len(placed) > 4 * size:  # requests finish: the fleet stays at a steady load
            by_id[placed.pop(0)].router_inflight -= 1

    def full_scan(n: int) -> None:
        place(policy.decide(_view(group), infos[n]).instance_id)

    def window(n: int) -> None:
        place(layer.decide(policy, group, infos[n], 0.0).instance_id)

    def with_admission(n: int) -> None:
        info = infos[n]
        offer = queue.offer(info, layer.slo_classes.get(info.slo_class), layer.saturated(group, info), 0.0)
        assert offer.verdict.value == "admit"
        place(layer.decide(policy, group, info, 0.0).instance_id)

    results = {"full scan": timed(full_scan, requests), "window 16": timed(window, requests),
               "window 16 + admission": timed(with_admission, requests)}
    for s in states:  # every instance saturated by queue depth
        s.waiting = 20
    for k in range(100):
        queue.offer(RequestInfo(f"held{k}", MODEL, 100), None, True, 0.0)

    def saturated(n: int) -> None:
        info = infos[n]
        offer = queue.offer(info, layer.slo_classes.get(info.slo_class), layer.saturated(group, info), 0.0)
        assert offer.verdict.value == "queue"
        item = queue.release(0.0, lambda held: True)  # one frees: the first in sort order goes
        assert item is not None

    results["admission, saturated (100 held)"] = timed(saturated, requests)
    return results


def _view(group: tuple[InstanceState, ...]) -> object:
    from scheduler.dispatch import ClusterView

    return ClusterView(group, 0.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4000, help="decisions measured per cell")
    args = parser.parse_args()
    from tqdm import tqdm

    rows = []
    with tqdm(total=len(SIZES) * len(PROFILES), desc="decision cost", unit="cell") as bar:
        for size in SIZES:
            for name, profile in PROFILES.items():
                for label, (median, p99) in measure(size, profile, args.requests).items():
                    rows.append((size, name, label, median, p99))
                bar.update(1)
    print("\n| instances | profile | path | median µs | p99 µs | median vs full scan |")
    print("| --- | --- | --- | --- | --- | --- |")
    base = {(size, name): median for size, name, label, median, _ in rows if label == "full scan"}
    for size, name, label, median, p99 in rows:
        print(f"| {size:,} | {name} | {label} | {median:.1f} | {p99:.1f} | {median / base[(size, name)]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
