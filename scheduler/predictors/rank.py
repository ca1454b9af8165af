"""Output-length ranking at request time: score = predicted log output tokens (higher =
longer answer), from a versioned model file trained by `tokenyard train rank` (`learn.rank`).

A model is two layers over `scheduler.predictors.features`:

1. a linear layer over the hashed word 1-2 grams of the instruction (ridge regression on
   log output tokens, model-demeaned): one number, "how long does this wording ask for";
2. a LightGBM booster (lambdarank, or a regression baseline) over the dense features plus
   that number.

Its raw output is mapped by a monotone linear calibration onto ln(1 + output tokens), so
scores keep the ranker's order but have a unit queue policies can reason about (a
starvation guard's span, vLLM integer priorities); a request's `max_tokens` caps it
(nothing is longer than its cap). Scoring is pure; loading reads the file once.

File format (JSON, optionally gzip-compressed, `.gz`): `{"format": "tokenyard-rank",
"format_version", "feature_spec", "kind", "text_layer": {"weights_b64", "bias"},
"booster", "calibration": {"scale", "offset"}, "meta"}`. A file whose `feature_spec`
differs from `features.FEATURE_SPEC` fails to load with a message naming both versions.

Cost: scoring one request goes through `HashedTextLayer`, a hand-written equivalent of
scikit-learn's `HashingVectorizer` (same tokens, same murmurhash3 indices, same l2 norm;
tests/test_rank_predictor.py checks equality) because the library's per-call overhead was
measured at ~340 us p50 for one 770-character prompt against ~80 us for this one (one core,
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
)

MODEL_FORMAT = "tokenyard-rank"
MODEL_FORMAT_VERSION = 1
DEFAULT_MODEL_PATH = Path(__file__).with_name("default_rank.json.gz")
MAX_MODEL_FILE_BYTES = 64 * 1024 * 1024


class RankModelError(ValueError):
    """A rank model file that cannot be used: missing, malformed, or for another feature spec."""


_TOKEN = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's default token_pattern
_INDEX_CACHE_MAX = 200_000


class HashedTextLayer:
    """weights . l2-normalised hashed word 1-2 gram counts + bias, for one text at a time.

    Equal to `hashing_vectorizer().transform([text]) @ weights + bias`; see the module
    docstring for why it is hand-written. Token -> index lookups are cached (bounded)."""

    __slots__ = ("weights", "bias", "_index")

    def __init__(self, weights: np.ndarray, bias: float) -> None:
        self.weights: list[float] = [float(w) for w in weights]
        self.bias = bias
        self._index: dict[str, int] = {}

    def _index_of(self, gram: str) -> int:
        index = self._index.get(gram)
        if index is None:
            from sklearn.utils import murmurhash3_32

            index = abs(int(murmurhash3_32(gram, seed=0))) % HASH_N_FEATURES
            if len(self._index) >= _INDEX_CACHE_MAX:
                self._index.clear()
            self._index[gram] = index
        return index

    def score(self, text: str) -> float:
        tokens = _TOKEN.findall(text.lower())
        counts: dict[int, int] = {}
        index_of = self._index_of
        for gram in tokens:
            i = index_of(gram)
            counts[i] = counts.get(i, 0) + 1
        for left, right in zip(tokens, tokens[1:], strict=False):
            i = index_of(left + " " + right)
            counts[i] = counts.get(i, 0) + 1
        if not counts:
            return self.bias
        weights = self.weights
        norm = math.sqrt(sum(c * c for c in counts.values()))
        return sum(weights[i] * c for i, c in counts.items()) / norm + self.bias


@dataclass(slots=True)
class RankModel:
    """A loaded ranker; `score`/`score_batch` give predicted ln(1 + output tokens)."""

    text_weights: np.ndarray  # float32, HASH_N_FEATURES
    text_bias: float
    booster: Any  # lightgbm.Booster
    calibration_scale: float
    calibration_offset: float
    kind: str = "lambdarank"
    meta: dict[str, Any] = field(default_factory=dict)
    _vectorizer: Any = None
    _text_layer: HashedTextLayer | None = None

    def __post_init__(self) -> None:
        if self.text_weights.shape != (HASH_N_FEATURES,):
            raise RankModelError(
                f"text layer: expected {HASH_N_FEATURES} weights, got {self.text_weights.shape}"
            )
        if not self.calibration_scale > 0:
            raise RankModelError(f"calibration scale must be positive, got {self.calibration_scale}")
        self._vectorizer = hashing_vectorizer()
        self._text_layer = HashedTextLayer(self.text_weights, self.text_bias)

    def text_scores(self, texts: Sequence[str]) -> np.ndarray:
        hashed = self._vectorizer.transform(list(texts))
        return np.asarray(hashed @ self.text_weights, dtype=np.float64) + self.text_bias

    def design_matrix(self, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """The booster's input rows: dense features, then the text layer's output."""
        feats = [request_features(r) for r in records]
        dense = np.array([f.dense for f in feats], dtype=np.float64).reshape(len(feats), len(DENSE_FEATURE_NAMES))
        assert self._text_layer is not None
        layer = self._text_layer
        text = np.array([layer.score(f.instruction_text) for f in feats], dtype=np.float64)
        return np.column_stack([dense, text])

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
        row = np.array([[*features.dense, self._text_layer.score(features.instruction_text)]])
        raw = float(self.booster.predict(row, num_threads=1)[0])
        return min(max(raw * self.calibration_scale + self.calibration_offset, 0.0), cap)

    # ------------------------------------------------------------------ file I/O
    def to_document(self) -> dict[str, Any]:
        weights = np.ascontiguousarray(self.text_weights, dtype="<f4").tobytes()
        return {
            "format": MODEL_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,
            "feature_spec": FEATURE_SPEC,
            "kind": self.kind,
            "text_layer": {"weights_b64": base64.b64encode(weights).decode("ascii"), "bias": self.text_bias},
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
        weights = np.frombuffer(base64.b64decode(text["weights_b64"]), dtype="<f4").astype(np.float32)
        booster = lightgbm.Booster(model_str=str(doc["booster"]))
        calibration = doc["calibration"]
        return RankModel(
            text_weights=weights,
            text_bias=float(text["bias"]),
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
