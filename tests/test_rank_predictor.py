"""The output-length ranker: features, the model file, scoring, training and its CLI."""

from __future__ import annotations

import gzip
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cli.main import main
from learn.rank import TrainConfig, fit_model, kendall_tau, prompt_weights, split_by_prompt
from learn.rank_data import Example, RankDataError, load_examples
from scheduler.predictors.features import (
    DENSE_FEATURE_NAMES,
    FEATURE_SPEC,
    hashing_vectorizer,
    request_features,
    tfidf,
)
from scheduler.predictors.rank import (
    DEFAULT_MODEL_PATH,
    HashedTextLayer,
    RankModelError,
    TextLayer,
    load_rank_model,
    model_from_document,
)

_SHORT = ["Answer yes or no: is {} a colour?", "In one word, what is {}?", "Classify {} as animal or plant.",
          "True or false: {} is bigger than a cat."]
_LONG = ["Write a detailed 800-word essay about {}.", "Write a long story about {} with five chapters.",
         "Explain step by step how {} works, in detail, with examples.", "Write a blog post about {}."]
_TOPICS = ["red", "a tiger", "the moon", "coffee", "rivers", "a violin", "snow", "trains", "bread", "the ocean",
           "glass", "a maple tree", "music", "a castle", "copper", "tea", "clouds", "a bicycle", "salt", "honey"]


def _records(n: int, seed: int = 0) -> list[dict[str, object]]:
    rng = random.Random(seed)
    rows: list[dict[str, object]] = []
    for i in range(n):
        topic = _TOPICS[i % len(_TOPICS)] + ("" if i < len(_TOPICS) else f" number {i}")
        long = rng.random() < 0.5
        template = rng.choice(_LONG if long else _SHORT)
        tokens = int(rng.uniform(300, 900) if long else rng.uniform(1, 30))
        rows.append({"messages": [{"role": "user", "content": template.format(topic)}],
                     "model": rng.choice(["llama-3-8b", "qwen2.5-1.5b"]), "output_tokens": tokens})
    return rows


def _examples(n: int, seed: int = 0) -> list[Example]:
    out = []
    for row in _records(n, seed):
        feats = request_features(row)
        out.append(Example(feats, int(row["output_tokens"]), feats.instruction_text, str(row["model"]), "test"))
    return out


@pytest.fixture(scope="module")
def small_model():
    config = TrainConfig(n_estimators=25, num_leaves=8, min_child_samples=5, unseen_models=(), refit_all=False)
    return fit_model(_examples(400), config)


_LAYER_VOCAB = ["the", "a", "of", "write", "essay", "yes", "no", "the a", "write essay", "x"]


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=300)
       | st.lists(st.sampled_from(_LAYER_VOCAB), max_size=40).map(" ".join))
def test_hashed_text_layer_equals_scikit_learn(text: str) -> None:
    from sklearn.feature_extraction.text import TfidfTransformer

    rng = np.random.default_rng(1)
    # a sparse layer over the buckets of a few training texts, as `fit_text_layer` builds it
    counts = hashing_vectorizer().transform(_LAYER_VOCAB + ["write a long essay", "yes or no"])
    idf_full = TfidfTransformer(sublinear_tf=True).fit(counts).idf_
    seen = np.flatnonzero(np.asarray(counts.getnnz(axis=0)).ravel())
    layer = TextLayer(seen.astype(np.int32), rng.normal(size=len(seen)).astype(np.float32),
                      idf_full[seen].astype(np.float32), 3.5, 0.25)
    weights, idf = layer.dense_weights()
    fast = HashedTextLayer(dict(zip(seen.tolist(), layer.weights.tolist(), strict=True)),
                           dict(zip(seen.tolist(), layer.idf.tolist(), strict=True)), 3.5, 0.25)
    expected = float((tfidf(hashing_vectorizer().transform([text]), idf) @ weights)[0]) + 0.25
    assert fast.score(text) == pytest.approx(expected, abs=1e-4)


