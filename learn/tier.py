"""Training and held-out evaluation of the tier predictor (`tokenyard train tier`).

Fits gradient-boosted trees (LightGBM, the default) on the text statistics and cues
`scheduler.predictors.tier` computes, learning the small tier's own score on each prompt
(`TrainParams.target`) and blended with a prompt-length prior (`TrainParams.length_prior_weight`;
trees only), or a logistic regression over hashed word n-grams + the same
statistics learning "the small tier's answer suffices" (`LabelledPrompt.small_ok`); either
way the raw score is Platt-calibrated to p_small_ok on held-out tasks. Writes the
versioned model file that module loads. Scores at evaluation are computed by loading the very document that is written, so
training and serving cannot disagree on features.

Held-out evaluation, all reported per benchmark with RouteLLM's and RouterBench's metrics:
- by prompt: 20% of distinct prompts held out;
- by task: 5 folds over task groups (MMLU subjects, MT-Bench categories, AlpacaEval
  sources, GSM8K): no task of a test fold is seen in training. Its out-of-fold scores fit
  the calibration map (Platt scaling) and the threshold table the tier decision reads;
- by benchmark: each benchmark held out in turn (trained on the others only).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, GroupShuffleSplit

from learn.tier_data import LabelledPrompt
from learn.tier_metrics import routing_curve, summary
from scheduler.predictors.tier import (
    MODEL_FORMAT,
    MODEL_VERSION,
    STAT_NAMES,
    HashSpec,
    TierPredictor,
    encode_floats,
    text_stats,
)

Progress = Callable[[str], None]
_OFFSET_SCALE = 10.0  # task columns take this value, so the L2 penalty barely holds their offsets back


@dataclass(frozen=True, slots=True)
class TrainParams:
    """What a training run is configured by (recorded in the model file)."""

    n_features: int = 2**15
    ngram_max: int = 2
    c: float = 0.5  # inverse L2 strength of the logistic regression
    balance_benchmarks: bool = True  # each benchmark weighs the same in the loss
    # One offset per task in the fit (dropped at inference): absorbs each task's base rate
    # of small-ok answers, so the text weights learn what makes a prompt harder than its
    # task's others rather than which benchmark it comes from.
    task_offsets: bool = True
    hashed: bool = True  # False: text statistics and cues only
    classifier: str = "lightgbm"  # or "logistic" (hashed n-grams + statistics)
    # What the trees learn (the logistic model always learns small_ok):
    # - "small_quality": the small tier's own score (cross-entropy on q_small in [0, 1]);
    #   how hard a prompt is for the small model carries to unseen tasks better than
    #   whether it beats the large one (by-task APGR 0.558 against 0.512, the variant picked
    #   by a validation split inside the training tasks in every outer fold: docs/benchmarks.md);
    # - "small_ok": the binary label, small as good as large within the margin.
    target: str = "small_quality"
    trees: int = 600
    leaves: int = 2  # stumps: an additive model of the cues (see `target`), picked by the same nested validation
    # The trees' score blended with "longer prompts go large" (scheduler.predictors.tier.
    # LengthPrior): 0.4 is what a 4-fold task split of the training tasks picked in three
    # outer folds of five (0.2 in the other two); by task 0.569 -> 0.588, each benchmark
    # held out 0.503 -> 0.524 (docs/benchmarks.md, "Tier routing"). 0 = the trees alone.
    length_prior_weight: float = 0.4
    seed: int = 0
    folds: int = 5

    def validate(self) -> None:
        if self.n_features & (self.n_features - 1) or not 2**8 <= self.n_features <= 2**20:
            raise ValueError(f"n_features: expected a power of two in [256, 1048576], got {self.n_features}")
        if not 1 <= self.ngram_max <= 3:
            raise ValueError(f"ngram_max: expected 1, 2 or 3, got {self.ngram_max}")
        if not self.c > 0:
            raise ValueError(f"C: expected a number > 0, got {self.c}")
        if self.target not in ("small_quality", "small_ok"):
            raise ValueError(f"target: expected 'small_quality' or 'small_ok', got {self.target!r}")
        if self.classifier not in ("lightgbm", "logistic"):
            raise ValueError(f"classifier: expected 'lightgbm' or 'logistic', got {self.classifier!r}")
        if not 1 <= self.trees <= 5000 or not 2 <= self.leaves <= 255:
            raise ValueError(f"trees/leaves: expected 1..5000 and 2..255, got {self.trees}, {self.leaves}")
        if not 0.0 <= self.length_prior_weight <= 1.0:
            raise ValueError(f"length prior weight: expected a number in [0, 1], got {self.length_prior_weight}")
        if not 2 <= self.folds <= 20:
            raise ValueError(f"folds: expected 2..20, got {self.folds}")


@dataclass(slots=True)
class Evaluation:
    """Held-out metrics: {split: {benchmark: metrics}}, plus the by-task out-of-fold scores."""

    metrics: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    oof_scores: np.ndarray | None = None  # calibrated, by-task folds
    oof_raw: np.ndarray | None = None


def _spec(params: TrainParams) -> HashSpec:
    return HashSpec(params.n_features, 1, params.ngram_max)


def _weights(rows: Sequence[LabelledPrompt], balance: bool) -> np.ndarray:
    if not balance:
        return np.ones(len(rows))
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.benchmark] = counts.get(row.benchmark, 0) + 1
    per = len(rows) / max(1, len(counts))
    return np.array([per / counts[row.benchmark] for row in rows])


def fit_document(rows: Sequence[LabelledPrompt], params: TrainParams,
                 calibration: tuple[Sequence[float], Sequence[float]] | None = None,
                 thresholds: Sequence[dict[str, float]] = (), meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model file (a JSON document) fitted on `rows`."""
    if len({row.small_ok for row in rows}) < 2:
        raise ValueError("training data has a single label (every small answer ok, or none): nothing to learn")
    spec = _spec(params)
    texts = [row.prompt for row in rows]
    stats = np.asarray([text_stats(t) for t in texts], dtype=np.float64)
    stat_mean = stats.mean(axis=0)
    stat_scale = np.where(stats.std(axis=0) > 1e-9, stats.std(axis=0), 1.0)
    if params.classifier == "lightgbm":
        return _lightgbm_document(rows, params, stats, stat_mean, stat_scale, calibration, thresholds, meta)
    hashed = spec.vectorizer().transform(texts)
    if not params.hashed:
        hashed = sparse.csr_matrix(hashed.shape, dtype=np.float32)
    blocks = [hashed, sparse.csr_matrix((stats - stat_mean) / stat_scale)]
    tasks = sorted({row.task for row in rows})
    if params.task_offsets:
        column = {task: k for k, task in enumerate(tasks)}
        blocks.append(sparse.csr_matrix(
            (np.full(len(rows), _OFFSET_SCALE), ([*range(len(rows))], [column[row.task] for row in rows])),
            shape=(len(rows), len(tasks)),
        ))
    design = sparse.hstack(blocks, format="csr")
    labels = np.array([row.small_ok for row in rows], dtype=int)
    model = LogisticRegression(C=params.c, max_iter=2000, solver="liblinear", random_state=params.seed)
    model.fit(design, labels, sample_weight=_weights(rows, params.balance_benchmarks))
    coef = model.coef_[0]
    intercept = float(model.intercept_[0])
    if params.task_offsets:  # serve with the mean task offset (row-weighted)
        offsets = coef[spec.n_features + len(STAT_NAMES):] * _OFFSET_SCALE
        counts = np.bincount([tasks.index(row.task) for row in rows], minlength=len(tasks))
        intercept += float(np.dot(offsets, counts) / max(1, counts.sum()))
        coef = coef[: spec.n_features + len(STAT_NAMES)]
    calib_x, calib_y = calibration if calibration is not None else ([0.0, 1.0], [0.0, 1.0])
    return {
        "format": MODEL_FORMAT,
        "version": MODEL_VERSION,
        "features": {"hash": spec.to_json(), "stats": list(STAT_NAMES)},
        "weights": encode_floats(coef[: spec.n_features]),
        "stat_weights": encode_floats(coef[spec.n_features:spec.n_features + len(STAT_NAMES)]),
        "stat_mean": [round(float(v), 6) for v in stat_mean],
        "stat_scale": [round(float(v), 6) for v in stat_scale],
        "intercept": intercept,
        "calibration": {"x": [float(v) for v in calib_x], "y": [float(v) for v in calib_y]},
        "thresholds": list(thresholds),
        "trained": meta or {},
    }


