"""`tokenyard train rank` (build a ranker from data) and `tokenyard rank score` (score a
JSONL file of requests with a ranker, the shipped default when --model is omitted).

The default ranker shipped in `scheduler/predictors/default_rank.json.gz` is built by:

    tokenyard train rank --data ../shared/data --out scheduler/predictors/default_rank.json.gz
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from learn.score_input import read_records, why_unwritable, write_atomic

DEFAULT_DATA = "../shared/data"


def register_train(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "rank", help="train the output-length ranker (LightGBM) and report Kendall's tau",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", action="append", type=Path, default=None,
                        help=f"data folder (../shared/data or a part of it) or router .jsonl log; repeatable "
                             f"(default: {DEFAULT_DATA})")
    parser.add_argument("--out", type=Path, required=True, help="model file to write (.json, or .json.gz)")
    parser.add_argument("--objective", choices=["regression", "lambdarank"], default="regression",
                        help="booster objective: L2 regression on ln(1 + output tokens), or lambdarank")
    parser.add_argument("--trees", type=int, default=300, help="boosting rounds")
    parser.add_argument("--leaves", type=int, default=31)
    parser.add_argument("--prompt-weight", type=float, default=None,
                        help="weight booster rows by (answers to the prompt) ** -W, 0..1 (regression only; "
                             "default: 1, each distinct prompt weighs the same; 0 with lambdarank)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of distinct prompts held out")
    parser.add_argument("--unseen-models", default="gpt-4o-2024-05-13,Meta-Llama-3-70B-Instruct,gemma-2b-it",
                        help="comma-separated models held out of training entirely")
    parser.add_argument("--no-word-models", action="store_true",
                        help="skip the 216 AlpacaEval models known only by answer length in words")
    parser.add_argument("--no-refit", action="store_true",
                        help="ship the split model instead of refitting on all data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", type=Path, default=None, help="also write the report as JSON here")
    parser.set_defaults(handler=_train)


def register(subparsers: Any) -> None:
    rank = subparsers.add_parser("rank", help="score requests with the output-length ranker")
    sub = rank.add_subparsers(dest="rank_command", metavar="COMMAND")
    score = sub.add_parser(
        "score", help="write {\"score\": predicted ln(1 + output tokens)} per JSONL request record",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    score.add_argument("--model", type=Path, default=None, help="rank model file (default: the shipped ranker)")
    score.add_argument("--input", type=Path, required=True,
                       help="JSONL: one {\"prompt\"|\"messages\", \"model\"?, \"max_tokens\"?} per line ('-' = stdin)")
    score.add_argument("--output", type=Path, default=None, help="write here instead of stdout")
    score.add_argument("--batch", type=int, default=256, help="records scored per batch")
    score.set_defaults(handler=_score)
    rank.set_defaults(handler=lambda args: (rank.print_help(), 2)[1])


def _train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from learn.rank import TrainConfig, train_and_report
    from learn.rank_data import RankDataError, load_examples

    paths = args.data or [Path(DEFAULT_DATA)]
    prompt_weight = args.prompt_weight
    if prompt_weight is None:  # TrainConfig's default; lambdarank takes no weights
        prompt_weight = TrainConfig().prompt_weight if args.objective == "regression" else 0.0
    try:
        config = TrainConfig(
            prompt_weight=prompt_weight, objective=args.objective, n_estimators=args.trees, num_leaves=args.leaves,
            test_fraction=args.test_fraction, seed=args.seed, refit_all=not args.no_refit,
            unseen_models=tuple(m for m in args.unseen_models.split(",") if m),
        )
    except ValueError as exc:
        print(f"tokenyard train rank: {exc}", file=sys.stderr)
        return 2
    if not args.out.parent.is_dir():
        print(f"tokenyard train rank: --out {args.out}: folder {args.out.parent} does not exist", file=sys.stderr)
        return 2
    rounds = config.n_estimators * (2 if config.refit_all else 1)
    with tqdm(total=rounds, desc="train rank", unit="round", file=sys.stderr) as bar:
        try:
            examples, info = load_examples(paths, word_models=not args.no_word_models,
                                           progress=lambda msg: bar.write(f"read {msg}"))
            model, report = train_and_report(examples, info, config, on_iteration=lambda: bar.update(1))
        except (RankDataError, ValueError) as exc:
            bar.close()
            print(f"tokenyard train rank: {exc}", file=sys.stderr)
            return 2
    model.save(args.out)
    doc = {k: getattr(report, k) for k in report.__dataclass_fields__}
    if args.report:
        args.report.write_text(json.dumps(doc, indent=2) + "\n")
    _print_report(doc, args.out)
    return 0


def _print_report(doc: dict[str, Any], out: Path) -> None:
    data = doc["data"]
    print(f"data: {data['train']} train / {data['test']} held-out-prompt / {data['unseen']} unseen-model examples; "
          f"{data['train_models']} training models; output tokens by {data.get('tokenizer')}")
    print(f"{'Kendall tau':<28}{'overall':>9}{'batch32':>9}{'batch64':>9}")
    for title, block in (("held-out prompts", doc["held_out_prompts"]), ("unseen models", doc["unseen_models"])):
        if not block.get("n"):
            continue
        for name in ("model", "model_prior", "input_length", "random", "fcfs"):
            row = block[name]
            print(f"{title + ': ' + name:<28}{row['overall']:>9.3f}{row['batch32']:>9.3f}{row['batch64']:>9.3f}")
    for source, row in doc["by_source"].items():
        print(f"{'source ' + source:<28}{row['overall']:>9.3f}{row['batch32']:>9.3f}{row['batch64']:>9.3f}  n={row['n']}")
    for turn, row in doc["multi_turn"].items():
        print(f"mt_bench {turn}: mean {row['mean_output_tokens']} tokens, tau {row['tau_overall']:.3f} "
              f"(input length {row['tau_input_length']:.3f}), n={row['n']}")
    print("feature gain: " + ", ".join(f"{k} {v:.2f}" for k, v in list(doc["feature_gain"].items())[:8]))
    print(f"wrote {out}")


def _score(args: argparse.Namespace) -> int:
    from scheduler.predictors.rank import RankModelError, load_rank_model

    if args.batch < 1:
        print("tokenyard rank score: --batch: expected a positive integer", file=sys.stderr)
        return 2
    try:
        model = load_rank_model(args.model)
    except RankModelError as exc:
        print(f"tokenyard rank score: {exc}", file=sys.stderr)
        return 2
    try:
        source = sys.stdin if str(args.input) == "-" else args.input.open(encoding="utf-8")
    except OSError as exc:
        print(f"tokenyard rank score: --input {args.input}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        records = list(read_records(source, str(args.input)))
    except ValueError as exc:
        print(f"tokenyard rank score: {exc}", file=sys.stderr)
        return 2
    finally:
        if source is not sys.stdin:
            source.close()
    lines: list[str] = []
    for start in range(0, len(records), args.batch):
        chunk = records[start:start + args.batch]
        for record, score in zip(chunk, model.score_batch(chunk), strict=True):
            row: dict[str, Any] = {"score": round(float(score), 6), "predicted_output_tokens": round(float(_expm1(score)), 1)}
            for key in ("id", "request_id", "model"):
                if key in record:
                    row[key] = record[key]
            lines.append(json.dumps(row))
    text = "\n".join(lines) + ("\n" if lines else "")
    if args.output:
        try:
            write_atomic(args.output, text)
        except OSError as exc:
            print(f"tokenyard rank score: --output {args.output}: cannot write ({why_unwritable(args.output, exc)}); "
                  "expected a file path in a writable folder", file=sys.stderr)
            return 2
    else:
        sys.stdout.write(text)
    return 0


def _expm1(value: float) -> float:
    import math

    return math.expm1(min(value, 50.0))
