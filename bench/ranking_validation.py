"""Choose ranker variants on a validation split carved from the training prompts.

The held-out test split of `tokenyard train rank` is never read here: the training part of
its split (`learn.rank.split_by_prompt`, the same seed and unseen models) is split again by
prompt (20% of its distinct prompts become the validation set), each variant is fit on the
rest, and Kendall's tau (overall and per same-model batch of 32) is printed on the
validation set, with the spread over booster seeds so a difference can be read against
seed noise. Whatever wins here is then built into `learn.rank` and reported once on the
held-out test split by `tokenyard train rank`.

Variants (`--variants`, comma-separated):

- `base`: the shipped pipeline (one text head: ridge on the model-demeaned mean ln tokens);
- `heads`: extra text heads over the same hashed n-grams (so the same per-request hashing
  work): the mean within-model percentile of the prompt's answer length, and the
  model-demeaned length among the more verbose and among the terser half of the models;
- `gauss`: the booster's target is each model's ln tokens mapped to normal quantiles of
  its within-model rank, rescaled to the model's mean and spread (order within a model
  kept, heavy tails tamed);
- `heads+gauss`: both;
- `add`: no main booster: the model prior plus a prompt stage, a small booster fit on one
  row per distinct prompt (its dense features without model cues, and its out-of-fold text
  score) onto the prompt's mean model-demeaned ln tokens;
- `stack`: the shipped pipeline with that prompt stage's out-of-fold output as one more
  booster input (fit per prompt, it cannot memorise a prompt from its ~200 answers);
- `z` (issue 11, stop 24): the text layer's target is each model's ln tokens standardised
  within the model (z-score), averaged per prompt, instead of demeaned: a model whose
  lengths spread widely no longer dominates the per-prompt mean;
- `pw` / `pw1` (stop 24): booster rows weighted by (answers to the prompt) ** -0.5 / ** -1,
  so the ~200 answers of one AlpacaEval prompt do not outweigh a GSM8K prompt's two by 100x
  and a leaf of the booster's dense-feature trees cannot be one memorised prompt's rows;
  combine with `+` (`z+pw`);
- `fam` (stop 24): per-model-family targets: one more text head per family with enough
  models (llama, gpt, mistral, claude, qwen, gemma, and the rest as "other"), each fit on
  the model-demeaned lengths of its family's answers only; the booster gets the head of
  the request's own family as one more input.

    nice -n 19 python bench/ranking_validation.py --data ../shared/data --variants base,stack --seeds 0,1,2,3,4
"""

from __future__ import annotations

import argparse
import pickle
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from learn.rank import (  # noqa: E402
    TrainConfig,
    batch_tau,
    design_matrix,
    kendall_tau,
    model_prior_table,
    prior_column,
    prompt_weights,
    split_by_prompt,
)
from learn.rank_data import Example, load_examples  # noqa: E402
from scheduler.predictors.features import DENSE_FEATURE_NAMES, hashing_vectorizer, tfidf  # noqa: E402


def cached_examples(data: Path, cache: Path | None) -> list[Example]:
    """The examples under `data`, read from (or written to) the pickle `cache` when given:
    a bench's own scratch file, never a file from elsewhere (pickle runs code on load)."""
    if cache and cache.exists():
        loaded: list[Example] = pickle.loads(cache.read_bytes())
        return loaded
    examples, _ = load_examples([data])
    if cache:
        cache.write_bytes(pickle.dumps(examples))
    return examples


def validation_split(examples: Sequence[Example]) -> tuple[list[Example], list[Example]]:
    """(train, validation): the training split of `tokenyard train rank`'s own split by
    prompt (same seed, same unseen models), split again by prompt; its test split is never
    read, so a choice made on the validation split can be reported on the test split."""
    config = TrainConfig()
    outer = split_by_prompt(examples, config)
    inner = split_by_prompt(outer.train, TrainConfig(seed=config.seed + 100, unseen_models=()))
    return list(inner.train), list(inner.test)


def _log_tokens(examples: Sequence[Example]) -> np.ndarray:
    return np.log1p(np.array([e.output_tokens for e in examples], dtype=np.float64))


def _by_model(examples: Sequence[Example]) -> dict[str, np.ndarray]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        groups[e.model].append(i)
    return {m: np.array(v) for m, v in groups.items()}


