"""The fast scoring path (`RankModel.score`) against a straightforward reference: the text
layer by scikit-learn, the booster by `Booster.predict`, and the features that the fast path
computes differently (word split and count, number + unit scan, brevity regex, cue-word and
format-cue counts, character-class fractions, cached model-name features) recomputed the
plain way, as feature spec 3 defines them; `SubstringScan` against `bytes.count`."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.predictors import features as F
from scheduler.predictors.rank import RankModel, load_rank_model
from scheduler.predictors.substrings import SubstringScan

_PLAIN_DIGITS = re.compile(r"\b\d{1,5}")
_PLAIN_BREVITY = re.compile(
    r"\b(brief(ly)?|short|concise(ly)?|one word|single word|one sentence|yes or no|just (the|a)|only (the|answer)|"
    r"in a word|summari[sz]e|tl;?dr|classify|choose|which one|true or false)\b", re.IGNORECASE,
)
_PLAIN_WORD = re.compile(r"[a-z]+")


def _plain_changed_features(text: str, model: str) -> dict[str, float]:
    """The features the fast path computes in its own way, computed the plain way."""
    best, unit_words, unit_items = 0, 0.0, 0.0
    for number in _PLAIN_DIGITS.finditer(text):
        unit = F._REQUEST_UNIT.match(text, number.end())
        if unit is not None and int(number.group()) > best:
            best = int(number.group())
            is_words = unit.group(1).lower().startswith(F._WORD_UNITS)
            unit_words, unit_items = (1.0, 0.0) if is_words else (0.0, 1.0)
    lower = text.lower()
    words = _PLAIN_WORD.findall(lower)
    first = words[0] if words else ""
    length = sum(1 for w in words if w in F._LENGTH_WORDS) + sum(lower.count(p) for p in F._LENGTH_PHRASES)
    out = {"log_requested_count": math.log1p(best), "requested_unit_words": unit_words,
           "requested_unit_items": unit_items, "brevity_cue": 1.0 if _PLAIN_BREVITY.search(text) else 0.0,
           "length_cue": float(min(length, 10)), "starts_with_question": float(first in F._QUESTION_WORDS),
           "starts_with_task_verb": float(first in F._TASK_VERBS)}
    for name, vocab in F._TASK_WORDS.items():
        out[f"task_{name}"] = float(min(10, sum(1 for w in words if w in vocab)))
    for name, cues in F._FORMAT_CUES.items():
        out[f"format_{name}"] = float(min(10, sum(lower.count(cue) for cue in cues)))
    n = max(1, len(text))
    out["instruction_words_log"] = math.log1p(len(text.split()))
    out["digit_fraction"] = sum(c in "0123456789" for c in text) / n
    out["upper_fraction"] = sum("A" <= c <= "Z" for c in text) / n
    out["code_symbol_fraction"] = sum(c in "{}();=<>[]_#/\\*&|$" for c in text) / n
    name = model.lower()
    match = F._PARAMS_B.search(name)
    out["model_log_params_b"] = math.log1p(min(float(match.group(1)) if match else 0.0, 10_000.0))
    for family in F._MODEL_FAMILIES:
        out[f"model_family_{family}"] = float(family in name)
    return out


def _plain_score(model: RankModel, record: dict[str, Any]) -> float:
    feats = F.request_features(record)
    dense = dict(zip(F.DENSE_FEATURE_NAMES, feats.dense, strict=True))
    plain = _plain_changed_features(feats.instruction_text, str(record.get("model") or ""))
    # the features themselves, not only the score (the booster may not split on every one)
    assert {name: dense[name] for name in plain} == plain
    dense.update(plain)
    text = float(model.text_scores([feats.instruction_text])[0])  # scikit-learn's HashingVectorizer
    row = np.array([[*(dense[n] for n in F.DENSE_FEATURE_NAMES), text, model.prior(feats.model)]])
    raw = float(model.booster.predict(row, num_threads=1)[0])
    cap = math.log1p(record["max_tokens"]) if "max_tokens" in record else math.inf
    return min(max(raw * model.calibration_scale + model.calibration_offset, 0.0), cap)


@pytest.fixture(scope="module")
def model() -> RankModel:
    return load_rank_model()


_PROMPTS = [
    "What is the capital of France?", "", "a", "Write 3 essays of 500 words, then list 10 ways to cook rice.",
    "Answer yes or no: 123456 words? 99999 items, 7-steps, 12\tsentences, 4%", "Summarise: " + "Revenue grew 4%. " * 200,
    "Ｗrite ſhort ıtems: 12 ſteps, 5 İdeas, ٣ words, 8 KELVIN K bullets", "def f(x):\n    return x_1 + x2  # 2 lines",
    "Translate to French: one sentence only, in a word, tl;dr", "¿Qué es 2+2? Explica paso a paso, en 200 palabras.",
    "写一篇关于春天的文章，500字", "Give a short answer.", "in 300words, 5bullet points, 2Lines", "Summarize this text for me.", "brief(ly) shortly concisely JUST THE answer; which one? true or false",
]
_MODELS = ["llama-3-8b", "meta-llama/Meta-Llama-3-70B-Instruct", "gpt-4o", "Qwen2-1.5B-chat", "", "unknown"]


def test_fast_score_equals_the_plain_reference(model: RankModel) -> None:
    for i, prompt in enumerate(_PROMPTS):
        record: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}], "model": _MODELS[i % 6]}
        if i % 2:
            record["max_tokens"] = 400
        assert model.score(record) == pytest.approx(_plain_score(model, record), abs=1e-9), prompt


_PIECES = ["write", "7", "words", "list", "12-items", "Brief", "code", "é", "yes or no", "step by step", "a", "Why",
           "-", "json", "step-by-step by step", "no explanationo explanation", "ſhort", "İn a word", "ıtems", "K",
           "\ud800", "Just the", "tl;dr", "TLDR", "123456", "5\tpages", "٣ words", "in detail", "csvcsv", "long",
           "belong", "fully", "a number", "which one", "only answer", "concisely", "Summarize", "5-steps", "x2",
           "\u2019s", "\n", "```", "(", "?", "ONE SENTENCE", "one line", "at least", "__", "3B", "tabletable"]
_TEXTS = (st.text(alphabet=st.characters(codec="utf-8"), max_size=400)
          | st.text(alphabet=st.characters(), max_size=60)  # lone surrogates too
          | st.lists(st.sampled_from(_PIECES), max_size=60).map(" ".join)
          | st.lists(st.sampled_from(_PIECES), min_size=60, max_size=400).map(" ".join)  # the numpy scan
          | st.lists(st.sampled_from(_PIECES), max_size=200).map("".join))


@settings(max_examples=200, deadline=None)
@given(_TEXTS, st.sampled_from(_MODELS))
def test_fast_score_equals_the_plain_reference_on_any_text(model: RankModel, text: str, name: str) -> None:
    record = {"prompt": text, "model": name}
    assert model.score(record) == pytest.approx(_plain_score(model, record), abs=1e-9)


def test_fast_score_equals_the_plain_reference_on_held_out_prompts(model: RankModel, shared_data: Path) -> None:
    path = shared_data / "lengths" / "alpaca_eval" / "derived_instructions.csv"
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))[::8]  # ~100 prompts
    for i, row in enumerate(rows):
        record = {"prompt": row["instruction"], "model": _MODELS[i % 6]}
        assert model.score(record) == pytest.approx(_plain_score(model, record), abs=1e-9), row["instruction"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["json", "step by step", "step", " by ", "-", "csv", "no explanation", "n", "o ",
                                 "long", "x", "\u00e9", "\u2019", "aaaa", "aa"]), max_size=300).map("".join))
def test_substring_scan_counts_as_bytes_count(text: str) -> None:
    needles = [b"json", b"step by step", b"step-by-step", b"csv", b"no explanation", b"long", b"aaa", b"aaaa"]
    scan = SubstringScan(needles, keep_positions=[0, 4, 6])
    data = text.encode()
    counts, kept = scan.scan(data)
    assert counts == [data.count(n) for n in needles]
    want = sorted(((i, m.start()) for i in (0, 4, 6) for m in re.finditer(b"(?=" + re.escape(needles[i]) + b")", data)),
                  key=lambda hit: hit[1])
    assert sorted(kept, key=lambda hit: (hit[1], hit[0])) == sorted(want, key=lambda hit: (hit[1], hit[0]))


def test_substring_scan_refuses_bad_needles() -> None:
    with pytest.raises(ValueError, match="distinct, non-empty ASCII"):
        SubstringScan([b"json", b"json"])
    with pytest.raises(ValueError, match="distinct, non-empty ASCII"):
        SubstringScan(["é".encode()])


def _plain_chat(messages: list[Any]) -> dict[str, float]:
    """The chat-structure features as feature spec 3 defines them, computed the plain way."""
    turns = [(str(m.get("role", "user")), F._content_text(m.get("content"))) for m in messages if isinstance(m, dict)]
    users = [i for i, (role, _) in enumerate(turns) if role == "user"]
    last = users[-1] if users else -1
    instruction = turns[last][1] if users else (turns[-1][1] if turns else "")
    before = turns[:last] if users else turns[:-1]
    return {
        "log_instruction_chars": math.log1p(len(instruction)),
        "log_context_chars": math.log1p(sum(len(t) for _, t in before)),
        "log_system_chars": math.log1p(sum(len(t) for role, t in turns if role in ("system", "developer"))),
        "n_user_turns": float(min(len(users), 50)),
        "n_assistant_turns": float(min(sum(1 for role, _ in before if role == "assistant"), 50)),
        "log_prior_assistant_chars": math.log1p(sum(len(t) for role, t in before if role == "assistant")),
        "log_input_tokens": math.log1p((len(instruction) + sum(len(t) for _, t in before)) / 4.0),
    }


_MESSAGE = st.fixed_dictionaries(
    {"content": st.one_of(st.text(max_size=30), st.none(),
                          st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                                                          "text": st.text(max_size=10)}), max_size=3))},
    optional={"role": st.sampled_from(["user", "assistant", "system", "developer", "tool", ""])},
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_MESSAGE | st.just("not a message"), max_size=8))
def test_chat_structure_features_equal_the_plain_reference(messages: list[Any]) -> None:
    dense = dict(zip(F.DENSE_FEATURE_NAMES, F.request_features({"messages": messages}).dense, strict=True))
    plain = _plain_chat(messages)
    assert {name: dense[name] for name in plain} == plain