def test_task_cues_and_model_key() -> None:
    code = request_features({"prompt": "Write a Python function that parses JSON, in detail.", "model": "org/Qwen2-7B"})
    short = request_features({"prompt": "Yes or no: is the sky green? One word."})
    values = dict(zip(DENSE_FEATURE_NAMES, code.dense, strict=True))
    others = dict(zip(DENSE_FEATURE_NAMES, short.dense, strict=True))
    assert values["task_code"] >= 3 and others["task_code"] == 0
    assert others["task_yes_no"] >= 2 and others["format_one_unit"] >= 1
    assert values["format_long_form"] >= 1 and values["format_structured"] >= 1
    assert code.model == "qwen2-7b" and short.model == ""
    assert others["prompt_length_bucket"] == 0 and values["prompt_length_bucket"] == 1


def test_features_read_chat_structure_and_length_requests() -> None:
    record = {"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Write some code"},
        {"role": "assistant", "content": "x" * 999},
        {"role": "user", "content": [{"type": "text", "text": "Now write it again in 500 words"}]},
    ], "model": "Meta-Llama-3-70B-Instruct", "max_tokens": 256}
    feats = request_features(record)
    values = dict(zip(DENSE_FEATURE_NAMES, feats.dense, strict=True))
    assert len(feats.dense) == len(DENSE_FEATURE_NAMES) == len(FEATURE_SPEC["dense"])
    assert feats.instruction_text == "Now write it again in 500 words"
    assert values["n_user_turns"] == 2 and values["n_assistant_turns"] == 1
    assert values["log_prior_assistant_chars"] == pytest.approx(math.log1p(999))
    assert values["log_requested_count"] == pytest.approx(math.log1p(500)) and values["requested_unit_words"] == 1
    assert values["log_max_tokens"] == pytest.approx(math.log1p(256))
    assert values["model_log_params_b"] == pytest.approx(math.log1p(70)) and values["model_family_llama"] == 1
    huge = request_features({"prompt": "a " * 100_000})
    assert len(huge.instruction_text) <= FEATURE_SPEC["max_text_chars"] + 1


def test_model_round_trips_and_orders_requests(small_model, tmp_path: Path) -> None:
    path = tmp_path / "m.json.gz"
    small_model.save(path)
    loaded = load_rank_model(path)
    records = [{"messages": [{"role": "user", "content": "Write a detailed 800-word essay about lamps."}]},
               {"messages": [{"role": "user", "content": "Answer yes or no: is a lamp a colour?"}]}]
    batch = loaded.score_batch(records)
    assert [loaded.score(r) for r in records] == pytest.approx(list(batch), abs=1e-6)
    assert list(batch) == pytest.approx(list(small_model.score_batch(records)), abs=1e-9)
    assert batch[0] > batch[1] + 1.0  # ln tokens: several times longer
    capped = loaded.score({**records[0], "max_tokens": 20})
    assert capped == pytest.approx(math.log1p(20))
    assert not list(tmp_path.glob("*.tmp"))


def test_held_out_tau_on_separable_data(small_model) -> None:
    held = _examples(200, seed=7)
    scores = small_model.score_batch([{"messages": [{"role": "user", "content": e.features.instruction_text}]}
                                      for e in held])
    # two classes with random lengths inside each: tau can reach about 0.5
    assert kendall_tau(scores, np.array([e.output_tokens for e in held])) > 0.4


def test_a_model_for_another_feature_spec_is_refused(small_model, tmp_path: Path) -> None:
    doc = small_model.to_document()
    doc["feature_spec"] = {**doc["feature_spec"], "version": 999}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(RankModelError, match=r"feature spec version 999.*computes feature spec version 3"):
        load_rank_model(path)
    with pytest.raises(RankModelError, match="not a tokenyard-rank model"):
        model_from_document({"format": "something"})
    (tmp_path / "junk.json").write_bytes(gzip.compress(b"{not json"))
    with pytest.raises(RankModelError, match="not a JSON rank model"):
        load_rank_model(tmp_path / "junk.json")
    with pytest.raises(RankModelError, match="cannot read"):
        load_rank_model(tmp_path / "missing.json")


