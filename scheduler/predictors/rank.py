"""Output-length ranking at request time: score = predicted log output tokens (higher =
longer answer), from a versioned model file trained by `tokenyard train rank` (`learn.rank`).

A model is two layers over `scheduler.predictors.features`:

1. a linear layer over the sublinear TF-IDF of the instruction's hashed word 1-2 grams
   (ridge regression on log output tokens, model-demeaned): one number, "how long does this
   wording ask for";
2. a per-model verbosity prior: the mean ln(1 + output tokens) of each model in training
   (a table keyed by `features.model_key`; NaN for a model not in it, which the booster
   learned to handle from models hidden from the table in training);
3. a LightGBM booster (lambdarank, or a regression baseline) over the dense features plus
   those two numbers.

Its raw output is mapped by a monotone linear calibration onto ln(1 + output tokens), so
scores keep the ranker's order but have a unit queue policies can reason about (a
starvation guard's span, vLLM integer priorities); a request's `max_tokens` caps it
(nothing is longer than its cap). Scoring is pure; loading reads the file once.

File format (JSON, optionally gzip-compressed, `.gz`): `{"format": "tokenyard-rank",
"format_version", "feature_spec", "kind", "text_layer": {"index_b64", "weights_b64",
"idf_b64", "idf_unseen", "bias"}, "model_prior": {"log_tokens": {model: number}}, "booster",
"calibration": {"scale", "offset"}, "meta"}` (the text layer sparse: only trained buckets). A file whose `feature_spec`
differs from `features.FEATURE_SPEC` fails to load with a message naming both versions.

Cost: scoring one request goes through `HashedTextLayer`, a hand-written equivalent of
scikit-learn's `HashingVectorizer` (same tokens, same murmurhash3 indices, same l2 norm;
tests/test_rank_predictor.py checks equality) because the library's per-call overhead was
measured at 2.4-4.5x the cost of this one (one core, spec 3; earlier ~340 us vs ~80 us,
`bench/ranking.py --predictor` prints the current figures), and batching does not amortise
it (the library tokenises each document in Python too). Training uses the library.
"""

from __future__ import annotations

import base64
import gzip
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scheduler.predictors.features import (
    DENSE_FEATURE_NAMES,
    FEATURE_SPEC,
    HASH_N_FEATURES,
    RequestFeatures,
    hashing_vectorizer,
    request_features,
    tfidf,
)

MODEL_FORMAT = "tokenyard-rank"
MODEL_FORMAT_VERSION = 2
DEFAULT_MODEL_PATH = Path(__file__).with_name("default_rank.json.gz")
MAX_MODEL_FILE_BYTES = 64 * 1024 * 1024


class RankModelError(ValueError):
    """A rank model file that cannot be used: missing, malformed, or for another feature spec."""


_TOKEN = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's default token_pattern
_INDEX_CACHE_MAX = 200_000


class HashedTextLayer:
    """weights . l2-normalised sublinear TF-IDF of hashed word 1-2 grams + bias, one text at a time.

    Equal to `tfidf(hashing_vectorizer().transform([text]), idf) @ weights + bias`; see the
    module docstring for why it is hand-written. Only the buckets seen in training carry a
    weight and an idf (a sparse table); an unseen bucket has weight 0 and `idf_unseen`, which
    still counts in the norm. Token -> index lookups are cached (bounded)."""

    __slots__ = ("table", "idf_unseen", "bias", "_index")

    def __init__(self, weights: Mapping[int, float], idf: Mapping[int, float], idf_unseen: float, bias: float) -> None:
        # one lookup per bucket: (weight, idf) together
        self.table: dict[int, tuple[float, float]] = {i: (float(w), float(idf[i])) for i, w in weights.items()}
        self.idf_unseen = idf_unseen
        self.bias = bias
        self._index: dict[str, int] = {}

    def _index_of(self, gram: str) -> int:
        from sklearn.utils import murmurhash3_32

        index = abs(int(murmurhash3_32(gram, seed=0))) % HASH_N_FEATURES
        if len(self._index) >= _INDEX_CACHE_MAX:
            self._index.clear()
        self._index[gram] = index
        return index

    def score(self, text: str) -> float:
        tokens = _TOKEN.findall(text.lower())
        counts: dict[int, int] = {}
        cache = self._index
        for gram in (*tokens, *(f"{a} {b}" for a, b in zip(tokens, tokens[1:], strict=False))):
            i = cache.get(gram)
            if i is None:
                i = self._index_of(gram)
            counts[i] = counts.get(i, 0) + 1
        if not counts:
            return self.bias
        table, unseen, log = self.table, self.idf_unseen, math.log
        total = norm2 = 0.0
        for i, c in counts.items():
            tf = 1.0 if c == 1 else 1.0 + log(c)
            entry = table.get(i)
            if entry is None:
                value = tf * unseen
            else:
                value = tf * entry[1]
                total += entry[0] * value
            norm2 += value * value
        return total / math.sqrt(norm2) + self.bias


