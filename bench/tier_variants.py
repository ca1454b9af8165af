"""Tier predictor variants, measured on held-out tasks: which label, features and tree shape
carry to tasks the model never saw (docs/benchmarks.md, "Tier routing").

Every variant is scored the same way: 5 folds over task groups (MMLU subjects, MT-Bench
categories, AlpacaEval sources, GSM8K; `learn.tier`'s by-task split), LightGBM with
benchmark-balanced weights, APGR per benchmark of the out-of-fold scores and their mean.
Then two nested selections, so that what is adopted is not chosen on the test folds: in
each outer fold, the variant with the best mean APGR on a 4-fold task split of the
training tasks alone is fitted on them and scores the outer fold.

    nice -n 10 python bench/tier_variants.py [--nested] [--beyond] [--json out.json]

Labels: `small_ok` (binary), `gain` (q_large - q_small, regression, ranked by minus the
prediction), `q_small` (the small tier's own score: regression or cross-entropy).
Features: the first 18 statistics and cues of `scheduler.predictors.tier.STAT_NAMES` (the
earlier feature set), or all of them (with the difficulty and shape cues).

`--beyond` (instead of the table; the default's row is repeated) measures what goes past one tree model of the cues (the default's stumps are the
reference): two heads, the small tier's score minus a share of the large tier's
(the gain the issue's label is about); five bagged stump models; OrchestraLLM-style
exemplars, the similarity-weighted small-tier score of the 50 nearest training prompts
by TF-IDF cosine; the stumps' rank averaged with the exemplars' (ranks per benchmark); and
the stumps with one more input, the packaged output-length ranker's prediction (that
ranker was trained on the AlpacaEval, GSM8K and MT-Bench prompts' answer lengths, so only
MMLU's figure of that row is held out from it); then the stumps blended with the length
prior ("longer prompts go large") at weights 0 to 1, and the weight a nested split of the
training tasks picks (what the packaged model ships: `learn.tier.TrainParams`).

`--priors` (instead of the table): the fifth round. The stumps blended with other priors
(log words, the stem without the answer choices, log words minus the distinct-word share),
with the k single-feature priors that rank best on the training rows (chosen per fold, so
blind to the test tasks), stumps on the statistics without the keyword cues, and stumps
boosted from the length prior instead of blended with it; then the nested choice among
all of them.

`--rank-prior` (instead of the table): the sixth round. The output-length ranker's predicted
answer length (mean over 8 models of its prior table) and its spread over those models, as
two more stump inputs and as a prior blended with the stumps (alone and with the length
prior), the shipped form in the same run, and the nested choice among them. The ranker is
retrained per outer fold by `learn.rank.fit_model` without the length examples of that
fold's held-out prompts (about 2 min a fold; `--rank-cache DIR` keeps the cues), so the
outer figures are clean; `--rank-leaky` repeats the rows with the packaged ranker, which
was trained on the AlpacaEval, GSM8K and MT-Bench prompts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from learn.tier_data import LabelledPrompt, read_any  # noqa: E402
from learn.tier_metrics import apgr, routing_curve, summary  # noqa: E402
from scheduler.predictors.tier import STAT_NAMES, text_stats  # noqa: E402

SHARED = Path(os.environ.get("TOKENYARD_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
EARLIER_FEATURES = 18  # STAT_NAMES before the difficulty and shape cues were appended


class Data:
    def __init__(self, rows: list[LabelledPrompt]) -> None:
        self.stats = np.asarray([text_stats(r.prompt) for r in rows])
        self.bench = np.array([r.benchmark for r in rows])
        self.tasks = np.array([r.task for r in rows])
        self.q_small = np.array([r.q_small for r in rows])
        self.q_large = np.array([r.q_large for r in rows])
        self.small_ok = np.array([r.small_ok for r in rows], dtype=float)
        counts = Counter(self.bench.tolist())
        self.weight = np.array([len(rows) / len(counts) / counts[b] for b in self.bench])
        self.texts = [r.prompt[:8000] for r in rows]
        self.prompts = [r.prompt for r in rows]

    def mean_apgr(self, index: np.ndarray, scores: np.ndarray) -> tuple[float, dict[str, float]]:
        per = {}
        for bench in sorted(set(self.bench[index].tolist())):
            mask = self.bench[index] == bench
            per[bench] = summary(scores[mask], self.q_small[index][mask], self.q_large[index][mask])["apgr"]
        return float(np.mean(list(per.values()))), per


# name -> (features: "earlier" | "all", label, objective, sign, extra LightGBM params, trees)
Variant = tuple[str, str, str, float, dict[str, Any], int]
LABEL_VARIANTS: dict[str, Variant] = {
    "small_ok, earlier features (the previous default)": ("earlier", "small_ok", "binary", 1.0, {}, 200),
    "gain, earlier features": ("earlier", "gain", "regression", -1.0, {}, 200),
    "q_small regression, earlier features": ("earlier", "q_small", "regression", 1.0, {}, 200),
    "small_ok, all features": ("all", "small_ok", "binary", 1.0, {}, 200),
    "gain, all features": ("all", "gain", "regression", -1.0, {}, 200),
    "q_small regression, all features": ("all", "q_small", "regression", 1.0, {}, 200),
}
SHAPE_VARIANTS: dict[str, Variant] = {
    "q_small cross-entropy, 7 leaves x 200": ("all", "q_small", "cross_entropy", 1.0, {}, 200),
    "q_small cross-entropy, stumps x 600 (the default)": ("all", "q_small", "cross_entropy", 1.0,
                                                          {"num_leaves": 2}, 600),
    "q_small cross-entropy, 3 leaves x 400": ("all", "q_small", "cross_entropy", 1.0, {"num_leaves": 3}, 400),
    "q_small cross-entropy, extremely randomised x 400": ("all", "q_small", "cross_entropy", 1.0,
                                                          {"extra_trees": True}, 400),
}


def _fit_score(data: Data, variant: Variant, train: np.ndarray, test: np.ndarray) -> np.ndarray:
    import lightgbm

    features, label, objective, sign, extra, trees = variant
    x = data.stats if features == "all" else data.stats[:, :EARLIER_FEATURES]
    y = {"small_ok": data.small_ok, "gain": data.q_large - data.q_small, "q_small": data.q_small,
         "q_large": data.q_large}[label]
    params = {"objective": objective, "num_leaves": 7, "learning_rate": 0.03, "min_data_in_leaf": 40,
              "feature_fraction": 0.8, "bagging_fraction": 0.8, "bagging_freq": 1, "verbose": -1, "seed": 0,
              "num_threads": 1, "deterministic": True, **extra}
    booster = lightgbm.train(params, lightgbm.Dataset(x[train], y[train], weight=data.weight[train]),
                             num_boost_round=trees)
    return sign * np.asarray(booster.predict(x[test]))


FOLD_SEED: list[int | None] = [None]  # --fold-seed: None is GroupKFold's size-balanced folds (every round's)


def _folds(groups: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """k folds over task groups: GroupKFold's, or with --fold-seed the tasks dealt at random."""
    from sklearn.model_selection import GroupKFold

    if FOLD_SEED[0] is None:
        return list(GroupKFold(k).split(np.zeros(len(groups)), groups=groups))
    names = sorted(set(groups.tolist()))
    order = np.random.default_rng(FOLD_SEED[0]).permutation(len(names))
    fold_of = {names[j]: i % k for i, j in enumerate(order)}
    assigned = np.array([fold_of[g] for g in groups.tolist()])
    return [(np.flatnonzero(assigned != f), np.flatnonzero(assigned == f)) for f in range(k)]