def _lightgbm_document(rows: Sequence[LabelledPrompt], params: TrainParams, stats: np.ndarray,
                       stat_mean: np.ndarray, stat_scale: np.ndarray,
                       calibration: tuple[Sequence[float], Sequence[float]] | None,
                       thresholds: Sequence[dict[str, float]], meta: dict[str, Any] | None) -> dict[str, Any]:
    """Gradient-boosted trees over the statistics and cues (trees find the interactions,
    e.g. length matters differently with and without answer choices)."""
    import lightgbm

    if params.target == "small_quality":
        objective, labels = "cross_entropy", np.array([row.q_small for row in rows], dtype=np.float64)
    else:
        objective, labels = "binary", np.array([row.small_ok for row in rows], dtype=np.float64)
    booster = lightgbm.train(
        {"objective": objective, "num_leaves": params.leaves, "learning_rate": 0.03, "min_data_in_leaf": 40,
         "feature_fraction": 0.8, "bagging_fraction": 0.8, "bagging_freq": 1, "verbose": -1,
         "seed": params.seed, "num_threads": 1, "deterministic": True},
        lightgbm.Dataset((stats - stat_mean) / stat_scale, labels, weight=_weights(rows, params.balance_benchmarks)),
        num_boost_round=params.trees,
    )
    calib_x, calib_y = calibration if calibration is not None else ([0.0, 1.0], [0.0, 1.0])
    extra: dict[str, Any] = {}
    if params.length_prior_weight > 0:
        trees = np.clip(np.asarray(booster.predict((stats - stat_mean) / stat_scale), dtype=np.float64), 1e-6, 1 - 1e-6)
        logits = np.log(trees / (1.0 - trees))
        extra["length_prior"] = {"weight": params.length_prior_weight, "logit_mean": round(float(logits.mean()), 6),
                                 "logit_scale": round(float(max(logits.std(), 1e-6)), 6)}
    return {
        **extra,
        "format": MODEL_FORMAT,
        "version": MODEL_VERSION,
        "classifier": "lightgbm",
        "features": {"hash": _spec(params).to_json(), "stats": list(STAT_NAMES)},
        "lightgbm": booster.model_to_string(),
        "stat_mean": [round(float(v), 6) for v in stat_mean],
        "stat_scale": [round(float(v), 6) for v in stat_scale],
        "intercept": 0.0,
        "calibration": {"x": [float(v) for v in calib_x], "y": [float(v) for v in calib_y]},
        "thresholds": list(thresholds),
        "trained": meta or {},
    }