def test_the_default_ranker_ships_small_and_ranks_plain_cases() -> None:
    assert DEFAULT_MODEL_PATH.stat().st_size < 2 * 1024 * 1024
    model = load_rank_model()
    assert model.meta.get("tokenizer", "").startswith("mistral-common")
    long = {"messages": [{"role": "user", "content": "Write a 1000-word short story about a dragon who learns to cook."}]}
    short = {"messages": [{"role": "user", "content": "What is 7 times 8? Reply with just the number."}]}
    assert model.score(long) > model.score(short)


def test_prompt_weights_give_every_prompt_the_same_weight() -> None:
    examples = _examples(60)
    # one prompt answered by 50 models, as an AlpacaEval prompt is, among prompts answered once
    crowd = [Example(examples[0].features, 10 + k, "crowded prompt", f"model-{k}", "test") for k in range(50)]
    pool = crowd + examples[1:]
    w = prompt_weights(pool, 1.0)
    assert w.mean() == pytest.approx(1.0)
    assert w[:50].sum() == pytest.approx(w[50])  # its 50 answers together weigh one single answer
    assert np.all(prompt_weights(pool, 0.0) == 1.0)
    half = prompt_weights(pool, 0.5)
    assert half[:50].sum() / half[50] == pytest.approx(50 ** 0.5)


def test_prompt_weight_is_checked() -> None:
    with pytest.raises(ValueError, match="prompt_weight: expected a number in \\[0, 1\\], got 2"):
        TrainConfig(prompt_weight=2.0)
    with pytest.raises(ValueError, match="only the regression objective takes prompt weights"):
        TrainConfig(objective="lambdarank", prompt_weight=1.0)
    assert TrainConfig(objective="lambdarank", prompt_weight=0.0).prompt_weight == 0.0


def test_train_cli_lambdarank_trains_unweighted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "live.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in _records(200)))
    out = tmp_path / "model.json"
    code = main(["train", "rank", "--data", str(log), "--out", str(out), "--trees", "5", "--leaves", "4",
                 "--unseen-models", "", "--no-refit", "--objective", "lambdarank"])
    assert code == 0, capsys.readouterr().err
    assert load_rank_model(out).meta["prompt_weight"] == 0.0
    code = main(["train", "rank", "--data", str(log), "--out", str(out), "--objective", "lambdarank",
                 "--prompt-weight", "1"])
    assert code == 2
    assert "only the regression objective takes prompt weights" in capsys.readouterr().err


def test_split_never_shares_a_prompt() -> None:
    examples = _examples(300)
    split = split_by_prompt(examples, TrainConfig(unseen_models=("qwen2.5-1.5b",)))
    train_keys = {e.prompt_key for e in split.train}
    assert not train_keys & {e.prompt_key for e in split.test + split.unseen}
    assert all(e.model == "qwen2.5-1.5b" for e in split.unseen)
    assert all(e.model != "qwen2.5-1.5b" for e in split.train + split.test)