def by_task(data: Data, variant: Variant) -> np.ndarray:
    oof = np.zeros(len(data.tasks))
    for train, test in _folds(data.tasks, 5):
        oof[test] = _fit_score(data, variant, train, test)
    return oof


DEFAULT = SHAPE_VARIANTS["q_small cross-entropy, stumps x 600 (the default)"]


def _exemplars(data: Data, train: np.ndarray, test: np.ndarray, k: int = 50) -> np.ndarray:
    """Similarity-weighted q_small of the k nearest training prompts (TF-IDF cosine)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(sublinear_tf=True, stop_words="english", min_df=2, max_features=50000)
    known = vectorizer.fit_transform([data.texts[i] for i in train])
    similarity = (vectorizer.transform([data.texts[i] for i in test]) @ known.T).tocsr()
    y = data.q_small[train]
    out = np.full(len(test), float(y.mean()))
    for i in range(len(test)):
        start, end = similarity.indptr[i], similarity.indptr[i + 1]
        if end > start:
            idx, val = similarity.indices[start:end], similarity.data[start:end]
            top = np.argsort(-val)[:k]
            out[i] = np.average(y[idx[top]], weights=val[top] + 1e-9)
    return out


def _rank_per_benchmark(data: Data, scores: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    out = np.zeros(len(scores))
    for bench in set(data.bench.tolist()):
        mask = data.bench == bench
        out[mask] = rankdata(scores[mask]) / mask.sum()
    return out


def beyond(data: Data, report: Callable[[str, np.ndarray], None]) -> None:
    """The variants past one tree model of the cues (module docstring), by task."""
    large_head = ("all", "q_large", "cross_entropy", 1.0, {"num_leaves": 2}, 600)
    small = by_task(data, DEFAULT)
    report("q_small cross-entropy, stumps x 600 (the default)", small)
    large = by_task(data, large_head)
    for share in (0.25, 0.5):
        report(f"two heads: q_small - {share} x q_large", small - share * large)
    bagged = np.zeros(len(data.tasks))
    for train, test in _folds(data.tasks, 5):
        bagged[test] = np.mean([_fit_score(data, (*DEFAULT[:4], {**DEFAULT[4], "seed": s}, DEFAULT[5]), train, test)
                                for s in range(5)], axis=0)
    report("5 bagged stump models (seeds 0-4)", bagged)
    exemplars = np.zeros(len(data.tasks))
    for train, test in _folds(data.tasks, 5):
        exemplars[test] = _exemplars(data, train, test)
    report("exemplars: 50 nearest training prompts (TF-IDF)", exemplars)
    report("stumps + 0.25 exemplars (rank average)",
           0.75 * _rank_per_benchmark(data, small) + 0.25 * _rank_per_benchmark(data, exemplars))
    from scheduler.predictors.rank import load_rank_model

    lengths = load_rank_model().score_batch([{"prompt": t, "model": "llama-3-8b"} for t in data.texts])
    with_length = Data.__new__(Data)
    with_length.__dict__.update(data.__dict__)  # the same rows, one more column (Data has no __slots__)
    with_length.stats = np.column_stack([data.stats, lengths])
    report("stumps + the ranker's predicted output length", by_task(with_length, DEFAULT))


LENGTH_WEIGHTS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def _length_blends(data: Data, train: np.ndarray, test: np.ndarray) -> dict[float, np.ndarray]:
    """The default's trees blended with minus the standardised log length at each weight
    (the form `scheduler.predictors.tier.LengthPrior` serves: z-scores from the training rows)."""
    import lightgbm

    features, _, objective, _, extra, trees = DEFAULT
    params = {"objective": objective, "num_leaves": 7, "learning_rate": 0.03, "min_data_in_leaf": 40,
              "feature_fraction": 0.8, "bagging_fraction": 0.8, "bagging_freq": 1, "verbose": -1, "seed": 0,
              "num_threads": 1, "deterministic": True, **extra}
    booster = lightgbm.train(params, lightgbm.Dataset(data.stats[train], data.q_small[train],
                                                      weight=data.weight[train]), num_boost_round=trees)

    def logit(rows: np.ndarray) -> np.ndarray:
        p = np.clip(np.asarray(booster.predict(data.stats[rows])), 1e-6, 1 - 1e-6)
        return np.asarray(np.log(p / (1 - p)))

    fit_logit, length = logit(train), data.stats[train, 0]
    z_trees = (logit(test) - fit_logit.mean()) / fit_logit.std()
    z_length = (data.stats[test, 0] - length.mean()) / length.std()
    return {w: (1 - w) * z_trees - w * z_length for w in LENGTH_WEIGHTS}


def length_prior_blends(data: Data, report: Callable[[str, np.ndarray], None], say: Callable[[str], None]) -> None:
    """Each weight by task, then the nested choice of the weight on the training tasks."""
    fixed = {w: np.zeros(len(data.tasks)) for w in LENGTH_WEIGHTS}
    chosen = np.zeros(len(data.tasks))
    for k, (train, test) in enumerate(_folds(data.tasks, 5)):
        inner = {w: np.zeros(len(train)) for w in LENGTH_WEIGHTS}
        for inner_train, inner_test in _folds(data.tasks[train], 4):
            for w, scores in _length_blends(data, train[inner_train], train[inner_test]).items():
                inner[w][inner_test] = scores
        picked = max(LENGTH_WEIGHTS, key=lambda w: data.mean_apgr(train, inner[w])[0])
        outer = _length_blends(data, train, test)
        for w in LENGTH_WEIGHTS:
            fixed[w][test] = outer[w]
        chosen[test] = outer[picked]
        say(f"  outer fold {k + 1}: length prior weight {picked} picked on its training tasks")
    for w in LENGTH_WEIGHTS:
        report(f"stumps blended with the length prior, weight {w}", fixed[w])
    report("nested: the weight picked on the training tasks", chosen)


# --priors: the fifth round (docs/benchmarks.md, "Tier routing"). Every prior is "higher
# value -> large tier": minus the z-scored feature(s), z-scores from the training rows.
PRIORS: dict[str, tuple[tuple[str, int], ...]] = {
    "log_chars": (("log_chars", 1),),  # the shipped prior
    "log_words": (("log_words", 1),),
    "stem_chars": (("stem_chars", 1),),
    "log_words - distinct_word_share": (("log_words", 1), ("distinct_word_share", -1)),
}
PRIOR_WEIGHTS = (0.2, 0.4, 0.6)
GENERIC = tuple(i for i, name in enumerate(STAT_NAMES) if not name.startswith("cue_"))


def _fast_mean_apgr(data: Data, index: np.ndarray, scores: np.ndarray) -> float:
    """Mean APGR over the benchmarks of `index` without the random router's figures (inner loops)."""
    values = []
    for bench in sorted(set(data.bench[index].tolist())):
        mask = data.bench[index] == bench
        values.append(apgr(routing_curve(scores[mask], data.q_small[index][mask], data.q_large[index][mask])))
    return float(np.mean(values))


