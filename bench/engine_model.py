"""Engine model benchmark: calibration error table, and the cost of the hot-path call.

Prints, per source and quantity, the median and p90 absolute percentage error of the
fitted engine model on the training and the held-out configurations of the real
measurements in shared/data/perf, next to the same figures for the unfitted default
factors (the baseline, measured in the same run). Then times `iteration_time_s` against a
baseline method call with the same arguments, as a ratio.

    python bench/engine_model.py [--data DIR] [--plot docs/img/calibration.png]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from scheduler.catalog import default_catalog
from scheduler.engine_model import EngineModel, PerfFactors
from sim.calibrate import (
    HELD_OUT_EVERY,
    FitResult,
    Predictor,
    calibrate,
    default_data_dir,
    format_error_table,
    format_factors,
    plot_fit,
    quantile,
)


def baseline_errors(result: FitResult) -> dict[tuple[str, str, str], float]:
    """Median APE of the unfitted default factors on the same observations."""
    predictor = Predictor(default_catalog(), PerfFactors())
    groups: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for obs in result.observations:
        split = "held-out" if obs.held_out else "train"
        groups[(obs.source, obs.quantity, split)].append(abs(predictor.predict(obs) / obs.measured - 1) * 100)
    return {key: quantile(sorted(values), 0.5) for key, values in groups.items()}


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
    parser.add_argument("--no-cross-validation", action="store_true",
                        help=f"skip refitting with each of the {HELD_OUT_EVERY} held-out folds")
    args = parser.parse_args()

    result = calibrate(args.data, progress=True)
    print("## Fitted engine model: absolute percentage error (APE) per source and quantity")
    print(format_error_table(result.errors()))
    print()
    baseline = baseline_errors(result)
    print("## Baseline: unfitted default factors, same observations (median APE %)")
    print(f"{'source':<10} {'quantity':<22} {'split':<9} {'default':>9} {'fitted':>8} {'ratio':>7}")
    for row in result.errors():
        key = (row["source"], row["quantity"], row["split"])
        fitted = row["median_ape_pct"]
        print(f"{key[0]:<10} {key[1]:<22} {key[2]:<9} {baseline[key]:>9.1f} {fitted:>8.1f} "
              f"{baseline[key] / max(fitted, 1e-9):>6.1f}x")
    print()
    print("## Fitted factors ('*' = fallback for GPU types without measurements)")
    print(format_factors(result.factors))
    print()

    # The overhead factors describe the engine Splitwise measured; swap in a modern engine's
    # (CUDA graphs, batched sampling) and keep the fitted hardware efficiencies.
    print("## TensorRT-LLM check: fitted hardware factors with modern-engine overheads")
    print("   (per_seq_overhead_s = 0, layer_overhead_s = 0, iteration_overhead_s = 2 ms)")
    trtllm = [o for o in result.observations if o.source == "trtllm"]
    for label, transform in (
        ("fitted factors as packaged", lambda f: f),
        ("modern-engine overheads", lambda f: replace(f, per_seq_overhead_s=0.0, layer_overhead_s=0.0,
                                                      iteration_overhead_s=0.002)),
    ):
        predictors = {gpu: Predictor(default_catalog(), transform(f)) for gpu, f in result.factors.items()}
        errors = sorted(abs(predictors.get(o.gpu, predictors["*"]).predict(o) / o.measured - 1) * 100 for o in trtllm)
        ratios = sorted(predictors.get(o.gpu, predictors["*"]).predict(o) / o.measured for o in trtllm)
        print(f"{label:<28} median APE {quantile(errors, 0.5):5.1f}%  p90 {quantile(errors, 0.9):5.1f}%  "
              f"median modelled/measured {quantile(ratios, 0.5):.2f}")
    print()

    if not args.no_cross_validation:
        quantities = ("prefill_time", "decode_time_per_token", "linear_op_time", "allreduce_time")
        print(f"## Cross-validation: held-out median APE % with each of the {HELD_OUT_EVERY} interleaved folds held out")
        print(f"{'fold':<6}" + "".join(f"{q:>24}" for q in quantities))
        for fold in range(HELD_OUT_EVERY):
            folded = calibrate(args.data, progress=False, fold=fold)
            print(f"{fold:<6}" + "".join(f"{folded.median_error(q):>24.1f}" for q in quantities))
        print()

    catalog = default_catalog()
    model = EngineModel(catalog.gpu("A100-80GB"), catalog.model("llama-3-8b"))
    calls = 200_000
    time_calls(model, 1000)  # warm up
    model_s = time_calls(model, calls)
    baseline_s = time_calls(_Baseline(), calls)
    print("## Hot path: EngineModel.iteration_time_s vs an empty method with the same arguments")
    print(f"iteration_time_s: {model_s * 1e9:.0f} ns/call; empty call: {baseline_s * 1e9:.0f} ns/call; "
          f"ratio {model_s / baseline_s:.1f}x")
    if args.plot:
        plot_fit(result, args.plot)
        print(f"\nwrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
