"""The ranker's scoring path as it was before the issue-11 cost work (main at 0eec9b5),
frozen: `request_features` and `HashedTextLayer.score` copied verbatim, so that
`bench/ranking.py --predictor` can time the old path and the current one in the same
process, interleaved, and print the ratio. Same features and scores as the current code
(tests/test_rank_frozen_scores.py checks the current code against values this code wrote);
nothing but the bench imports it."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from scheduler.predictors.features import (
    _CUE_WORDS,
    _FORMAT_CUES,
    _LENGTH_BUCKETS_CHARS,
    _LENGTH_PHRASES,
    _LENGTH_WORDS,
    _QUESTION_WORDS,
    _REQUEST_UNIT,
    _TASK_VERBS,
    _TASK_WORDS,
    _WORD_TASKS,
    _WORD_UNITS,
    RequestFeatures,
    _clip,
    _content_text,
    _model_features,
    _number,
    model_key,
)
from scheduler.predictors.rank import HASH_N_FEATURES, RankModel

_DIGITS = re.compile(r"\d(?<!\w\d)\d{0,4}(?i:(?=[\s\-bceilnpqrstvw]))")
_BREVITY = re.compile(
    r"\b(?=[bcijostwy])(brief(ly)?|short|concise(ly)?|one word|single word|one sentence|yes or no|just (the|a)|only (the|answer)|"
    r"in a word|summari[sz]e|tl;?dr|classify|choose|which one|true or false)\b", re.IGNORECASE,
)
_WORD = re.compile(r"[a-z]+")
_ASCII_NON_LETTERS_TO_SPACE = str.maketrans({chr(c): " " for c in range(128) if not "a" <= chr(c) <= "z"})
_CODE_SYMBOLS = "{}();=<>[]_#/\\*&|$"
_DROP_DIGITS = str.maketrans("", "", "0123456789")
_DROP_UPPER = str.maketrans("", "", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_DROP_CODE = str.maketrans("", "", _CODE_SYMBOLS)
_TOKEN = re.compile(r"(?u)\b\w\w+\b")
_ASCII_NON_WORD_TO_SPACE = str.maketrans({chr(c): " " for c in range(128) if not (chr(c).isalnum() or chr(c) == "_")})
_INDEX_CACHE_MAX = 200_000


@dataclass(frozen=True, slots=True)
class _Chat:
    instruction: str
    context_chars: int
    system_chars: int
    user_turns: int
    assistant_turns: int
    prior_assistant_chars: int


def _chat_structure(record: Mapping[str, Any]) -> _Chat:
    prompt = record.get("prompt")
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        prompt = "\n".join(prompt)
    if isinstance(prompt, str):
        return _Chat(prompt, 0, 0, 1, 0, 0)
    messages = record.get("messages")
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        return _Chat("", 0, 0, 0, 0, 0)
    texts: list[tuple[str, str]] = []
    for message in messages:
        if isinstance(message, Mapping):
            texts.append((str(message.get("role", "user")), _content_text(message.get("content"))))
    last_user = max((i for i, (role, _) in enumerate(texts) if role == "user"), default=-1)
    instruction = texts[last_user][1] if last_user >= 0 else (texts[-1][1] if texts else "")
    before = texts[:last_user] if last_user >= 0 else texts[:-1]
    return _Chat(
        instruction=instruction,
        context_chars=sum(len(t) for _, t in before),
        system_chars=sum(len(t) for role, t in texts if role in ("system", "developer")),
        user_turns=sum(1 for role, _ in texts if role == "user"),
        assistant_turns=sum(1 for role, _ in before if role == "assistant"),
        prior_assistant_chars=sum(len(t) for role, t in before if role == "assistant"),
    )


def _task_and_format(cue_words: list[str], lower: str) -> list[float]:
    counts = [0.0] * len(_TASK_WORDS)
    for word in cue_words:
        for k in _WORD_TASKS.get(word, ()):
            counts[k] += 1.0
    counts = [min(10.0, c) for c in counts]
    formats = [float(min(10, sum(lower.count(cue) for cue in cues))) for cues in _FORMAT_CUES.values()]
    bucket = float(sum(1 for edge in _LENGTH_BUCKETS_CHARS if len(lower) > edge))
    return [*counts, *formats, bucket]


def _requested_count(text: str) -> tuple[float, float, float]:
    best, words, items = 0, 0.0, 0.0
    for number in _DIGITS.finditer(text):
        unit = _REQUEST_UNIT.match(text, number.end())
        if unit is None:
            continue
        count = int(number.group())
        if count > best:
            best = count
            is_words = unit.group(1).lower().startswith(_WORD_UNITS)
            words, items = (1.0, 0.0) if is_words else (0.0, 1.0)
    return math.log1p(best), words, items


def request_features(record: Mapping[str, Any]) -> RequestFeatures:
    chat = _chat_structure(record)
    text = _clip(chat.instruction)
    n = max(1, len(text))
    digits = len(text) - len(text.translate(_DROP_DIGITS))
    uppers = len(text) - len(text.translate(_DROP_UPPER))
    code = len(text) - len(text.translate(_DROP_CODE))
    input_tokens = _number(record, "input_tokens", -1.0)
    if input_tokens < 0:
        input_tokens = (len(chat.instruction) + chat.context_chars) / 4.0
    max_tokens = _number(record, "max_tokens", _number(record, "max_completion_tokens", 0.0))
    count, unit_words, unit_items = _requested_count(text)
    lower = text.lower()
    words = lower.translate(_ASCII_NON_LETTERS_TO_SPACE).split() if lower.isascii() else _WORD.findall(lower)
    first = words[0] if words else ""
    cue_words = list(filter(_CUE_WORDS.__contains__, words))
    length_cues = sum(1 for w in cue_words if w in _LENGTH_WORDS) + sum(lower.count(p) for p in _LENGTH_PHRASES)
    dense = [
        math.log1p(max(0.0, input_tokens)),
        math.log1p(len(chat.instruction)),
        math.log1p(chat.context_chars),
        math.log1p(chat.system_chars),
        math.log1p(len(text.split())),
        math.log1p(text.count("\n")),
        float(min(text.count("?"), 20)),
        digits / n,
        code / n,
        1.0 if "```" in text else 0.0,
        uppers / n,
        float(min(chat.user_turns, 50)),
        float(min(chat.assistant_turns, 50)),
        math.log1p(chat.prior_assistant_chars),
        count,
        unit_words,
        unit_items,
        1.0 if _BREVITY.search(text) else 0.0,
        float(min(length_cues, 10)),
        1.0 if first in _QUESTION_WORDS else 0.0,
        1.0 if first in _TASK_VERBS else 0.0,
        math.log1p(max(0.0, max_tokens)),
        1.0 if max_tokens > 0 else 0.0,
        _number(record, "temperature", 1.0),
        _number(record, "top_p", 1.0),
        *_model_features(str(record.get("model") or "")),
        *_task_and_format(cue_words, lower),
    ]
    return RequestFeatures(dense=tuple(dense), instruction_text=text, model=model_key(str(record.get("model") or "")))


class BaselineTextLayer:
    """`HashedTextLayer.score` as it was, over the current layer's dense tables, with its own
    gram -> bucket cache."""

    def __init__(self, weights: np.ndarray, idf: np.ndarray, bias: float) -> None:
        self.weights, self.idf, self.bias = weights, idf, bias
        self._index: dict[str, int] = {}
        from sklearn.utils import murmurhash3_32

        self._murmur: Any = murmurhash3_32

    def _index_of(self, gram: str) -> int:
        index = abs(int(self._murmur(gram, seed=0))) % HASH_N_FEATURES
        if len(self._index) >= _INDEX_CACHE_MAX:
            self._index.clear()
        self._index[gram] = index
        return index

    def score(self, text: str) -> float:
        lower = text.lower()
        if lower.isascii():
            tokens = [t for t in lower.translate(_ASCII_NON_WORD_TO_SPACE).split() if len(t) > 1]
        else:
            tokens = _TOKEN.findall(lower)
        if not tokens:
            return self.bias
        grams = tokens + list(map(" ".join, zip(tokens, tokens[1:], strict=False)))
        counts = Counter(map(self._index.get, grams))
        if None in counts:
            counts = Counter(self._index.get(g) or self._index_of(g) for g in grams)
        n = len(counts)
        index = np.fromiter(counts.keys(), dtype=np.intp, count=n)
        values = (1.0 + np.log(np.fromiter(counts.values(), dtype=np.float64, count=n))) * self.idf[index]
        total = float(self.weights[index] @ values)
        return total / math.sqrt(float(values @ values)) + self.bias


def _old_predict(single: Any, row: tuple[float, ...]) -> float:
    """`_SingleRowPredictor.predict` as it was (the same prepared C-API configuration)."""
    import ctypes

    if single._lib is None:
        return float(single.booster.predict(np.array([row], dtype=np.float64), num_threads=1)[0])
    with single._lock:
        single._row[:] = row
        from lightgbm import basic

        basic._safe_call(single._lib.LGBM_BoosterPredictForMatSingleRowFast(
            single._config, single._row_ptr, ctypes.byref(single._out_len), single._out_ptr,
        ))
        return float(single._out[0])


class BaselineScorer:
    """`RankModel.score` as it was: the old features, the old text layer, the same booster call."""

    def __init__(self, model: RankModel) -> None:
        layer = model._text_layer
        assert layer is not None
        self.model = model
        self.text_layer = BaselineTextLayer(layer.weights, layer.idf, layer.bias)

    def score(self, record: Mapping[str, Any]) -> float:
        from scheduler.predictors.rank import _cap

        features = request_features(record)
        model = self.model
        assert model._single_row is not None
        raw = _old_predict(model._single_row,
                           (*features.dense, self.text_layer.score(features.instruction_text), model.prior(features.model)))
        return min(max(raw * model.calibration_scale + model.calibration_offset, 0.0), _cap(record))