def _z(values: np.ndarray, train: np.ndarray, test: np.ndarray) -> np.ndarray:
    return np.asarray((values[test] - values[train].mean()) / (values[train].std() + 1e-12))


def _stumps_z(data: Data, columns: tuple[int, ...] | None, train: np.ndarray, test: np.ndarray,
              init: tuple[np.ndarray, np.ndarray] | None = None, rounds: tuple[int, ...] = (600,)) -> list[np.ndarray]:
    """The default's stumps on `columns` (all if None): z-scored logits (or raw scores from `init`)."""
    import lightgbm

    x = data.stats if columns is None else data.stats[:, list(columns)]
    params = {"objective": "cross_entropy", "num_leaves": 2, "learning_rate": 0.03, "min_data_in_leaf": 40,
              "feature_fraction": 0.8, "bagging_fraction": 0.8, "bagging_freq": 1, "verbose": -1, "seed": 0,
              "num_threads": 1, "deterministic": True}
    dataset = lightgbm.Dataset(x[train], data.q_small[train], weight=data.weight[train],
                               init_score=None if init is None else init[0])
    booster = lightgbm.train(params, dataset, num_boost_round=max(rounds))
    if init is not None:
        return [init[1] + booster.predict(x[test], num_iteration=r, raw_score=True) for r in rounds]
    fit, out = booster.predict(x[train], raw_score=True), booster.predict(x[test], raw_score=True)
    return [np.asarray((out - fit.mean()) / fit.std())]


