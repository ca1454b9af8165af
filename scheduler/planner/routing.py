"""The routing table a plan hands the dispatcher: length bucket -> pools with weights.

Keyed by (input bucket, output bucket) cell, with each input row's rate-weighted mix as
well, which a dispatcher uses when it does not know the output length (it rarely does:
a request carries at most its `max_output_tokens`). A plan solved with `route_by_input`
gives every cell of a row the row's mix, so routing by the prompt alone follows it
exactly. A plan solved with routing keys (`PlanProblem.routing_keys`) routes on the
*predicted* output length instead (`output_source: predicted_rank`: the output-length
ranker's score, ln(1 + tokens), the scale of `scheduler.predictors.rank` and
`sim.rank_noise`), the cell being the request's input row and predicted output column.
The choice among weighted pools is a pure function of the request id, so the
router and the simulator (and every router replica) send a request to the same pool.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from scheduler.planner.problem import Plan, PlanError, bucket_of

Weights = tuple[tuple[str, float], ...]
OUTPUT_SOURCES = ("max_output_tokens", "predicted_rank")
_MAX_RANK = 30.0  # e^30 tokens: any rank above is "the longest bucket", and expm1 stays finite


def _normalised(weights: Mapping[str, float]) -> Weights:
    total = sum(w for w in weights.values() if w > 0)
    if total <= 0:
        return ()
    return tuple(sorted(((p, w / total) for p, w in weights.items() if w > 0), key=lambda pw: (-pw[1], pw[0])))


@dataclass(frozen=True, slots=True)
class RoutingTable:
    input_edges: tuple[int, ...]
    output_edges: tuple[int, ...]
    cells: Mapping[tuple[int, int], Weights]
    rows: Mapping[int, Weights]
    output_source: str = "max_output_tokens"  # what picks the output cell (OUTPUT_SOURCES)

    def output_tokens_of(self, max_output_tokens: int | None, predicted_rank: float | None) -> int | None:
        """The output length the cell is looked up by (None: use the row's mix)."""
        if self.output_source != "predicted_rank":
            return max_output_tokens
        if predicted_rank is None or not math.isfinite(predicted_rank):
            return None
        return max(0, round(math.expm1(min(max(predicted_rank, 0.0), _MAX_RANK))))

    def weights_for(self, input_tokens: int, output_tokens: int | None = None) -> Weights:
        row = bucket_of(self.input_edges, input_tokens)
        if output_tokens is not None:
            cell = self.cells.get((row, bucket_of(self.output_edges, output_tokens)))
            if cell:
                return cell
        return self.rows.get(row, ())

    def pools_for(self, request_id: str, input_tokens: int, output_tokens: int | None = None) -> list[str]:
        """Pools in preference order: the one this request's id draws by weight, then the
        others by weight. Empty when the table has nothing for the bucket."""
        weights = self.weights_for(input_tokens, output_tokens)
        if not weights:
            return []
        draw = zlib.crc32(request_id.encode()) / 2**32
        chosen = weights[-1][0]
        acc = 0.0
        for pool, weight in weights:
            acc += weight
            if draw < acc:
                chosen = pool
                break
        return [chosen, *(p for p, _ in weights if p != chosen)]

    def as_dict(self) -> dict[str, Any]:
        return {
            "input_edges": list(self.input_edges),
            "output_edges": list(self.output_edges),
            "cells": [{"input": i, "output": j, "pools": dict(w)} for (i, j), w in sorted(self.cells.items())],
            "rows": [{"input": i, "pools": dict(w)} for i, w in sorted(self.rows.items())],
            "output_source": self.output_source,
        }

    @classmethod
    def from_dict(cls, raw: Any, where: str = "routing table") -> RoutingTable:
        if not isinstance(raw, Mapping):
            raise PlanError(f"{where}: expected a mapping with input_edges, output_edges, cells, rows")
        edges: list[tuple[int, ...]] = []
        for key in ("input_edges", "output_edges"):
            values = raw.get(key)
            if (not isinstance(values, list) or len(values) < 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in values)
                    or any(b <= a for a, b in zip(values, values[1:], strict=False))):
                raise PlanError(f"{where}.{key}: expected an increasing list of at least 2 token counts")
            edges.append(tuple(values))
        cells: dict[tuple[int, int], Weights] = {}
        rows: dict[int, Weights] = {}
        for kind in ("cells", "rows"):
            for n, entry in enumerate(raw.get(kind) or []):
                path = f"{where}.{kind}[{n}]"
                if not isinstance(entry, Mapping) or not isinstance(entry.get("pools"), Mapping):
                    raise PlanError(f"{path}: expected {{input, {'output, ' if kind == 'cells' else ''}pools: {{name: weight}}}}")
                pools = entry["pools"]
                if not all(isinstance(w, int | float) and not isinstance(w, bool) and w >= 0 for w in pools.values()):
                    raise PlanError(f"{path}.pools: expected non-negative weights")
                weights = _normalised({str(k): float(v) for k, v in pools.items()})
                i = entry.get("input")
                if not isinstance(i, int) or not 0 <= i < len(edges[0]) - 1:
                    raise PlanError(f"{path}.input: expected an input bucket index in [0, {len(edges[0]) - 2}]")
                if kind == "rows":
                    rows[i] = weights
                    continue
                j = entry.get("output")
                if not isinstance(j, int) or not 0 <= j < len(edges[1]) - 1:
                    raise PlanError(f"{path}.output: expected an output bucket index in [0, {len(edges[1]) - 2}]")
                cells[(i, j)] = weights
        source = raw.get("output_source", "max_output_tokens")
        if source not in OUTPUT_SOURCES:
            raise PlanError(f"{where}.output_source: expected one of {', '.join(OUTPUT_SOURCES)}, got {source!r}")
        return cls(edges[0], edges[1], cells, rows, str(source))


def table_from_plan(plan: Plan, input_edges: Sequence[int], output_edges: Sequence[int],
                    slo_class: str = "default") -> RoutingTable:
    """The plan's shares (of one SLO class's buckets) as a routing table; rows weigh each
    cell's mix by its rate. A plan with routing keys gives its keys' shares, looked up by
    the predicted output length."""
    cells: dict[tuple[int, int], Weights] = {}
    row_mix: dict[int, dict[str, float]] = {}
    if plan.key_shares is not None:
        for (klass, row, col), share in plan.key_shares.items():
            if klass == slo_class and share:
                cells[(row, col)] = _normalised(share)
        for bucket, share in zip(plan.buckets, plan.shares, strict=True):
            if bucket.rate_rps > 0 and share and bucket.slo_class == slo_class:
                mix = row_mix.setdefault(bucket.row, {})
                for pool, weight in share.items():
                    mix[pool] = mix.get(pool, 0.0) + weight * bucket.rate_rps
        rows = {i: _normalised(mix) for i, mix in row_mix.items()}
        return RoutingTable(tuple(input_edges), tuple(output_edges), cells, rows, "predicted_rank")
    for bucket, share in zip(plan.buckets, plan.shares, strict=True):
        if bucket.rate_rps <= 0 or not share or bucket.slo_class != slo_class:
            continue
        cells[(bucket.row, bucket.col)] = _normalised(share)
        mix = row_mix.setdefault(bucket.row, {})
        for pool, weight in share.items():
            mix[pool] = mix.get(pool, 0.0) + weight * bucket.rate_rps
    rows = {i: _normalised(mix) for i, mix in row_mix.items()}
    return RoutingTable(tuple(input_edges), tuple(output_edges), cells, rows)
