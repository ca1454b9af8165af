"""Output-length ranking at request time: score = predicted log output tokens (higher =
longer answer), from a versioned model file trained by `tokenyard train rank` (`learn.rank`).

A model is two layers over `scheduler.predictors.features`:

1. a linear layer over the sublinear TF-IDF of the instruction's hashed word 1-2 grams
   (ridge regression on log output tokens, model-demeaned): one number, "how long does this
   wording ask for";
2. a per-model verbosity prior: the mean ln(1 + output tokens) of each model in training
   (a table keyed by `features.model_key`; NaN for a model not in it, which the booster
   learned to handle from models hidden from the table in training);
3. a LightGBM booster (L2 regression on ln(1 + tokens), or lambdarank) over the dense features plus
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
it (the library tokenises each document in Python too). Training uses the library. The
booster runs through LightGBM's single-row C API (`_SingleRowPredictor`), not
`Booster.predict`, whose per-call Python setup cost more than the trees (22 us vs 7 us).
tests/test_rank_score_path.py checks `score()` against the plain path (scikit-learn's text
layer, `Booster.predict`, the plain feature code) to 1e-9.
"""

from __future__ import annotations

import base64
import ctypes
import gzip
import json
import math
import re
import struct
import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
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
# The text layer reads the lowercased text's UTF-8 bytes: ASCII non-word bytes (\w of ASCII is
# [0-9A-Za-z_]) to spaces, bytes >= 0x80 kept, split in C; a piece that is ASCII is a token when
# it has 2 characters or more (the regex's \w\w+), a piece that is not is tokenised by the
# regex (its non-ASCII characters may or may not be \w). Pieces are separated by ASCII non-word
# characters, which no \w run crosses, so the tokens are the regex's over the whole text.
_WORD_BYTES_OR_SPACE = bytes(c if c >= 128 or chr(c).isalnum() or c == 95 else 32 for c in range(256))
_INDEX_CACHE_MAX = 200_000

Gram = bytes | tuple[bytes, bytes]  # a token, or two adjacent tokens (the bigram "a b")
# The cache holds each gram's bucket as 4 bytes (int32, little-endian): the distinct buckets
# of a text are then one `b"".join` and one `np.frombuffer`, where `np.fromiter` over Python
# ints cost ~190 instructions a bucket (callgrind, issue 11 stop 23)
_BUCKET = struct.Struct("<i")
_BUCKET_DTYPE = np.dtype("<i4")


def text_tokens(lower: str) -> list[bytes]:
    """`_TOKEN.findall(lower)`, each token UTF-8 encoded (the bytes murmurhash reads)."""
    raw = lower.encode("utf-8", "surrogatepass")
    pieces = raw.translate(_WORD_BYTES_OR_SPACE).split()
    if raw.isascii():
        return [p for p in pieces if len(p) > 1]
    tokens: list[bytes] = []
    for piece in pieces:
        if piece.isascii():
            if len(piece) > 1:
                tokens.append(piece)
        else:
            tokens.extend(t.encode() for t in _TOKEN.findall(piece.decode("utf-8", "surrogatepass")))
    return tokens


class HashedTextLayer:
    """weights . l2-normalised sublinear TF-IDF of hashed word 1-2 grams + bias, one text at a time.

    Equal to `tfidf(hashing_vectorizer().transform([text]), idf) @ weights + bias`; see the
    module docstring for why it is hand-written. Only the buckets seen in training carry a
    weight and an idf; an unseen bucket has weight 0 and `idf_unseen`, which still counts in
    the norm. Tokens are UTF-8 bytes (`text_tokens`), a bigram is the pair of its tokens:
    the gram -> bucket cache (bounded) is looked up without building the bigram's string
    (`b" ".join` is built, and hashed, only on a miss); `collections.Counter` (C) counts the
    buckets, and the per-bucket arithmetic runs in numpy over dense (weight, idf) tables.
    Counting by a numpy sort instead was ~10% faster for a 1,600-character answer with warm
    caches but slower for a repetitive prompt, and slower for both when run after other work
    (the cold-cache case a router's worker thread is in): the Counter took 6-15% less thread
    CPU p50 there (issue 11, stop 23). Against the previous version (str tokens, joined bigrams, `np.fromiter` over ints):
    `bench/ranking.py --predictor` prints the ratio.
    """

    __slots__ = ("weights", "idf", "idf_unseen", "bias", "_index", "_murmur")

    def __init__(self, weights: Mapping[int, float], idf: Mapping[int, float], idf_unseen: float, bias: float) -> None:
        self.weights = np.zeros(HASH_N_FEATURES, dtype=np.float64)
        self.idf = np.full(HASH_N_FEATURES, idf_unseen, dtype=np.float64)
        buckets = np.fromiter(weights.keys(), dtype=np.intp, count=len(weights))
        self.weights[buckets] = np.fromiter(weights.values(), dtype=np.float64, count=len(weights))
        self.idf[buckets] = np.fromiter((idf[i] for i in weights), dtype=np.float64, count=len(weights))
        self.idf_unseen = idf_unseen
        self.bias = bias
        self._index: dict[Gram, bytes] = {}
        self._murmur: Any = None

    def _buckets_cold(self, tokens: list[bytes]) -> list[bytes]:
        """The buckets of all grams when some are not cached yet: hashes the missing ones
        (murmurhash3 of the gram's UTF-8, as `HashingVectorizer`), stores them, and returns
        the buckets from what it computed (a cache cleared meanwhile by another thread or by
        the size bound changes nothing here)."""
        if self._murmur is None:
            from sklearn.utils import murmurhash3_32

            self._murmur = murmurhash3_32
        murmur, cache = self._murmur, self._index
        fresh: dict[Gram, bytes] = {}
        buckets = []
        grams: Iterable[Gram] = chain(tokens, zip(tokens, tokens[1:], strict=False))
        for gram in grams:
            bucket = cache.get(gram) or fresh.get(gram)
            if bucket is None:
                key = gram if isinstance(gram, bytes) else b" ".join(gram)
                bucket = fresh[gram] = _BUCKET.pack(abs(int(murmur(key, 0))) % HASH_N_FEATURES)
            buckets.append(bucket)
        if len(cache) + len(fresh) > _INDEX_CACHE_MAX:
            cache.clear()
        cache.update(fresh)
        return buckets

    def score(self, text: str) -> float:
        tokens = text_tokens(text.lower())
        if not tokens:
            return self.bias
        get = self._index.__getitem__
        try:
            counts = Counter(chain(map(get, tokens), map(get, zip(tokens, tokens[1:], strict=False))))
        except KeyError:  # some gram not hashed yet
            counts = Counter(self._buckets_cold(tokens))
        return self._weigh(np.frombuffer(b"".join(counts), dtype=_BUCKET_DTYPE),
                           np.fromiter(counts.values(), dtype=np.intp, count=len(counts)))

    def _weigh(self, index: np.ndarray, counts: np.ndarray) -> float:
        """`weights . tfidf / |tfidf| + bias` over the distinct buckets `index` and their counts."""
        # 1 + ln(1) is exactly 1: the sublinear tf needs no case for a single occurrence
        values = np.log(counts)
        values += 1.0
        values *= self.idf[index]
        total = float(self.weights[index] @ values)
        return total / math.sqrt(float(values @ values)) + self.bias


