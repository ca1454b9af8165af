"""Learned-rank shortest-job-first against FCFS, input-length SJF and the oracle, in the
simulator on the Azure conversation trace; and the ranker's cost per request.

    python bench/ranking.py [--requests 3000] [--max-num-seqs 64] [--tau 0.37] [--guard-s 60]
    python bench/ranking.py --predictor      # scoring cost: one request, one core, against the path before issue 11
    python bench/ranking.py --cap-study      # a lower batch cap to make a queue for SJF: does it pay?

Output lengths come from the trace; predictions from `sim.rank_noise` at the Kendall tau
given (default: the shipped ranker's held-out tau), the oracle is tau = 1. Load is the
arrival rate over the cluster's capacity, measured in the same run (FCFS at 5x the
trace's rate: completed requests per second). Engines order their waiting queues by the
queue policy's vLLM `priority` (`scheduling_policy: priority`); the router's admission
queue (`QueueSort` "learned_rank") is the same order one hop earlier. Writes a table, a
JSON file and docs/img/ranking.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from sim.cluster import parse_cluster
from sim.rank_noise import InputLengthRanker, NoisyRanker, RankFn, noise_sd_for_tau
from sim.simulator import simulate
from sim.traces import read_trace
from sim.workload import TraceRequest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA_DEFAULT = Path(os.environ.get("TOKENYARD_SHARED_DATA", ROOT.parent / "shared" / "data"))  # as tests/conftest.py
TRACE = "traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv"
LOADS = (0.5, 0.8, 0.95, 1.2)  # 1.2: a burst over capacity (the trace is finite)


def cluster(queue_policy: Any, max_num_seqs: int, count: int) -> Any:
    return parse_cluster({
        "default_model": "llama-3-8b",
        "pools": [{"name": "a100", "gpu": "A100-80GB", "model": "llama-3-8b", "count": count,
                   "engine": {"max_num_seqs": max_num_seqs, "max_num_batched_tokens": 4096}}],
        "dispatch": {"scorers": ["least_outstanding"], "picker": "max_score"},
        "queue": {"policy": queue_policy},
    }, "bench/ranking.py")


def scaled(requests: list[TraceRequest], rate_scale: float) -> list[TraceRequest]:
    start = requests[0].arrival_s
    return [dataclasses.replace(r, arrival_s=start + (r.arrival_s - start) / rate_scale) for r in requests]


def rate_per_s(requests: list[TraceRequest]) -> float:
    return len(requests) / max(1e-9, requests[-1].arrival_s - requests[0].arrival_s)


def metrics(result: Any) -> dict[str, float]:
    done = [r for r in result.records if r.e2e_s is not None]
    e2e = np.array([r.e2e_s for r in done])
    ttft = np.array([r.ttft_s for r in done])
    outputs = np.array([max(1, r.output_tokens) for r in done], dtype=np.float64)
    span = max(1e-9, result.end_s - result.start_s)
    return {
        "mean_e2e_s": float(e2e.mean()), "p90_e2e_s": float(np.percentile(e2e, 90)),
        # vLLM's "normalized latency" and vllm-ltr's headline metric (its Figure 1: s / token):
        # each request's E2E over its output tokens, averaged over requests
        "mean_norm_latency_s": float((e2e / outputs).mean()),
        # after the first token: what queue order cannot shorten (decode in a shared batch)
        "mean_decode_s": float((e2e - ttft).mean()),
        "mean_ttft_s": float(ttft.mean()), "p99_ttft_s": float(np.percentile(ttft, 99)),
        "max_ttft_s": float(ttft.max()), "throughput_rps": len(done) / span,
        "output_tok_per_s": float(sum(r.output_tokens for r in done)) / span,
        "preemptions": float(sum(r.preemptions for r in result.records)),
    }


def policies(sd: float, guard_s: float) -> list[tuple[str, Any, RankFn | None]]:
    return [
        ("fcfs", "fcfs", None),
        ("input-length SJF", {"input_length": {}}, InputLengthRanker()),
        ("learned SJF", {"learned_rank": {"max_wait_s": None}}, NoisyRanker(sd)),
        (f"learned SJF + guard {guard_s:g}s", {"learned_rank": {"max_wait_s": guard_s}}, NoisyRanker(sd)),
        ("oracle SJF", {"learned_rank": {"max_wait_s": None}}, NoisyRanker(0.0)),
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    requests = read_trace(args.data / TRACE, limit=args.requests).requests()
    outputs = [r.output_tokens for r in requests]
    sd = noise_sd_for_tau(outputs, args.tau, seed=0)
    capacity = metrics(simulate(cluster("fcfs", args.max_num_seqs, args.count), scaled(requests, 5.0)))["throughput_rps"]
    base_rate = rate_per_s(requests)
    rows: list[dict[str, Any]] = []
    sweep: list[dict[str, Any]] = []
    plan = [(load, p) for load in LOADS for p in policies(sd, args.guard_s)]
    taus = (0.2, 0.3, args.tau, 0.5, 0.6, 0.8, 1.0)
    with tqdm(total=len(plan) + 2 * len(taus), desc="ranking bench", unit="run", file=sys.stderr) as bar:
        for load, (name, queue_policy, ranker) in plan:
            trace = scaled(requests, load * capacity / base_rate)
            result = simulate(cluster(queue_policy, args.max_num_seqs, args.count), trace, ranker=ranker)
            rows.append({"load": load, "policy": name, **metrics(result)})
            bar.update(1)
        trace = scaled(requests, args.sweep_load * capacity / base_rate)
        fcfs = metrics(simulate(cluster("fcfs", args.max_num_seqs, args.count), trace))
        for tau in taus:
            tau_sd = noise_sd_for_tau(outputs, tau, seed=0)
            for guard in (None, args.guard_s):
                res = simulate(cluster({"learned_rank": {"max_wait_s": guard}}, args.max_num_seqs, args.count),
                               trace, ranker=NoisyRanker(tau_sd))
                sweep.append({"tau": tau, "guard_s": guard, **metrics(res),
                              "mean_e2e_vs_fcfs": fcfs["mean_e2e_s"] / metrics(res)["mean_e2e_s"]})
                bar.update(1)
    return {"requests": len(requests), "capacity_rps": capacity, "trace_rate_rps": base_rate, "tau": args.tau,
            "noise_sd": sd, "max_num_seqs": args.max_num_seqs, "instances": args.count,
            "guard_s": args.guard_s, "rows": rows, "sweep_load": args.sweep_load, "sweep": sweep}


CAP_STUDY_SEQS = (16, 32, 48, 64, 128)


def cap_study(args: argparse.Namespace) -> None:
    """Does a lower batch cap, which makes a queue form for SJF to order, pay? Capacity per
    `max_num_seqs`, then mean E2E at 80/95% of the `--max-num-seqs` engine's capacity under
    each cap, FCFS and oracle SJF, against FCFS at `--max-num-seqs`."""
    requests = read_trace(args.data / TRACE, limit=args.requests).requests()
    base_rate = rate_per_s(requests)
    caps = {n: metrics(simulate(cluster("fcfs", n, args.count), scaled(requests, 5.0)))["throughput_rps"]
            for n in sorted({*CAP_STUDY_SEQS, args.max_num_seqs})}
    print("capacity req/s by max_num_seqs: " + ", ".join(f"{n}: {c:.2f}" for n, c in caps.items()))
    oracle = {"learned_rank": {"max_wait_s": None}}
    for load in (0.8, 0.95):
        trace = scaled(requests, load * caps[args.max_num_seqs] / base_rate)
        ref = metrics(simulate(cluster("fcfs", args.max_num_seqs, args.count), trace))["mean_e2e_s"]
        cells = []
        for n in caps:
            fcfs = metrics(simulate(cluster("fcfs", n, args.count), trace))["mean_e2e_s"]
            best = metrics(simulate(cluster(oracle, n, args.count), trace, ranker=NoisyRanker(0.0)))["mean_e2e_s"]
            cells.append(f"{n}: FCFS {fcfs:.1f} s, oracle {best:.1f} s ({ref / best:.2f}x)")
        print(f"load {load:.2f} of max_num_seqs {args.max_num_seqs}'s capacity (FCFS there {ref:.2f} s); "
              "mean E2E by cap (FCFS at the reference cap / oracle): " + "; ".join(cells))


def print_table(doc: dict[str, Any]) -> None:
    print(f"Azure conv, first {doc['requests']} requests; {doc['instances']} x A100-80GB llama-3-8b, "
          f"max_num_seqs {doc['max_num_seqs']}; capacity {doc['capacity_rps']:.2f} req/s; "
          f"predictions at tau {doc['tau']} (noise sd {doc['noise_sd']:.3f})")
    print(f"{'load':>5} {'policy':<26}{'mean E2E':>9}{'p90 E2E':>9}{'mean TTFT':>10}{'decode':>8}{'p99 TTFT':>9}"
          f"{'max TTFT':>9}{'req/s':>7}{'FCFS/x':>7}{'ms/tok':>8}{'norm FCFS/x':>12}{'bound':>7}")
    fcfs = {r["load"]: r for r in doc["rows"] if r["policy"] == "fcfs"}
    for r in doc["rows"]:
        f = fcfs[r["load"]]
        print(f"{r['load']:>5.2f} {r['policy']:<26}{r['mean_e2e_s']:>9.2f}{r['p90_e2e_s']:>9.2f}"
              f"{r['mean_ttft_s']:>10.2f}{r['mean_decode_s']:>8.2f}{r['p99_ttft_s']:>9.2f}{r['max_ttft_s']:>9.1f}"
              f"{r['throughput_rps']:>7.2f}{f['mean_e2e_s'] / r['mean_e2e_s']:>7.2f}"
              f"{1000 * r['mean_norm_latency_s']:>8.1f}{f['mean_norm_latency_s'] / r['mean_norm_latency_s']:>12.2f}"
              f"{f['mean_e2e_s'] / max(1e-9, f['mean_decode_s']):>7.2f}")
    print("norm = mean over requests of E2E / output tokens (vllm-ltr's metric); bound = FCFS mean E2E over its mean "
          "decode time: the most any queue order can gain on mean E2E (it removes waits, not decode)")
    print(f"tau sweep at load {doc['sweep_load']}: mean E2E FCFS / learned (no guard | guard {doc['guard_s']:g}s), max TTFT")
    for tau in sorted({s["tau"] for s in doc["sweep"]}):
        pair = [s for s in doc["sweep"] if s["tau"] == tau]
        print(f"  tau {tau:.2f}: " + " | ".join(f"{s['mean_e2e_vs_fcfs']:.2f}x (max TTFT {s['max_ttft_s']:.0f}s)" for s in pair))


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    names = list(dict.fromkeys(r["policy"] for r in doc["rows"]))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        rows = [r for r in doc["rows"] if r["policy"] == name]
        x = np.arange(len(rows)) + k * width
        axes[0].bar(x, [r["mean_e2e_s"] for r in rows], width, label=name)
        axes[1].bar(x, [r["max_ttft_s"] for r in rows], width, label=name)
    for ax, title in ((axes[0], "mean end-to-end latency (s)"), (axes[1], "worst TTFT (s, log)")):
        ax.set_xticks(np.arange(len(LOADS)) + 0.4 - width / 2, [f"{int(load * 100)}% load" for load in LOADS])
        ax.set_title(title)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    for guard in (None, doc["guard_s"]):
        pts = [s for s in doc["sweep"] if s["guard_s"] == guard]
        axes[2].plot([s["tau"] for s in pts], [s["mean_e2e_vs_fcfs"] for s in pts], marker="o",
                     label="learned SJF" + ("" if guard is None else f" + guard {guard:g}s"))
    axes[2].axhline(1.0, color="grey", lw=0.8)
    axes[2].axvline(doc["tau"], color="grey", ls=":", lw=0.8)
    axes[2].set_xlabel("predictor Kendall tau")
    axes[2].set_title(f"mean E2E, FCFS / learned, at {int(doc['sweep_load'] * 100)}% load")
    axes[2].legend(fontsize=8)
    fig.suptitle(f"Azure conversation trace, {doc['instances']} x A100 llama-3-8b (max_num_seqs {doc['max_num_seqs']}), "
                 f"simulated; predictions at tau {doc['tau']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _real_prompts(data: Path) -> list[str]:
    """Two real prompts of ~1,600 characters (AlpacaEval answers used as texts to summarise,
    one ASCII, one not), when the shared data is there: the synthetic 1,562-character prompt
    repeats one sentence, which flatters the n-gram counting."""
    path = data / "lengths" / "alpaca_eval" / "model_outputs" / "gpt4_1106_preview" / "model_outputs.json"
    if not path.is_file():
        return []
    answers = [a["output"] for a in json.loads(path.read_text(encoding="utf-8"))]
    pick = [next(a for a in answers if a.isascii() == ascii_only and 1400 < len(a) < 1800) for ascii_only in (True, False)]
    return ["Summarise the following answer in three bullets.\n\n" + a for a in pick]


def predictor_cost(model_path: Path | None, samples: int, data: Path) -> None:
    """Scoring one request on one core: wall time, and the thread's CPU time (what the
    scoring costs a core, robust to a box shared with other jobs), for `score()` and, in the
    same run and interleaved call by call, for the path before the issue-11 cost work
    (bench/ranking_cost_baseline.py, the same features and scores) and for scikit-learn's
    HashingVectorizer path."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ranking_cost_baseline import BaselineScorer

    from scheduler.predictors.rank import load_rank_model

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    model = load_rank_model(model_path)
    before = BaselineScorer(model)
    texts = ["What is the capital of France?",
             "Write a detailed, 800-word blog post about a trip to Japan, with headings and tips. " * 3,
             "Summarise the following report.\n" + "The quarterly revenue grew by 4% while costs fell. " * 30,
             *_real_prompts(data)]
    records: list[dict[str, Any]] = [{"messages": [{"role": "user", "content": t}], "model": "llama-3-8b", "max_tokens": 512} for t in texts]
    print(f"box load average at start: {' / '.join(f'{x:.2f}' for x in os.getloadavg())} (1 / 5 / 15 min)")

    def library_path(record: dict[str, Any]) -> None:
        row = model.design_matrix([record])[0]  # dense features, text layer, model prior
        model.booster.predict(np.column_stack([
            np.array([row[:-2]]), model.text_scores([record["messages"][0]["content"]]), np.array([row[-1:]]),
        ]), num_threads=1)

    paths = {"score": model.score, "before": before.score}
    for record in records:
        assert before.score(record) == model.score(record)  # the same number, or the ratio means nothing
        # after other work: scikit-learn's path runs before every timed call (caches cold-ish,
        # as on a router's worker thread between requests), for both paths alike
        cold: dict[str, list[float]] = {name: [] for name in paths}
        wall: list[float] = []
        library: list[float] = []
        for _ in range(samples):
            for name, path in paths.items():
                c0 = time.thread_time_ns()
                library_path(record)
                c1, t1 = time.thread_time_ns(), time.perf_counter_ns()
                path(record)
                cold[name].append((time.thread_time_ns() - c1) / 1000)
                library.append((c1 - c0) / 1000)
                if name == "score":
                    wall.append((time.perf_counter_ns() - t1) / 1000)
        # back to back: blocks of 50 calls of one path, then of the other (caches warm)
        warm: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(max(1, samples // 50)):
            for name, path in paths.items():
                for _ in range(50):
                    c0 = time.thread_time_ns()
                    path(record)
                    warm[name].append((time.thread_time_ns() - c0) / 1000)
        (f, b), (wf, wb) = ([np.percentile(t[name], [50, 99]) for name in paths] for t in (cold, warm))
        w, lib = np.percentile(wall, [50, 99]), np.percentile(library, 50)
        text = record["messages"][0]["content"]
        kind = "" if text.isascii() else ", not ASCII"
        print(f"{len(text):>5} chars{kind}: after other work score() CPU p50 {f[0]:.0f} us p99 {f[1]:.0f} us (wall p50 "
              f"{w[0]:.0f} p99 {w[1]:.0f}), before p50 {b[0]:.0f} p99 {b[1]:.0f}, before/score() {b[0] / f[0]:.2f}x / "
              f"{b[1] / f[1]:.2f}x; back to back score() p50 {wf[0]:.0f} p99 {wf[1]:.0f}, before p50 {wb[0]:.0f} p99 "
              f"{wb[1]:.0f}, {wb[0] / wf[0]:.2f}x / {wb[1] / wf[1]:.2f}x; scikit-learn hashing path CPU p50 {lib:.0f} us")
    # the loop above hashes each n-gram once and then hits the gram -> bucket cache; a prompt
    # never seen before pays murmurhash for each of its n-grams
    layer = model._text_layer
    assert layer is not None
    for record in records[2:]:
        fresh: dict[str, list[float]] = {"score": [], "before": []}
        for _ in range(max(1, samples // 4)):
            for name, cache in (("score", layer._index), ("before", before.text_layer._index)):
                cache.clear()
                c0 = time.thread_time_ns()
                paths[name](record)
                fresh[name].append((time.thread_time_ns() - c0) / 1000)
        (p50, p99), (b50, b99) = (np.percentile(fresh[name], [50, 99]) for name in fresh)
        print(f"{len(record['messages'][0]['content']):>5} chars, n-gram cache cleared before each call: score() CPU p50 "
              f"{p50:.0f} us p99 {p99:.0f} us; before p50 {b50:.0f} us p99 {b99:.0f} us ({b50 / p50:.2f}x / {b99 / p99:.2f}x)")
    batch = records[:3] * 100
    for name, score_all in (("score_batch", model.score_batch),
                            ("before (one at a time)", lambda rs: [before.score(r) for r in rs])):
        c0 = time.thread_time_ns()
        score_all(batch)
        print(f"{name} of {len(batch)}: {(time.thread_time_ns() - c0) / len(batch) / 1000:.0f} us CPU per request")
    print(f"box load average at end: {' / '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED_DATA_DEFAULT)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--count", type=int, default=1, help="instances")
    parser.add_argument("--tau", type=float, default=0.37,
                        help="Kendall tau of the predictions; default: the shipped ranker's held-out tau per batch of "
                        "one model's requests (0.372), what one engine's queue sees (0.489 overall also counts the "
                        "model prior, which ranks models, not one model's requests)")
    parser.add_argument("--guard-s", type=float, default=60.0, help="starvation guard max_wait_s")
    parser.add_argument("--sweep-load", type=float, default=0.95)
    parser.add_argument("--out", type=Path, default=Path("docs/img/ranking.png"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--predictor", action="store_true", help="measure the ranker's scoring cost instead")
    parser.add_argument("--cap-study", action="store_true",
                        help="instead: does a lower max_num_seqs (a queue for SJF to order) pay at 80/95%% load?")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--samples", type=int, default=2000)
    args = parser.parse_args()
    if args.predictor:
        predictor_cost(args.model, args.samples, args.data)
        return 0
    if args.cap_study:
        cap_study(args)
        return 0
    doc = run(args)
    print_table(doc)
    plot(doc, args.out)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
