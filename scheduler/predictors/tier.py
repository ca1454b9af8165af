"""The tier predictor at request time: p_small_ok, the probability that the small tier's
answer to a prompt is good enough (correct, or within a score margin of the large tier's).

Owns the feature spec (hashed word n-grams via scikit-learn's `HashingVectorizer`, text
statistics, task cues), the versioned model file (JSON: a logistic regression over those
features, a calibration map, and the held-out threshold table the tier decision reads; or a LightGBM booster over the
statistics and cues, optionally blended with a prompt-length prior),
and scoring. Training lives in `learn.tier`; it writes files this module loads.

A model file names its format, version and feature spec; a file whose spec differs from
what this code computes is refused with a `TierModelError` saying what differs, never
scored with silently wrong features.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.feature_extraction.text import HashingVectorizer

from scheduler.tiers import ThresholdPoint

MODEL_FORMAT = "tokenyard-tier"
MODEL_VERSION = 1
MAX_PROMPT_CHARS = 8000  # the features read at most this much of a prompt (bounded time)
MAX_MODEL_FILE_BYTES = 64 * 1024 * 1024
DEFAULT_MODEL_RESOURCE = "tier_default.json"

# Keyword cues per task family; a cue's feature is log1p(count of its words in the prompt).
TASK_CUES: dict[str, tuple[str, ...]] = {
    "math": ("calculate", "how many", "how much", "total", "sum", "percent", "solve", "equation",
             "integer", "probability", "average", "ratio", "remainder", "dollars", "cost"),
    "code": ("code", "function", "python", "program", "implement", "algorithm", "sql", "java",
             "javascript", "class", "bug", "compile", "regex"),
    "writing": ("write", "compose", "draft", "essay", "poem", "story", "blog", "email", "letter",
                "rewrite", "describe", "imagine", "pretend"),
    "reasoning": ("why", "explain", "reason", "infer", "implies", "therefore", "argument",
                  "assume", "which of the following", "conclude", "best describes"),
    "knowledge": ("who", "when", "where", "history", "law", "medical", "biology", "chemistry",
                  "physics", "economics", "philosophy", "according to"),
    "extraction": ("extract", "summarize", "summarise", "list", "json", "table", "format",
                   "classify", "identify"),
}
# Difficulty cues that carry across tasks (counted in one pass like TASK_CUES): negations
# ("which is NOT"), steps of a word problem ("then", "each", "twice"), and constraints of an
# instruction ("at least", "exactly", "must").
DIFFICULTY_CUES: dict[str, tuple[str, ...]] = {
    "negation": ("not", "except", "least", "never", "false", "incorrect", "cannot", "no"),
    "steps": ("then", "after", "each", "every", "per", "twice", "half", "times", "remaining", "left",
              "more than", "less than", "if"),
    "constraints": ("must", "should", "at least", "at most", "exactly", "without", "only", "include",
                    "ensure", "make sure", "no more than", "words", "sentences", "paragraph"),
}
STAT_NAMES: tuple[str, ...] = (
    "log_chars", "log_words", "log_lines", "digit_share", "upper_share", "punct_share",
    "questions", "choices", "math_symbols", "code_marks", "numbers", "mean_word_chars",
    *(f"cue_{name}" for name in TASK_CUES),
    *(f"cue_{name}" for name in DIFFICULTY_CUES),
    "sentences", "latex_marks", "choice_chars", "choice_spread", "stem_chars", "long_word_share",
    "distinct_word_share", "distinct_numbers", "numeric_choices", "commas",
)
_CHOICE_RE = re.compile(r"(?m)^\s*\(?[A-Ea-e][.)]\s(.*)$")
_SENTENCE_RE = re.compile(r"[.!?](?:\s|$)")
_LATEX_RE = re.compile(r"\\[a-z]+|\$")
_NUMBER_RE = re.compile(r"\d+(?:[.,]\d+)?")
_CODE_MARKS = ("```", "def ", "return ", "=>", "import ")  # counted with str.count (a regex: 24 us)
_CODE_LINE_ENDS = ("{", "}", ";")
_MATH_CHARS = "+-*/=^%$<>"
_PUNCT_CHARS = ".,;:!?\"'()[]"
# One pass for every cue (a named group per task family): one alternation per family cost
# ~25 us each on a 470-character prompt.
_CUES_RE = re.compile(r"\b(?:" + "|".join(
    f"(?P<{name}>" + "|".join(re.escape(w) for w in words) + ")" for name, words in TASK_CUES.items()
) + r")\b")
_DIFFICULTY_RE = re.compile(r"\b(?:" + "|".join(
    f"(?P<{name}>" + "|".join(re.escape(w) for w in words) + ")" for name, words in DIFFICULTY_CUES.items()
) + r")\b")
_DIGITS = "0123456789"
_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class TierModelError(ValueError):
    """A tier model file that cannot be used: unreadable, wrong format/version or feature spec."""


@dataclass(frozen=True, slots=True)
class HashSpec:
    """The hashed n-gram part of the features (what HashingVectorizer is built with)."""

    n_features: int = 2**15
    ngram_min: int = 1
    ngram_max: int = 2

    def to_json(self) -> dict[str, Any]:
        return {"analyzer": "word", "lowercase": True, "norm": "l2", "alternate_sign": False,
                "n_features": self.n_features, "ngram_range": [self.ngram_min, self.ngram_max]}

    @staticmethod
    def from_json(doc: Mapping[str, Any], where: str) -> HashSpec:
        expected = HashSpec().to_json()
        for key in ("analyzer", "lowercase", "norm", "alternate_sign"):
            if doc.get(key) != expected[key]:
                raise TierModelError(
                    f"{where}: features.hash.{key} is {doc.get(key)!r}; this code computes {expected[key]!r}"
                )
        n_features = doc.get("n_features")
        ngrams = doc.get("ngram_range")
        if not isinstance(n_features, int) or not 2**8 <= n_features <= 2**22:
            raise TierModelError(f"{where}: features.hash.n_features: expected an integer in [256, 4194304], got {n_features!r}")
        if (not isinstance(ngrams, list) or len(ngrams) != 2 or not all(isinstance(n, int) for n in ngrams)
                or not 1 <= ngrams[0] <= ngrams[1] <= 4):
            raise TierModelError(f"{where}: features.hash.ngram_range: expected [min, max] with 1 <= min <= max <= 4, got {ngrams!r}")
        return HashSpec(n_features, ngrams[0], ngrams[1])

    def vectorizer(self) -> HashingVectorizer:
        return HashingVectorizer(
            n_features=self.n_features, ngram_range=(self.ngram_min, self.ngram_max),
            alternate_sign=False, norm="l2", lowercase=True, dtype=np.float32,
        )


def text_stats(text: str) -> list[float]:
    """The statistics and task cues of one prompt, in STAT_NAMES order."""
    text = text[:MAX_PROMPT_CHARS]
    chars = len(text)
    words = text.split()
    n_words = len(words)
    denominator = max(1, chars)
    lower = text.lower()
    # Counts of each character (str.count runs in C) rather than a loop over the text's
    # characters or map(str.isdigit): 40 us for each of those on a 470-character prompt.
    digits = sum(map(text.count, _DIGITS))
    upper = sum(map(text.count, _UPPER))
    punct = sum(map(text.count, _PUNCT_CHARS))
    math_symbols = sum(map(text.count, _MATH_CHARS))
    code_marks = sum(map(text.count, _CODE_MARKS)) + sum(
        1 for line in text.splitlines() if line.rstrip().endswith(_CODE_LINE_ENDS)
    )
    cues = dict.fromkeys(TASK_CUES, 0)
    for match in _CUES_RE.finditer(lower):
        if match.lastgroup is not None:
            cues[match.lastgroup] += 1
    difficulty = dict.fromkeys(DIFFICULTY_CUES, 0)
    for match in _DIFFICULTY_RE.finditer(lower):
        if match.lastgroup is not None:
            difficulty[match.lastgroup] += 1
    choices = _CHOICE_RE.findall(text)
    numbers = _NUMBER_RE.findall(text)
    stats = [
        math.log1p(chars),
        math.log1p(n_words),
        math.log1p(text.count("\n")),
        digits / denominator,
        upper / denominator,
        punct / denominator,
        math.log1p(text.count("?")),
        math.log1p(len(choices)),
        math.log1p(math_symbols),
        math.log1p(code_marks),
        math.log1p(len(numbers)),
        (sum(len(w) for w in words) / n_words) if n_words else 0.0,
    ]
    stats.extend(math.log1p(cues[name]) for name in TASK_CUES)
    stats.extend(math.log1p(difficulty[name]) for name in DIFFICULTY_CUES)
    stats.extend(_shape_stats(text, words, choices, numbers))
    return stats


def _shape_stats(text: str, words: list[str], choices: list[str], numbers: list[str]) -> list[float]:
    """How the question is put: sentences, formulas, the answer choices' length and spread
    (near-identical long options are the hard ones), the stem without them, vocabulary."""
    n_words = max(1, len(words))
    choice_chars = [len(c) for c in choices]
    mean_choice = sum(choice_chars) / len(choice_chars) if choice_chars else 0.0
    spread = 0.0
    if choice_chars:
        spread = math.sqrt(sum((c - mean_choice) ** 2 for c in choice_chars) / len(choice_chars)) / (mean_choice + 1.0)
    stem_chars = len(text) - sum(choice_chars)
    return [
        math.log1p(len(_SENTENCE_RE.findall(text))),
        math.log1p(len(_LATEX_RE.findall(text))),
        math.log1p(mean_choice),
        spread,
        math.log1p(max(0, stem_chars)),
        sum(1 for w in words if len(w) >= 10) / n_words,
        len({w.lower() for w in words}) / n_words,
        math.log1p(len(set(numbers))),
        float(any(c.strip().replace(".", "").isdigit() for c in choices)),
        math.log1p(text.count(",")),
    ]


def _decode_floats(value: Any, length: int, where: str) -> np.ndarray:
    if not isinstance(value, str):
        raise TierModelError(f"{where}: expected base64 of {length} little-endian float32, got {type(value).__name__}")
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError as exc:
        raise TierModelError(f"{where}: not valid base64 ({exc})") from exc
    if len(raw) != 4 * length:
        raise TierModelError(f"{where}: expected {length} float32 ({4 * length} bytes), got {len(raw)} bytes")
    return np.frombuffer(raw, dtype="<f4").astype(np.float64)


def encode_floats(values: Sequence[float] | np.ndarray) -> str:
    """The model file's encoding of a float vector (base64 of little-endian float32)."""
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode("ascii")


