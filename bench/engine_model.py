"""Engine model benchmark: cross-validated error, by group, before and after; hot-path cost.

Fits the engine model `HELD_OUT_EVERY` times, each time holding out one interleaved fold of
every source (ML.ENERGY: whole models, so the check is on models the fit never saw;
Splitwise: whole (model, TP) configurations, so on a TP degree or a model it never saw), and
pools the held-out predictions: every measurement is predicted once by a fit that did not
see it. Prints, per source and quantity, the median and p90 absolute percentage error
(APE) of those out-of-fold predictions next to the factors packaged before this model shape
(bench/data/perf_factors_before_i10.json, the baseline, evaluated in the same run on the same
measurements), then the same per (model, GPU, TP) group with the group's median bias, and
checks the targets: median APE <= 10% held out, no group with |median bias| > 25%.
Then times `iteration_time_s` against an empty method with the same arguments, as a ratio.

    python bench/engine_model.py [--data DIR] [--plot docs/img/calibration.png] [--ablation]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

from scheduler.catalog import default_catalog
from scheduler.engine_model import EngineModel, _parse_factors_document
from sim.calibrate import (
    ENGINE_SPECIFIC_BOUNDS,
    ENGINE_SPECIFIC_SOURCES,
    HELD_OUT_EVERY,
    SAME_SILICON,
    FitShape,
    Predictor,
    calibrate,
    default_data_dir,
    format_factors,
    plot_fit,
)
from sim.calibrate_data import FitResult, Observation, quantile

BEFORE_FACTORS = Path(__file__).resolve().parent / "data" / "perf_factors_before_i10.json"
TARGET_MEDIAN_APE_PCT = 10.0
TARGET_GROUP_BIAS_PCT = 25.0
# Quantities the targets apply to (end-to-end step times of an engine; the operator profiles
# are reported but are ingredients, not what a simulation reads).
TARGET_QUANTITIES = ("serving_tpot", "decode_time_per_token", "prefill_time")


def out_of_fold(data_dir: Path, shape: FitShape | None = None) -> tuple[list[Observation], list[float], FitResult]:
    """Every observation with the prediction of the fit that held it out; and the last fit."""
    observations: list[Observation] = []
    predictions: list[float] = []
    last: FitResult | None = None
    for fold in range(HELD_OUT_EVERY):
        result = calibrate(data_dir, progress=False, fold=fold, shape=shape)
        for obs, pred in zip(result.observations, result.predictions, strict=True):
            # TensorRT-LLM figures are held out of every fold: count them once.
            if obs.held_out and (obs.source != "trtllm" or fold == 0):
                observations.append(obs)
                predictions.append(pred)
        last = result
        print(f"  fold {fold + 1}/{HELD_OUT_EVERY} fitted", file=sys.stderr)
    assert last is not None
    return observations, predictions, last


def before_predictions(observations: list[Observation]) -> list[float]:
    """Predictions of the previously packaged factors (new terms at their neutral values)."""
    table = _parse_factors_document(json.loads(BEFORE_FACTORS.read_text()), str(BEFORE_FACTORS))
    catalog = default_catalog()
    predictors = {name: Predictor(catalog, factors) for name, factors in table.items()}
    return [predictors.get(o.gpu.lower(), predictors["*"]).predict(o) for o in observations]


def _stats(pairs: list[tuple[float, float]]) -> tuple[float, float, float]:
    """(median APE %, p90 APE %, median bias %) of (predicted, measured) pairs."""
    apes = sorted(abs(p / m - 1) * 100 for p, m in pairs)
    biases = sorted((p / m - 1) * 100 for p, m in pairs)
    return quantile(apes, 0.5), quantile(apes, 0.9), quantile(biases, 0.5)


def error_rows(observations: list[Observation], predictions: list[float], by_group: bool
               ) -> dict[tuple[str, ...], tuple[int, tuple[float, float, float]]]:
    groups: dict[tuple[str, ...], list[tuple[float, float]]] = defaultdict(list)
    for obs, pred in zip(observations, predictions, strict=True):
        key: tuple[str, ...] = (obs.source, obs.quantity)
        if by_group:
            key += (obs.model or "-", obs.gpu, f"tp{obs.tp}")
        groups[key].append((pred, obs.measured))
    return {key: (len(pairs), _stats(pairs)) for key, pairs in sorted(groups.items())}


def print_tables(observations: list[Observation], after: list[float], before: list[float]) -> list[str]:
    """Print the source and group tables; return the target failures."""
    failures = []
    print(f"{'source':<10} {'quantity':<22} {'n':>5} {'before med/p90 APE %':>21} {'after med/p90 APE %':>20}"
          f" {'after bias %':>12}")
    rows_before = error_rows(observations, before, by_group=False)
    for key, (count, (med, p90, bias)) in error_rows(observations, after, by_group=False).items():
        b_med, b_p90, _ = rows_before[key][1]
        print(f"{key[0]:<10} {key[1]:<22} {count:>5} {b_med:>12.1f} / {b_p90:<6.1f} {med:>11.1f} / {p90:<6.1f}"
              f" {bias:>+12.1f}")
        if key[1] in TARGET_QUANTITIES and med > TARGET_MEDIAN_APE_PCT:
            failures.append(f"{key[0]} {key[1]}: held-out median APE {med:.1f}% > {TARGET_MEDIAN_APE_PCT}%")
    print()
    print("## By (model, GPU, TP) group, held out: median APE and median bias (predicted / measured - 1)")
    print(f"{'source':<10} {'quantity':<22} {'model':<16} {'gpu':<10} {'tp':<4} {'n':>3} {'before APE':>10}"
          f" {'before bias':>11} {'after APE':>9} {'after bias':>10}")
    groups_before = error_rows(observations, before, by_group=True)
    for key, (count, (med, _, bias)) in error_rows(observations, after, by_group=True).items():
        if key[1] not in TARGET_QUANTITIES:
            continue
        b_med, _, b_bias = groups_before[key][1]
        print(f"{key[0]:<10} {key[1]:<22} {key[2]:<16} {key[3]:<10} {key[4]:<4} {count:>3} {b_med:>10.1f}"
              f" {b_bias:>+11.1f} {med:>9.1f} {bias:>+10.1f}")
        if abs(bias) > TARGET_GROUP_BIAS_PCT:
            failures.append(f"{' '.join(key)}: median bias {bias:+.1f}% beyond +-{TARGET_GROUP_BIAS_PCT}%")
    return failures


def print_ablation(data_dir: Path, observations: list[Observation], full: list[float]) -> None:
    """Held-out median / p90 APE of the target quantities with each shape choice switched off
    (same split, same folds); `large_step=False, hold_attention=False` is main's shape before."""
    variants = {
        "no step, attention fitted (before)": FitShape(large_step=False, hold_attention=False),
        "no step, attention held": FitShape(large_step=False, hold_attention=True),
        "step, attention fitted": FitShape(large_step=True, hold_attention=False),
    }
    columns = {"step, attention held (packaged)": error_rows(observations, full, by_group=False)}
    for label, shape in variants.items():
        obs, pred, _ = out_of_fold(data_dir, shape)
        columns[label] = error_rows(obs, pred, by_group=False)
    print("## Ablation: held-out median / p90 APE % with each shape choice off")
    print(f"{'source':<10} {'quantity':<22}" + "".join(f" {label:>36}" for label in columns))
    for key in columns["step, attention held (packaged)"]:
        if key[1] not in TARGET_QUANTITIES:
            continue
        cells = "".join(f" {f'{rows[key][1][0]:.1f} / {rows[key][1][1]:.1f}':>36}" for rows in columns.values())
        print(f"{key[0]:<10} {key[1]:<22}{cells}")
    print()