class _SingleRowPredictor:
    """LightGBM's single-row C API (`LGBM_BoosterPredictForMatSingleRowFast`), its
    configuration prepared once: the same trees and arithmetic as `Booster.predict` (with
    `num_threads=1`, all iterations up to `best_iteration`), without the ~20 us of Python
    input checks and setup that call pays per row. Falls back to `Booster.predict` where the
    library lacks the API. A lock serialises the shared output buffer across threads."""

    def __init__(self, booster: Any, n_columns: int) -> None:
        self.booster = booster
        self.n_columns = n_columns
        self._row = np.zeros(n_columns, dtype=np.float64)
        self._pack_row = struct.Struct(f"={n_columns}d").pack_into
        self._row_buffer = self._row.data.cast("B")  # the row's bytes, for pack_into
        self._out = np.zeros(1, dtype=np.float64)
        self._out_len = ctypes.c_int64(0)
        self._lock = threading.Lock()
        self._lib: Any = None
        self._config = ctypes.c_void_p()
        from lightgbm import basic

        try:
            lib = basic._LIB  # type: ignore[attr-defined]  # the loaded C library (private, stable since 3.x)
            basic._safe_call(lib.LGBM_BoosterPredictForMatSingleRowFastInit(
                booster._handle, ctypes.c_int(basic._C_API_PREDICT_NORMAL), ctypes.c_int(0),
                ctypes.c_int(booster.best_iteration), ctypes.c_int(basic._C_API_DTYPE_FLOAT64),
                ctypes.c_int32(n_columns), basic._c_str("num_threads=1"), ctypes.byref(self._config),
            ))
        except (AttributeError, basic.LightGBMError):
            return
        self._lib = lib
        self._row_ptr = self._row.ctypes.data_as(ctypes.c_void_p)
        self._out_ptr = self._out.ctypes.data_as(ctypes.POINTER(ctypes.c_double))
        self._out_len_ref = ctypes.byref(self._out_len)
        self._predict_row = lib.LGBM_BoosterPredictForMatSingleRowFast
        self._check = basic._safe_call

    def __del__(self) -> None:
        if self._lib is not None:
            self._lib.LGBM_FastConfigFree(self._config)

    def predict(self, row: Sequence[float]) -> float:
        if self._lib is None:
            return float(self.booster.predict(np.array([row], dtype=np.float64), num_threads=1)[0])
        with self._lock:
            self._pack_row(self._row_buffer, 0, *row)  # ~1.2 us; numpy's `row[:] = tuple` ~2.7 us
            status = self._predict_row(self._config, self._row_ptr, self._out_len_ref, self._out_ptr)
            if status:
                self._check(status)  # raises LightGBMError with the library's message
            return float(self._out[0])


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
    _single_row: _SingleRowPredictor | None = None

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
        # the fast layer's dense tables are `text.dense_weights()`: one copy serves both paths
        self._dense_text = (self._text_layer.weights, self._text_layer.idf)
        self._single_row = _SingleRowPredictor(self.booster, len(DENSE_FEATURE_NAMES) + 2)

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
        assert self._text_layer is not None and self._single_row is not None
        raw = self._single_row.predict(
            (*features.dense, self._text_layer.score(features.instruction_text), self.prior(features.model)))
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
