"""What the shared measurements say about the small GPUs the planner mixes (issue 12).

The packaged engine factors (scheduler/perf_factors.json) are fitted to A100 and H100 data;
L4, A10G and L40S take their mean (`default`). The only measurement of a small-GPU-class chip
in ../shared/data/perf is Vidur's linear-operator profile of the A40 (GA102, GDDR6: the
A10G's die, with 84 of its SMs and 696 GB/s against the A10G's 80 SMs and 600 GB/s). This
script:

1. predicts every A40 row (Llama-2-7B, tp 1 and 2, 1-32k tokens: the per-layer QKV, O and
   MLP GEMMs) with the `default` factors the small GPUs get, and reports the error;
2. refits the three factors that row shape identifies (compute efficiency, memory
   efficiency, roofline overlap) on 3 of every 4 rows and reports the held-out error;
3. shows what the refit changes for llama-2-7b's unloaded decode step on A10G and L4, split
   into GPU time (what the A40 profile measures) and CPU time (the engine's fixed per-step and
   per-layer costs, fitted to ML.ENERGY's vLLM on A100/H100, which no small-GPU measurement
   here covers), and writes the refit as a factors file for `--factors` (A10G takes the
   GA102 fit; L4, another chip, keeps `default`).

    python bench/small_gpu_check.py --write bench/data/perf_factors_ga102.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("TOKENYARD_SHARED_DATA", REPO.parent / "shared" / "data"))

from scheduler.catalog import GpuSpec, default_catalog  # noqa: E402
from scheduler.engine_model import EngineModel, PerfFactors, fitted_factors  # noqa: E402
from sim.calibrate import VIDUR_LINEAR_OPS  # noqa: E402
from sim.calibrate_data import read_csv  # noqa: E402

# NVIDIA A40 data sheet: 48 GB GDDR6 at 696 GB/s, 149.7 TFLOPS dense FP16/BF16 tensor.
A40 = GpuSpec("A40", 48, 149.7, 696, "pcie", 32, 0.0)
FITTED = ("compute_efficiency", "memory_efficiency", "roofline_overlap_loss")


def a40_rows() -> list[tuple[int, int, float]]:
    """(tp, tokens, median seconds of the four linear ops per layer) for Llama-2-7B."""
    path = DATA / "perf" / "vidur" / "profiling" / "compute" / "a40" / "meta-llama" / "Llama-2-7b-hf" / "mlp.csv"
    samples: dict[tuple[int, int], list[float]] = defaultdict(list)
    columns = [f"time_stats.{op}.median" for op in VIDUR_LINEAR_OPS]
    for row in read_csv(path, [*columns, "num_tensor_parallel_workers", "num_tokens"]):
        ms = sum(float(row[c]) for c in columns)
        samples[(int(row["num_tensor_parallel_workers"]), int(row["num_tokens"]))].append(ms / 1e3)
    return sorted((tp, n, statistics.median(v)) for (tp, n), v in samples.items())


def predict(factors: PerfFactors, tp: int, tokens: int) -> float:
    model = default_catalog().model("llama-2-7b")
    return EngineModel(A40, model, tp=tp, factors=factors).linear_time_per_layer_s(tokens)


def errors(factors: PerfFactors, rows: list[tuple[int, int, float]]) -> dict[str, float]:
    ape = sorted(abs(predict(factors, tp, n) / t - 1) * 100 for tp, n, t in rows)
    bias = statistics.median(predict(factors, tp, n) / t - 1 for tp, n, t in rows) * 100
    return {"n": len(rows), "median_ape_pct": round(statistics.median(ape), 1),
            "p90_ape_pct": round(ape[min(len(ape) - 1, int(0.9 * len(ape)))], 1), "median_bias_pct": round(bias, 1)}


def fit(start: PerfFactors, rows: list[tuple[int, int, float]]) -> PerfFactors:
    import numpy as np
    from scipy.optimize import least_squares

    bounds = {"compute_efficiency": (0.05, 1.0), "memory_efficiency": (0.05, 1.0), "roofline_overlap_loss": (0.0, 1.0)}

    def factors_of(x: Any) -> PerfFactors:
        return replace(start, **{name: float(v) for name, v in zip(FITTED, x, strict=True)})

    def residuals(x: Any) -> Any:
        f = factors_of(x)
        return np.array([math.log(predict(f, tp, n) / t) for tp, n, t in rows])

    x0 = [getattr(start, n) for n in FITTED]
    solution = least_squares(residuals, x0, bounds=([bounds[n][0] for n in FITTED], [bounds[n][1] for n in FITTED]),
                             loss="soft_l1", f_scale=0.1)
    return factors_of(solution.x)


def decode_step(gpu: GpuSpec, factors: PerfFactors) -> dict[str, float]:
    """Llama-2-7B, one sequence of 512 context tokens: the step's GPU and CPU milliseconds."""
    engine = EngineModel(gpu, default_catalog().model("llama-2-7b"), tp=1, factors=factors)
    total = engine.iteration_time_s(0, 1, 512)
    cpu = engine.cpu_time_s(1)
    return {"step_ms": round(total * 1e3, 1), "gpu_ms": round((total - cpu) * 1e3, 1), "cpu_ms": round(cpu * 1e3, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", type=Path, default=None, help="write the factors file with A10G on the GA102 fit")
    args = parser.parse_args()
    rows = a40_rows()
    held = [r for i, r in enumerate(rows) if i % 4 == 3]
    train = [r for i, r in enumerate(rows) if i % 4 != 3]
    table = fitted_factors()
    default = table["*"]
    refit = fit(default, train)
    report: dict[str, Any] = {
        "rows": len(rows), "tp": sorted({tp for tp, _, _ in rows}),
        "default_factors_all_rows": errors(default, rows), "default_factors_held_out": errors(default, held),
        "refit_held_out": errors(refit, held), "refit_train": errors(refit, train),
        # decode-sized GEMMs (memory-bound) and prefill-sized ones (compute-bound), tp 1
        "tp1_tokens_le_256": {"default": errors(default, small := [r for r in rows if r[0] == 1 and r[1] <= 256]),
                              "refit": errors(refit, small)},
        "tp1_tokens_ge_1024": {"default": errors(default, large := [r for r in rows if r[0] == 1 and r[1] >= 1024]),
                               "refit": errors(refit, large)},
        "default": {n: round(getattr(default, n), 3) for n in FITTED},
        "refit": {n: round(getattr(refit, n), 3) for n in FITTED},
        "a40_1_token_ms_per_layer": {"measured": round(next(t for tp, n, t in rows if tp == 1 and n == 1) * 1e3, 3)},
    }
    catalog = default_catalog()
    steps = {}
    for name in ("L4", "A10G", "A100-80GB", "H100-80GB"):
        gpu = catalog.gpu(name)
        packaged = table.get(name.lower(), default)
        steps[name] = {"packaged": decode_step(gpu, packaged)}
        if name == "A10G":
            steps[name]["ga102_refit"] = decode_step(gpu, refit)
    report["llama-2-7b decode step, batch 1, 512 context"] = steps
    print(json.dumps(report, indent=1))
    if args.write:
        document = json.loads((REPO / "scheduler" / "perf_factors.json").read_text())
        document["gpus"]["A10G"] = refit.as_dict()
        document["comment"] = ("The packaged fit, with A10G on a refit of compute/memory efficiency and roofline "
                               "overlap to Vidur's A40 (GA102) linear-op profile: bench/small_gpu_check.py")
        args.write.write_text(json.dumps(document, indent=1) + "\n")
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
