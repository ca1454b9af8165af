"""Predicted ranks in the simulator: the noise model of a chosen Kendall tau, and
shortest-predicted-first scheduling through the real engine core."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from scheduler.predictors.rank import load_rank_model
from sim.cluster import parse_cluster
from sim.rank_noise import ModelRanker, NoisyRanker, measured_tau, noise_sd_for_tau
from sim.simulator import simulate
from sim.traces import read_trace
from sim.workload import TraceRequest


def _cluster(queue_policy: object) -> object:
    return parse_cluster({
        "default_model": "llama-3-8b",
        "pools": [{"name": "a", "gpu": "A100-80GB", "model": "llama-3-8b", "count": 1,
                   "engine": {"max_num_seqs": 8, "max_num_batched_tokens": 4096}}],
        "dispatch": {"scorers": ["least_outstanding"], "picker": "max_score"},
        "queue": {"policy": queue_policy},
    }, "test")


def _bimodal_trace(n: int, rate_per_s: float) -> list[TraceRequest]:
    rng = random.Random(3)
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate_per_s)
        tokens = rng.choice([rng.randint(5, 20), rng.randint(400, 800)])
        out.append(TraceRequest(request_id=f"r{i}", arrival_s=t, input_tokens=200, output_tokens=tokens))
    return out


@pytest.mark.parametrize("target", [0.2, 0.4, 0.6])
def test_noise_model_reproduces_the_target_tau_on_the_azure_trace(shared_data, target: float) -> None:
    trace = read_trace(shared_data / "traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv", limit=3000)
    outputs = [r.output_tokens for r in trace]
    sd = noise_sd_for_tau(outputs, target)
    assert measured_tau(outputs, sd, seed=0) == pytest.approx(target, abs=0.01)
    # on other requests of the same trace (other noise draws) it holds too
    other = [r.output_tokens for r in read_trace(trace.path, window_s=(1200, 1800))][:2000]
    assert measured_tau(other, sd, seed=5) == pytest.approx(target, abs=0.04)


def test_noisy_ranker_is_per_request_and_exact_at_zero_noise() -> None:
    req = TraceRequest(request_id="x1", arrival_s=0.0, input_tokens=10, output_tokens=99)
    assert NoisyRanker(0.0)(req) == pytest.approx(math.log1p(99))
    assert NoisyRanker(1.0, seed=4)(req) == NoisyRanker(1.0, seed=4)(req)
    assert NoisyRanker(1.0, seed=4)(req) != NoisyRanker(1.0, seed=5)(req)
    with pytest.raises(ValueError, match="noise_sd"):
        NoisyRanker(-1.0)
    with pytest.raises(ValueError, match="target tau"):
        noise_sd_for_tau([1, 2, 3] * 10, 1.5)


def test_model_ranker_scores_prompts_and_falls_back() -> None:
    ranker = ModelRanker(load_rank_model(), fallback=NoisyRanker(0.0))
    with_prompt = TraceRequest("p", 0.0, 20, 5, prompt="Write a 1000-word story about a lighthouse keeper.")
    without = TraceRequest("q", 0.0, 20, 5)
    assert ranker(with_prompt) != pytest.approx(math.log1p(5))
    assert ranker(without) == pytest.approx(math.log1p(5))


def test_predicted_shortest_first_cuts_queueing_and_the_guard_bounds_it() -> None:
    trace = _bimodal_trace(400, rate_per_s=2.2)
    fcfs = simulate(_cluster("fcfs"), trace)
    oracle = simulate(_cluster({"learned_rank": {"max_wait_s": None}}), trace, ranker=NoisyRanker(0.0))
    guarded = simulate(_cluster({"learned_rank": {"max_wait_s": 20}}), trace, ranker=NoisyRanker(0.0))

    def mean_e2e(result: object) -> float:
        return float(np.mean([r.e2e_s for r in result.records]))  # type: ignore[attr-defined]

    def max_ttft(result: object) -> float:
        return max(r.ttft_s for r in result.records)  # type: ignore[attr-defined]

    assert len(oracle.records) == len(fcfs.records) == 400
    assert mean_e2e(oracle) < 0.8 * mean_e2e(fcfs)
    assert max_ttft(guarded) < max_ttft(oracle)


def test_queue_order_moves_waits_not_decode_time() -> None:
    """What bench/ranking*.py's no-wait bound rests on: on an engine that does not preempt
    (KV to spare), the waiting order changes when a request starts, not how long its decode
    takes, so FCFS mean E2E / mean decode caps any order's gain on mean E2E."""
    trace = _bimodal_trace(400, rate_per_s=2.2)
    fcfs = simulate(_cluster("fcfs"), trace)
    oracle = simulate(_cluster({"learned_rank": {"max_wait_s": None}}), trace, ranker=NoisyRanker(0.0))

    def means(result: object) -> tuple[float, float, float]:
        recs = result.records  # type: ignore[attr-defined]
        e2e = float(np.mean([r.e2e_s for r in recs]))
        ttft = float(np.mean([r.ttft_s for r in recs]))
        return e2e, ttft, e2e - ttft

    (f_e2e, f_ttft, f_decode), (o_e2e, o_ttft, o_decode) = means(fcfs), means(oracle)
    assert sum(r.preemptions for r in oracle.records) == 0
    assert o_ttft < 0.7 * f_ttft  # the order did move the waits
    assert o_decode == pytest.approx(f_decode, rel=0.01)  # and left decode alone
    assert f_e2e / o_e2e <= f_e2e / f_decode  # so the bound holds

def test_sim_run_gives_ranks_from_the_noise_model_and_the_real_ranker(tmp_path, capsys) -> None:
    import json

    from cli.main import main
    from sim.cli import SimJob, TraceOptions, run_job

    trace = tmp_path / "trace.jsonl"
    rows = [{"arrival_s": r.arrival_s, "input_tokens": r.input_tokens, "output_tokens": r.output_tokens}
            for r in _bimodal_trace(300, rate_per_s=2.2)]
    rows[0]["prompt"] = "Write a 1000-word story about a lighthouse keeper."
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cluster = tmp_path / "c.yaml"
    cluster.write_text(
        "default_model: llama-3-8b\n"
        "pools: [{name: a, gpu: A100-80GB, model: llama-3-8b, count: 1,"
        " engine: {max_num_seqs: 8, max_num_batched_tokens: 4096}}]\n"
        "queue: {policy: {learned_rank: {max_wait_s: null}}}\n")

    def mean_e2e(tau: float | None) -> float:
        job = SimJob(cluster_path=str(cluster), trace=TraceOptions(str(trace)), rank_tau=tau)
        return float(np.mean([r.e2e_s for r in run_job(job).result.records]))

    assert mean_e2e(1.0) < 0.8 * mean_e2e(None)  # without ranks the queue is arrival order
    out = tmp_path / "out"
    assert main(["sim", "run", str(cluster), "--trace", str(trace), "--rank-tau", "0.4", "--no-plots",
                 "--no-progress", "--out", str(out)]) == 0
    assert (out / "summary.json").exists()
    with pytest.raises(SystemExit):
        main(["sim", "run", str(cluster), "--trace", str(trace), "--rank-tau", "1.5"])
    assert "expected a Kendall tau in (-1, 1]" in capsys.readouterr().err
