"""The simulator's tier noise model (sim/tier_noise.py): scores rank hidden small-ok labels
at the AUC asked for, send the held-out table's share of requests large at any AUC, are the
same per (seed, request id), and reach `tokenyard sim run` through --tier-auc."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from scheduler.predictors.tier import load_predictor
from scheduler.tiers import ThresholdPoint
from sim.cli import SimJob, TraceOptions, run_job
from sim.tier_noise import NoisyTierScores, TierNoise, parse_auc, quality

IDS = [f"req-{i}" for i in range(20_000)]
TABLE = tuple(load_predictor().thresholds)


def _draw(auc: float, share: float | None = 0.4, seed: int = 0,
          table: tuple[ThresholdPoint, ...] = TABLE) -> tuple[np.ndarray, np.ndarray]:
    scores = NoisyTierScores(TierNoise(auc, share), seed, table)
    return (np.array([scores.small_ok(i) for i in IDS], dtype=float), np.array([scores.score(i) for i in IDS]))


@pytest.mark.parametrize("auc", [0.5, 0.6, 0.75, 0.9, 0.99])
def test_scores_rank_the_labels_at_the_target_auc(auc: float) -> None:
    labels, scores = _draw(auc)
    assert abs(labels.mean() - 0.4) < 0.015
    assert abs(roc_auc_score(labels, scores) - auc) < 0.012
    assert scores.min() >= 0.0 and scores.max() <= 1.0


@pytest.mark.parametrize("auc", [0.5, 0.8])
def test_a_threshold_sends_the_tables_share_large_at_any_auc(auc: float) -> None:
    _, scores = _draw(auc)
    for row in TABLE[2:-2:4]:
        assert abs(float(np.mean(scores < row.threshold)) - row.large_share) < 0.02, row


def test_without_a_table_scores_are_uniform_percentiles() -> None:
    _, scores = _draw(0.7, table=())
    assert np.allclose(np.quantile(scores, [0.1, 0.5, 0.9]), [0.1, 0.5, 0.9], atol=0.015)


def test_same_request_same_label_and_score_and_seeds_differ() -> None:
    a, b = NoisyTierScores(TierNoise(0.8), 1, TABLE), NoisyTierScores(TierNoise(0.8), 1, TABLE)
    assert [a.score(i) for i in IDS[:50]] == [b.score(i) for i in IDS[:50]]
    other = NoisyTierScores(TierNoise(0.8), 2, TABLE)
    assert [a.score(i) for i in IDS[:50]] != [other.score(i) for i in IDS[:50]]


def test_oracle_sends_exactly_the_ok_requests_small_and_quality_counts_losses() -> None:
    scores = NoisyTierScores(TierNoise(1.0, 0.5), 0, ())
    served = {i: ("small" if scores.score(i) >= 0.5 else "large") for i in IDS[:2000]}
    assert quality(served, scores, "small") == 1.0
    coin = NoisyTierScores(TierNoise(0.5, 0.5), 0, ())
    served = {i: ("small" if coin.score(i) >= 0.5 else "large") for i in IDS[:2000]}
    assert 0.7 < quality(served, coin, "small") < 0.8  # half go small, half of those not ok


def test_bad_knobs_say_what_was_expected() -> None:
    with pytest.raises(ValueError, match=r"auc: expected a number in \(0, 1\], got 1.5"):
        TierNoise(1.5)
    with pytest.raises(ValueError, match=r"small_ok_share: expected a number in \[0, 1\], got -0.1"):
        TierNoise(0.7, -0.1)
    with pytest.raises(argparse.ArgumentTypeError, match="expected a ROC AUC in"):
        parse_auc("0")


def test_sim_run_tier_auc_routes_the_ok_requests_small(tmp_path: Path) -> None:
    """On a prompt-less trace, a better predictor sends the same share small but loses less."""
    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,input_tokens,output_tokens\n" + "".join(
        f"{i * 0.05:.2f},200,20\n" for i in range(600)))
    cluster = tmp_path / "c.yaml"
    cluster.write_text(
        "default_model: auto\npools:\n"
        "  - {name: small, gpu: L4, model: qwen2.5-1.5b, count: 1, engine: {max_num_seqs: 64}}\n"
        "  - {name: large, gpu: A100-80GB, model: llama-3-8b, count: 1, engine: {max_num_seqs: 64}}\n"
        "policy:\n  tiers: {alias: auto, small_model: qwen2.5-1.5b, large_model: llama-3-8b, policy: quality_only,\n"
        "          default: {cost_budget: 0.5}}\n")
    outcome = {}
    for auc in (0.5, 0.95):
        job = SimJob(cluster_path=str(cluster), trace=TraceOptions(str(trace)), tier_auc=auc, tier_small_ok_share=0.5)
        records = run_job(job).result.records
        served = {r.request_id: r.model for r in records}
        scores = NoisyTierScores(TierNoise(auc, 0.5), 0, TABLE)
        small = sum(m == "qwen2.5-1.5b" for m in served.values()) / len(served)
        outcome[auc] = (small, quality(served, scores, "qwen2.5-1.5b"))
    assert abs(outcome[0.5][0] - outcome[0.95][0]) < 0.08 and 0.3 < outcome[0.5][0] < 0.7
    assert outcome[0.95][1] > outcome[0.5][1] + 0.15