def _best_single_priors(data: Data, train: np.ndarray, k: int) -> list[tuple[int, int]]:
    """The k (column, sign) whose prior alone ranks best on the training rows (mean over their
    benchmarks): a prior chosen without looking at the test tasks."""
    found = []
    for j in range(data.stats.shape[1]):
        if data.stats[train, j].std() > 1e-9:
            for sign in (1, -1):
                found.append((_fast_mean_apgr(data, train, -sign * data.stats[train, j]), j, sign))
    chosen: list[tuple[int, int]] = []
    for _, j, sign in sorted(found, reverse=True):
        if all(j != c for c, _ in chosen):
            chosen.append((j, sign))
    return chosen[:k]


def _prior_family(data: Data, train: np.ndarray, test: np.ndarray) -> dict[str, np.ndarray]:
    """Every fifth-round candidate's scores on `test`, fitted on `train` (shared fits)."""
    out: dict[str, np.ndarray] = {}
    column = {name: j for j, name in enumerate(STAT_NAMES)}
    trees = _stumps_z(data, None, train, test)[0]
    generic = _stumps_z(data, GENERIC, train, test)[0]
    for name, terms in PRIORS.items():
        prior = -sum(sign * _z(data.stats[:, column[f]], train, test) for f, sign in terms)
        for w in PRIOR_WEIGHTS:
            out[f"stumps + prior {name}, weight {w}"] = (1 - w) * trees + w * prior
            if name == "log_chars":
                out[f"stumps on the {len(GENERIC)} non-keyword statistics + prior log_chars, weight {w}"] = (
                    (1 - w) * generic + w * prior)
    best = _best_single_priors(data, train, 4)
    for k in (1, 2, 4):
        prior = -sum(sign * _z(data.stats[:, j], train, test) for j, sign in best[:k]) / np.sqrt(k)
        for w in PRIOR_WEIGHTS:
            out[f"stumps + the {k} best single-feature priors on the training rows, weight {w}"] = (
                (1 - w) * trees + w * prior)
    # Boosting from the length prior (the trees learn what it misses) instead of blending with it.
    length_train, length_test = _z(data.stats[:, 0], train, train), _z(data.stats[:, 0], train, test)
    mean = float(np.average(data.q_small[train], weights=data.weight[train]))
    slope = -float(np.polyfit(length_train, data.q_small[train], 1, w=data.weight[train])[0]) / max(1e-6, mean * (1 - mean))
    base = math.log(mean / (1 - mean))
    init = (base - abs(slope) * length_train, base - abs(slope) * length_test)
    for rounds, scores in zip((150, 600), _stumps_z(data, None, train, test, init, (150, 600)), strict=True):
        out[f"stumps boosted from the length prior, {rounds} rounds"] = scores
    return out


