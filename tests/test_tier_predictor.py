"""The tier predictor: model file checks, scoring, metrics, the data readers on the real
routing data, and the `tokenyard train tier` / `tokenyard tier score` commands."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from cli.main import main
from learn.tier_data import TierDataError, read_any, read_plain
from learn.tier_metrics import aiq, apgr, cpt, routing_curve, summary
from scheduler.predictors.tier import (
    MODEL_VERSION,
    STAT_NAMES,
    TierModelError,
    TierPredictor,
    load_predictor,
    text_stats,
)


@pytest.fixture(scope="module")
def default_doc() -> dict:
    path = Path(__file__).resolve().parents[1] / "scheduler" / "predictors" / "tier_default.json"
    return json.loads(path.read_text())


def test_default_model_is_small_and_scores_probabilities() -> None:
    path = Path(__file__).resolve().parents[1] / "scheduler" / "predictors" / "tier_default.json"
    assert path.stat().st_size < 2 * 1024 * 1024
    predictor = load_predictor()
    texts = ["What is 2+2?", "Write a poem about the sea.", "x" * 50_000, ""]
    batch = predictor.score_many(texts)
    assert batch.shape == (4,) and np.all((batch >= 0) & (batch <= 1))
    assert [predictor.score(t) for t in texts] == pytest.approx(list(batch))
    assert len(predictor.thresholds) >= 10
    assert predictor.meta["contaminated_dropped"] == 17


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "other"}, "format is 'other'"),
        ({"version": MODEL_VERSION + 1}, "retrain"),
        ({"features": {"hash": {"analyzer": "char"}, "stats": list(STAT_NAMES)}}, "features.hash.analyzer"),
        ({"features": {"hash": None, "stats": ["log_chars"]}}, "features.hash"),
        ({"classifier": "svm"}, "classifier 'svm'"),
        ({"stat_mean": [0.0]}, "stat_mean"),
        ({"calibration": {"x": [1.0, 0.0], "y": [0.0, 1.0]}}, "x ascending"),
        ({"length_prior": {"weight": 1.5, "logit_mean": 0.0, "logit_scale": 1.0}}, "weight in"),
        ({"length_prior": {"weight": 0.4, "logit_mean": "x", "logit_scale": 1.0}}, "length_prior.logit_mean"),
        ({"length_prior": [0.4]}, "length_prior: expected an object"),
    ],
)
def test_bad_model_files_are_refused_with_the_reason(default_doc: dict, change: dict, message: str) -> None:
    with pytest.raises(TierModelError, match=message):
        TierPredictor({**default_doc, **change}, "m.json")


def test_length_prior_weight_moves_the_order_toward_longer_prompts_large(default_doc: dict) -> None:
    assert default_doc["length_prior"]["weight"] > 0  # the packaged model blends it
    texts = [f"Question {k}: " + "word " * (5 + 40 * k) + "?" for k in range(6)] + ["Solve 12 + 7 =", "Write a haiku."]
    prior_only = TierPredictor({**default_doc, "length_prior": {**default_doc["length_prior"], "weight": 1.0}})
    scores = prior_only.raw_scores(texts[:6])
    assert np.all(np.diff(scores) < 0)  # longer prompt, lower p_small_ok: the prior alone
    trees_only = TierPredictor({key: value for key, value in default_doc.items() if key != "length_prior"})
    blended = TierPredictor(default_doc)
    assert not np.allclose(trees_only.raw_scores(texts), blended.raw_scores(texts))
    assert np.all((blended.score_many(texts) >= 0) & (blended.score_many(texts) <= 1))


def test_stats_mismatch_names_the_difference(default_doc: dict) -> None:
    features = {**default_doc["features"], "stats": [*STAT_NAMES[:-1], "cue_other"]}
    with pytest.raises(TierModelError, match="differ from this code"):
        TierPredictor({**default_doc, "features": features}, "m.json")


def test_unreadable_model_file(tmp_path: Path) -> None:
    bad = tmp_path / "m.json"
    bad.write_text("{not json")
    with pytest.raises(TierModelError, match="not a JSON tier model"):
        load_predictor(bad)
    with pytest.raises(TierModelError, match="cannot read"):
        load_predictor(tmp_path / "missing.json")


def test_text_stats_see_choices_code_and_numbers() -> None:
    stats = dict(zip(STAT_NAMES, text_stats("Which?\nA. 1\nB. 2\nC. 3\n```def f(): return 4```"), strict=True))
    assert stats["choices"] > 1.0 and stats["code_marks"] > 0 and stats["numbers"] > 1.0
    assert stats["questions"] > 0


def test_metrics_oracle_random_and_hand_computed() -> None:
    rng = random.Random(0)
    q_small = [float(rng.random() < 0.6) for _ in range(2000)]
    q_large = [max(s, float(rng.random() < 0.8)) for s in q_small]
    oracle = [1.0 if s >= big else 0.0 for s, big in zip(q_small, q_large, strict=True)]
    assert apgr(routing_curve(oracle, q_small, q_large)) > 0.8
    assert summary(np.zeros(2000), q_small, q_large)["apgr"] == pytest.approx(0.5, abs=0.03)
    # two prompts: only the second gains from the large tier; sending it first recovers all
    curve = routing_curve([0.9, 0.1], [1.0, 0.0], [1.0, 1.0])
    assert list(curve.pgr) == [0.0, 1.0, 1.0]
    assert apgr(curve) == pytest.approx(0.75)
    assert cpt(curve, 0.5) == 0.5 and cpt(curve, 0.8) == 0.5
    assert aiq(curve) == pytest.approx((0.5 + 1.0) / 2 * 0.5 + 1.0 * 0.5)


def test_routing_data_drops_contaminated_prompts(shared_data: Path) -> None:
    rows, dropped = read_any(shared_data / "routing")
    assert dropped == 17
    benchmarks = {r.benchmark for r in rows}
    assert benchmarks == {"gsm8k", "mmlu", "mt_bench"}
    assert len({r.task for r in rows if r.benchmark == "mmlu"}) == 57
    contaminated = json.loads((shared_data / "routing/routellm/gsm8k/contaminated_prompts.jsonl").read_text().splitlines()[0])
    assert contaminated["eval_prompt"] not in {r.prompt for r in rows}
    mt = [r for r in rows if r.benchmark == "mt_bench"]
    assert len(mt) == 160 and all(0 <= r.q_small <= 1 for r in mt)
    alpaca, _ = read_any(shared_data / "lengths")
    assert len(alpaca) == 805 and all(r.q_large == 0.5 for r in alpaca)


def test_plain_data_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "small_score": 1, "large_score": 1}\n{"prompt": "b", "small_score": 2, "large_score": 1}\n')
    with pytest.raises(TierDataError, match=r"d.jsonl:2: .*\[0, 1\]"):
        read_plain(path)
    with pytest.raises(TierDataError, match="no such file"):
        read_any(tmp_path / "nope")


def _synthetic(path: Path, n: int = 240) -> None:
    """Two made-up benchmarks where long prompts need the large tier."""
    rng = random.Random(1)
    lines = []
    for i in range(n):
        words = rng.randint(3, 60)
        hard = words > 30
        small_ok = rng.random() < (0.2 if hard else 0.9)
        bench = "alpha" if i % 2 else "beta"
        lines.append(json.dumps({"prompt": " ".join(["word"] * words) + f" item {i}?", "benchmark": bench,
                                 "task": f"{bench}/{i % 6}", "small_score": float(small_ok), "large_score": 1.0}))
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("classifier", ["lightgbm", "logistic"])
def test_train_then_score_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str], classifier: str) -> None:
    data = tmp_path / "train.jsonl"
    _synthetic(data)
    model = tmp_path / "tier.json"
    assert main(["train", "tier", "--data", str(data), "--out", str(model), "--classifier", classifier,
                 "--plots", str(tmp_path / "img")]) == 0
    out = capsys.readouterr().out
    assert "by_task" in out and "APGR" in out
    doc = json.loads(model.read_text())
    assert doc["trained"]["held_out"]["by_task"]["mean"]["apgr"] > 0.6  # the length signal is learnable
    assert (tmp_path / "img" / "tier_cost_quality.png").stat().st_size > 1000
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "word word item?"}\n'
                       '{"id": "b", "messages": [{"role": "user", "content": "' + "word " * 55 + '"}]}\n')
    scored = tmp_path / "scored.jsonl"
    assert main(["tier", "score", "--model", str(model), "--input", str(prompts), "--output", str(scored)]) == 0
    lines = [json.loads(x) for x in scored.read_text().splitlines()]
    assert [x["id"] for x in lines] == ["a", "b"]
    assert lines[0]["p_small_ok"] > lines[1]["p_small_ok"]


def test_score_bad_input_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"text": "no prompt"}\n')
    out = tmp_path / "out.jsonl"
    assert main(["tier", "score", "--input", str(prompts), "--output", str(out)]) == 2
    assert "p.jsonl:2: expected an object with 'prompt' or 'messages'" in capsys.readouterr().err
    assert not out.exists()
    assert main(["tier", "score", "--model", str(tmp_path / "none.json"), "--input", str(prompts)]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_score_default_model_to_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "What is the capital of France?"}\n')
    assert main(["tier", "score", "--input", str(prompts)]) == 0
    line = json.loads(capsys.readouterr().out)
    assert 0.0 <= line["p_small_ok"] <= 1.0


def test_another_benchmark_and_model_pair_in_the_routellm_layout(tmp_path: Path) -> None:
    bench = tmp_path / "arc"
    bench.mkdir()
    (bench / "arc_responses.csv").write_text(
        "prompt,tiny,medium,huge,tiny_response\n"
        "q1,0,0.5,1,x\nq2,1,1,1,y\nq3,0.25,0,1,z\n")
    rows, dropped = read_any(tmp_path)
    assert dropped == 0 and [r.task for r in rows] == ["arc"] * 3
    assert [(r.q_small, r.q_large) for r in rows] == [(0.0, 1.0), (1.0, 1.0), (0.25, 1.0)]  # weakest vs strongest
    rows, _ = read_any(tmp_path, small_model="medium", large_model="huge")
    assert [r.q_small for r in rows] == [0.5, 1.0, 0.0]
    with pytest.raises(TierDataError, match="no model column 'giant'"):
        read_any(tmp_path, large_model="giant")
