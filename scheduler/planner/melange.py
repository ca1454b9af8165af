"""Mélange's input format, and Mélange's own formulation as the baseline to compare with.

The format (Griggs et al., "Mélange: Cost Efficient Large Language Model Serving by
Exploiting GPU Heterogeneity", arXiv:2404.14527, and its released solver's config):

    {"gpu_info": {"A10G": {"cost": 1.01, "tputs": [[2, 1], [5, 2]]}, ...},
     "workload_distribution": [[0.2, 0.1], [0.5, 0.2]],   # share of requests per bucket
     "total_request_rate": 30,                             # req/s
     "slice_factor": 8}

`tputs[i][j]` is the max request rate one GPU sustains within the SLO for requests of
input bucket i and output bucket j. `gpu_info` may also be a list of {name, cost, tputs}.

The baseline (`melange_baseline`) is the paper's formulation: every bucket is cut into
`slice_factor` equal slices, each slice goes whole to one GPU type (a binary variable per
slice and type), the load a slice puts on a type is its rate over that type's throughput,
the loads on a type fit in its integer GPU count, and the total cost is minimised.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array

from scheduler.planner.problem import Bucket, PlanError, PlanProblem, PoolOption


@dataclass(frozen=True, slots=True)
class MelangeConfig:
    gpu_names: tuple[str, ...]
    costs: tuple[float, ...]
    tputs: tuple[tuple[tuple[float, ...], ...], ...]  # per GPU, [input][output]
    distribution: tuple[tuple[float, ...], ...]
    total_request_rate: float
    slice_factor: int


def _number(value: Any, where: str, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PlanError(f"{where}: expected a number, got {value!r}")
    if value < minimum:
        raise PlanError(f"{where}: expected a number >= {minimum}, got {value!r}")
    return float(value)


def _grid(raw: Any, where: str, shape: tuple[int, int] | None) -> tuple[tuple[float, ...], ...]:
    if not isinstance(raw, list) or not raw or not all(isinstance(r, list) and r for r in raw):
        raise PlanError(f"{where}: expected a non-empty 2-D list of numbers (rows: input buckets)")
    grid = tuple(tuple(_number(v, f"{where}[{i}][{j}]") for j, v in enumerate(row)) for i, row in enumerate(raw))
    width = len(grid[0])
    if any(len(row) != width for row in grid):
        raise PlanError(f"{where}: rows have different lengths; expected a rectangular grid")
    if shape is not None and (len(grid), width) != shape:
        raise PlanError(f"{where}: shape {len(grid)}x{width}, expected {shape[0]}x{shape[1]} "
                        f"(the workload_distribution's shape)")
    return grid


def parse_melange_config(doc: Any, source: str = "<melange config>") -> MelangeConfig:
    """Validate a parsed Mélange config; errors name `source` and the key."""
    if not isinstance(doc, Mapping):
        raise PlanError(f"{source}: expected a JSON object with gpu_info, workload_distribution, "
                        f"total_request_rate, slice_factor")
    allowed = {"gpu_info", "workload_distribution", "total_request_rate", "slice_factor", "overall_rate"}
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise PlanError(f"{source}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    for key in ("gpu_info", "workload_distribution"):
        if key not in doc:
            raise PlanError(f"{source}: {key}: required key is missing")
    distribution = _grid(doc["workload_distribution"], f"{source}: workload_distribution", None)
    shape = (len(distribution), len(distribution[0]))
    rate_key = "total_request_rate" if "total_request_rate" in doc else "overall_rate"
    if rate_key not in doc:
        raise PlanError(f"{source}: total_request_rate: required key is missing")
    rate = _number(doc[rate_key], f"{source}: {rate_key}")
    slice_factor = doc.get("slice_factor", 1)
    if isinstance(slice_factor, bool) or not isinstance(slice_factor, int) or slice_factor < 1:
        raise PlanError(f"{source}: slice_factor: expected an integer >= 1, got {slice_factor!r}")
    raw_gpus = doc["gpu_info"]
    if isinstance(raw_gpus, list):
        entries = []
        for i, entry in enumerate(raw_gpus):
            if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
                raise PlanError(f"{source}: gpu_info[{i}]: expected an object with a string 'name'")
            entries.append((entry["name"], entry, f"{source}: gpu_info[{i}]"))
    elif isinstance(raw_gpus, Mapping) and raw_gpus:
        entries = [(str(name), entry, f"{source}: gpu_info.{name}") for name, entry in raw_gpus.items()]
    else:
        raise PlanError(f"{source}: gpu_info: expected a non-empty object of GPU name -> {{cost, tputs}}")
    names, costs, tputs = [], [], []
    for name, entry, where in entries:
        if not isinstance(entry, Mapping):
            raise PlanError(f"{where}: expected an object with cost and tputs")
        for key in ("cost", "tputs"):
            if key not in entry:
                raise PlanError(f"{where}.{key}: required key is missing")
        names.append(name)
        costs.append(_number(entry["cost"], f"{where}.cost"))
        tputs.append(_grid(entry["tputs"], f"{where}.tputs", shape))
    if len(set(names)) != len(names):
        raise PlanError(f"{source}: gpu_info: duplicate GPU names")
    return MelangeConfig(tuple(names), tuple(costs), tuple(tputs), distribution, rate, slice_factor)


def melange_problem(config: MelangeConfig, headroom_fraction: float = 0.0,
                    continuous: bool = False) -> PlanProblem:
    """The config as a planner problem: one pool per GPU (tp 1), buckets indexed by grid cell
    (token edges are the cell indices: Mélange's format carries no token boundaries).

    Shares come in the config's slices (Mélange's granularity), or with `continuous` as any
    fraction: a relaxation, never costlier, which may plan a pool at exactly 100% load."""
    rows, cols = len(config.distribution), len(config.distribution[0])
    buckets = tuple(
        Bucket(i, j, i, i + 1, j, j + 1, config.distribution[i][j] * config.total_request_rate)
        for i in range(rows) for j in range(cols)
    )
    options = tuple(
        PoolOption(name, name, 1, cost, tuple(tput[i][j] for i in range(rows) for j in range(cols)))
        for name, cost, tput in zip(config.gpu_names, config.costs, config.tputs, strict=True)
    )
    return PlanProblem(buckets, options, headroom_fraction=headroom_fraction,
                       slice_factor=None if continuous else config.slice_factor)


@dataclass(frozen=True, slots=True)
class BaselineResult:
    counts: dict[str, int]
    usd_per_hour: float
    solve_s: float


def melange_baseline(config: MelangeConfig, time_limit_s: float = 60.0) -> BaselineResult:
    """Mélange's slice formulation (see the module docstring), solved with HiGHS."""
    started = time.perf_counter()
    g_count = len(config.gpu_names)
    slices: list[tuple[float, list[float]]] = []  # (rate, load per unit rate on each GPU)
    for i, row in enumerate(config.distribution):
        for j, share in enumerate(row):
            rate = share * config.total_request_rate / config.slice_factor
            if rate <= 0:
                continue
            per_rate = [1.0 / t[i][j] if t[i][j] > 0 else math.inf for t in config.tputs]
            if all(math.isinf(v) for v in per_rate):
                raise PlanError(f"bucket [{i}][{j}]: no GPU has a positive throughput for it")
            slices.extend((rate, per_rate) for _ in range(config.slice_factor))
    if not slices:
        raise PlanError("workload: empty (total request rate is 0)")
    width = g_count + len(slices) * g_count
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    lower: list[float] = []
    upper: list[float] = []
    x_upper = np.ones(width)
    for s, (_, per_rate) in enumerate(slices):
        for g in range(g_count):
            rows.append(s)
            cols.append(g_count + s * g_count + g)
            vals.append(1.0)
            if math.isinf(per_rate[g]):
                x_upper[g_count + s * g_count + g] = 0.0
        lower.append(1.0)
        upper.append(1.0)
    for g in range(g_count):
        r = len(slices) + g
        for s, (rate, per_rate) in enumerate(slices):
            if not math.isinf(per_rate[g]):
                rows.append(r)
                cols.append(g_count + s * g_count + g)
                vals.append(rate * per_rate[g])
        rows.append(r)
        cols.append(g)
        vals.append(-1.0)
        lower.append(-np.inf)
        upper.append(0.0)
    x_upper[:g_count] = np.inf
    matrix = coo_array((vals, (rows, cols)), shape=(len(lower), width)).tocsr()
    cost = np.zeros(width)
    cost[:g_count] = config.costs
    result = milp(cost, integrality=np.ones(width), bounds=Bounds(np.zeros(width), x_upper),
                  constraints=[LinearConstraint(matrix, np.array(lower), np.array(upper))],
                  options={"time_limit": time_limit_s, "disp": False})
    if result.x is None:
        raise PlanError(f"melange baseline: no solution ({result.message})")
    counts = {name: int(round(result.x[g])) for g, name in enumerate(config.gpu_names)}
    total = sum(counts[n] * c for n, c in zip(config.gpu_names, config.costs, strict=True))
    return BaselineResult(counts, total, time.perf_counter() - started)