def prior_round(data: Data, report: Callable[[str, np.ndarray], None], say: Callable[[str], None]) -> None:
    """Each candidate by task, then the nested choice among all of them on the training tasks."""
    fixed: dict[str, np.ndarray] = {}
    chosen = np.zeros(len(data.tasks))
    for k, (train, test) in enumerate(_folds(data.tasks, 5)):
        outer = _prior_family(data, train, test)
        for name, scores in outer.items():
            fixed.setdefault(name, np.zeros(len(data.tasks)))[test] = scores
        inner: dict[str, np.ndarray] = {}
        for inner_train, inner_test in _folds(data.tasks[train], 4):
            for name, scores in _prior_family(data, train[inner_train], train[inner_test]).items():
                inner.setdefault(name, np.zeros(len(train)))[inner_test] = scores
        scored = {name: _fast_mean_apgr(data, train, scores) for name, scores in inner.items()}
        picked = max(scored, key=lambda name: scored[name])
        chosen[test] = outer[picked]
        say(f"  outer fold {k + 1}: picked {picked} (inner {scored[picked]:.3f}); "
            f"best single priors there: {[(STAT_NAMES[j], s) for j, s in _best_single_priors(data, train, 4)]}")
    for name, scores in fixed.items():
        report(name, scores)
    report("nested: the candidate picked on the training tasks", chosen)


