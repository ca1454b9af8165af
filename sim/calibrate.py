"""Engine model calibration against real measurements, and `tokenyard model predict`.

Reads the public performance data in `shared/data/perf` (see its MANIFEST.md):

- Vidur per-layer operator profiles (`vidur/profiling/compute/<gpu>/<model>/mlp.csv`):
  the four projection GEMMs of one layer (attn_pre_proj, attn_post_proj, mlp_up_proj,
  mlp_down_proj) vs tokens and tensor parallelism -> quantity `linear_op_time`.
- Vidur all-reduce profiles (`vidur/profiling/network/<gpu>_dgx/all_reduce.csv`, one node)
  -> quantity `allreduce_time`.
- Splitwise's measured performance model (`splitwise_sim/perf_model.csv`): Llama2-70B and
  BLOOM-176B with TP on A100/H100 -> `prefill_time` (a batch of prompts in one iteration)
  and `decode_time_per_token` (mean over the generation, so at the mean context).
- TensorRT-LLM's published max-throughput tables (`derived_trtllm_throughput.csv`): a
  secondary check only (another engine, FP8), never fitted; see `trtllm_observations`.

Each GPU type with measurements (A100-80GB, H100-80GB) gets its own `PerfFactors`, fitted by
scipy least squares on log(predicted / measured) with a robust loss; GPU types on the same chip
(H200, A100-40GB) take that chip's fit, and the fallback `"*"` for the others (A10G, L4,
L40S) is the mean of the fits. Configurations are split deterministically:
every k-th configuration of each source (sorted by its key) is held out of the fit, except
ML.ENERGY (held out by whole model) and Splitwise (by whole (model, TP) configuration), and
the error table reports train and held-out errors separately. Splitwise's older engine gets
its own CPU overheads and a large-iteration step (`ENGINE_SPECIFIC_BOUNDS`), fitted alongside
and recorded under `engine_specific`, never packaged as a GPU's factors; prefill attention
efficiency is held per chip at published FlashAttention-2 figures (`CHIP_FIXED_FACTORS`).

The file written (`scheduler/perf_factors.json` by default) is what `EngineModel` loads.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from scheduler.catalog import (
    Catalog,
    CatalogError,
    GpuSpec,
    ModelSpec,
    default_catalog,
    tensor_parallel_problem,
)
from scheduler.engine_model import BatchShape, EngineModel, PerfFactors
from sim.calibrate_data import FitResult, Observation, read_csv
from sim.calibrate_report import format_error_table, format_factors, plot_fit

__all__ = ["format_error_table", "format_factors", "plot_fit"]  # re-exported: bench/ and tests use them here

log = logging.getLogger(__name__)

HELD_OUT_EVERY = 4  # every 4th configuration of a source (sorted by key) is held out

# Vidur and Splitwise folder / column names -> catalog names.
VIDUR_GPUS = {"a100": "A100-80GB", "h100": "H100-80GB"}  # a40: not in the catalog
VIDUR_MODELS = {
    "Llama-2-7b-hf": "llama-2-7b",
    "Llama-2-70b-hf": "llama-2-70b",
    "Meta-Llama-3-8B": "llama-3-8b",
    "Meta-Llama-3-70B": "llama-3-70b",
    "CodeLlama-34b-Instruct-hf": "codellama-34b",
    "phi-2": "phi-2",
}
VIDUR_LINEAR_OPS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj")
SPLITWISE_GPUS = {"a100-80gb": "A100-80GB", "h100-80gb": "H100-80GB"}  # h100-80gb-pcap: power-capped
SPLITWISE_MODELS = {"llama2-70b": "llama-2-70b", "bloom-176b": "bloom-176b"}
TRTLLM_GPUS = {"H100": "H100-80GB", "H200": "H200"}
TRTLLM_MODELS = {"Llama 3.1 8B": "llama-3-8b", "Llama 3.3 70B": "llama-3-70b", "Llama 3.1 405B": "llama-3.1-405b"}
# Assumption for the TensorRT-LLM check: the batch is bounded by the KV cache and by this cap
# (trtllm-bench's default maximum batch size).
TRTLLM_MAX_BATCH = 2048

# Factors fitted, with bounds; the rest keep their defaults.
FIT_BOUNDS: dict[str, tuple[float, float]] = {
    "compute_efficiency": (0.05, 1.0),
    "memory_efficiency": (0.05, 1.0),
    "attention_efficiency": (0.02, 1.0),
    "prefill_attention_efficiency": (0.02, 1.0),
    "per_seq_overhead_s": (1e-8, 2e-3),
    "allreduce_latency_s": (1e-7, 2e-4),
    "interconnect_efficiency": (0.05, 1.0),
    "roofline_overlap_loss": (1e-4, 1.0),
    "layer_overhead_s": (1e-8, 2e-3),
    "unsharded_s_per_token_layer": (1e-10, 1e-5),
    "tp_sync_s_per_layer": (1e-8, 1e-3),
    "sampling_s_per_vocab_seq": (1e-13, 1e-8),
}
# The CPU overheads are the engine's, not the GPU's: Splitwise measured an older engine
# (eager mode, per-sequence Python sampling) than the vLLM ML.ENERGY ran. Its observations
# get their own overhead factors, fitted alongside and then dropped; the packaged factors
# keep those of the current engine (ML.ENERGY's vLLM). Without that split, the fit either
# carries Splitwise's ~0.27 ms per sequence into today's engine (1.5-2x too slow at batch
# 500+) or misfits Splitwise.
ENGINE_SPECIFIC_SOURCES = ("splitwise",)
ENGINE_SPECIFIC_BOUNDS: dict[str, tuple[float, float]] = {
    "per_seq_overhead_s": (1e-7, 2e-3),
    "layer_overhead_s": (1e-7, 2e-3),
    # Splitwise's engine gets dearer per token above a few thousand tokens per iteration
    # (PerfFactors.large_step_s_per_token_layer); Vidur's GEMM profiles show no such step and
    # no measurement of a current engine has iterations that large, so it is fitted for
    # Splitwise's engine only and the packaged factors keep 0.
    "large_step_s_per_token_layer": (1e-10, 1e-5),
    "large_step_knee_tokens": (256.0, 65536.0),
}
# Factors held fixed. A fixed cost per iteration and one per layer are nearly collinear in
# this data (Splitwise: only 70- and 80-layer models); left free, the A100 fit took the first
# and the H100 fit the second, and small models came out slower on H100 than on A100. The
# per-layer form is what eager-mode launches cost and extrapolates sensibly to shallower
# models; the per-iteration part (scheduling, sampling setup) is fixed at a typical 2 ms.
FIXED_FACTORS: dict[str, float] = {"iteration_overhead_s": 0.002}
# Factors held per chip at published kernel figures instead of fitted. Prefill attention
# efficiency: FlashAttention-2's forward pass reaches ~190-200 TFLOP/s of A100's 312 with a
# causal mask at head dim 128 (Dao 2023, fig. 5), and "only 35% utilization" on H100 (Shah et
# al. 2024, FlashAttention-3). Fitted, it trades off against the prefill terms the data do
# pin down: Splitwise's prompts of 128-8,192 tokens leave attention a few % of the step, and
# the fit drove H100's to 0.16, which charged a 16k prompt's attention at twice its real cost.
CHIP_FIXED_FACTORS: dict[str, dict[str, float]] = {
    "A100-80GB": {"prefill_attention_efficiency": 0.62},
    "H100-80GB": {"prefill_attention_efficiency": 0.35},
}
ENGINE_SPECIFIC_FIXED: dict[str, float] = {"iteration_overhead_s": 0.002}

# GPU types without measurements of their own that share the chip (and its efficiencies) of
# a measured one are fitted together with it and take its fit: H200 is GH100 with more and
# faster HBM, A100-40GB is GA100 (its ML.ENERGY runs and the A100-80GB profiles fit one chip).
SAME_SILICON: dict[str, str] = {"H200": "H100-80GB", "A100-40GB": "A100-80GB"}


def chip_of(gpu: str) -> str:
    return SAME_SILICON.get(gpu, gpu)


# Relative weight of each quantity in the fit (each quantity's residuals are also divided by
# sqrt(count), so that the ~5000 operator profiles do not drown the ~60 end-to-end figures).
QUANTITY_WEIGHTS = {
    "serving_tpot": 3.0,
    "prefill_time": 2.0,
    "decode_time_per_token": 1.0,
    "linear_op_time": 0.5,
    "allreduce_time": 0.3,
}


def default_data_dir() -> Path:
    env = os.environ.get("TOKENYARD_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


# ---------------------------------------------------------------------------------------
# Loading


def split_held_out(observations: list[Observation], fold: int = HELD_OUT_EVERY - 1) -> list[Observation]:
    """Mark every HELD_OUT_EVERY-th configuration of each (source, quantity), sorted by key,
    starting at `fold`, as held out. TensorRT-LLM figures are always held out (never fitted)."""
    if not 0 <= fold < HELD_OUT_EVERY:
        raise ValueError(f"fold must be in 0..{HELD_OUT_EVERY - 1}, got {fold}")
    groups: dict[tuple[str, str], list[Observation]] = defaultdict(list)
    for obs in observations:
        groups[(obs.source, obs.quantity)].append(obs)
    marked: list[Observation] = []
    for (source, _), members in groups.items():
        if any(o.group for o in members):
            # Whole groups (models) held out: the check is on models the fit never saw.
            names = sorted({o.group for o in members})
            out = {name for i, name in enumerate(names) if i % HELD_OUT_EVERY == fold}
            marked.extend(replace(o, held_out=o.group in out) for o in members)
            continue
        ordered = sorted(members, key=lambda o: o.key)
        marked.extend(
            replace(o, held_out=source == "trtllm" or i % HELD_OUT_EVERY == fold) for i, o in enumerate(ordered)
        )
    return marked


def vidur_compute_observations(data_dir: Path) -> list[Observation]:
    base = data_dir / "perf" / "vidur" / "profiling" / "compute"
    samples: dict[tuple[str, str, int, int], list[float]] = defaultdict(list)
    for gpu_dir, gpu in VIDUR_GPUS.items():
        for path in sorted((base / gpu_dir).glob("*/*/mlp.csv")):
            model = VIDUR_MODELS.get(path.parent.name)
            if model is None:
                continue
            columns = [f"time_stats.{op}.median" for op in VIDUR_LINEAR_OPS]
            for row in read_csv(path, [*columns, "num_tensor_parallel_workers", "num_tokens"]):
                ms = sum(float(row[f"time_stats.{op}.median"]) for op in VIDUR_LINEAR_OPS)
                key = (gpu, model, int(row["num_tensor_parallel_workers"]), int(row["num_tokens"]))
                samples[key].append(ms / 1e3)
    observations = [
        Observation(
            source="vidur", quantity="linear_op_time", gpu=gpu, model=model, tp=tp,
            key=f"{gpu} {model} tp{tp} tokens={tokens:05d}", measured=statistics.median(values),
            num_tokens=tokens,
        )
        for (gpu, model, tp, tokens), values in samples.items()
    ]
    return observations


def vidur_network_observations(data_dir: Path) -> list[Observation]:
    base = data_dir / "perf" / "vidur" / "profiling" / "network"
    observations = []
    for gpu_dir, gpu in VIDUR_GPUS.items():
        path = base / f"{gpu_dir}_dgx" / "all_reduce.csv"
        if not path.exists():
            continue
        samples: dict[tuple[int, int], list[float]] = defaultdict(list)
        for row in read_csv(path, ["num_workers", "devices_per_node", "size", "time_stats.all_reduce.median"]):
            workers = int(row["num_workers"])
            # One node only: TP across nodes is not what an engine instance does.
            if workers != int(row["devices_per_node"]) or workers < 2:
                continue
            samples[(workers, int(row["size"]))].append(float(row["time_stats.all_reduce.median"]) / 1e3)
        for (workers, size), values in samples.items():
            observations.append(Observation(
                source="vidur", quantity="allreduce_time", gpu=gpu, model="", tp=workers,
                key=f"{gpu} allreduce tp{workers} bytes={size:010d}", measured=statistics.median(values),
                num_bytes=size,
            ))
    return observations


def splitwise_observations(data_dir: Path) -> list[Observation]:
    rows = read_csv(
        data_dir / "perf" / "splitwise_sim" / "perf_model.csv",
        ["model", "hardware", "tensor_parallel", "prompt_size", "batch_size", "token_size", "prompt_time", "token_time"],
    )
    prefill: dict[tuple[str, str, int, int, int], list[float]] = defaultdict(list)
    decode: dict[tuple[str, str, int, int, int, int], list[float]] = defaultdict(list)
    for row in rows:
        gpu = SPLITWISE_GPUS.get(row["hardware"])
        model = SPLITWISE_MODELS.get(row["model"])
        if gpu is None or model is None:
            continue
        tp = int(row["tensor_parallel"])
        prompt, batch, output = int(row["prompt_size"]), int(row["batch_size"]), int(row["token_size"])
        prefill[(gpu, model, tp, prompt, batch)].append(float(row["prompt_time"]) / 1e3)
        decode[(gpu, model, tp, prompt, batch, output)].append(float(row["token_time"]) / 1e3)
    prefill_obs = [
        Observation(
            source="splitwise", quantity="prefill_time", gpu=gpu, model=model, tp=tp,
            key=f"{gpu} {model} tp{tp} prompt={prompt:05d} batch={batch:03d}",
            measured=statistics.median(values), prompt_tokens=prompt, batch_size=batch,
            group=f"{model} tp{tp}",
        )
        for (gpu, model, tp, prompt, batch), values in prefill.items()
    ]
    decode_obs = [
        Observation(
            source="splitwise", quantity="decode_time_per_token", gpu=gpu, model=model, tp=tp,
            key=f"{gpu} {model} tp{tp} prompt={prompt:05d} batch={batch:03d} out={output:05d}",
            # The mean over a generation of `output` tokens is at the mean context, because
            # the step time is linear in context (EngineModel.decode_step_linear_s).
            measured=statistics.median(values), prompt_tokens=prompt, batch_size=batch,
            context_tokens=prompt + output // 2, output_tokens=output, group=f"{model} tp{tp}",
        )
        for (gpu, model, tp, prompt, batch, output), values in decode.items()
    ]
    return prefill_obs + decode_obs


def trtllm_observations(data_dir: Path) -> list[Observation]:
    """TensorRT-LLM max-throughput figures usable as a check: H100/H200, FP8 or BF16, and a
    model whose architecture is in the catalog (Llama 3.1/3.3 share Llama 3's layers)."""
    rows = read_csv(
        data_dir / "perf" / "trtllm_perf_overview" / "derived_trtllm_throughput.csv",
        ["model", "gpu", "tp", "pp", "precision", "isl", "osl", "total_output_tok_per_s"],
    )
    observations = []
    for row in rows:
        gpu = TRTLLM_GPUS.get(row["gpu"])
        model = TRTLLM_MODELS.get(row["model"])
        if gpu is None or model is None or row["precision"] not in ("FP8", "BF16") or row["pp"] != "1":
            continue
        isl, osl = int(row["isl"]), int(row["osl"])
        observations.append(Observation(
            source="trtllm", quantity="throughput", gpu=gpu, model=f"{model}:{row['precision'].lower()}",
            tp=int(row["tp"]), key=f"{gpu} {model} tp{row['tp']} {row['precision']} isl={isl} osl={osl}",
            measured=float(row["total_output_tok_per_s"]), prompt_tokens=isl, output_tokens=osl,
            held_out=True,
        ))
    return observations


def mlenergy_observations(data_dir: Path, catalog: Catalog | None = None) -> list[Observation]:
    """ML.ENERGY serving runs (sim/calibrate_mlenergy.py): mean TPOT at the mean running batch,
    cross-validated by model."""
    from sim.calibrate_mlenergy import mlenergy_rows

    observations = []
    for row in mlenergy_rows(data_dir, catalog or default_catalog()):
        observations.append(Observation(
            source="mlenergy", quantity="serving_tpot", gpu=str(row["gpu"]), model=str(row["model"]),
            tp=int(row["tp"]), key=f"{row['task']} {row['gpu']} {row['model']} tp{row['tp']} bs={row['max_batch']:05d}",
            measured=float(row["tpot_s"]), prompt_tokens=int(row["prompt_tokens"]),
            output_tokens=float(row["output_tokens"]), running_seqs=float(row["running_seqs"]),
            group=str(row["model"]),
        ))
    return observations


def load_observations(data_dir: Path, fold: int = HELD_OUT_EVERY - 1) -> list[Observation]:
    """All observations of all sources, split by `split_held_out(..., fold)`; a missing file
    is a FileNotFoundError naming it."""
    return split_held_out(
        vidur_compute_observations(data_dir)
        + vidur_network_observations(data_dir)
        + splitwise_observations(data_dir)
        + trtllm_observations(data_dir)
        + mlenergy_observations(data_dir),
        fold,
    )


# ---------------------------------------------------------------------------------------
# Prediction


def _precision_variant(gpu: GpuSpec, model: ModelSpec, precision: str) -> tuple[GpuSpec, ModelSpec]:
    if precision == "fp8":
        # Hopper's FP8 tensor cores double the bf16 peak; weights and KV cache take 1 byte.
        return replace(gpu, bf16_tflops=gpu.bf16_tflops * 2), replace(model, dtype_bytes=1)
    return gpu, model


class Predictor:
    """Predicts observations with one set of factors; caches an EngineModel per configuration."""

    def __init__(self, catalog: Catalog, factors: PerfFactors) -> None:
        self.catalog = catalog
        self.factors = factors
        self._engines: dict[tuple[str, str, int], EngineModel] = {}

    def engine(self, gpu: str, model: str, tp: int) -> EngineModel:
        cache_key = (gpu, model, tp)
        found = self._engines.get(cache_key)
        if found is None:
            name, _, precision = model.partition(":")
            gpu_spec = self.catalog.gpu(gpu)
            # All-reduce observations name no model; allreduce_time_s does not depend on it.
            model_spec = self.catalog.model(name or "llama-2-7b")
            gpu_spec, model_spec = _precision_variant(gpu_spec, model_spec, precision)
            found = EngineModel(gpu_spec, model_spec, tp=tp, factors=self.factors)
            self._engines[cache_key] = found
        return found

    def predict(self, obs: Observation) -> float:
        engine = self.engine(obs.gpu, obs.model, obs.tp)
        if obs.quantity == "linear_op_time":
            return engine.linear_time_per_layer_s(obs.num_tokens)
        if obs.quantity == "allreduce_time":
            return engine.allreduce_time_s(obs.num_bytes)
        if obs.quantity == "prefill_time":
            if obs.source == "splitwise":
                return splitwise_prefill_time_s(engine, obs.prompt_tokens, obs.batch_size)
            return engine.prefill_time_s(obs.prompt_tokens, obs.batch_size)
        if obs.quantity == "decode_time_per_token":
            return engine.decode_time_per_token_s(obs.batch_size, obs.context_tokens)
        if obs.quantity == "throughput":
            return modelled_max_throughput(engine, obs.prompt_tokens, int(obs.output_tokens))
        if obs.quantity == "serving_tpot":
            return engine.serving_tpot_s(obs.running_seqs, obs.prompt_tokens, obs.output_tokens)
        raise ValueError(f"unknown quantity {obs.quantity!r}")


def splitwise_prefill_time_s(engine: EngineModel, prompt_tokens: int, batch_size: int) -> float:
    """Splitwise's engine prefills a batch of B prompts like one causal sequence of B x P
    tokens: its times for (P, B) track those of a single prompt of B x P tokens (within the
    per-sequence overhead), far above what block-diagonal attention over B prompts costs.
    So its attention work is that of the concatenated sequence."""
    tokens = prompt_tokens * batch_size
    return engine.iteration_time_s(
        prefill_tokens=tokens,
        prefill_attention_pairs=BatchShape.prefill_pairs(tokens, 0),
        prefill_seqs=batch_size,
    )


def modelled_max_throughput(engine: EngineModel, input_tokens: int, output_tokens: int) -> float:
    """Output tokens/s of an offline run at the largest batch the KV cache holds.

    A batch of B requests costs one prefill of B prompts plus `output_tokens` decode steps of
    B sequences at the mean context; B = KV tokens / tokens per request, capped.
    """
    per_request = input_tokens + output_tokens
    batch = min(engine.kv_capacity_tokens() // per_request, TRTLLM_MAX_BATCH)
    if batch < 1:
        return 0.0
    seconds = engine.prefill_time_s(input_tokens, batch) + output_tokens * engine.decode_time_per_token_s(
        batch, input_tokens + output_tokens // 2
    )
    return batch * output_tokens / seconds


# ---------------------------------------------------------------------------------------
# Fitting


# CPU-side factors are the engine's, not the chip's (the ML.ENERGY runs used one vLLM on A100
# and H100): after a first fit per chip they are averaged over the chips and held there
# while each chip's hardware factors are refitted. Left per chip, the H100 fit took a larger
# per-layer cost than the A100 one and small models came out slower on H100.
SHARED_ENGINE_FACTORS = ("per_seq_overhead_s", "layer_overhead_s", "sampling_s_per_vocab_seq")


@dataclass(frozen=True, slots=True)
class FitShape:
    """Which model-shape choices a fit makes (`bench/engine_model.py --ablation` compares
    them): the large-iteration step for Splitwise's engine, and prefill attention efficiency
    held per chip at published figures (else fitted, as before issue 10's second round)."""

    large_step: bool = True
    hold_attention: bool = True

    def own_bounds(self) -> dict[str, tuple[float, float]]:
        """The factors fitted for ENGINE_SPECIFIC_SOURCES' engine, with bounds."""
        return {name: bound for name, bound in ENGINE_SPECIFIC_BOUNDS.items()
                if self.large_step or not name.startswith("large_step_")}

    def held_for(self, chip: str) -> dict[str, float]:
        return dict(CHIP_FIXED_FACTORS.get(chip, {})) if self.hold_attention else {}


def _factors_from_vector(
    vector: Sequence[float], names: Sequence[str], held: dict[str, float], own_names: Sequence[str]
) -> tuple[PerfFactors, PerfFactors]:
    """(current-engine factors, engine-specific factors for ENGINE_SPECIFIC_SOURCES)."""
    fitted = {name: math.exp(v) for name, v in zip(names, vector[: len(names)], strict=True)}
    own = {name: math.exp(v) for name, v in zip(own_names, vector[len(names):], strict=True)}
    current = PerfFactors(**{**FIXED_FACTORS, **held, **fitted})
    return current, replace(current, **{**ENGINE_SPECIFIC_FIXED, **own})


def fit_gpu(
    catalog: Catalog,
    train: list[Observation],
    start: PerfFactors | None = None,
    on_evaluation: Callable[[float], None] | None = None,
    held: dict[str, float] | None = None,
    own_bounds: Mapping[str, tuple[float, float]] | None = None,
) -> tuple[PerfFactors, PerfFactors, float]:
    """Least squares on the log ratio predicted / measured of one chip's observations;
    returns the current-engine factors, those of ENGINE_SPECIFIC_SOURCES, and the cost.
    `held`: factors kept at the given values instead of fitted; `own_bounds`: the factors
    fitted for ENGINE_SPECIFIC_SOURCES' engine (default ENGINE_SPECIFIC_BOUNDS)."""
    import numpy as np
    from scipy.optimize import least_squares

    counts: dict[str, int] = defaultdict(int)
    for obs in train:
        counts[obs.quantity] += 1
    weights = np.array([QUANTITY_WEIGHTS.get(o.quantity, 1.0) / math.sqrt(counts[o.quantity]) for o in train])
    log_measured = np.log([o.measured for o in train])
    own_source = [o.source in ENGINE_SPECIFIC_SOURCES for o in train]
    start = start or PerfFactors()
    held = held or {}
    own_bounds = dict(ENGINE_SPECIFIC_BOUNDS if own_bounds is None else own_bounds)
    own_names = list(own_bounds)
    fit_names = [n for n in FIT_BOUNDS if n not in held]
    bounds = [*(FIT_BOUNDS[n] for n in fit_names), *own_bounds.values()]
    names = [*fit_names, *own_names]
    lower = np.log([b[0] for b in bounds])
    upper = np.log([b[1] for b in bounds])
    x0 = np.clip(np.log([max(getattr(start, name), bound[0] * 10) for name, bound in zip(names, bounds, strict=True)]),
                 lower, upper)

    def residuals(vector: Any) -> Any:
        current, own = _factors_from_vector(vector, fit_names, held, own_names)
        predictor, own_predictor = Predictor(catalog, current), Predictor(catalog, own)
        predicted = np.array([
            (own_predictor if is_own else predictor).predict(o) for o, is_own in zip(train, own_source, strict=True)
        ])
        result = weights * (np.log(np.maximum(predicted, 1e-12)) - log_measured)
        if on_evaluation is not None:
            on_evaluation(float(np.sum(result**2)))
        return result

    # soft_l1: a few broken measurements (Splitwise's A100 TP2 batch-64 prefill is faster than
    # batch 32) must not pull the fit; f_scale is about a 10% log error after weighting.
    solution = least_squares(
        residuals, x0, bounds=(lower, upper), loss="soft_l1", f_scale=0.1 / math.sqrt(len(train)),
        x_scale=1.0, max_nfev=400,
    )
    current, own = _factors_from_vector(solution.x, fit_names, held, own_names)
    return current, own, float(solution.cost)


def mean_factors(factors: Iterable[PerfFactors]) -> PerfFactors:
    """Arithmetic mean per factor: the fallback for GPU types without measurements. (Not the
    geometric mean: a factor one fit pins at its lower bound would drag it towards zero.)"""
    table = [f.as_dict() for f in factors]
    if not table:
        return PerfFactors()
    return PerfFactors(**{name: statistics.fmean(row[name] for row in table) for name in table[0]})


def calibrate(
    data_dir: Path, catalog: Catalog | None = None, progress: bool = True, fold: int = HELD_OUT_EVERY - 1,
    shape: FitShape | None = None,
) -> FitResult:
    """Fit factors per GPU type on the training split; predict every observation.

    `fold` picks which of the HELD_OUT_EVERY interleaved splits is held out (cross-validation);
    `shape` the model-shape choices (default: all of them, what is packaged).
    """
    shape = shape or FitShape()
    own_bounds = shape.own_bounds()
    from tqdm import tqdm

    catalog = catalog or default_catalog()
    observations = load_observations(data_dir, fold)
    if not observations:
        raise ValueError(f"{data_dir}/perf: no usable measurements found")
    costs: dict[str, float] = {}
    chips = sorted({chip_of(o.gpu) for o in observations if o.source != "trtllm"})
    train = {c: [o for o in observations if chip_of(o.gpu) == c and not o.held_out and o.source != "trtllm"]
             for c in chips}
    fitted: dict[str, PerfFactors] = {}
    own: dict[str, PerfFactors] = {}
    for chip in chips:
        with tqdm(desc=f"fit {chip}", unit="eval", disable=not progress, file=sys.stderr) as bar:
            def on_evaluation(cost: float, bar: Any = bar) -> None:
                bar.update(1)
                bar.set_postfix(cost=f"{cost:.4g}", refresh=False)

            fitted[chip], own[chip], costs[chip] = fit_gpu(catalog, train[chip], on_evaluation=on_evaluation,
                                                           held=shape.held_for(chip), own_bounds=own_bounds)
    if len(chips) > 1:
        shared = {n: statistics.fmean(getattr(fitted[c], n) for c in chips) for n in SHARED_ENGINE_FACTORS}
        for chip in chips:
            with tqdm(desc=f"refit {chip}", unit="eval", disable=not progress, file=sys.stderr) as bar:
                def on_refit(cost: float, bar: Any = bar) -> None:
                    bar.update(1)
                    bar.set_postfix(cost=f"{cost:.4g}", refresh=False)

                fitted[chip], own[chip], costs[chip] = fit_gpu(
                    catalog, train[chip], start=fitted[chip], on_evaluation=on_refit,
                    held={**shape.held_for(chip), **shared}, own_bounds=own_bounds)
    for chip in chips:
        log.info("fitted perf factors", extra={"gpu": chip, "train_configs": len(train[chip]), **fitted[chip].as_dict()})
    fitted["*"] = mean_factors(fitted[g] for g in chips)
    own["*"] = mean_factors(own[g] for g in chips)
    for gpu, source in SAME_SILICON.items():
        if source in fitted:
            fitted[gpu], own[gpu] = fitted[source], own[source]
    predictors = {name: Predictor(catalog, f) for name, f in fitted.items()}
    own_predictors = {name: Predictor(catalog, f) for name, f in own.items()}
    predictions = []
    for obs in observations:
        table = own_predictors if obs.source in ENGINE_SPECIFIC_SOURCES else predictors
        predictions.append(table.get(obs.gpu, table["*"]).predict(obs))
    return FitResult(fitted, observations, predictions, costs, own)


# ---------------------------------------------------------------------------------------
# Output


def factors_document(result: FitResult, data_dir: Path) -> dict[str, Any]:
    return {
        "comment": "Fitted by `tokenyard calibrate` (sim/calibrate.py) to shared/data/perf; "
                   "'default' (mean of the fits) serves GPU types without measurements; "
                   "'same_silicon' lists GPU types that take the fit of the same chip.",
        "same_silicon": {gpu: source for gpu, source in SAME_SILICON.items() if source in result.factors},
        "held_out_every": HELD_OUT_EVERY,
        "gpus": {name: f.as_dict() for name, f in sorted(result.factors.items()) if name != "*"},
        "default": result.factors["*"].as_dict(),
        # The older engine Splitwise measured (its own CPU overheads and large-iteration step),
        # fitted alongside the hardware factors: for reference, never loaded as a GPU's factors.
        "engine_specific": {
            source: {name: f.as_dict() for name, f in sorted(result.engine_specific.items())
                     if name != "*" and name not in SAME_SILICON}
            for source in ENGINE_SPECIFIC_SOURCES
        },
        "errors": result.errors(),
    }


def write_json_atomically(path: Path, document: dict[str, Any]) -> None:
    """Write to a temporary file in the same folder, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as out:
            json.dump(document, out, indent=2, sort_keys=False)
            out.write("\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------
# CLI


def _load_catalog(args: argparse.Namespace) -> Catalog:
    from scheduler.catalog import extend_catalog
    from tokenyard.config import load_yaml

    catalog = default_catalog()
    if getattr(args, "catalog", None):
        catalog = extend_catalog(catalog, load_yaml(args.catalog), source=str(args.catalog))
    if getattr(args, "hf_config", None):
        from scheduler.catalog import model_from_hf_config

        path = Path(args.hf_config)
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CatalogError(f"{path}: cannot read a HuggingFace config.json: {exc}") from exc
        catalog.add_model(model_from_hf_config(args.model, config, where=str(path)))
    return catalog


def _cmd_calibrate_from(args: argparse.Namespace) -> int:
    """`tokenyard calibrate --from PATH ... --gpu G --model M [--tp N]`: one deployment's fit."""
    from scheduler.engine_model import factors_for
    from sim.calibrate_from import (
        CalibrationDataError,
        factors_file_document,
        fit_deployment,
        format_fit,
        read_samples,
    )

    if not args.gpu or not args.model:
        print("error: --from needs the deployment it measured: --gpu and --model (and --tp if not 1)", file=sys.stderr)
        return 2
    tp = 1 if args.tp is None else args.tp
    if tp < 1:
        print(f"error: --tp must be >= 1, got {tp}", file=sys.stderr)
        return 2
    try:
        catalog = default_catalog()
        gpu, model = catalog.gpu(args.gpu), catalog.model(args.model)
        tp_problem = tensor_parallel_problem(model, tp)
        if tp_problem:
            raise CatalogError(f"--tp: {tp_problem}")
        engine = EngineModel(gpu, model, tp=tp, factors=factors_for(gpu))
        samples = [s for path in args.from_paths for s in read_samples(Path(path))]
        fit = fit_deployment(engine, samples)
    except (CatalogError, CalibrationDataError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from scheduler.engine_model import fitted_factors

    document = factors_file_document(fit, engine, args.from_paths, fitted_factors()["*"])
    if args.write:
        write_json_atomically(Path(args.write), document)
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(format_fit(fit, engine.name))
        if args.write:
            print(f"wrote {args.write} (use it with --factors)")
    return 0


def _calibrate_usage_error(args: argparse.Namespace) -> str | None:
    """Flag combinations that would be silently ignored, and outputs that cannot be
    written (refused before the fit, not after it)."""
    from sim.report import check_output_path

    if args.from_paths:
        stray = [flag for flag, value in (("--data", args.data), ("--plot", args.plot)) if value]
        if stray:
            return (f"{', '.join(stray)}: not with --from (--from fits one deployment from its own measurements; "
                    "--data and --plot belong to the fit on the shared data)")
    else:
        stray = [flag for flag, value in (("--gpu", args.gpu), ("--model", args.model), ("--tp", args.tp))
                 if value is not None]
        if stray:
            return (f"{', '.join(stray)}: only with --from PATH (they name the deployment it measured); without "
                    "--from, calibrate fits every GPU type of the shared data")
    try:
        if args.write:
            check_output_path(args.write, "--write")
        if args.plot:
            check_output_path(args.plot, "--plot")
    except ValueError as exc:
        return str(exc)
    return None


def _cmd_calibrate(args: argparse.Namespace) -> int:
    problem = _calibrate_usage_error(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.from_paths:
        return _cmd_calibrate_from(args)
    data_dir = Path(args.data) if args.data else default_data_dir()
    if not (data_dir / "perf").is_dir():
        print(f"error: {data_dir}/perf: no such folder (expected shared/data with perf/; "
              "set --data or TOKENYARD_SHARED_DATA)", file=sys.stderr)
        return 2
    try:
        result = calibrate(data_dir, progress=not args.json)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    document = factors_document(result, data_dir)
    if args.write:
        write_json_atomically(Path(args.write), document)
    if args.plot:
        plot_fit(result, Path(args.plot))
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(format_error_table(result.errors()))
        print()
        print(format_factors(result.factors))
        if args.write:
            print(f"\nwrote {args.write}")
        if args.plot:
            print(f"wrote {args.plot}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from tokenyard.config import ConfigError

    try:
        catalog = _load_catalog(args)
        gpu = catalog.gpu(args.gpu)
        model = catalog.model(args.model)
    except (CatalogError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name in ("tp", "batch"):
        if getattr(args, name) < 1:
            print(f"error: --{name} must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    if args.context < 1:
        print(f"error: --context must be >= 1 token, got {args.context}", file=sys.stderr)
        return 2
    tp_problem = tensor_parallel_problem(model, args.tp)
    if tp_problem:
        print(f"error: --tp: {tp_problem}", file=sys.stderr)
        return 2
    if args.context > model.max_context_tokens:
        print(f"error: --context: {model.name} takes at most {model.max_context_tokens} tokens per sequence "
              f"(its context length), got {args.context}", file=sys.stderr)
        return 2
    factors = None
    if args.factors:
        from scheduler.engine_model import load_factors_file

        try:
            table = load_factors_file(args.factors)
        except (OSError, ValueError) as exc:
            print(f"error: --factors: {exc}", file=sys.stderr)
            return 2
        factors = table.get(gpu.name.lower(), table["*"])
    engine = EngineModel(gpu, model, tp=args.tp, factors=factors)
    report = {
        "engine": engine.name,
        "gpu": gpu.name,
        "model": model.name,
        "tp": args.tp,
        "batch": args.batch,
        "context_tokens": args.context,
        "prefill_time_ms": engine.prefill_time_s(args.context, 1) * 1e3,
        "prefill_time_batch_ms": engine.prefill_time_s(args.context, args.batch) * 1e3,
        "decode_time_per_token_ms": engine.decode_time_per_token_s(args.batch, args.context) * 1e3,
        "decode_tokens_per_s": args.batch / engine.decode_time_per_token_s(args.batch, args.context),
        "kv_capacity_tokens": engine.kv_capacity_tokens(),
        "kv_capacity_blocks": engine.kv_capacity_blocks(16),
        "fits": engine.fits(),
        "batch_kv_tokens": args.batch * args.context,
        "batch_fits_kv": args.batch * args.context <= engine.kv_capacity_tokens(),
        "usd_per_hour": gpu.usd_per_hour * args.tp,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{engine.name}  (batch {args.batch}, context {args.context} tokens)")
    print(f"  prefill, 1 prompt of {args.context} tokens   {report['prefill_time_ms']:10.2f} ms")
    print(f"  prefill, {args.batch} x {args.context} tokens at once    {report['prefill_time_batch_ms']:10.2f} ms")
    print(f"  decode time per token at batch {args.batch}  {report['decode_time_per_token_ms']:10.2f} ms"
          f"  ({report['decode_tokens_per_s']:.0f} tokens/s)")
    print(f"  KV capacity                     {report['kv_capacity_tokens']:10d} tokens"
          f" = {report['kv_capacity_blocks']} blocks of 16")
    print(f"  batch's KV ({args.batch} x {args.context})".ljust(32) + f"{report['batch_kv_tokens']:10d} tokens: "
          + ("fits" if report["batch_fits_kv"] else "does not fit (the weights leave no room)"
             if report["kv_capacity_tokens"] == 0 else "does not fit (fewer or shorter sequences run at once)"))
    print(f"  fits (weights + one sequence)   {'yes' if report['fits'] else 'no'}")
    print(f"  cost                            {report['usd_per_hour']:10.2f} $/hour")
    return 0


def register(subparsers: Any) -> None:
    calibrate_parser = subparsers.add_parser(
        "calibrate",
        help="fit the engine model's efficiency factors to the measurements in shared/data/perf",
        description="Fit per-GPU efficiency factors (Vidur, Splitwise; TensorRT-LLM as a check) "
                    "and print the median / p90 absolute percentage error per source on train "
                    "and held-out configurations.",
    )
    calibrate_parser.add_argument("--data", metavar="DIR",
                                  help="the shared data folder holding perf/ (default: $TOKENYARD_SHARED_DATA or ../shared/data)")
    calibrate_parser.add_argument("--write", metavar="JSON",
                                  help="write the fitted factors here (e.g. scheduler/perf_factors.json), atomically")
    calibrate_parser.add_argument("--plot", metavar="PNG", help="write a predicted-vs-measured scatter plot")
    calibrate_parser.add_argument("--json", action="store_true", help="print the factors and errors as JSON")
    calibrate_parser.add_argument(
        "--from", dest="from_paths", action="append", default=[], metavar="PATH",
        help="fit one deployment from its own measurements instead (repeatable): a folder of vLLM /metrics "
             "scrapes (*.prom, in scrape order) or a Prometheus query_range JSON, `vllm bench serve` or "
             "guidellm result JSON, or request records (.csv/.parquet/.jsonl); needs --gpu and --model")
    calibrate_parser.add_argument("--gpu", help="--from: the deployment's GPU type, e.g. H100-80GB")
    calibrate_parser.add_argument("--model", help="--from: the deployment's model (catalog name or HF id)")
    calibrate_parser.add_argument("--tp", type=int, default=None, help="--from: tensor-parallel degree (default 1)")
    calibrate_parser.set_defaults(handler=_cmd_calibrate)

    model_parser = subparsers.add_parser("model", help="query the engine performance model")
    model_sub = model_parser.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    predict = model_sub.add_parser(
        "predict",
        help="modelled prefill / decode time, KV capacity and cost of one engine instance",
        description="Print the engine model's prefill time (one prompt of --context tokens, and "
                    "--batch of them), decode time per token at --batch sequences of --context "
                    "tokens, KV capacity and whether the batch's KV cache fits in it, whether the "
                    "weights fit with room for one sequence, and $/hour.",
    )
    predict.add_argument("--gpu", required=True, help="GPU name, e.g. A100-80GB (case-insensitive)")
    predict.add_argument("--model", required=True, help="model name, e.g. llama-3-8b (or the name for --hf-config)")
    predict.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default 1)")
    predict.add_argument("--batch", type=int, default=1, help="sequences in the batch (default 1)")
    predict.add_argument("--context", type=int, default=1024, help="tokens per sequence (default 1024)")
    predict.add_argument("--catalog", metavar="YAML", help="extra or overriding gpus:/models: entries")
    predict.add_argument("--hf-config", metavar="CONFIG_JSON",
                         help="a HuggingFace config.json describing --model")
    predict.add_argument("--factors", metavar="JSON",
                         help="efficiency factors written by `tokenyard calibrate --write` "
                              "(default: the packaged scheduler/perf_factors.json)")
    predict.add_argument("--json", action="store_true", help="print JSON")
    predict.set_defaults(handler=_cmd_predict)