def _demeaned(examples: Sequence[Example]) -> np.ndarray:
    y = _log_tokens(examples)
    out = np.empty_like(y)
    for idx in _by_model(examples).values():
        out[idx] = y[idx] - y[idx].mean()
    return out


def _zscored(examples: Sequence[Example]) -> np.ndarray:
    """Each model's ln tokens standardised (mean 0, spread 1 within the model)."""
    y = _log_tokens(examples)
    out = np.empty_like(y)
    for idx in _by_model(examples).values():
        out[idx] = (y[idx] - y[idx].mean()) / max(1e-6, float(y[idx].std()))
    return out


def _percentile(examples: Sequence[Example]) -> np.ndarray:
    from scipy.stats import rankdata

    y = _log_tokens(examples)
    out = np.empty_like(y)
    for idx in _by_model(examples).values():
        out[idx] = (rankdata(y[idx]) - 0.5) / len(idx) - 0.5
    return out


def _gauss_target(examples: Sequence[Example]) -> np.ndarray:
    from scipy.stats import norm, rankdata

    y = _log_tokens(examples)
    out = np.empty_like(y)
    for idx in _by_model(examples).values():
        z = norm.ppf((rankdata(y[idx]) - 0.5) / len(idx))
        out[idx] = y[idx].mean() + y[idx].std() * z
    return out


# model families with enough models in the data for a head of their own; the rest: "other"
FAMILY_HEADS = ("llama", "gpt", "mistral", "claude", "qwen", "gemma")


def family_of(model: str) -> str:
    name = model.lower()
    return next((f for f in FAMILY_HEADS if f in name), "other")


def head_targets(examples: Sequence[Example], heads: Sequence[str]) -> list[np.ndarray]:
    """Per-example values whose per-prompt mean each text head regresses on (NaN = not used)."""
    demeaned = _demeaned(examples)
    out = []
    prior = model_prior_table(examples)
    median = float(np.median(list(prior.values()))) if prior else 0.0
    verbose = np.array([prior.get(e.features.model, median) > median for e in examples])
    for head in heads:
        if head == "mean":
            out.append(demeaned)
        elif head == "zmean":
            out.append(_zscored(examples))
        elif head.startswith("fam:"):
            family = head[4:]
            inside = np.array([family_of(e.features.model) == family for e in examples])
            out.append(np.where(inside, demeaned, np.nan))
        elif head == "pct":
            out.append(_percentile(examples))
        elif head == "verbose":
            out.append(np.where(verbose, demeaned, np.nan))
        elif head == "terse":
            out.append(np.where(~verbose, demeaned, np.nan))
        else:
            raise ValueError(head)
    return out


class Heads:
    """Ridge heads over the sublinear TF-IDF of the hashed instruction n-grams."""

    def __init__(self, examples: Sequence[Example], heads: Sequence[str], alpha: float) -> None:
        from sklearn.feature_extraction.text import TfidfTransformer
        from sklearn.linear_model import Ridge

        keys = sorted({e.prompt_key for e in examples})
        pos = {k: i for i, k in enumerate(keys)}
        texts = [""] * len(keys)
        for e in examples:
            texts[pos[e.prompt_key]] = e.features.instruction_text
        counts = hashing_vectorizer().transform(texts)
        self.idf = np.full(counts.shape[1], float(np.log(1.0 + len(texts)) + 1.0))
        fitted = TfidfTransformer(sublinear_tf=True, smooth_idf=True).fit(counts).idf_
        seen = np.asarray(counts.getnnz(axis=0)).ravel() > 0
        self.idf[seen] = fitted[seen]
        x = tfidf(counts, self.idf)
        prompt_of = np.array([pos[e.prompt_key] for e in examples])
        self.coefs: list[np.ndarray] = []
        self.biases: list[float] = []
        for values in head_targets(examples, heads):
            ok = ~np.isnan(values)
            if not ok.any():  # a family absent from this training part: its head predicts 0
                self.coefs.append(np.zeros(x.shape[1]))
                self.biases.append(0.0)
                continue
            sums = np.bincount(prompt_of[ok], values[ok], minlength=len(keys))
            n = np.bincount(prompt_of[ok], minlength=len(keys)).astype(np.float64)
            have = n > 0
            ridge = Ridge(alpha=alpha, solver="sparse_cg", random_state=0)
            ridge.fit(x[have], sums[have] / n[have], sample_weight=np.sqrt(n[have]))
            self.coefs.append(np.asarray(ridge.coef_))
            self.biases.append(float(ridge.intercept_))

    def scores(self, examples: Sequence[Example]) -> np.ndarray:
        counts = hashing_vectorizer().transform([e.features.instruction_text for e in examples])
        x = tfidf(counts, self.idf)
        return np.column_stack([x @ c + b for c, b in zip(self.coefs, self.biases, strict=True)])