# --rank-prior: the sixth round. The output-length ranker's prediction as a difficulty cue.
# Clean by construction: for each outer fold a ranker is trained with `learn.rank.fit_model`
# (the shipped pipeline and settings) on every length example except those whose prompt is
# in that fold's held-out tasks (AlpacaEval, GSM8K and MT-Bench prompts are in both data
# sets), and it scores the fold's training and held-out rows. The inner (choice) loop reads
# the same outer-fold ranker, which saw the inner held-out tasks' prompts: that can only bias
# the choice towards the ranker cues, never the outer figure. `--rank-leaky` adds the same
# rows with the packaged ranker (trained on all of them) for comparison.
RANK_WEIGHTS = (0.2, 0.4, 0.6)
RANK_SPREAD_MODELS = 8  # the ranker's per-model scores: models at these quantiles of its prior table


def _prompt_match_keys(data: Data, examples: list[Any]) -> list[set[str]]:
    """For each tier row, the ranker `prompt_key`s it shares its prompt with: the row's
    normalised prompt equals, or (an MT-Bench later turn) starts with, the example's instruction."""
    from learn.rank_data import _prompt_key

    by_text: dict[str, set[str]] = {}
    for example in examples:
        if example.source in ("alpaca", "gsm8k", "mt_bench_turn1", "alpaca_words"):
            by_text.setdefault(_prompt_key(example.features.instruction_text), set()).add(example.prompt_key)
    lengths = sorted({len(k) for k in by_text})
    out = []
    for prompt in data.prompts:
        key = _prompt_key(prompt)
        found: set[str] = set()
        for n in lengths:
            if n > len(key):
                break
            if n == len(key) or key[n] == " ":
                found |= by_text.get(key[:n], set())
        out.append(found)
    return out


def _rank_columns(model: Any, prompts: list[str]) -> np.ndarray:
    """(mean, spread) over models of a ranker's predicted ln(1 + output tokens) per prompt."""
    table = sorted(model.model_prior.items(), key=lambda kv: kv[1])
    models = [table[int(q * (len(table) - 1))][0] for q in np.linspace(0.1, 0.9, RANK_SPREAD_MODELS)]
    per_model = np.column_stack([
        model.score_batch([{"messages": [{"role": "user", "content": p}], "model": m} for p in prompts])
        for m in models])
    return np.column_stack([per_model.mean(axis=1), per_model.std(axis=1)])


def _fold_rank_columns(data: Data, say: Callable[[str], None], cache: Path | None) -> list[np.ndarray]:
    """One (n_rows, 2) ranker-cue matrix per outer fold, from a ranker blind to that fold's tasks."""
    from learn.rank import TrainConfig, fit_model
    from learn.rank_data import load_examples

    examples: list[Any] = []
    out = []
    for k, (_, test) in enumerate(_folds(data.tasks, 5)):
        seed = "" if FOLD_SEED[0] is None else f"_seed{FOLD_SEED[0]}"
        path = None if cache is None else cache / f"rank_fold{k}{seed}.npy"
        if path is not None and path.exists():
            out.append(np.load(path))
            continue
        if not examples:
            say("  reading the length examples (tokenising the answers, ~1 min)")
            examples, _ = load_examples([SHARED / "lengths", SHARED / "routing"])
            matches = _prompt_match_keys(data, examples)
            say(f"  {sum(1 for m in matches if m)} of {len(matches)} tier prompts are also ranker prompts")
        held_out = set().union(*(matches[i] for i in test))
        train = [e for e in examples if e.prompt_key not in held_out]
        say(f"  outer fold {k + 1}: ranker on {len(train)} of {len(examples)} length examples "
            f"({len(held_out)} held-out prompts excluded), ~2 min")
        columns = _rank_columns(fit_model(train, TrainConfig(refit_all=False)), data.prompts)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, columns)
        out.append(columns)
    return out


