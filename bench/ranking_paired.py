"""Two rankers on the same held-out split, paired: the difference of their Kendall tau and
how much of it the sample of prompts explains (a bootstrap over whole held-out prompts,
both rankers scored on the same resample).

    tokenyard train rank --data ../shared/data --no-refit --prompt-weight 0 --out /tmp/a.json.gz
    tokenyard train rank --data ../shared/data --no-refit --out /tmp/b.json.gz
    nice -n 10 python bench/ranking_paired.py --cache /tmp/examples.pkl /tmp/a.json.gz /tmp/b.json.gz

Both must be split models (`--no-refit`, the default seed and unseen models), or the
held-out prompts were in their training data. Prints, for the held-out prompts and the
unseen models: each ranker's overall tau, the difference (b - a), its bootstrap spread and
the share of resamples in which b is ahead; overall and within one model (the mean over
models of the tau among that model's requests: what one engine's queue sees).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ranking_validation import cached_examples  # noqa: E402

from learn.rank import TrainConfig, design_matrix, kendall_tau, prior_column, split_by_prompt  # noqa: E402
from learn.rank_data import Example  # noqa: E402
from scheduler.predictors.rank import RankModel, load_rank_model  # noqa: E402


def raw_scores(model: RankModel, examples: Sequence[Example]) -> np.ndarray:
    """The booster's raw output, as `learn.rank.evaluate` scores a split."""
    text = model.text_scores([e.features.instruction_text for e in examples])
    prior = prior_column(examples, model.model_prior)
    return np.asarray(model.booster.predict(design_matrix(examples, text, prior), num_threads=2))


def within_model_tau(pred: np.ndarray, actual: np.ndarray, model_of: np.ndarray, idx: np.ndarray) -> float:
    """Mean over models of Kendall tau among one model's examples in `idx` (what one
    engine's queue sees, without the random batching of `batch_tau`)."""
    taus = []
    for m in np.unique(model_of[idx]):
        inside = idx[model_of[idx] == m]
        if len(inside) > 2:
            taus.append(kendall_tau(pred[inside], actual[inside]))
    return float(np.mean(taus)) if taus else float("nan")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--cache", type=Path, default=None, help="pickle of the loaded examples (read or written)")
    parser.add_argument("--draws", type=int, default=200)
    args = parser.parse_args(argv)
    examples = cached_examples(args.data, args.cache)
    for path in (args.a, args.b):
        if load_rank_model(path).meta.get("refit_all", False):
            raise SystemExit(f"{path}: refit on all the data (its held-out prompts were trained on); use --no-refit")
    models = [load_rank_model(args.a), load_rank_model(args.b)]
    split = split_by_prompt(examples, TrainConfig())
    rng = np.random.default_rng(0)
    for title, part in (("held-out prompts", split.test), ("unseen models", split.unseen)):
        actual = np.array([e.output_tokens for e in part], dtype=np.float64)
        pa, pb = (raw_scores(m, part) for m in models)
        ta, tb = kendall_tau(pa, actual), kendall_tau(pb, actual)
        by_prompt: dict[str, list[int]] = defaultdict(list)
        for i, e in enumerate(part):
            by_prompt[e.prompt_key].append(i)
        groups = [np.array(v) for v in by_prompt.values()]
        names = sorted({e.model for e in part})
        model_of = np.array([names.index(e.model) for e in part])
        everything = np.arange(len(part))
        wa, wb = (within_model_tau(p, actual, model_of, everything) for p in (pa, pb))
        diffs, within = [], []
        for _ in range(args.draws):
            idx = np.concatenate([groups[k] for k in rng.integers(0, len(groups), len(groups))])
            diffs.append(kendall_tau(pb[idx], actual[idx]) - kendall_tau(pa[idx], actual[idx]))
            within.append(within_model_tau(pb, actual, model_of, idx) - within_model_tau(pa, actual, model_of, idx))
        for label, x, y, d in (("overall", ta, tb, np.array(diffs)), ("within-model", wa, wb, np.array(within))):
            print(f"{title} ({len(part)} examples, {len(groups)} prompts), {label} tau: a {x:.4f}, b {y:.4f}, "
                  f"b - a {y - x:+.4f}; bootstrap over prompts: sd of b - a {d.std():.4f}, "
                  f"b ahead in {np.mean(d > 0):.0%} of {len(d)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
