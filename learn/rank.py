"""Training and evaluation of the output-length ranker (`tokenyard train rank`).

Pipeline (the model it builds is described in `scheduler.predictors.rank`):

1. split by prompt: a fraction of the distinct prompts is held out (no prompt is in both
   train and test), and a few models are held out entirely (`unseen_models`), evaluated on
   the held-out prompts only, so "unseen model" also means "unseen prompt";
2. the text layer: ridge regression (scikit-learn) of model-demeaned ln(1 + output tokens)
   on the sublinear TF-IDF of the hashed instruction n-grams (idf fit on the distinct
   training prompts), one row per distinct prompt; the booster is trained on its
   out-of-fold predictions (5 folds by prompt), so it does not learn to trust an in-sample
   fit;
2b. the model prior: each training model's mean ln(1 + output tokens) (models with at
   least 20 answers); 20% of the models (a stable hash of the name) are hidden from it while
   the booster trains, so the booster learns to rank requests to a model without a prior;
3. the booster: LightGBM `regression` (L2 on ln(1 + tokens); the default since issue 11's
   fourth round: higher held-out tau than lambdarank on the same split and ~8x cheaper to
   train), each row weighted by 1 / (answers to its prompt), so that every distinct prompt
   weighs the same (`prompt_weight`, since stop 24: an AlpacaEval prompt's ~200 answers are
   one observation of what its wording asks for, and no leaf can be one prompt's rows), or
   `lambdarank` (unweighted) over query groups of 64 (per model, plus mixed-model groups so
   that model cues matter too), labels = the within-group rank in 32 bins, linear gains;
4. a monotone linear calibration of the raw score onto ln(1 + tokens);
5. the report: Kendall's tau overall and the mean over random same-model batches of 32 and
   64, against input length, random and FCFS (arrival order) baselines, on held-out prompts
   and on unseen models; per source; what multi-turn conversations show.

With `refit_all` the shipped model is then refit on every example with the same settings
(the report's figures are those of the split model).
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from learn.rank_data import Example
from scheduler.predictors.features import DENSE_FEATURE_NAMES, hashing_vectorizer, tfidf
from scheduler.predictors.rank import RankModel, TextLayer

OBJECTIVES = ("regression", "lambdarank")
_RANK_BINS = 32
_PRIOR_MIN_EXAMPLES = 20  # a model with fewer training answers gets no prior (too noisy)
_PRIOR_HIDDEN_SHARE = 0.2


@dataclass(frozen=True, slots=True)
class TrainConfig:
    objective: str = "regression"
    n_estimators: int = 300
    num_leaves: int = 31
    learning_rate: float = 0.05
    min_child_samples: int = 40
    ridge_alpha: float = 4.0  # chosen on a validation split of the training prompts (docs/ranking.md)
    test_fraction: float = 0.2
    unseen_models: tuple[str, ...] = ("gpt-4o-2024-05-13", "Meta-Llama-3-70B-Instruct", "gemma-2b-it")
    group_size: int = 64
    # booster rows weighted by (answers to the row's prompt) ** -prompt_weight (regression):
    # 0 = every answer counts the same, 1 = every distinct prompt does; 1 since issue 11 stop
    # 24 (chosen on a validation split of the training prompts, docs/ranking.md)
    prompt_weight: float = 1.0
    seed: int = 0
    refit_all: bool = True

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective: expected one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction: expected a number in (0, 1), got {self.test_fraction}")
        if not 0.0 <= self.prompt_weight <= 1.0:
            raise ValueError(f"prompt_weight: expected a number in [0, 1], got {self.prompt_weight}")
        if self.prompt_weight and self.objective != "regression":
            raise ValueError(f"prompt_weight: only the regression objective takes prompt weights, "
                             f"got {self.prompt_weight} with objective {self.objective!r} (use 0)")
        if self.n_estimators < 1 or self.num_leaves < 2 or self.group_size < 2:
            raise ValueError("n_estimators >= 1, num_leaves >= 2 and group_size >= 2 are required")


@dataclass(slots=True)
class Split:
    train: list[Example]
    test: list[Example]
    unseen: list[Example]


def split_by_prompt(examples: Sequence[Example], config: TrainConfig) -> Split:
    keys = sorted({e.prompt_key for e in examples})
    rng = np.random.default_rng(config.seed)
    rng.shuffle(keys)
    test_keys = set(keys[: max(1, int(len(keys) * config.test_fraction))])
    unseen = set(config.unseen_models)
    split = Split([], [], [])
    for e in examples:
        held = e.prompt_key in test_keys
        if e.model in unseen:
            if held:
                split.unseen.append(e)
        elif held:
            split.test.append(e)
        else:
            split.train.append(e)
    return split


def _log_tokens(examples: Sequence[Example]) -> np.ndarray:
    return np.log1p(np.array([e.output_tokens for e in examples], dtype=np.float64))


def _demeaned_by_prompt(examples: Sequence[Example]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(instruction text, mean model-demeaned log tokens, weight) per distinct prompt."""
    y = _log_tokens(examples)
    by_model: dict[str, list[float]] = defaultdict(list)
    for e, v in zip(examples, y, strict=True):
        by_model[e.model].append(float(v))
    model_mean = {m: float(np.mean(v)) for m, v in by_model.items()}
    sums: dict[str, list[float]] = {}
    texts: dict[str, str] = {}
    for e, v in zip(examples, y, strict=True):
        acc = sums.setdefault(e.prompt_key, [0.0, 0.0])
        acc[0] += float(v) - model_mean[e.model]
        acc[1] += 1.0
        texts.setdefault(e.prompt_key, e.features.instruction_text)
    keys = sorted(sums)
    return (
        [texts[k] for k in keys],
        np.array([sums[k][0] / sums[k][1] for k in keys]),
        np.array([sums[k][1] for k in keys]),
    )


