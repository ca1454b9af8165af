"""The tier predictor's plots: calibration (reliability diagram of the held-out-task
scores) and the cost-quality curve (PGR against the share of large-tier calls)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from learn.tier import Evaluation, oof_curves
from learn.tier_data import LabelledPrompt
from learn.tier_metrics import calibration_table


def write_plots(rows: Sequence[LabelledPrompt], evaluation: Evaluation, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert evaluation.oof_scores is not None
    folder.mkdir(parents=True, exist_ok=True)
    scores = evaluation.oof_scores
    labels = np.array([r.small_ok for r in rows], dtype=float)
    predicted, observed, counts, ece = calibration_table(scores, labels)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    used = counts > 0
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect")
    ax.plot(predicted[used], observed[used], marker="o", label=f"tier model (ECE {ece:.3f})")
    for x, y, n in zip(predicted[used], observed[used], counts[used], strict=True):
        ax.annotate(str(int(n)), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlabel("predicted p_small_ok (held-out tasks)")
    ax.set_ylabel("observed share of small answers that suffice")
    ax.set_title("Tier predictor calibration")
    ax.legend(loc="upper left")
    calibration_path = folder / "tier_calibration.png"
    fig.tight_layout()
    fig.savefig(calibration_path, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for benchmark, (share, pgr) in oof_curves(rows, scores).items():
        m = evaluation.metrics["by_task"].get(benchmark, {})
        ax.plot(share, pgr, label=f"{benchmark} (APGR {m.get('apgr', float('nan')):.2f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="random router (APGR 0.50)")
    ax.set_xlabel("share of requests sent to the large tier (cost)")
    ax.set_ylabel("performance gap recovered (PGR)")
    ax.set_title("Cost-quality curve, held-out tasks")
    ax.legend(fontsize=8, loc="lower right")
    curve_path = folder / "tier_cost_quality.png"
    fig.tight_layout()
    fig.savefig(curve_path, dpi=110)
    plt.close(fig)
    return [calibration_path, curve_path]
