"""The shipped ranker's scores on real prompts, frozen: every feature value, the text layer's
output and the score of 339 requests built from ../shared/data (AlpacaEval instructions and
answers, MT-Bench two-turn chats with a system prompt, GSM8K, MMLU; instructions of 17 to
5,575 characters, 27 not ASCII, 26 clipped) must equal the frozen values to 1e-9, and the dense
features bit for bit. The dense features are those the scoring code computed before the
issue-11 cost work (main at 0eec9b5; their hashes were unchanged when the fixture was
rewritten); the text layer's output and the scores were regenerated in issue 11 stop 24 for
the new shipped ranker (the booster weighted per prompt, docs/ranking.md).

The expected values live in tests/data/rank_scores_spec3.json, written by

    TOKENYARD_SHARED_DATA=../shared/data PYTHONPATH=. python tests/test_rank_frozen_scores.py --write

from the code they freeze; regenerate only when the feature spec or the shipped model
changes on purpose (and say so in the commit)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from scheduler.predictors.features import request_features
from scheduler.predictors.rank import RankModel, load_rank_model

FIXTURE = Path(__file__).with_name("data") / "rank_scores_spec3.json"
_MODELS = ["meta-llama/Meta-Llama-3-8B-Instruct", "gpt-4o-2024-05-13", "Qwen1.5-72B-Chat", "phi-2", "",
           "mistralai/Mixtral-8x7B-Instruct-v0.1", "some-unknown-13b", "gemma-2b-it"]
_SYSTEM = "You are a helpful assistant. Answer accurately; keep it short unless asked for detail."


def _sha(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()[:16]


def _record(i: int, source: str, messages_or_prompt: Any) -> dict[str, Any]:
    record: dict[str, Any] = {"model": _MODELS[i % len(_MODELS)]}
    if isinstance(messages_or_prompt, str) and i % 3 == 0:
        record["prompt"] = messages_or_prompt
    elif isinstance(messages_or_prompt, str):
        record["messages"] = [{"role": "user", "content": messages_or_prompt}]
    else:
        record["messages"] = messages_or_prompt
    if i % 4 == 1:
        record["max_tokens"] = 64 + 37 * i
    if i % 5 == 2:
        record["temperature"], record["top_p"] = 0.2 + (i % 7) / 10, 0.9
    record["_id"] = f"{source}:{i}"
    return record


def cases(shared: Path) -> list[dict[str, Any]]:
    """The requests, built deterministically from the shared data (the `_id` key is the
    case's name; the scorer ignores unknown keys)."""
    csv.field_size_limit(1 << 30)
    out: list[dict[str, Any]] = []
    alpaca = shared / "lengths" / "alpaca_eval"
    with (alpaca / "derived_instructions.csv").open(newline="") as handle:
        instructions = [row["instruction"] for row in csv.DictReader(handle)]
    longest = sorted(range(len(instructions)), key=lambda k: -len(instructions[k]))[:10]
    for k in sorted(set(range(0, len(instructions), 5)) | set(longest)):
        out.append(_record(len(out), f"alpaca:{k}", instructions[k]))
    answers = [a["output"] for a in json.loads((alpaca / "model_outputs" / "gpt4_1106_preview" / "model_outputs.json")
                                               .read_text(encoding="utf-8"))]
    for k in range(3, len(answers), 25):  # long texts, some not ASCII, some clipped
        out.append(_record(len(out), f"answer:{k}", "Summarise the following answer in three bullets.\n\n" + answers[k]))
    mt = shared / "routing" / "routellm" / "mt_bench" / "question.jsonl"
    for k, line in enumerate(mt.read_text(encoding="utf-8").splitlines()[::2]):
        turns = json.loads(line)["turns"]
        out.append(_record(len(out), f"mt_bench:{k}", [
            {"role": "system", "content": _SYSTEM}, {"role": "user", "content": turns[0]},
            {"role": "assistant", "content": answers[k * 11]}, {"role": "user", "content": turns[1]},
        ]))
    with (shared / "routing" / "routellm" / "gsm8k" / "gsm8k_responses.csv").open(newline="") as handle:
        gsm = [row["prompt"] for row in csv.DictReader(handle)]
    for k in range(0, len(gsm), 26):
        out.append(_record(len(out), f"gsm8k:{k}", gsm[k]))
    mmlu = sorted((shared / "routing" / "routellm" / "mmlu" / "responses").glob("mmlu_*.csv"))
    for f, path in enumerate(mmlu[::2]):
        with path.open(newline="") as handle:
            rows = [row["prompt"] for row in csv.DictReader(handle)]
        for k in (0, len(rows) // 2) if f % 2 == 0 else (max(range(len(rows)), key=lambda j: len(rows[j])),):
            out.append(_record(len(out), f"{path.stem}:{k}", rows[k]))
    return out


def _dense_sha(dense: tuple[float, ...]) -> str:
    return _sha(struct.pack(f"<{len(dense)}d", *dense))


def _input_sha(record: dict[str, Any]) -> str:
    return _sha(json.dumps(record, sort_keys=True, ensure_ascii=False).encode())


def frozen_values(model: RankModel, record: dict[str, Any]) -> dict[str, Any]:
    feats = request_features(record)
    layer = model._text_layer
    assert layer is not None
    return {"id": record["_id"], "input": _input_sha(record), "dense": _dense_sha(feats.dense),
            "text_layer": layer.score(feats.instruction_text), "score": model.score(record)}


@pytest.fixture(scope="module")
def model() -> RankModel:
    return load_rank_model()


def test_the_fixture_holds_a_few_hundred_varied_prompts(shared_data: Path) -> None:
    records = cases(shared_data)
    expected = json.loads(FIXTURE.read_text())
    assert [c["id"] for c in expected["cases"]] == [r["_id"] for r in records]
    texts = [request_features(r).instruction_text for r in records]
    assert len(records) >= 300
    assert min(map(len, texts)) < 40 and max(map(len, texts)) > 2000  # short ones and clipped ones
    assert sum(not t.isascii() for t in texts) >= 10
    assert sum("messages" in r and len(r["messages"]) > 1 for r in records) >= 30


def test_scores_and_features_equal_the_frozen_ones(model: RankModel, shared_data: Path) -> None:
    expected = {c["id"]: c for c in json.loads(FIXTURE.read_text())["cases"]}
    for record in cases(shared_data):
        want = expected[record["_id"]]
        got = frozen_values(model, record)
        assert got["input"] == want["input"], f"{record['_id']}: the shared data changed under this case"
        assert got["dense"] == want["dense"], f"{record['_id']}: a dense feature changed"
        assert got["text_layer"] == pytest.approx(want["text_layer"], abs=1e-12), record["_id"]
        assert got["score"] == pytest.approx(want["score"], abs=1e-9), record["_id"]
        # score_batch is the batched path of the same numbers
        assert float(model.score_batch([record])[0]) == pytest.approx(want["score"], abs=1e-9), record["_id"]


def test_score_batch_of_all_cases_equals_one_at_a_time(model: RankModel, shared_data: Path) -> None:
    records = cases(shared_data)
    batch = model.score_batch(records)
    assert [float(b) for b in batch] == pytest.approx([model.score(r) for r in records], abs=1e-9)


def _write() -> None:
    shared = Path(os.environ.get("TOKENYARD_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    model = load_rank_model()
    doc = {"note": "written by tests/test_rank_frozen_scores.py --write; dense = sha256[:16] of the little-endian "
                   "doubles of RequestFeatures.dense; input = sha256[:16] of the case's JSON",
           "cases": [frozen_values(model, r) for r in cases(shared)]}
    FIXTURE.parent.mkdir(exist_ok=True)
    lines = ",\n".join(json.dumps(c) for c in doc["cases"])
    FIXTURE.write_text(f'{{"note": {json.dumps(doc["note"])},\n"cases": [\n{lines}\n]}}\n')
    print(f"wrote {len(doc['cases'])} cases to {FIXTURE}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_rank_frozen_scores.py --write")
    _write()
