"""The calibration's data types and its one CSV reader, shared by `sim.calibrate` (the fit),
`sim.calibrate_mlenergy` (one source's rows) and `sim.calibrate_report` (tables, plots), so
none of them imports another for them."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scheduler.engine_model import PerfFactors


@dataclass(frozen=True, slots=True)
class Observation:
    """One measured configuration: `measured` is seconds, or tokens/s for `throughput`."""

    source: str
    quantity: str
    gpu: str
    model: str
    tp: int
    key: str  # human-readable configuration, unique within the source
    measured: float
    num_tokens: int = 0  # linear_op_time
    num_bytes: int = 0  # allreduce_time
    prompt_tokens: int = 0
    batch_size: int = 0
    context_tokens: int = 0  # decode_time_per_token: mean context per sequence
    output_tokens: float = 0  # throughput; serving_tpot: mean output tokens
    held_out: bool = False
    running_seqs: float = 0.0  # serving_tpot: mean running batch
    group: str = ""  # cross-validation unit where it is not the configuration (mlenergy: the model)


def read_csv(path: Path, required: Iterable[str] = ()) -> list[dict[str, str]]:
    """Rows of a CSV file; a missing file or missing columns is an error naming both."""
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            columns = set(reader.fieldnames or ())
    except OSError as exc:
        raise FileNotFoundError(f"{path}: cannot read measurements ({exc.strerror or exc})") from exc
    missing = sorted(set(required) - columns)
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
    return rows


@dataclass(slots=True)
class FitResult:
    factors: dict[str, PerfFactors]  # per GPU name, plus "*"
    observations: list[Observation]
    predictions: list[float]
    cost: dict[str, float] = field(default_factory=dict)  # per GPU: final least-squares cost
    # Per GPU: the factors of the older engine Splitwise measured (ENGINE_SPECIFIC_SOURCES).
    engine_specific: dict[str, PerfFactors] = field(default_factory=dict)

    def errors(self) -> list[dict[str, Any]]:
        """Absolute percentage error per (source, quantity, split): median, p90, count."""
        groups: dict[tuple[str, str, str], list[float]] = defaultdict(list)
        for obs, pred in zip(self.observations, self.predictions, strict=True):
            split = "held-out" if obs.held_out else "train"
            groups[(obs.source, obs.quantity, split)].append(abs(pred - obs.measured) / obs.measured * 100)
        table = []
        for (source, quantity, split), values in sorted(groups.items()):
            values.sort()
            table.append({
                "source": source, "quantity": quantity, "split": split, "count": len(values),
                "median_ape_pct": round(quantile(values, 0.5), 2),
                "p90_ape_pct": round(quantile(values, 0.9), 2),
            })
        return table

    def median_error(self, quantity: str, split: str = "held-out", source: str | None = None) -> float:
        for row in self.errors():
            if row["quantity"] == quantity and row["split"] == split and source in (None, row["source"]):
                return float(row["median_ape_pct"])
        raise KeyError(f"no {split} observations of {quantity}")


def quantile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)