def fit_text_layer(examples: Sequence[Example], alpha: float) -> TextLayer:
    """Ridge over the sublinear TF-IDF of the hashed instruction n-grams (idf fit on the
    distinct training prompts); the sparse layer keeps only the buckets seen in training."""
    from sklearn.feature_extraction.text import TfidfTransformer
    from sklearn.linear_model import Ridge

    texts, target, weight = _demeaned_by_prompt(examples)
    counts = hashing_vectorizer().transform(texts)
    idf = TfidfTransformer(sublinear_tf=True, smooth_idf=True).fit(counts).idf_
    # sqrt weights: a prompt answered by 200 models should count more, not 200x more
    ridge = Ridge(alpha=alpha, solver="sparse_cg", random_state=0)
    ridge.fit(tfidf(counts, idf), target, sample_weight=np.sqrt(weight))
    seen = np.flatnonzero(np.asarray(counts.getnnz(axis=0)).ravel())
    unseen_idf = float(np.log(1.0 + len(texts)) + 1.0)  # smooth idf of a bucket in no document
    return TextLayer(seen.astype(np.int32), np.asarray(ridge.coef_[seen], dtype=np.float32),
                     np.asarray(idf[seen], dtype=np.float32), unseen_idf, float(ridge.intercept_))


def _layer_scores(layer: TextLayer, counts: Any) -> np.ndarray:
    weights, idf = layer.dense_weights()
    return np.asarray(tfidf(counts, idf) @ weights, dtype=np.float64) + layer.bias


def out_of_fold_text_scores(examples: Sequence[Example], alpha: float, seed: int, folds: int = 5) -> np.ndarray:
    keys = sorted({e.prompt_key for e in examples})
    rng = np.random.default_rng(seed + 1)
    fold_of = dict(zip(keys, rng.integers(0, folds, len(keys)), strict=True))
    counts = hashing_vectorizer().transform([e.features.instruction_text for e in examples])
    scores = np.zeros(len(examples))
    fold_index = np.array([fold_of[e.prompt_key] for e in examples])
    for fold in range(folds):
        inside = fold_index == fold
        if not inside.any():
            continue
        layer = fit_text_layer([e for e, i in zip(examples, inside, strict=True) if not i], alpha)
        scores[inside] = _layer_scores(layer, counts[inside])
    return scores