class _Baseline:
    """Same call shape as EngineModel.iteration_time_s, doing the least possible work."""

    def iteration_time_s(self, prefill_tokens: int = 0, decode_seqs: int = 0, context_tokens: int = 0,
                         prefill_attention_pairs: float = 0.0) -> float:
        return 0.0


def time_calls(target: object, calls: int) -> float:
    method = target.iteration_time_s  # type: ignore[attr-defined]
    start = time.perf_counter()
    for i in range(calls):
        method(0, 64, 64 * 1000 + i, 0.0)
        method(512, 63, 63 * 1000 + i, 512 * 256.5)
    return (time.perf_counter() - start) / (2 * calls)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=default_data_dir())
    parser.add_argument("--plot", type=Path, help="also write the predicted-vs-measured plot here")
    parser.add_argument("--ablation", action="store_true",
                        help="also cross-validate the model without each of its shape choices (3 more fits x 4 folds)")
    args = parser.parse_args()

    observations, after, last = out_of_fold(args.data)
    before = before_predictions(observations)
    print(f"## Held-out error, {HELD_OUT_EVERY}-fold cross-validation (every measurement predicted by a fit "
          "that did not see it)")
    failures = print_tables(observations, after, before)
    print()
    print(f"## Factors of the last fold (current engine; {', '.join(ENGINE_SPECIFIC_SOURCES)} fitted its own "
          "CPU overheads)")
    print(format_factors(last.factors))
    print()
    print(f"## {', '.join(ENGINE_SPECIFIC_SOURCES)} engine's own factors (fitted alongside, not packaged)")
    for chip in sorted(last.engine_specific):
        if chip in ("*", *SAME_SILICON):
            continue
        own = last.engine_specific[chip]
        print(f"{chip:<10} " + ", ".join(f"{name} {getattr(own, name):.4g}" for name in ENGINE_SPECIFIC_BOUNDS))
    print()
    print("## Targets: median APE <= 10% held out (serving TPOT, decode, prefill), no group median bias > 25%")
    print("\n".join(f"MISSED  {line}" for line in failures) or "all met")
    print()
    if args.ablation:
        print_ablation(args.data, observations, after)

    catalog = default_catalog()
    h100 = catalog.gpu("H100-80GB")
    engines = [("llama-3-8b A100 tp1", EngineModel(catalog.gpu("A100-80GB"), catalog.model("llama-3-8b"))),
               ("mixtral-8x7b H100 tp2", EngineModel(h100, catalog.model("mixtral-8x7b"), tp=2))]
    if "H100-80GB" in last.engine_specific:  # the large-iteration step switched on
        engines.append(("llama-2-70b H100 tp8, Splitwise engine's factors (step on)",
                        EngineModel(h100, catalog.model("llama-2-70b"), tp=8,
                                    factors=last.engine_specific["H100-80GB"])))
    for label, model in engines:
        calls = 200_000
        time_calls(model, 1000)  # warm up
        model_s = time_calls(model, calls)
        baseline_s = time_calls(_Baseline(), calls)
        print(f"## Hot path ({label}): iteration_time_s {model_s * 1e9:.0f} ns/call; empty call "
              f"{baseline_s * 1e9:.0f} ns/call; ratio {model_s / baseline_s:.1f}x")
    if args.plot:
        plot_fit(last, args.plot)
        print(f"\nwrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
