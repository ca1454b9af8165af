"""What limits the ranker's held-out tau: measured on the validation split of
bench/ranking_validation.py (carved from the training prompts of `tokenyard train rank`'s
split; its test split is never read here).

    nice -n 10 python bench/ranking_limits.py --cache /tmp/examples.pkl [--fractions 0.25,0.5,1] [--seeds 0,1]

- learning curve: the shipped pipeline (`base`) fit on a random share of the training
  prompts (all answers of each kept prompt), tau on the same validation set; if tau still
  climbs at 100%, more distinct prompts with answer lengths would lift it;
- ceilings on the validation set: the model prior alone, and the model prior plus the
  prompt's true mean model-demeaned length computed from the *other* models' answers to it
  (leave-one-model-out: what a perfect prompt-only predictor would add to the prior);
- the sampling noise of a tau on this many prompts: the spread of the validation tau over
  bootstrap resamples of the validation prompts (whole prompts, all their answers).
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

from ranking_validation import _demeaned, cached_examples, fit_and_score, validation_split  # noqa: E402

from learn.rank import TrainConfig, batch_tau, kendall_tau, model_prior_table  # noqa: E402
from learn.rank_data import Example  # noqa: E402


def _bootstrap_sd(pred: np.ndarray, val: Sequence[Example], draws: int, seed: int) -> float:
    by_prompt: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(val):
        by_prompt[e.prompt_key].append(i)
    groups = [np.array(v) for v in by_prompt.values()]
    actual = np.array([e.output_tokens for e in val], dtype=np.float64)
    rng = np.random.default_rng(seed)
    taus = []
    for _ in range(draws):
        idx = np.concatenate([groups[k] for k in rng.integers(0, len(groups), len(groups))])
        taus.append(kendall_tau(pred[idx], actual[idx]))
    return float(np.std(taus))


def _ceilings(train: Sequence[Example], val: Sequence[Example]) -> dict[str, float]:
    table = model_prior_table(train)
    prior = np.array([table.get(e.features.model, np.nan) for e in val])
    prior = np.where(np.isnan(prior), np.nanmean(prior), prior)
    demeaned = _demeaned(val)
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for e, d in zip(val, demeaned, strict=True):
        sums[e.prompt_key][0] += float(d)
        sums[e.prompt_key][1] += 1.0
    loo = np.array([(sums[e.prompt_key][0] - d) / max(1.0, sums[e.prompt_key][1] - 1.0)
                    for e, d in zip(val, demeaned, strict=True)])
    actual = np.array([e.output_tokens for e in val], dtype=np.float64)
    return {
        "prior alone": kendall_tau(prior, actual),
        "prior + true prompt effect (leave-one-model-out)": kendall_tau(prior + loo, actual),
        "true prompt effect alone, batch32": batch_tau(loo, val, 32, 0),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--cache", type=Path, default=None, help="pickle of the loaded examples (read or written)")
    parser.add_argument("--fractions", default="0.25,0.5,1")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--bootstrap", type=int, default=200)
    args = parser.parse_args(argv)
    examples = cached_examples(args.data, args.cache)
    config = TrainConfig()
    train, val = validation_split(examples)
    actual = np.array([e.output_tokens for e in val], dtype=np.float64)
    print(f"validation: {len(train)} train / {len(val)} validation examples, "
          f"{len({e.prompt_key for e in train})} / {len({e.prompt_key for e in val})} prompts", flush=True)
    for name, value in _ceilings(train, val).items():
        print(f"ceiling: {name}: tau {value:.4f}", flush=True)
    variant_args = argparse.Namespace(trees=300, extra_trees=False, leaves=31, min_child=40,
                                      prompt_trees=300, prompt_leaves=7, prompt_min_child=20)
    keys = sorted({e.prompt_key for e in train})
    for fraction in (float(f) for f in args.fractions.split(",")):
        rows = []
        for seed in (int(s) for s in args.seeds.split(",")):
            rng = np.random.default_rng(1000 + seed)
            kept = set(rng.permutation(keys)[: max(1, round(len(keys) * fraction))].tolist())
            part = [e for e in train if e.prompt_key in kept]
            pred = fit_and_score(part, val, "base", seed, config, variant_args)
            rows.append((kendall_tau(pred, actual), batch_tau(pred, val, 32, 0)))
            extra = ""
            if fraction == 1.0 and seed == int(args.seeds.split(",")[0]) and args.bootstrap:
                extra = f", bootstrap sd over validation prompts {_bootstrap_sd(pred, val, args.bootstrap, seed):.4f}"
            print(f"  {fraction:.2f} of the training prompts ({len(kept)}), seed {seed}: overall {rows[-1][0]:.4f} "
                  f"batch32 {rows[-1][1]:.4f}{extra}", flush=True)
        a = np.array(rows)
        print(f"learning curve {fraction:.2f}: overall {a[:, 0].mean():.4f} +- {a[:, 0].std():.4f}  "
              f"batch32 {a[:, 1].mean():.4f} +- {a[:, 1].std():.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