@dataclass(slots=True)
class TextLayer:
    """The trained text layer's parameters: sparse (bucket, weight, idf) for the buckets seen
    in training, the idf of an unseen bucket, and the intercept."""

    index: np.ndarray  # int32 bucket numbers, ascending
    weights: np.ndarray  # float32, one per bucket in `index`
    idf: np.ndarray  # float32, one per bucket in `index`
    idf_unseen: float
    bias: float

    def __post_init__(self) -> None:
        n = len(self.index)
        if self.weights.shape != (n,) or self.idf.shape != (n,):
            raise RankModelError(f"text layer: {n} buckets but {self.weights.shape[0]} weights, {self.idf.shape[0]} idf")
        if n and (int(self.index.min()) < 0 or int(self.index.max()) >= HASH_N_FEATURES):
            raise RankModelError(f"text layer: bucket numbers must lie in [0, {HASH_N_FEATURES})")

    def dense_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """(weights, idf) over all HASH_N_FEATURES buckets."""
        weights = np.zeros(HASH_N_FEATURES, dtype=np.float64)
        idf = np.full(HASH_N_FEATURES, self.idf_unseen, dtype=np.float64)
        weights[self.index] = self.weights
        idf[self.index] = self.idf
        return weights, idf


@dataclass(slots=True)
class RankModel:
    """A loaded ranker; `score`/`score_batch` give predicted ln(1 + output tokens)."""

    text: TextLayer
    booster: Any  # lightgbm.Booster
    calibration_scale: float
    calibration_offset: float
    model_prior: dict[str, float] = field(default_factory=dict)  # model_key -> mean ln(1 + tokens)
    kind: str = "lambdarank"
    meta: dict[str, Any] = field(default_factory=dict)
    _vectorizer: Any = None
    _text_layer: HashedTextLayer | None = None
    _dense_text: tuple[np.ndarray, np.ndarray] | None = None

    def __post_init__(self) -> None:
        if not self.calibration_scale > 0:
            raise RankModelError(f"calibration scale must be positive, got {self.calibration_scale}")
        self._vectorizer = hashing_vectorizer()
        index = [int(i) for i in self.text.index]
        self._text_layer = HashedTextLayer(
            dict(zip(index, (float(w) for w in self.text.weights), strict=True)),
            dict(zip(index, (float(v) for v in self.text.idf), strict=True)),
            self.text.idf_unseen, self.text.bias,
        )
        self._dense_text = self.text.dense_weights()

    def text_scores(self, texts: Sequence[str]) -> np.ndarray:
        """The text layer by scikit-learn (batches; training and evaluation)."""
        assert self._dense_text is not None
        weights, idf = self._dense_text
        weighted = tfidf(self._vectorizer.transform(list(texts)), idf)
        return np.asarray(weighted @ weights, dtype=np.float64) + self.text.bias

    def prior(self, model: str) -> float:
        """The model's verbosity prior (mean ln(1 + output tokens) in training); NaN for a
        model the training data did not have (the booster then reads size and family)."""
        return self.model_prior.get(model, math.nan)

    def design_matrix(self, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """The booster's input rows: dense features, the text layer's output, the model prior."""
        feats = [request_features(r) for r in records]
        dense = np.array([f.dense for f in feats], dtype=np.float64).reshape(len(feats), len(DENSE_FEATURE_NAMES))
        assert self._text_layer is not None
        layer = self._text_layer
        text = np.array([layer.score(f.instruction_text) for f in feats], dtype=np.float64)
        prior = np.array([self.prior(f.model) for f in feats], dtype=np.float64)
        return np.column_stack([dense, text, prior])

    def score_batch(self, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Predicted ln(1 + output tokens) of each record, capped by its `max_tokens`."""
        if not records:
            return np.zeros(0)
        raw = np.asarray(self.booster.predict(self.design_matrix(records), num_threads=1), dtype=np.float64)
        scores = raw * self.calibration_scale + self.calibration_offset
        caps = np.array([_cap(r) for r in records], dtype=np.float64)
        capped: np.ndarray = np.minimum(np.maximum(scores, 0.0), caps)
        return capped

    def score(self, record: Mapping[str, Any]) -> float:
        """One record's score, by the fast single-text path (same value as score_batch)."""
        return self.score_features(request_features(record), _cap(record))

    def score_features(self, features: RequestFeatures, cap: float = math.inf) -> float:
        assert self._text_layer is not None
        row = np.array([[*features.dense, self._text_layer.score(features.instruction_text), self.prior(features.model)]])
        raw = float(self.booster.predict(row, num_threads=1)[0])
        return min(max(raw * self.calibration_scale + self.calibration_offset, 0.0), cap)

    # ------------------------------------------------------------------ file I/O
    def to_document(self) -> dict[str, Any]:
        def b64(array: np.ndarray, dtype: str) -> str:
            return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")

        return {
            "format": MODEL_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,
            "feature_spec": FEATURE_SPEC,
            "kind": self.kind,
            "text_layer": {"index_b64": b64(self.text.index, "<i4"), "weights_b64": b64(self.text.weights, "<f4"),
                           "idf_b64": b64(self.text.idf, "<f4"), "idf_unseen": self.text.idf_unseen,
                           "bias": self.text.bias},
            "model_prior": {"log_tokens": self.model_prior},
            "booster": self.booster.model_to_string(),
            "calibration": {"scale": self.calibration_scale, "offset": self.calibration_offset},
            "meta": self.meta,
        }

    def save(self, path: str | Path) -> None:
        """Write the model file (gzip when the name ends in .gz), atomically: a temporary
        file renamed into place, so a failed write leaves nothing half-written."""
        target = Path(path)
        payload = json.dumps(self.to_document(), separators=(",", ":")).encode()
        if target.suffix == ".gz":
            payload = gzip.compress(payload, mtime=0)
        tmp = target.with_name(target.name + ".tmp")
        try:
            tmp.write_bytes(payload)
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)


def _cap(record: Mapping[str, Any]) -> float:
    for key in ("max_tokens", "max_completion_tokens"):
        value = record.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return math.log1p(value)
    return math.inf


def model_from_document(doc: Any, where: str = "rank model") -> RankModel:
    """Build a RankModel from a parsed model file; every mismatch names what was expected."""
    if not isinstance(doc, Mapping) or doc.get("format") != MODEL_FORMAT:
        raise RankModelError(f"{where}: not a {MODEL_FORMAT} model file (no \"format\": \"{MODEL_FORMAT}\")")
    if doc.get("format_version") != MODEL_FORMAT_VERSION:
        raise RankModelError(
            f"{where}: model file format version {doc.get('format_version')!r}, expected {MODEL_FORMAT_VERSION}"
        )
    spec = doc.get("feature_spec")
    if spec != FEATURE_SPEC:
        got = spec.get("version") if isinstance(spec, Mapping) else spec
        raise RankModelError(
            f"{where}: built for feature spec version {got!r}, this Tokenyard computes feature spec "
            f"version {FEATURE_SPEC['version']} (or the specs differ in detail); retrain it with "
            "`tokenyard train rank`"
        )
    try:
        import lightgbm

        text = doc["text_layer"]

        def array(key: str, dtype: str) -> np.ndarray:
            return np.frombuffer(base64.b64decode(text[key]), dtype=dtype).astype(dtype[1:])

        layer = TextLayer(array("index_b64", "<i4"), array("weights_b64", "<f4"), array("idf_b64", "<f4"),
                          float(text["idf_unseen"]), float(text["bias"]))
        prior = doc["model_prior"]["log_tokens"]
        if not isinstance(prior, Mapping):
            raise TypeError("model_prior.log_tokens: expected an object of model -> number")
        booster = lightgbm.Booster(model_str=str(doc["booster"]))
        calibration = doc["calibration"]
        return RankModel(
            text=layer,
            model_prior={str(k): float(v) for k, v in prior.items()},
            booster=booster,
            calibration_scale=float(calibration["scale"]),
            calibration_offset=float(calibration["offset"]),
            kind=str(doc.get("kind", "lambdarank")),
            meta=dict(doc.get("meta") or {}),
        )
    except RankModelError:
        raise
    except (KeyError, TypeError, ValueError, lightgbm.basic.LightGBMError) as exc:
        raise RankModelError(f"{where}: malformed model file: {exc}") from exc


def load_rank_model(path: str | Path | None = None) -> RankModel:
    """Load a model file; None loads the default ranker shipped in this package."""
    source = DEFAULT_MODEL_PATH if path is None else Path(path)
    try:
        size = source.stat().st_size
        if size > MAX_MODEL_FILE_BYTES:
            raise RankModelError(f"{source}: {size} bytes, more than the {MAX_MODEL_FILE_BYTES} a rank model may have")
        raw = source.read_bytes()
    except OSError as exc:
        raise RankModelError(f"{source}: cannot read rank model: {exc.strerror or exc}") from exc
    try:
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        doc = json.loads(raw)
    except (OSError, EOFError, ValueError) as exc:
        raise RankModelError(f"{source}: not a JSON rank model file: {exc}") from exc
    return model_from_document(doc, where=str(source))