def _float_list(doc: Mapping[str, Any], key: str, where: str) -> list[float]:
    value = doc.get(key)
    if not isinstance(value, list) or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        raise TierModelError(f"{where}: {key}: expected a list of numbers, got {value!r:.80}")
    return [float(v) for v in value]


class TierPredictor:
    """A loaded tier model: `score(text)` / `score_many(texts)` give p_small_ok in [0, 1]."""

    def __init__(self, doc: Mapping[str, Any], where: str = "tier model") -> None:
        if doc.get("format") != MODEL_FORMAT:
            raise TierModelError(f"{where}: format is {doc.get('format')!r}, expected {MODEL_FORMAT!r}")
        if doc.get("version") != MODEL_VERSION:
            raise TierModelError(
                f"{where}: version {doc.get('version')!r}; this code reads version {MODEL_VERSION} "
                "(retrain with `tokenyard train tier`)"
            )
        features = doc.get("features")
        if not isinstance(features, Mapping):
            raise TierModelError(f"{where}: features: expected an object with 'hash' and 'stats'")
        hash_doc = features.get("hash")
        if not isinstance(hash_doc, Mapping):
            raise TierModelError(f"{where}: features.hash: expected an object")
        self.hash_spec = HashSpec.from_json(hash_doc, where)
        stats = features.get("stats")
        if stats != list(STAT_NAMES):
            raise TierModelError(
                f"{where}: features.stats {stats!r:.200} differ from this code's {list(STAT_NAMES)!r:.200} "
                "(retrain with `tokenyard train tier`)"
            )
        n_stats = len(STAT_NAMES)
        self.classifier = doc.get("classifier", "logistic")
        self._booster: Any = None
        if self.classifier == "logistic":
            self.weights = _decode_floats(doc.get("weights"), self.hash_spec.n_features, f"{where}: weights")
            self.stat_weights = _decode_floats(doc.get("stat_weights"), n_stats, f"{where}: stat_weights")
        elif self.classifier == "lightgbm":
            self._booster = _load_booster(doc.get("lightgbm"), n_stats, where)
        else:
            raise TierModelError(f"{where}: classifier {self.classifier!r}; expected 'logistic' or 'lightgbm'")
        self.stat_mean = np.asarray(_float_list(doc, "stat_mean", where))
        self.stat_scale = np.asarray(_float_list(doc, "stat_scale", where))
        if len(self.stat_mean) != n_stats or len(self.stat_scale) != n_stats or np.any(self.stat_scale <= 0):
            raise TierModelError(f"{where}: stat_mean/stat_scale: expected {n_stats} values each, scales > 0")
        intercept = doc.get("intercept")
        if not isinstance(intercept, int | float) or isinstance(intercept, bool):
            raise TierModelError(f"{where}: intercept: expected a number, got {intercept!r}")
        self.intercept = float(intercept)
        calibration = doc.get("calibration") or {"x": [0.0, 1.0], "y": [0.0, 1.0]}
        if not isinstance(calibration, Mapping):
            raise TierModelError(f"{where}: calibration: expected an object with 'x' and 'y'")
        self.calib_x = np.asarray(_float_list(calibration, "x", f"{where}: calibration"))
        self.calib_y = np.asarray(_float_list(calibration, "y", f"{where}: calibration"))
        if len(self.calib_x) < 2 or len(self.calib_x) != len(self.calib_y) or np.any(np.diff(self.calib_x) < 0):
            raise TierModelError(f"{where}: calibration: expected equal-length x, y (>= 2 points, x ascending)")
        self.length_prior = _length_prior(doc.get("length_prior"), where) if self._booster is not None else None
        self.thresholds = tuple(_threshold_rows(doc.get("thresholds") or [], where))
        self.meta: Mapping[str, Any] = doc.get("trained") or {}
        self._vectorizer = self.hash_spec.vectorizer()

    def raw_scores(self, texts: Sequence[str]) -> np.ndarray:
        """Uncalibrated probabilities of the logistic model."""
        clipped = [t[:MAX_PROMPT_CHARS] for t in texts]
        stats = (np.asarray([text_stats(t) for t in clipped], dtype=np.float64) - self.stat_mean) / self.stat_scale
        if self._booster is not None:
            trees = np.asarray(self._booster.predict(stats, num_threads=1))
            if self.length_prior is None:
                return trees
            return self.length_prior.blend(trees, stats[:, STAT_NAMES.index("log_chars")])
        hashed = self._vectorizer.transform(clipped)
        logits = hashed @ self.weights + stats @ self.stat_weights + self.intercept
        return np.asarray(1.0 / (1.0 + np.exp(-np.clip(logits, -30.0, 30.0))))

    def score_many(self, texts: Sequence[str]) -> np.ndarray:
        """Calibrated p_small_ok of each text."""
        if not texts:
            return np.zeros(0)
        return np.asarray(np.interp(self.raw_scores(texts), self.calib_x, self.calib_y))

    def score(self, text: str) -> float:
        return float(self.score_many([text])[0])