def out_of_fold(examples: Sequence[Example], heads: Sequence[str], alpha: float, seed: int, folds: int = 5) -> np.ndarray:
    keys = sorted({e.prompt_key for e in examples})
    rng = np.random.default_rng(seed + 1)
    fold_of = dict(zip(keys, rng.integers(0, folds, len(keys)), strict=True))
    fold = np.array([fold_of[e.prompt_key] for e in examples])
    out = np.zeros((len(examples), len(heads)))
    for f in range(folds):
        inside = fold == f
        model = Heads([e for e, i in zip(examples, inside, strict=True) if not i], heads, alpha)
        out[inside] = model.scores([e for e, i in zip(examples, inside, strict=True) if i])
    return out


def _prompt_rows(examples: Sequence[Example], text: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """One row per distinct prompt: (keys, prompt-only features, mean model-demeaned ln tokens, count)."""
    demeaned = _demeaned(examples)
    first: dict[str, int] = {}
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for i, e in enumerate(examples):
        first.setdefault(e.prompt_key, i)
        sums[e.prompt_key][0] += float(demeaned[i])
        sums[e.prompt_key][1] += 1.0
    keys = sorted(first)
    model_cols = [k for k, n in enumerate(DENSE_FEATURE_NAMES) if n.startswith("model_")]
    rows = []
    for k in keys:
        dense = np.array(examples[first[k]].features.dense, dtype=np.float64)
        dense[model_cols] = 0.0
        rows.append(np.append(dense, text[first[k]]))
    return keys, np.array(rows), np.array([sums[k][0] / sums[k][1] for k in keys]), np.array([sums[k][1] for k in keys])


def _prompt_booster(examples: Sequence[Example], text: np.ndarray, seed: int, args: argparse.Namespace) -> Any:
    import lightgbm

    _, x, y, n = _prompt_rows(examples, text)
    params = {"objective": "regression", "learning_rate": 0.03, "num_leaves": args.prompt_leaves,
              "min_child_samples": args.prompt_min_child, "feature_fraction": 0.9, "bagging_fraction": 0.8,
              "bagging_freq": 1, "seed": seed, "verbose": -1, "num_threads": 2}
    return lightgbm.train(params, lightgbm.Dataset(x, y, weight=np.sqrt(n)), num_boost_round=args.prompt_trees)


def _prompt_features(examples: Sequence[Example], text: np.ndarray) -> np.ndarray:
    model_cols = [k for k, n in enumerate(DENSE_FEATURE_NAMES) if n.startswith("model_")]
    dense = np.array([e.features.dense for e in examples], dtype=np.float64)
    dense[:, model_cols] = 0.0
    return np.column_stack([dense, text])


def prompt_stage_oof(train: Sequence[Example], text_oof: np.ndarray, seed: int, args: argparse.Namespace,
                     folds: int = 5) -> np.ndarray:
    keys = sorted({e.prompt_key for e in train})
    rng = np.random.default_rng(seed + 7)
    fold_of = dict(zip(keys, rng.integers(0, folds, len(keys)), strict=True))
    fold = np.array([fold_of[e.prompt_key] for e in train])
    out = np.zeros(len(train))
    for f in range(folds):
        inside = fold == f
        booster = _prompt_booster([e for e, i in zip(train, inside, strict=True) if not i], text_oof[~inside], seed, args)
        out[inside] = booster.predict(_prompt_features([e for e, i in zip(train, inside, strict=True) if i],
                                                       text_oof[inside]), num_threads=2)
    return out


def fit_and_score(train: Sequence[Example], val: Sequence[Example], variant: str, seed: int,
                  config: TrainConfig, args: argparse.Namespace) -> np.ndarray:
    import lightgbm

    first = "zmean" if "z" in variant.split("+") else "mean"
    heads = [first, "pct", "verbose", "terse"] if "heads" in variant else [first]
    families = "fam" in variant.split("+")
    if families:
        heads = [first, *(f"fam:{f}" for f in (*FAMILY_HEADS, "other"))]
    oof = out_of_fold(train, heads, config.ridge_alpha, seed)
    table = model_prior_table(train)
    val_heads = Heads(train, heads, config.ridge_alpha).scores(val)
    if families:  # one extra column: the head of the example's own family
        order = [*FAMILY_HEADS, "other"]

        def own(scores: np.ndarray, part: Sequence[Example]) -> np.ndarray:
            pick = np.array([1 + order.index(family_of(e.features.model)) for e in part])
            return np.column_stack([scores[:, 0], scores[np.arange(len(part)), pick]])

        oof, val_heads = own(oof, train), own(val_heads, val)
    x_train = np.column_stack([design_matrix(train, oof[:, 0], prior_column(train, table, seed)), oof[:, 1:]])
    x_val = np.column_stack([design_matrix(val, val_heads[:, 0], prior_column(val, table)), val_heads[:, 1:]])
    staged = "stack" in variant or "add" in variant
    if staged:
        stage_train = prompt_stage_oof(train, oof[:, 0], seed, args)
        stage_val = _prompt_booster(train, oof[:, 0], seed, args).predict(
            _prompt_features(val, val_heads[:, 0]), num_threads=2)
        if "add" in variant:
            prior_val = prior_column(val, table)
            return np.where(np.isnan(prior_val), np.nanmean(prior_val), prior_val) + stage_val
        x_train = np.column_stack([x_train, stage_train])
        x_val = np.column_stack([x_val, stage_val])
    y = _gauss_target(train) if "gauss" in variant else _log_tokens(train)
    params: dict[str, Any] = {
        "objective": "regression", "learning_rate": config.learning_rate, "num_leaves": args.leaves,
        "min_child_samples": args.min_child, "feature_fraction": 0.9, "bagging_fraction": 0.8,
        "bagging_freq": 1, "seed": seed, "verbose": -1, "num_threads": 2, "extra_trees": args.extra_trees,
    }
    tokens = variant.split("+")
    power = 0.5 if "pw" in tokens else 1.0 if "pw1" in tokens else 0.0
    weight = prompt_weights(train, power) if power else None
    booster = lightgbm.train(params, lightgbm.Dataset(x_train, y, weight=weight), num_boost_round=args.trees)
    return np.asarray(booster.predict(x_val, num_threads=2))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--cache", type=Path, default=None, help="pickle of the loaded examples (read or written)")
    parser.add_argument("--variants", default="base,heads")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--trees", type=int, default=300)
    parser.add_argument("--extra-trees", action="store_true", help="LightGBM extra_trees (random split thresholds)")
    parser.add_argument("--leaves", type=int, default=31)
    parser.add_argument("--min-child", type=int, default=40)
    parser.add_argument("--prompt-trees", type=int, default=300)
    parser.add_argument("--prompt-leaves", type=int, default=7)
    parser.add_argument("--prompt-min-child", type=int, default=20)
    args = parser.parse_args(argv)
    examples = cached_examples(args.data, args.cache)
    config = TrainConfig()
    train, val = validation_split(examples)
    actual = np.array([e.output_tokens for e in val], dtype=np.float64)
    print(f"validation: {len(train)} train / {len(val)} validation examples "
          f"({len({e.prompt_key for e in val})} validation prompts)", flush=True)
    for variant in args.variants.split(","):
        rows = []
        for seed in (int(s) for s in args.seeds.split(",")):
            start = time.perf_counter()
            pred = fit_and_score(train, val, variant, seed, config, args)
            rows.append((kendall_tau(pred, actual), batch_tau(pred, val, 32, 0)))
            print(f"  {variant} seed {seed}: overall {rows[-1][0]:.4f} batch32 {rows[-1][1]:.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
        a = np.array(rows)
        print(f"{variant:<14} overall {a[:, 0].mean():.4f} +- {a[:, 0].std():.4f}  "
              f"batch32 {a[:, 1].mean():.4f} +- {a[:, 1].std():.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
