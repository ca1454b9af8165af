"""The engine performance model: how long one continuous-batching iteration takes.

A roofline per iteration: linear layers and attention are compute-bound for prefill
tokens, weight and KV-cache reads are memory-bound for decode; tensor parallelism splits
both and adds all-reduce time. Efficiency factors (achieved fraction of peak FLOP/s and
of HBM bandwidth, a fixed per-iteration overhead) are fitted to real measurements by
`tokenyard calibrate` and stored in `perf_factors.json` next to this module.

Pure arithmetic: no I/O besides reading the packaged factors once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from scheduler.catalog import GpuSpec, ModelSpec


@dataclass(frozen=True, slots=True)
class PerfFactors:
    """Achieved fractions of the roofline peaks, and fixed costs, for one GPU type."""

    compute_efficiency: float = 0.55  # achieved / peak bf16 FLOP/s in GEMMs
    memory_efficiency: float = 0.75  # achieved / peak HBM bandwidth when streaming weights + KV
    attention_efficiency: float = 0.35  # achieved / peak FLOP/s in attention kernels
    iteration_overhead_s: float = 0.004  # scheduler, sampling, kernel launches per iteration
    per_seq_overhead_s: float = 0.00002  # per sequence in the batch (sampling, bookkeeping)
    allreduce_latency_s: float = 0.00001  # per all-reduce call with tensor parallelism


@dataclass(frozen=True, slots=True)
class BatchShape:
    """What an iteration computes.

    prefill_tokens: prompt tokens computed this iteration (all chunks together).
    decode_seqs: sequences generating one token this iteration.
    context_tokens: KV-cache tokens read by attention, summed over decode sequences.
    prefill_attention_pairs: query x key pairs of the prefill chunks (causal), i.e. for a
        chunk of c tokens after p cached ones, c * (p + (c + 1) / 2).
    """

    prefill_tokens: int = 0
    decode_seqs: int = 0
    context_tokens: int = 0
    prefill_attention_pairs: float = 0.0

    @staticmethod
    def prefill_pairs(chunk_tokens: int, cached_tokens: int) -> float:
        return chunk_tokens * (cached_tokens + (chunk_tokens + 1) / 2.0)


@lru_cache(maxsize=1)
def fitted_factors() -> dict[str, PerfFactors]:
    """Factors per GPU name (lower-case) from the packaged fit; `"*"` is the fallback."""
    try:
        text = resources.files("scheduler").joinpath("perf_factors.json").read_text()
    except FileNotFoundError:
        return {"*": PerfFactors()}
    raw = json.loads(text)
    table = {name.lower(): PerfFactors(**values) for name, values in raw.get("gpus", {}).items()}
    table.setdefault("*", PerfFactors(**raw["default"]) if "default" in raw else PerfFactors())
    return table


def factors_for(gpu: GpuSpec) -> PerfFactors:
    table = fitted_factors()
    return table.get(gpu.name.lower(), table["*"])


class EngineModel:
    """Iteration time and KV capacity of one engine instance: (GPU, model, tensor parallel)."""

    def __init__(
        self,
        gpu: GpuSpec,
        model: ModelSpec,
        tp: int = 1,
        factors: PerfFactors | None = None,
        gpu_memory_utilization: float = 0.9,
    ) -> None:
        if tp < 1:
            raise ValueError(f"tensor parallel degree must be >= 1, got {tp}")
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        self.gpu = gpu
        self.model = model
        self.tp = tp
        self.factors = factors or factors_for(gpu)
        self.gpu_memory_utilization = gpu_memory_utilization
        f = self.factors
        # Per-token and per-byte constants, precomputed: iteration_time_s is on the hot path.
        peak_flops = gpu.bf16_tflops * 1e12 * tp
        self._s_per_linear_token = 2.0 * model.active_params / (peak_flops * f.compute_efficiency)
        attn_flops_per_pair = 4.0 * model.num_layers * model.num_attention_heads * model.head_dim
        self._s_per_attn_pair = attn_flops_per_pair / (peak_flops * f.attention_efficiency)
        bandwidth = gpu.hbm_gbps * 1e9 * tp * f.memory_efficiency
        self._weight_read_s = model.weight_bytes / bandwidth
        self._s_per_context_token = model.kv_bytes_per_token / bandwidth
        if tp > 1:
            # Two all-reduces per layer of (tokens x hidden) activations; ring all-reduce
            # moves 2 (tp - 1) / tp of the data per GPU.
            bytes_per_token = 2 * model.hidden_size * model.dtype_bytes * 2 * (tp - 1) / tp
            self._s_per_comm_token = model.num_layers * bytes_per_token / (gpu.interconnect_gbps * 1e9)
            self._comm_fixed_s = 2 * model.num_layers * f.allreduce_latency_s
        else:
            self._s_per_comm_token = 0.0
            self._comm_fixed_s = 0.0

    @property
    def name(self) -> str:
        return f"{self.model.name}@{self.gpu.name}x{self.tp}"

    def iteration_time_s(
        self,
        prefill_tokens: int = 0,
        decode_seqs: int = 0,
        context_tokens: int = 0,
        prefill_attention_pairs: float = 0.0,
    ) -> float:
        """Wall time of one iteration computing the given batch."""
        tokens = prefill_tokens + decode_seqs
        if tokens <= 0:
            return 0.0
        compute = tokens * self._s_per_linear_token
        memory = self._weight_read_s
        linear = compute if compute > memory else memory
        attention_compute = (prefill_attention_pairs + context_tokens) * self._s_per_attn_pair
        attention_memory = context_tokens * self._s_per_context_token
        attention = attention_compute if attention_compute > attention_memory else attention_memory
        comm = tokens * self._s_per_comm_token + self._comm_fixed_s
        seqs = decode_seqs + (1 if prefill_tokens else 0)
        return (
            linear
            + attention
            + comm
            + self.factors.iteration_overhead_s
            + seqs * self.factors.per_seq_overhead_s
        )

    def batch_time_s(self, batch: BatchShape) -> float:
        return self.iteration_time_s(
            batch.prefill_tokens, batch.decode_seqs, batch.context_tokens, batch.prefill_attention_pairs
        )

    def prefill_time_s(self, prompt_tokens: int, batch_size: int = 1) -> float:
        """Time to prefill `batch_size` prompts of `prompt_tokens` each in one iteration."""
        pairs = batch_size * BatchShape.prefill_pairs(prompt_tokens, 0)
        return self.iteration_time_s(prefill_tokens=prompt_tokens * batch_size, prefill_attention_pairs=pairs)

    def decode_time_per_token_s(self, batch_size: int, context_tokens_per_seq: int) -> float:
        """Time of one decode iteration of `batch_size` sequences of the given context length."""
        return self.iteration_time_s(
            decode_seqs=batch_size, context_tokens=batch_size * context_tokens_per_seq
        )

    def kv_capacity_tokens(self) -> int:
        """KV-cache tokens that fit after weights, per instance (all TP shards together)."""
        usable = self.gpu.memory_gib * (1 << 30) * self.tp * self.gpu_memory_utilization
        # Activations and CUDA graphs: a fixed reserve per GPU, as vLLM's profiling run finds.
        reserve = 1.5 * (1 << 30) * self.tp
        free = usable - self.model.weight_bytes - reserve
        if free <= 0:
            return 0
        return int(free // self.model.kv_bytes_per_token)

    def kv_capacity_blocks(self, block_size: int = 16) -> int:
        return self.kv_capacity_tokens() // block_size

    def fits(self) -> bool:
        """Whether the weights fit with room for at least one full-length sequence."""
        return self.kv_capacity_tokens() >= min(self.model.max_context_tokens, 2048)
