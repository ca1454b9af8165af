"""The live workload histogram the control loop plans from: requests per (SLO class, input
bucket, output bucket) per time slot, mergeable across router replicas.

Each router replica records the requests it finished (`record`: it knows the output
length then) into its own histogram, writes `as_dict()` to the state store under its own
key, and the control loop merges every replica's (`merge`) and reads the rates of the
last window (`rates_by_bucket`), which feed `autoscale.pool_loads` or a re-solve. Slots
older than `keep_slots` are dropped on every record, so a stored histogram stays bounded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from scheduler.planner.problem import Bucket, PlanError, bucket_of

CellKey = tuple[int, str, int, int]  # (slot, SLO class, input bucket, output bucket)


@dataclass(slots=True)
class LengthHistogram:
    input_edges: tuple[int, ...]
    output_edges: tuple[int, ...]
    slot_s: float = 60.0
    keep_slots: int = 60
    counts: dict[CellKey, int] = field(default_factory=dict)

    def _slot(self, t_s: float) -> int:
        return int(t_s // self.slot_s)

    def record(self, t_s: float, slo_class: str, input_tokens: int, output_tokens: int) -> None:
        slot = self._slot(t_s)
        key = (slot, slo_class, bucket_of(self.input_edges, input_tokens), bucket_of(self.output_edges, output_tokens))
        self.counts[key] = self.counts.get(key, 0) + 1
        oldest = slot - self.keep_slots
        if any(k[0] < oldest for k in self.counts):
            self.counts = {k: v for k, v in self.counts.items() if k[0] >= oldest}

    def merge(self, other: LengthHistogram) -> LengthHistogram:
        if (self.input_edges, self.output_edges, self.slot_s) != (other.input_edges, other.output_edges, other.slot_s):
            raise PlanError("histogram merge: the histograms have different bucket edges or slot length")
        merged = dict(self.counts)
        for key, value in other.counts.items():
            merged[key] = merged.get(key, 0) + value
        return LengthHistogram(self.input_edges, self.output_edges, self.slot_s, max(self.keep_slots, other.keep_slots),
                               merged)

    def rates(self, now_s: float, window_s: float) -> dict[tuple[str, int, int], float]:
        """Requests per second per (class, input bucket, output bucket) over the whole slots
        of the last `window_s` before `now_s` (the current, partial slot is left out)."""
        current = self._slot(now_s)
        slots = max(1, int(window_s // self.slot_s))
        first = current - slots
        out: dict[tuple[str, int, int], float] = {}
        for (slot, klass, i, j), count in self.counts.items():
            if first <= slot < current:
                out[(klass, i, j)] = out.get((klass, i, j), 0.0) + count / (slots * self.slot_s)
        return out

    def rates_by_bucket(self, buckets: Sequence[Bucket], now_s: float, window_s: float) -> dict[int, float]:
        """`rates` as {index into `buckets`: req/s} (cells no bucket covers are dropped)."""
        index = {(b.slo_class, b.row, b.col): k for k, b in enumerate(buckets)}
        return {index[cell]: rate for cell, rate in self.rates(now_s, window_s).items() if cell in index}

    def as_dict(self) -> dict[str, Any]:
        return {"input_edges": list(self.input_edges), "output_edges": list(self.output_edges),
                "slot_s": self.slot_s, "keep_slots": self.keep_slots,
                "cells": [[slot, klass, i, j, n] for (slot, klass, i, j), n in sorted(self.counts.items())]}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = "histogram") -> LengthHistogram:
        try:
            hist = cls(tuple(int(v) for v in raw["input_edges"]), tuple(int(v) for v in raw["output_edges"]),
                       float(raw["slot_s"]), int(raw["keep_slots"]))
            for slot, klass, i, j, n in raw["cells"]:
                hist.counts[(int(slot), str(klass), int(i), int(j))] = int(n)
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"{where}: expected input_edges, output_edges, slot_s, keep_slots and cells "
                            f"[[slot, class, input, output, count]] ({exc})") from None
        if len(hist.input_edges) < 2 or len(hist.output_edges) < 2 or hist.slot_s <= 0:
            raise PlanError(f"{where}: expected at least 2 edges per axis and a positive slot_s")
        return hist