def test_train_cli_retrains_from_a_request_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "live.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in _records(300)))
    out = tmp_path / "model.json"
    code = main(["train", "rank", "--data", str(log), "--out", str(out), "--trees", "15", "--leaves", "8",
                 "--unseen-models", "", "--no-refit"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "held-out prompts: model" in printed and out.exists()
    tau = float(printed.split("held-out prompts: model")[1].split()[0])
    assert tau > 0.35
    assert load_rank_model(out).meta["objective"] == "regression"  # the default objective


def test_train_cli_bad_data_says_where(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "bad.jsonl"
    log.write_text(json.dumps({"prompt": "hi", "output_tokens": 3}) + "\n{oops\n")
    code = main(["train", "rank", "--data", str(log), "--out", str(tmp_path / "m.json")])
    assert code == 2
    assert f"{log}:2: not JSON" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()
    with pytest.raises(RankDataError, match="feature spec 0"):
        bad = tmp_path / "spec.jsonl"
        bad.write_text(json.dumps({"feature_spec": 0, "dense": [0.0], "output_tokens": 1}) + "\n")
        load_examples([bad])


def test_rank_score_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "prompts.jsonl"
    source.write_text(json.dumps({"id": "a", "prompt": "Write a 900-word essay on rivers."}) + "\n" +
                      json.dumps({"id": "b", "messages": [{"role": "user", "content": "Yes or no: is ice cold?"}],
                                  "max_tokens": 5}) + "\n")
    out = tmp_path / "scores.jsonl"
    assert main(["rank", "score", "--input", str(source), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"]
    assert rows[0]["score"] > rows[1]["score"] and rows[1]["score"] <= math.log1p(5) + 1e-6
    source.write_text('{"prompt": "x"}\n[1, 2]\n')
    assert main(["rank", "score", "--input", str(source)]) == 2
    assert f"{source}:2: expected an object" in capsys.readouterr().err


@pytest.mark.parametrize(("content", "expected"), [
    (b'{"prompt": 5}\n', ":1: prompt: expected a string or a list of strings, got int"),
    (b'{"messages": "hi"}\n', ":1: messages: expected a list of {role, content} objects"),
    (b'\xff\xfe\x00binary', ": not UTF-8 text (invalid start byte); expected JSON lines"),
    (b'{"prompt": "' + b"a" * 300 + b'"}', ":1: line longer than 200 characters"),
])
def test_rank_score_cli_refuses_bad_records(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch, content: bytes, expected: str) -> None:
    """A bad record is one line naming the file and the line (a number as `prompt` was scored
    as an empty prompt; binary input was a bare codec message), and no output is written."""
    import learn.score_input

    monkeypatch.setattr(learn.score_input, "MAX_LINE_CHARS", 200)
    monkeypatch.setattr(learn.score_input.read_records, "__defaults__", (200,))
    source = tmp_path / "in.jsonl"
    source.write_bytes(content)
    out = tmp_path / "scores.jsonl"
    assert main(["rank", "score", "--input", str(source), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"tokenyard rank score: {source}{expected}", err
    assert not out.exists()


def test_rank_score_cli_unwritable_output_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An --output under a file or onto a folder is one line naming why (was a traceback)."""
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "hello"}\n')
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for output, why in ((blocker / "scores.jsonl", f"{blocker} is a file"), (tmp_path, "it is a folder")):
        assert main(["rank", "score", "--input", str(source), "--output", str(output)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and f"--output {output}: cannot write ({why})" in err, err
    assert blocker.read_text() == "x"


def test_model_prior_orders_a_verbose_model_after_a_terse_one() -> None:
    from learn.rank import _hidden_from_prior

    models = [m for m in ("model-a-7b", "model-b-7b", "model-c-7b", "model-d-7b") if not _hidden_from_prior(m, 0)][:2]
    assert len(models) == 2
    rng = random.Random(3)
    examples = []
    for i in range(400):
        text = f"Tell me about {_TOPICS[i % len(_TOPICS)]} number {i}."
        model = models[i % 2]
        tokens = int(rng.uniform(20, 60) * (8 if model == models[1] else 1))
        feats = request_features({"prompt": text, "model": model})
        examples.append(Example(feats, tokens, text, model, "test"))
    config = TrainConfig(n_estimators=30, num_leaves=8, min_child_samples=5, unseen_models=(), refit_all=False)
    model = fit_model(examples, config)
    assert set(model.model_prior) == set(models)
    assert model.model_prior[models[1]] > model.model_prior[models[0]] + 1.5  # ln(8) ~ 2.1
    prompt = "Tell me about trains number 9000."
    terse, verbose, unknown = (model.score({"prompt": prompt, "model": m}) for m in (*models, "never-seen-3b"))
    assert verbose > terse + 1.0 and math.isfinite(unknown)


def test_the_same_prompt_for_another_model_changes_only_model_features() -> None:
    from learn.rank_data import _with_model

    text = "Write a Python function that lists 10 ideas, in detail."
    base = request_features({"prompt": text, "model": "gpt-4"})
    other = _with_model(base, text, "Qwen/Qwen1.5-72B-Chat")
    direct = request_features({"prompt": text, "model": "Qwen/Qwen1.5-72B-Chat"})
    assert other.dense == direct.dense and other.model == direct.model == "qwen1.5-72b-chat"
    changed = {n for n, a, b in zip(DENSE_FEATURE_NAMES, base.dense, other.dense, strict=True) if a != b}
    assert changed and all(n.startswith("model_") for n in changed)