def _logit(p: np.ndarray) -> np.ndarray:
    clipped = np.clip(p, 1e-6, 1.0 - 1e-6)
    return np.asarray(np.log(clipped / (1.0 - clipped)))


@dataclass(frozen=True, slots=True)
class LengthPrior:
    """The trees' score blended with "longer prompts go large": `weight` x the standardised
    minus log length + (1 - weight) x the trees' standardised logit, squashed to (0, 1).
    The prior is the one rule that held on benchmarks the trees never saw (GSM8K's word
    problems, where the trees rank below random); the weight was chosen on training tasks
    only (docs/benchmarks.md, "Tier routing")."""

    weight: float
    logit_mean: float
    logit_scale: float

    def blend(self, trees: np.ndarray, log_chars_standardised: np.ndarray) -> np.ndarray:
        z_trees = (_logit(trees) - self.logit_mean) / self.logit_scale
        z = (1.0 - self.weight) * z_trees - self.weight * log_chars_standardised
        return np.asarray(1.0 / (1.0 + np.exp(-np.clip(z, -30.0, 30.0))))


def _length_prior(value: Any, where: str) -> LengthPrior | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TierModelError(f"{where}: length_prior: expected an object {{weight, logit_mean, logit_scale}}")
    numbers = {}
    for key in ("weight", "logit_mean", "logit_scale"):
        item = value.get(key)
        if not isinstance(item, int | float) or isinstance(item, bool) or not math.isfinite(item):
            raise TierModelError(f"{where}: length_prior.{key}: expected a number, got {item!r}")
        numbers[key] = float(item)
    if not 0.0 <= numbers["weight"] <= 1.0 or numbers["logit_scale"] <= 0.0:
        raise TierModelError(f"{where}: length_prior: expected weight in [0, 1] and logit_scale > 0, got {dict(value)!r:.120}")
    return LengthPrior(numbers["weight"], numbers["logit_mean"], numbers["logit_scale"])