def _rank_family(data: Data, rank: np.ndarray, train: np.ndarray, test: np.ndarray) -> dict[str, np.ndarray]:
    """The sixth-round candidates on `test`, fitted on `train`; `rank` holds (mean, spread)."""
    out: dict[str, np.ndarray] = {}
    trees = _stumps_z(data, None, train, test)[0]
    with_rank = Data.__new__(Data)
    with_rank.__dict__.update(data.__dict__)  # the same rows, two more columns
    with_rank.stats = np.column_stack([data.stats, rank])
    trees_rank = _stumps_z(with_rank, None, train, test)[0]
    length = -_z(data.stats[:, 0], train, test)
    answer = -_z(rank[:, 0], train, test)
    spread = -_z(rank[:, 1], train, test)
    out["the ranker's predicted answer length alone"] = answer
    for w in RANK_WEIGHTS:
        out[f"stumps + prior log_chars, weight {w} (the shipped form)"] = (1 - w) * trees + w * length
        out[f"stumps + prior predicted answer length, weight {w}"] = (1 - w) * trees + w * answer
        out[f"stumps + prior log_chars and answer length, weight {w}"] = (
            (1 - w) * trees + w * (length + answer) / np.sqrt(2))
        out[f"stumps + prior log_chars, answer length and spread, weight {w}"] = (
            (1 - w) * trees + w * (length + answer + spread) / np.sqrt(3))
        out[f"stumps with the ranker's mean and spread as features + prior log_chars, weight {w}"] = (
            (1 - w) * trees_rank + w * length)
    return out


def rank_round(data: Data, report: Callable[[str, np.ndarray], None], say: Callable[[str], None],
               cache: Path | None, leaky: bool) -> None:
    """Each candidate by task with a clean ranker per outer fold, then the nested choice."""
    folds = _fold_rank_columns(data, say, cache)
    runs = [("", folds)]
    if leaky:
        from scheduler.predictors.rank import load_rank_model

        say("  scoring with the packaged ranker (it saw the AlpacaEval, GSM8K and MT-Bench prompts)")
        packaged = _rank_columns(load_rank_model(), data.prompts)
        runs.append(("[leaky: packaged ranker] ", [packaged] * len(folds)))
    for tag, columns in runs:
        fixed: dict[str, np.ndarray] = {}
        chosen = np.zeros(len(data.tasks))
        baseline = np.zeros(len(data.tasks))  # the same choice among the shipped form's weights only
        for k, (train, test) in enumerate(_folds(data.tasks, 5)):
            for name, scores in _rank_family(data, columns[k], train, test).items():
                fixed.setdefault(name, np.zeros(len(data.tasks)))[test] = scores
            inner: dict[str, np.ndarray] = {}
            for inner_train, inner_test in _folds(data.tasks[train], 4):
                for name, scores in _rank_family(data, columns[k], train[inner_train], train[inner_test]).items():
                    inner.setdefault(name, np.zeros(len(train)))[inner_test] = scores
            scored = {name: _fast_mean_apgr(data, train, scores) for name, scores in inner.items()}
            picked = max(scored, key=lambda name: scored[name])
            shipped_form = max((n for n in scored if n.endswith("(the shipped form)")), key=lambda n: scored[n])
            chosen[test] = fixed[picked][test]
            baseline[test] = fixed[shipped_form][test]
            say(f"  {tag}outer fold {k + 1}: picked {picked} (inner {scored[picked]:.3f}); "
                f"among the shipped form only: {shipped_form} (inner {scored[shipped_form]:.3f})")
        for name, scores in fixed.items():
            report(tag + name, scores)
        report(tag + "nested: the candidate picked on the training tasks", chosen)
        report(tag + "nested among the shipped form's weights only (the baseline)", baseline)