def _by_benchmark(rows: Sequence[LabelledPrompt], index: Iterable[int], scores: np.ndarray,
                  seed: int) -> dict[str, dict[str, float]]:
    groups: dict[str, list[int]] = {}
    for k, i in enumerate(index):
        groups.setdefault(rows[i].benchmark, []).append(k)
    out: dict[str, dict[str, float]] = {}
    positions = list(index)
    for benchmark, ks in sorted(groups.items()):
        picked = [positions[k] for k in ks]
        out[benchmark] = summary(scores[ks], [rows[i].q_small for i in picked], [rows[i].q_large for i in picked], seed)
    if out:
        out["mean"] = {key: float(np.mean([m[key] for m in out.values()])) for key in next(iter(out.values()))}
    return out


def _score(doc: dict[str, Any], rows: Sequence[LabelledPrompt], index: Sequence[int] | np.ndarray, raw: bool = False) -> np.ndarray:
    predictor = TierPredictor(doc, "in-training model")
    texts = [rows[i].prompt for i in index]
    return predictor.raw_scores(texts) if raw else predictor.score_many(texts)


def fit_calibration(raw: np.ndarray, labels: np.ndarray, points: int = 41) -> tuple[list[float], list[float]]:
    """Platt scaling (a logistic fit on the raw score's logit) sampled at `points` knots.
    Strictly increasing, unlike isotonic regression, whose plateaus would tie many
    requests at one score and leave the load-aware order among them arbitrary."""
    logit = np.log(np.clip(raw, 1e-6, 1 - 1e-6) / np.clip(1 - raw, 1e-6, 1.0)).reshape(-1, 1)
    platt = LogisticRegression(C=1e4, solver="lbfgs").fit(logit, labels.astype(int))
    xs = np.unique(np.concatenate([[0.0, 1.0], np.quantile(raw, np.linspace(0.0, 1.0, points))]))
    knots = np.log(np.clip(xs, 1e-6, 1 - 1e-6) / np.clip(1 - xs, 1e-6, 1.0)).reshape(-1, 1)
    ys = platt.predict_proba(knots)[:, 1]
    if platt.coef_[0][0] <= 0:  # a raw score that ranks backwards is not turned around here
        ys = np.full_like(xs, float(labels.mean()))
    return [round(float(x), 6) for x in xs], [round(float(y), 6) for y in np.maximum.accumulate(ys)]


def threshold_table(rows: Sequence[LabelledPrompt], scores: np.ndarray, steps: int = 20) -> list[dict[str, float]]:
    """At the score quantiles 0, 1/steps, ..., 1 of these rows: the threshold, and the share
    of large calls and the PGR there, each the mean over benchmarks (no benchmark dominates)."""
    by_bench: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_bench.setdefault(row.benchmark, []).append(i)
    table = []
    for k in range(steps + 1):
        share = k / steps
        threshold = 0.0 if k == 0 else (1.0 + 1e-9 if k == steps else float(np.quantile(scores, share)))
        pgrs, shares = [], []
        for idx in by_bench.values():
            qs = np.array([rows[i].q_small for i in idx])
            ql = np.array([rows[i].q_large for i in idx])
            to_large = scores[idx] < threshold
            shares.append(float(to_large.mean()))
            gap = ql.mean() - qs.mean()
            if abs(gap) > 1e-12:
                pgrs.append(float((np.where(to_large, ql, qs).mean() - qs.mean()) / gap))
        table.append({"threshold": round(threshold, 6), "large_share": round(float(np.mean(shares)), 6),
                      "pgr": round(float(np.mean(pgrs)) if pgrs else share, 6)})
    return table