def model_prior_table(examples: Sequence[Example]) -> dict[str, float]:
    """Mean ln(1 + output tokens) per model (`RequestFeatures.model`): its verbosity prior."""
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for e, v in zip(examples, _log_tokens(examples), strict=True):
        acc = sums[e.features.model]
        acc[0] += float(v)
        acc[1] += 1.0
    return {m: round(acc[0] / acc[1], 4) for m, acc in sorted(sums.items()) if m and acc[1] >= _PRIOR_MIN_EXAMPLES}


def _hidden_from_prior(model: str, seed: int) -> bool:
    """Models whose prior the booster does not see in training (a stable hash of the name),
    so it learns to rank requests to a model missing from the table."""
    return hashlib.blake2b(f"{seed}:{model}".encode(), digest_size=2).digest()[0] < 256 * _PRIOR_HIDDEN_SHARE


def prior_column(examples: Sequence[Example], table: dict[str, float], seed: int | None = None) -> np.ndarray:
    """Each example's model prior; NaN when unknown (or hidden, with a training `seed`)."""
    return np.array([
        math.nan if seed is not None and _hidden_from_prior(e.features.model, seed)
        else table.get(e.features.model, math.nan) for e in examples
    ], dtype=np.float64)


def design_matrix(examples: Sequence[Example], text_scores: np.ndarray, prior: np.ndarray) -> np.ndarray:
    dense = np.array([e.features.dense for e in examples], dtype=np.float64).reshape(len(examples), len(DENSE_FEATURE_NAMES))
    return np.column_stack([dense, text_scores, prior])


def query_groups(examples: Sequence[Example], group_size: int, seed: int) -> list[np.ndarray]:
    """Index groups for lambdarank: same-model batches, plus as many mixed-model batches."""
    rng = np.random.default_rng(seed + 2)
    by_model: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        by_model[e.model].append(i)
    groups: list[np.ndarray] = []
    for model in sorted(by_model):
        idx = np.array(by_model[model])
        rng.shuffle(idx)
        groups.extend(idx[k:k + group_size] for k in range(0, len(idx), group_size))
    mixed = rng.permutation(len(examples))
    groups.extend(mixed[k:k + group_size] for k in range(0, len(mixed), group_size))
    return [g for g in groups if len(g) > 1]


def prompt_weights(examples: Sequence[Example], power: float) -> np.ndarray:
    """Per-example weights (answers to the example's prompt) ** -power, scaled to mean 1.
    With power 1 each distinct prompt weighs the same in the booster, however many models
    answered it: the ~200 answers of one AlpacaEval prompt are one observation of what its
    wording asks for, not 200, and a leaf cannot be one memorised prompt's rows."""
    counts: dict[str, int] = defaultdict(int)
    for e in examples:
        counts[e.prompt_key] += 1
    w = np.array([counts[e.prompt_key] ** -power for e in examples], dtype=np.float64)
    return np.asarray(w * (len(w) / w.sum()), dtype=np.float64)