def _threshold_rows(value: Any, where: str) -> list[ThresholdPoint]:
    if not isinstance(value, list):
        raise TierModelError(f"{where}: thresholds: expected a list of {{threshold, large_share, pgr}}")
    rows = []
    for i, row in enumerate(value):
        try:
            rows.append(ThresholdPoint(float(row["threshold"]), float(row["large_share"]), float(row["pgr"])))
        except (KeyError, TypeError, ValueError) as exc:
            raise TierModelError(f"{where}: thresholds[{i}]: expected numbers threshold, large_share, pgr ({exc})") from exc
    return rows


def _load_booster(model_text: Any, n_stats: int, where: str) -> Any:
    import lightgbm  # only models of this kind need it

    if not isinstance(model_text, str) or not model_text:
        raise TierModelError(f"{where}: lightgbm: expected the booster's model text")
    try:
        booster = lightgbm.Booster(model_str=model_text)
    except lightgbm.basic.LightGBMError as exc:
        raise TierModelError(f"{where}: lightgbm: not a LightGBM model ({exc})") from exc
    if booster.num_feature() != n_stats:
        raise TierModelError(f"{where}: lightgbm: model has {booster.num_feature()} features; this code computes {n_stats}")
    return booster


def load_predictor(path: str | Path | None = None) -> TierPredictor:
    """The model at `path`, or the packaged default model when `path` is None."""
    if path is None:
        where = f"packaged {DEFAULT_MODEL_RESOURCE}"
        try:
            data = resources.files("scheduler.predictors").joinpath(DEFAULT_MODEL_RESOURCE).read_bytes()
        except OSError as exc:
            raise TierModelError(f"{where}: cannot read ({exc})") from exc
    else:
        where = str(path)
        try:
            size = Path(path).stat().st_size
            if size > MAX_MODEL_FILE_BYTES:
                raise TierModelError(f"{where}: {size} bytes; a tier model is at most {MAX_MODEL_FILE_BYTES}")
            data = Path(path).read_bytes()
        except OSError as exc:
            raise TierModelError(f"{where}: cannot read ({exc.strerror or exc})") from exc
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TierModelError(f"{where}: not a JSON tier model ({exc})") from exc
    if not isinstance(doc, Mapping):
        raise TierModelError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    return TierPredictor(doc, where)
