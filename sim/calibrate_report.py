"""Reports of an engine-model fit: the error table, the factors table, the predicted-vs-measured plot."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scheduler.engine_model import PerfFactors
from sim.calibrate_data import FitResult, Observation

SOURCE_COLOURS = {
    ("vidur", "linear_op_time"): "tab:blue",
    ("vidur", "allreduce_time"): "tab:gray",
    ("splitwise", "prefill_time"): "tab:orange",
    ("splitwise", "decode_time_per_token"): "tab:green",
    ("trtllm", "throughput"): "tab:red",
    ("mlenergy", "serving_tpot"): "tab:purple",
}


def plot_fit(result: FitResult, path: Path) -> None:
    """Predicted vs measured, log-log, one colour per source and quantity, with y = x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 6))
    panels: tuple[tuple[str, Callable[[Observation], bool]], ...] = (("times (s)", lambda o: o.quantity != "throughput"), ("throughput (tokens/s)", lambda o: o.quantity == "throughput"))
    for ax, (label, wanted) in zip(axes, panels, strict=True):
        groups: dict[tuple[str, str], list[tuple[float, float, bool]]] = defaultdict(list)
        for obs, pred in zip(result.observations, result.predictions, strict=True):
            if wanted(obs) and pred > 0:
                groups[(obs.source, obs.quantity)].append((obs.measured, pred, obs.held_out))
        low, high = math.inf, 0.0
        for (source, quantity), points in sorted(groups.items()):
            colour = SOURCE_COLOURS.get((source, quantity), "black")
            for held_out in (False, True):
                xs = [p[0] for p in points if p[2] == held_out]
                ys = [p[1] for p in points if p[2] == held_out]
                if not xs:
                    continue
                ax.scatter(xs, ys, s=10 if held_out else 5, alpha=0.8 if held_out else 0.35, c=colour,
                           marker="o" if held_out else ".",
                           label=f"{source} {quantity} ({'held-out' if held_out else 'train'}, n={len(xs)})")
                low, high = min(low, *xs, *ys), max(high, *xs, *ys)
        if high > 0:
            ax.plot([low, high], [low, high], "k--", linewidth=1, label="y = x")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"measured {label}")
        ax.set_ylabel(f"modelled {label}")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    axes[0].set_title("Engine model vs Vidur / Splitwise / ML.ENERGY vLLM (A100, H100)")
    axes[1].set_title("Check: TensorRT-LLM max throughput, H100/H200 FP8 (not fitted)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_error_table(rows: list[dict[str, Any]]) -> str:
    header = f"{'source':<10} {'quantity':<22} {'split':<9} {'n':>5} {'median APE %':>13} {'p90 APE %':>10}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['source']:<10} {row['quantity']:<22} {row['split']:<9} {row['count']:>5} "
            f"{row['median_ape_pct']:>13.1f} {row['p90_ape_pct']:>10.1f}"
        )
    return "\n".join(lines)


def format_factors(factors: dict[str, PerfFactors]) -> str:
    names = list(PerfFactors().as_dict())
    header = f"{'factor':<26}" + "".join(f"{gpu:>12}" for gpu in factors)
    lines = [header]
    for name in names:
        lines.append(f"{name:<26}" + "".join(f"{getattr(f, name):>12.4g}" for f in factors.values()))
    return "\n".join(lines)