def _rank_labels(values: np.ndarray) -> np.ndarray:
    order = np.argsort(np.argsort(values, kind="stable"), kind="stable")
    return (order * _RANK_BINS // len(values)).astype(np.int32)


def train_booster(
    features: np.ndarray, examples: Sequence[Example], config: TrainConfig, on_iteration: Callable[[], None] | None = None
) -> Any:
    import lightgbm

    y = _log_tokens(examples)
    params: dict[str, Any] = {
        "learning_rate": config.learning_rate, "num_leaves": config.num_leaves,
        "min_child_samples": config.min_child_samples, "feature_fraction": 0.9,
        "bagging_fraction": 0.8, "bagging_freq": 1, "seed": config.seed, "verbose": -1, "num_threads": 2,
    }
    if config.objective == "lambdarank":
        groups = query_groups(examples, config.group_size, config.seed)
        index = np.concatenate(groups)
        labels = np.concatenate([_rank_labels(y[g]) for g in groups])
        params.update(objective="lambdarank", lambdarank_truncation_level=config.group_size,
                      label_gain=list(range(_RANK_BINS)), eval_at=[config.group_size])
        data = lightgbm.Dataset(features[index], labels, group=[len(g) for g in groups])
    else:
        params.update(objective="regression")
        weight = prompt_weights(examples, config.prompt_weight) if config.prompt_weight else None
        data = lightgbm.Dataset(features, y, weight=weight)
    callbacks = [lambda env: on_iteration()] if on_iteration else []
    return lightgbm.train(params, data, num_boost_round=config.n_estimators, callbacks=callbacks)


def calibrate(raw: np.ndarray, examples: Sequence[Example]) -> tuple[float, float]:
    """Least-squares scale and offset mapping raw scores onto ln(1 + tokens); positive scale."""
    y = _log_tokens(examples)
    spread = float(np.std(raw))
    if spread <= 0:
        return 1e-6, float(np.mean(y))
    scale, offset = np.polyfit(raw, y, 1)
    if scale <= 0:  # a ranker anti-correlated with length on its own training set: flat
        return 1e-6, float(np.mean(y))
    return float(scale), float(offset)


# --------------------------------------------------------------------------- evaluation
def kendall_tau(predicted: np.ndarray, actual: np.ndarray) -> float:
    from scipy.stats import kendalltau

    if len(predicted) < 2:
        return math.nan
    tau = kendalltau(predicted, actual).statistic
    return float(tau) if tau == tau else 0.0  # constant input: no order information


def batch_tau(predicted: np.ndarray, examples: Sequence[Example], batch: int, seed: int) -> float:
    """Mean Kendall tau over random same-model batches (what one engine's queue holds)."""
    rng = np.random.default_rng(seed + 3)
    actual = np.array([e.output_tokens for e in examples], dtype=np.float64)
    by_model: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        by_model[e.model].append(i)
    taus: list[float] = []
    for model in sorted(by_model):
        idx = np.array(by_model[model])
        rng.shuffle(idx)
        for k in range(0, len(idx) - batch + 1, batch):
            chunk = idx[k:k + batch]
            taus.append(kendall_tau(predicted[chunk], actual[chunk]))
    return float(np.mean(taus)) if taus else math.nan


def _tau_row(predicted: np.ndarray, examples: Sequence[Example], seed: int) -> dict[str, float]:
    actual = np.array([e.output_tokens for e in examples], dtype=np.float64)
    return {
        "overall": round(kendall_tau(predicted, actual), 4),
        "batch32": round(batch_tau(predicted, examples, 32, seed), 4),
        "batch64": round(batch_tau(predicted, examples, 64, seed), 4),
    }


def evaluate(model: RankModel, examples: Sequence[Example], seed: int) -> dict[str, Any]:
    """Taus of the model and of the baselines on one example set."""
    if not examples:
        return {"n": 0}
    rng = np.random.default_rng(seed + 4)
    text = model.text_scores([e.features.instruction_text for e in examples])
    prior = prior_column(examples, model.model_prior)
    raw = np.asarray(model.booster.predict(design_matrix(examples, text, prior), num_threads=2))
    input_len = np.array([e.features.dense[0] for e in examples])
    return {
        "n": len(examples),
        "model": _tau_row(raw, examples, seed),
        "input_length": _tau_row(input_len, examples, seed),
        # the verbosity prior alone (a model's mean length; the same for all its requests)
        "model_prior": _tau_row(np.nan_to_num(prior, nan=float(np.nanmean(prior)) if np.isfinite(prior).any() else 0.0),
                                examples, seed),
        "random": _tau_row(rng.random(len(examples)), examples, seed),
        # FCFS serves in arrival order, which is independent of the answer's length: its
        # "prediction" is the arrival index of a random arrival sequence.
        "fcfs": _tau_row(rng.permutation(len(examples)).astype(np.float64), examples, seed),
    }


@dataclass(slots=True)
class TrainReport:
    config: dict[str, Any]
    data: dict[str, Any]
    held_out_prompts: dict[str, Any] = field(default_factory=dict)
    unseen_models: dict[str, Any] = field(default_factory=dict)
    by_source: dict[str, Any] = field(default_factory=dict)
    multi_turn: dict[str, Any] = field(default_factory=dict)
    feature_gain: dict[str, float] = field(default_factory=dict)


def fit_model(
    train: Sequence[Example], config: TrainConfig, on_iteration: Callable[[], None] | None = None
) -> RankModel:
    """Text layer, model prior, booster on out-of-fold text scores, calibration: one RankModel."""
    layer = fit_text_layer(train, config.ridge_alpha)
    oof = out_of_fold_text_scores(train, config.ridge_alpha, config.seed)
    table = model_prior_table(train)
    features = design_matrix(train, oof, prior_column(train, table, config.seed))
    booster = train_booster(features, train, config, on_iteration)
    scale, offset = calibrate(np.asarray(booster.predict(features, num_threads=2)), train)
    return RankModel(layer, booster, scale, offset, model_prior=table, kind=config.objective)


def multi_turn_findings(model: RankModel, examples: Sequence[Example], seed: int) -> dict[str, Any]:
    """Second turns vs first turns of the same conversations (mt_bench)."""
    out: dict[str, Any] = {}
    for turn in (1, 2):
        subset = [e for e in examples if e.source == f"mt_bench_turn{turn}"]
        if subset:
            entry = evaluate(model, subset, seed)
            out[f"turn{turn}"] = {
                "n": len(subset),
                "mean_output_tokens": round(float(np.mean([e.output_tokens for e in subset])), 1),
                "tau_overall": entry["model"]["overall"],
                "tau_input_length": entry["input_length"]["overall"],
            }
    return out


def _feature_gain(model: RankModel) -> dict[str, float]:
    gains = model.booster.feature_importance(importance_type="gain")
    names = [*DENSE_FEATURE_NAMES, "text_layer", "model_prior"]
    total = float(np.sum(gains)) or 1.0
    ranked = sorted(zip(names, gains, strict=True), key=lambda p: -p[1])
    return {name: round(float(g) / total, 4) for name, g in ranked[:12]}


def train_and_report(
    examples: Sequence[Example], data_info: dict[str, Any], config: TrainConfig,
    on_iteration: Callable[[], None] | None = None,
) -> tuple[RankModel, TrainReport]:
    split = split_by_prompt(examples, config)
    if len(split.train) < 50 or not split.test:
        raise ValueError(f"too little data: {len(split.train)} training and {len(split.test)} test examples")
    model = fit_model(split.train, config, on_iteration)
    report = TrainReport(
        config={k: getattr(config, k) for k in config.__dataclass_fields__},
        data={**data_info, "train": len(split.train), "test": len(split.test), "unseen": len(split.unseen),
              "train_models": len({e.model for e in split.train})},
    )
    report.held_out_prompts = evaluate(model, split.test, config.seed)
    report.unseen_models = evaluate(model, split.unseen, config.seed)
    for source in sorted({e.source for e in split.test}):
        subset = [e for e in split.test if e.source == source]
        report.by_source[source] = {"n": len(subset), **evaluate(model, subset, config.seed)["model"]}
    report.multi_turn = multi_turn_findings(model, split.test + split.unseen, config.seed)
    report.feature_gain = _feature_gain(model)
    if config.refit_all:
        model = fit_model(examples, config, on_iteration)
    model.meta = {
        "objective": config.objective, "prompt_weight": config.prompt_weight, "tokenizer": data_info.get("tokenizer"),
        "sources": data_info.get("sources"), "held_out_tau": report.held_out_prompts.get("model"),
        "unseen_model_tau": report.unseen_models.get("model"), "refit_all": config.refit_all,
    }
    return model, report
