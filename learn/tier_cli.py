"""`tokenyard train tier` (train and evaluate the tier predictor) and `tokenyard tier score`
(p_small_ok of every prompt of a JSONL file). Heavy imports stay inside the handlers."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from learn.score_input import read_records, unwritable, why_unwritable, write_atomic

DEFAULT_DATA = ("../shared/data/routing", "../shared/data/lengths")


def _shared_default() -> list[str]:
    root = os.environ.get("TOKENYARD_SHARED_DATA")
    if root:
        return [str(Path(root) / "routing"), str(Path(root) / "lengths")]
    return list(DEFAULT_DATA)


def register_train(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "tier", help="train the small/large tier predictor (p_small_ok) and report held-out metrics",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", action="append", default=None, metavar="PATH",
                        help="a routing/AlpacaEval data folder or a plain .jsonl/.csv (repeatable); "
                             f"default: {' and '.join(DEFAULT_DATA)} (or $TOKENYARD_SHARED_DATA)")
    parser.add_argument("--out", required=True, help="model file to write (JSON)")
    parser.add_argument("--report", help="also write the held-out metrics here (JSON)")
    parser.add_argument("--plots", metavar="DIR", help="write the calibration plot and the cost-quality curve here")
    parser.add_argument("--classifier", choices=["lightgbm", "logistic"], default="lightgbm")
    parser.add_argument("--target", choices=["small_quality", "small_ok"], default="small_quality",
                        help="what the trees learn: the small tier's score on the prompt, or whether it "
                             "matches the large tier's (docs/tiers.md)")
    parser.add_argument("--length-prior-weight", type=float, default=0.4,  # learn.tier.TrainParams (imported lazily)
                        help="blend the trees' score with 'longer prompts go large' at this weight in [0, 1] "
                             "(0: the trees alone; docs/tiers.md)")
    parser.add_argument("--small-model", help="the small tier's column in correctness files (default: the weakest)")
    parser.add_argument("--large-model", help="the large tier's column in correctness files (default: the strongest)")
    parser.add_argument("--alpaca-small-model", default=None,
                        help="the small tier's model in AlpacaEval preferences (default: Mixtral-8x7B-Instruct concise)")
    parser.add_argument("--margin", type=float, default=None,
                        help="graded tasks: the small answer suffices within this score margin (scores in [0, 1]); default 0.1")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(handler=_train)


def register(subparsers: Any) -> None:
    tier = subparsers.add_parser("tier", help="the tier predictor: score prompts")
    commands = tier.add_subparsers(dest="tier_command", metavar="COMMAND")
    score = commands.add_parser(
        "score", help="write {\"p_small_ok\": ...} for each JSONL record (prompt or messages)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    score.add_argument("--model", help="tier model file (default: the packaged model)")
    score.add_argument("--input", required=True, help="JSONL with `prompt` or `messages` per line ('-' = stdin)")
    score.add_argument("--output", default="-", help="where to write the JSON lines ('-' = stdout)")
    score.add_argument("--batch", type=int, default=256, help="records scored together")
    score.set_defaults(handler=_score)
    tier.set_defaults(handler=lambda args: (tier.print_help(), 2)[1])


def _train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from learn.tier import TrainParams, train
    from learn.tier_data import (
        DEFAULT_ALPACA_SMALL_MODEL,
        DEFAULT_GRADE_MARGIN,
        TierDataError,
        read_any,
    )

    margin = DEFAULT_GRADE_MARGIN if args.margin is None else args.margin
    if not 0.0 <= margin <= 1.0:
        print(f"tokenyard train tier: --margin: expected a number in [0, 1], got {margin}", file=sys.stderr)
        return 2
    if not 0.0 <= args.length_prior_weight <= 1.0:
        print(f"tokenyard train tier: --length-prior-weight: expected a number in [0, 1], got "
              f"{args.length_prior_weight}", file=sys.stderr)
        return 2
    # Outputs that cannot be written are refused before training, not after it (and not
    # after --out was written, leaving a model without its --report).
    for option, value, folder in (("--out", args.out, False), ("--report", args.report, False),
                                  ("--plots", args.plots, True)):
        problem = unwritable(Path(value), folder) if value else None
        if problem:
            print(f"tokenyard train tier: {option} {value}: cannot write ({problem}); expected "
                  f"{'a folder path' if folder else 'a file path'} in a writable folder", file=sys.stderr)
            return 2
    rows = []
    dropped = 0
    sources = args.data or _shared_default()
    try:
        for source in sources:
            found, n_dropped = read_any(Path(source), args.small_model,
                                        args.alpaca_small_model or DEFAULT_ALPACA_SMALL_MODEL, margin, args.large_model)
            rows.extend(found)
            dropped += n_dropped
    except TierDataError as exc:
        print(f"tokenyard train tier: {exc}", file=sys.stderr)
        return 2
    params = TrainParams(classifier=args.classifier, seed=args.seed, target=args.target,
                         length_prior_weight=args.length_prior_weight)
    benchmarks = sorted({r.benchmark for r in rows})
    stages = 1 + min(params.folds, len({r.task for r in rows})) + (len(benchmarks) if len(benchmarks) > 1 else 0) + 1
    meta = {"data": [str(s) for s in sources], "contaminated_dropped": dropped, "benchmarks": benchmarks,
            "margin": margin, "command": "tokenyard " + " ".join(getattr(args, "argv", []) or ["train", "tier"])}
    with tqdm(total=stages, desc="train tier", unit="fit", file=sys.stderr) as bar:
        def progress(stage: str) -> None:
            bar.set_postfix_str(stage)
            bar.update(1)

        try:
            doc, evaluation = train(rows, params, meta, progress)
        except ValueError as exc:
            print(f"tokenyard train tier: {exc}", file=sys.stderr)
            return 2
    write_atomic(Path(args.out), json.dumps(doc, separators=(",", ":")))
    if args.report:
        write_atomic(Path(args.report), json.dumps(doc["trained"], indent=1))
    if args.plots:
        from learn.tier_plots import write_plots

        assert evaluation.oof_scores is not None
        for path in write_plots(rows, evaluation, Path(args.plots)):
            print(f"wrote {path}", file=sys.stderr)
    _print_metrics(doc["trained"]["held_out"], len(rows), dropped)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size} bytes)")
    return 0


def _print_metrics(held_out: dict[str, dict[str, dict[str, float]]], n_rows: int, dropped: int) -> None:
    print(f"{n_rows} prompts ({dropped} contaminated dropped); held-out metrics (random router: APGR 0.5)")
    print(f"{'split':<13}{'benchmark':<13}{'n':>7}{'APGR':>7}{'CPT50':>7}{'CPT80':>7}{'AIQ':>7}{'AIQ rnd':>8}")
    for split, by in held_out.items():
        for bench, m in by.items():
            print(f"{split:<13}{bench:<13}{int(m['n']):>7}{m['apgr']:>7.3f}{m['cpt50']:>7.3f}"
                  f"{m['cpt80']:>7.3f}{m['aiq']:>7.3f}{m['random_aiq']:>8.3f}")


def _score(args: argparse.Namespace) -> int:
    from scheduler.predictors.text import prompt_text
    from scheduler.predictors.tier import TierModelError, load_predictor

    if not 1 <= args.batch <= 100_000:
        print(f"tokenyard tier score: --batch: expected 1..100000, got {args.batch}", file=sys.stderr)
        return 2
    try:
        predictor = load_predictor(args.model)
    except TierModelError as exc:
        print(f"tokenyard tier score: {exc}", file=sys.stderr)
        return 2
    try:
        source = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")  # noqa: SIM115
    except OSError as exc:
        print(f"tokenyard tier score: --input {args.input}: cannot read ({exc.strerror})", file=sys.stderr)
        return 2
    lines: list[str] = []
    try:
        with source:
            batch: list[dict[str, Any]] = []
            for record in read_records(source, args.input):
                batch.append(record)
                if len(batch) >= args.batch:
                    lines.extend(_score_batch(predictor, batch, prompt_text))
                    batch = []
            lines.extend(_score_batch(predictor, batch, prompt_text))
    except ValueError as exc:
        print(f"tokenyard tier score: {exc}", file=sys.stderr)
        return 2
    text = "".join(lines)
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    try:
        write_atomic(Path(args.output), text)
    except OSError as exc:
        print(f"tokenyard tier score: --output {args.output}: cannot write ({why_unwritable(Path(args.output), exc)}); "
              "expected a file path in a writable folder", file=sys.stderr)
        return 2
    return 0


def _score_batch(predictor: Any, batch: list[dict[str, Any]], prompt_text: Any) -> list[str]:
    texts = [prompt_text(r) for r in batch]
    scores = predictor.score_many(texts)
    out = []
    for record, text, p in zip(batch, texts, scores, strict=True):
        line: dict[str, Any] = {"p_small_ok": round(float(p), 6), "prompt_chars": len(text)}
        if "id" in record:
            line["id"] = record["id"]
        out.append(json.dumps(line) + "\n")
    return out