def nested(data: Data, variants: dict[str, Variant], say: Callable[[str], None]) -> tuple[np.ndarray, list[str]]:
    """Outer by-task folds; in each, the variant an inner task split of its training tasks picks."""
    oof = np.zeros(len(data.tasks))
    picks = []
    for k, (train, test) in enumerate(_folds(data.tasks, 5)):
        best, best_apgr = "", -1.0
        for name, variant in variants.items():
            inner = np.zeros(len(train))
            for inner_train, inner_test in _folds(data.tasks[train], 4):
                inner[inner_test] = _fit_score(data, variant, train[inner_train], train[inner_test])
            apgr, _ = data.mean_apgr(train, inner)
            if apgr > best_apgr:
                best, best_apgr = name, apgr
        oof[test] = _fit_score(data, variants[best], train, test)
        picks.append(best)
        say(f"  outer fold {k + 1}: picked {best} (inner {best_apgr:.3f})")
    return oof, picks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nested", action="store_true", help="also run the two nested selections (minutes)")
    parser.add_argument("--beyond", action="store_true",
                        help="also the variants past one tree model: two heads, bagging, exemplars")
    parser.add_argument("--priors", action="store_true",
                        help="instead: the fifth round, priors other than the prompt length, boosting from it, "
                             "stumps without the keyword cues, and the nested choice among them (3 min)")
    parser.add_argument("--rank-prior", action="store_true",
                        help="instead: the sixth round, the output-length ranker's prediction as a feature and "
                             "as a prior, a ranker retrained per outer fold without its held-out prompts (~15 min)")
    parser.add_argument("--rank-leaky", action="store_true",
                        help="with --rank-prior: also the same rows with the packaged ranker (not held out)")
    parser.add_argument("--rank-cache", type=Path,
                        help="with --rank-prior: keep the per-fold ranker cues here (.npy) and reuse them "
                             "(keyed by fold and --fold-seed only: empty it when the data changes)")
    parser.add_argument("--fold-seed", type=int,
                        help="deal the tasks to folds at random with this seed (default: GroupKFold's folds)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    FOLD_SEED[0] = args.fold_seed
    rows: list[LabelledPrompt] = []
    for folder in ("routing", "lengths"):
        rows.extend(read_any(SHARED / folder)[0])
    data = Data(rows)
    everything = np.arange(len(rows))
    out: dict[str, Any] = {"by_task": {}, "nested": {}}

    def report(name: str, scores: np.ndarray) -> None:
        mean, per = data.mean_apgr(everything, scores)
        out["by_task"][name] = {"mean": mean, **per}
        print(f"{name:<55} mean {mean:.3f}  " + "  ".join(f"{b} {v:.3f}" for b, v in per.items()), flush=True)

    print(f"{len(rows)} prompts; by-task APGR (5 folds over task groups; random router 0.5)")
    if args.rank_prior:
        rank_round(data, report, print, args.rank_cache, args.rank_leaky)
    elif args.priors:
        prior_round(data, report, print)
    elif args.beyond:  # the reference row, then the rest (the table above is the same as without it)
        beyond(data, report)
        length_prior_blends(data, report, print)
    else:
        for name, variant in {**LABEL_VARIANTS, **SHAPE_VARIANTS}.items():
            report(name, by_task(data, variant))
        length_prior = -data.stats[:, 0]  # longer prompts go large
        report("the length prior alone (longer prompts go large)", length_prior)
    if args.nested:
        for title, variants in (("label and features", LABEL_VARIANTS), ("tree shape", SHAPE_VARIANTS)):
            print(f"nested selection of the {title}:")
            scores, picks = nested(data, variants, print)
            mean, per = data.mean_apgr(everything, scores)
            out["nested"][title] = {"mean": mean, "picks": picks, **per}
            print(f"  outer by-task mean {mean:.3f}  " + "  ".join(f"{b} {v:.3f}" for b, v in per.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
