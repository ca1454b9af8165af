"""Simulated overload with the admission queue on vs off (issue #8's evidence).

The Azure LLM inference conversation trace (../shared/data, 19,366 requests in an hour)
replayed at `--rate-scale` (default 3x) on sim/examples/overload.yaml (2 x A100-80GB +
2 x L4, Llama-3-8B), requests given SLO classes at random (seeded): 40% interactive,
40% default, 20% batch (sheddable). The same cluster, the same requests, the same
dispatch; only `admission.enabled` differs. Per class: p99 TTFT of the served requests
(arrival to first token, queue wait included), requests shed (429) and refused (503);
goodput = requests that met both their TTFT and TPOT targets, per second of the trace's
arrival span (a shed request is not good).

    python bench/admission_overload.py                       # ~2-4 minutes
    python bench/admission_overload.py --limit 6000 --rate-scale 3

Prints a Markdown table and writes docs/img/admission_overload.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_TRACE = REPO.parent / "shared" / "data" / "traces" / "azure_llm_2023" / "AzureLLMInferenceTrace_conv.csv"
CLASSES = (("interactive", 0.4), ("default", 0.4), ("batch", 0.2))


def requests(path: Path, rate_scale: float, limit: int | None, seed: int) -> list[Any]:
    from sim.traces import read_trace

    rng = random.Random(seed)
    names = [name for name, _ in CLASSES]
    weights = [w for _, w in CLASSES]
    return [dataclasses.replace(r, slo_class=rng.choices(names, weights)[0])
            for r in read_trace(path, rate_scale=rate_scale, limit=limit)]


def run(cluster: Any, trace: list[Any], admission: bool) -> dict[str, Any]:
    from tqdm import tqdm

    from scheduler.policy_document import load_policy_document
    from sim.simulator import simulate

    raw = cluster.document().to_dict()
    raw["admission"]["enabled"] = admission
    variant = dataclasses.replace(cluster, policy=load_policy_document(raw))
    label = f"admission {'on' if admission else 'off'}"
    with tqdm(total=len(trace), desc=label, unit="req") as bar:
        def progress(now_s: float, finished: int, total: int) -> None:
            bar.update(finished - bar.n)

        result = simulate(variant, trace, progress=progress, total_requests=len(trace))
    return summarise(result, variant, label)


def summarise(result: Any, cluster: Any, label: str) -> dict[str, Any]:
    classes = cluster.slo_classes
    duration_s = max(1e-9, result.end_s - result.start_s)
    out: dict[str, Any] = {"label": label, "classes": {}, "good": 0}
    for name, _ in CLASSES:
        records = [r for r in result.records if r.slo_class == name]
        served = sorted(r.first_token_s - r.arrival_s for r in records
                        if not r.rejected and r.first_token_s is not None)
        slo = classes[name]
        good = 0
        for r in records:
            if r.rejected or r.first_token_s is None or r.finish_s is None:
                continue
            ttft_ok = r.first_token_s - r.arrival_s <= slo.ttft_slo_ms / 1000.0
            tpot = (r.finish_s - r.first_token_s) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
            good += ttft_ok and tpot <= slo.tpot_slo_ms / 1000.0
        out["good"] += good
        out["classes"][name] = {
            "requests": len(records),
            "p99_ttft_s": served[int(0.99 * (len(served) - 1))] if served else float("nan"),
            "shed": sum(1 for r in records if r.rejected and r.reject_reason.startswith("shed")),
            "refused": sum(1 for r in records if r.rejected and r.reject_reason.startswith("refused")),
            "good": good,
        }
    arrivals = [r.arrival_s for r in result.records]
    span_s = max(1e-9, max(arrivals) - min(arrivals))  # the same for both runs
    out["goodput_rps"] = out["good"] / span_s
    out["duration_s"] = duration_s
    return out


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    labels = [row["label"] for row in rows]
    colors = ["tab:gray", "tab:blue"]
    names = [name for name, _ in CLASSES]
    width = 0.38
    for k, row in enumerate(rows):
        xs = [i + k * width for i in range(len(names))]
        axes[0].bar(xs, [row["classes"][n]["p99_ttft_s"] for n in names], width, label=row["label"], color=colors[k])
        axes[2].bar(xs, [row["classes"][n]["shed"] + row["classes"][n]["refused"] for n in names], width,
                    label=row["label"], color=colors[k])
    for ax in (axes[0], axes[2]):
        ax.set_xticks([i + width / 2 for i in range(len(names))])
        ax.set_xticklabels(names)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("p99 TTFT of served requests (s)")
    axes[0].set_yscale("log")
    axes[0].set_title("p99 TTFT per class")
    axes[1].bar(labels, [row["goodput_rps"] for row in rows], color=colors)
    axes[1].set_ylabel("requests/s meeting TTFT and TPOT")
    axes[1].set_title("goodput")
    axes[2].set_ylabel("requests")
    axes[2].set_title("shed (429) + refused (503)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", default=str(DEFAULT_TRACE))
    parser.add_argument("--cluster", default=str(REPO / "sim" / "examples" / "overload.yaml"))
    parser.add_argument("--rate-scale", type=float, default=3.0)
    parser.add_argument("--limit", type=int, default=None, help="first N requests of the trace")
    parser.add_argument("--seed", type=int, default=0, help="seeds the SLO class of each request")
    parser.add_argument("--out", default=str(REPO / "docs" / "img" / "admission_overload.png"))
    args = parser.parse_args()

    from sim.cluster import load_cluster

    cluster = load_cluster(args.cluster)
    trace = requests(Path(args.trace), args.rate_scale, args.limit, args.seed)
    rows = [run(cluster, trace, admission=False), run(cluster, trace, admission=True)]
    print(f"\n{len(trace):,} requests, Azure conv at {args.rate_scale:g}x, {Path(args.cluster).name}; "
          f"trace span {rows[0]['duration_s']:.0f} s (off) / {rows[1]['duration_s']:.0f} s (on)\n")
    print("| admission | class | requests | p99 TTFT s (served) | shed 429 | refused 503 | met both SLOs |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        for name, c in row["classes"].items():
            print(f"| {row['label']} | {name} | {c['requests']:,} | {c['p99_ttft_s']:.2f} | {c['shed']:,} "
                  f"| {c['refused']:,} | {c['good']:,} |")
    for row in rows:
        print(f"| {row['label']} | **goodput** | | | | | {row['goodput_rps']:.2f} req/s |")
    plot(rows, Path(args.out), f"Azure conv x{args.rate_scale:g} on {Path(args.cluster).name}: admission off vs on")
    print(f"\nplot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