def evaluate(rows: Sequence[LabelledPrompt], params: TrainParams, progress: Progress | None = None) -> Evaluation:
    """The three held-out evaluations (see the module docstring)."""
    say = progress or (lambda _: None)
    result = Evaluation()
    labels = np.array([r.small_ok for r in rows], dtype=float)
    all_index = np.arange(len(rows))
    prompts = [" ".join(r.prompt.split()).lower() for r in rows]
    train, test = next(GroupShuffleSplit(1, test_size=0.2, random_state=params.seed).split(all_index, groups=prompts))
    say("by prompt")
    doc = fit_document([rows[i] for i in train], params)
    result.metrics["by_prompt"] = _by_benchmark(rows, test, _score(doc, rows, test, raw=True), params.seed)

    tasks = [r.task for r in rows]
    folds = min(params.folds, len(set(tasks)))
    oof_raw = np.zeros(len(rows))
    for k, (train, test) in enumerate(GroupKFold(folds).split(all_index, groups=tasks)):
        say(f"by task, fold {k + 1}/{folds}")
        doc = fit_document([rows[i] for i in train], params)
        oof_raw[test] = _score(doc, rows, test, raw=True)
    result.metrics["by_task"] = _by_benchmark(rows, all_index, oof_raw, params.seed)
    calib_x, calib_y = fit_calibration(oof_raw, labels)
    result.oof_raw = oof_raw
    result.oof_scores = np.interp(oof_raw, calib_x, calib_y)

    benchmarks = sorted({r.benchmark for r in rows})
    held: dict[str, dict[str, float]] = {}
    for benchmark in benchmarks if len(benchmarks) > 1 else ():
        say(f"by benchmark, {benchmark} held out")
        train = np.array([i for i, r in enumerate(rows) if r.benchmark != benchmark])
        test = np.array([i for i, r in enumerate(rows) if r.benchmark == benchmark])
        train_rows = [rows[i] for i in train]
        if len({r.small_ok for r in train_rows}) < 2:
            continue
        doc = fit_document(train_rows, params)
        held[benchmark] = _by_benchmark(rows, test, _score(doc, rows, test, raw=True), params.seed)[benchmark]
    if held:
        held["mean"] = {key: float(np.mean([m[key] for m in held.values()])) for key in next(iter(held.values()))}
        result.metrics["by_benchmark"] = held
    return result


def train(rows: Sequence[LabelledPrompt], params: TrainParams, meta: dict[str, Any],
          progress: Progress | None = None) -> tuple[dict[str, Any], Evaluation]:
    """Evaluate held out, then fit on everything; the model file and the evaluation."""
    params.validate()
    evaluation = evaluate(rows, params, progress)
    assert evaluation.oof_raw is not None and evaluation.oof_scores is not None
    labels = np.array([r.small_ok for r in rows], dtype=float)
    calibration = fit_calibration(evaluation.oof_raw, labels)
    table = threshold_table(rows, evaluation.oof_scores)
    if progress:
        progress("final fit on all rows")
    meta = {**meta, "params": {"classifier": params.classifier, "target": params.target, "trees": params.trees, "leaves": params.leaves,
                               "length_prior_weight": params.length_prior_weight,
                               "n_features": params.n_features, "ngram_max": params.ngram_max, "C": params.c,
                               "balance_benchmarks": params.balance_benchmarks, "seed": params.seed},
            "rows": len(rows), "small_ok_share": round(float(labels.mean()), 4),
            "held_out": _rounded(evaluation.metrics)}
    return fit_document(rows, params, calibration, table, meta), evaluation


def _rounded(metrics: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    return {split: {b: {k: (round(v, 4) if math.isfinite(v) else None) for k, v in m.items()} for b, m in by.items()}
            for split, by in metrics.items()}


def oof_curves(rows: Sequence[LabelledPrompt], scores: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per benchmark, (large share, PGR) of the by-task out-of-fold scores (for the plot)."""
    out = {}
    for benchmark in sorted({r.benchmark for r in rows}):
        idx = [i for i, r in enumerate(rows) if r.benchmark == benchmark]
        curve = routing_curve(scores[idx], [rows[i].q_small for i in idx], [rows[i].q_large for i in idx])
        out[benchmark] = (curve.large_share, curve.pgr)
    return out
