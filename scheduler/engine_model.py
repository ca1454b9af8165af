"""The engine performance model: how long one continuous-batching iteration takes.

A roofline per iteration, in two parts that a current engine runs one after the other:

- GPU time. Linear layers (the Q/K/V/O and MLP projections, and the LM head for each
  sequence that emits a token) cost the larger of their FLOPs at the achieved fraction of
  peak and their weight bytes at the achieved fraction of HBM bandwidth, plus a fitted share
  of the smaller one (the two overlap imperfectly at moderate batch sizes). For MoE models
  the weights read are those of the experts the batch's tokens are routed to (the expected
  number of distinct experts under uniform top-k routing) plus a routing cost per token.
  Decode attention grows with the batch's context: the larger of its query x key FLOPs and
  its KV-cache bytes per context token. Prefill attention (a chunk of c tokens after p
  cached ones: c (p + (c + 1) / 2) pairs) runs at its own efficiency; a chunked-prefill step
  mixes both, each at its own rate, sharing one pass over the weights. Tensor parallelism
  splits all of that over `tp` GPUs and adds two all-reduces per layer (latency, ring
  bandwidth) and a synchronisation cost per layer growing with the number of workers.
- CPU time: a fixed cost per iteration (scheduling, input preparation, launches; per layer
  in eager mode) and a cost per sequence in the batch (sampling, detokenisation, output
  processing). `cpu_time_s` and `gpu_time_s` give the two apart.
- For engines that show one (Splitwise's, not the packaged current engine): a step up in the
  cost per token of iterations above a knee of a few thousand tokens.

The efficiency factors (`PerfFactors`) are fitted to real measurements by
`tokenyard calibrate` (sim/calibrate.py) and stored in `perf_factors.json` next to this
module, per GPU type, with a fallback entry `"*"` for GPU types without measurements.

Pure arithmetic: no I/O besides reading the packaged factors once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import lru_cache
from importlib import resources
from typing import Any

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
    # Achieved / peak unidirectional interconnect bandwidth in a ring all-reduce.
    interconnect_efficiency: float = 0.7
    # Fixed cost per layer per iteration (kernel launches, synchronisation between TP
    # workers): large in eager-mode engines, small with CUDA graphs.
    layer_overhead_s: float = 0.0
    # Per token per layer work that tensor parallelism does not split (norms, residual
    # adds, rotary embedding run on every worker).
    unsharded_s_per_token_layer: float = 0.0
    # Share of the smaller roofline term (compute or weight reads) added to the larger one:
    # 0 is a perfect roofline (max), 1 is no overlap at all (sum).
    roofline_overlap_loss: float = 0.0
    # Synchronisation between tensor-parallel workers per layer, times log2(tp) (the slowest
    # of tp GPUs sets the pace, and a barrier precedes each all-reduce): what makes TP 4-8 at
    # small batch slower than bandwidth and latency alone predict.
    tp_sync_s_per_layer: float = 0.0
    # Achieved / peak FLOP/s of prefill (flash) attention; decode attention, which reads the
    # KV cache once per query, keeps `attention_efficiency` and the HBM roofline.
    prefill_attention_efficiency: float = 0.35
    # MoE expert routing per token per layer (router GEMM, top-k, permute / un-permute).
    moe_route_s_per_token_layer: float = 0.0
    # Sampling per sequence and vocabulary entry (softmax, top-p / top-k sorts over the
    # logits): a 256k-vocabulary model pays 2-5x more per sequence than a 32k one.
    sampling_s_per_vocab_seq: float = 0.0
    # A step up in the cost per token of large iterations, per token per layer, not split by
    # TP: above `large_step_knee_tokens` tokens in one iteration every token costs this much
    # more. Splitwise's engine shows it (llama-2-70b prefill on H100 TP8: 0.067 ms per token
    # at 2,048 tokens, 0.095 at 4,096 and beyond), Vidur's GEMM profiles do not (so it is not
    # the kernels), and no measurement of a current engine does: 0 in the packaged factors,
    # fitted for Splitwise's engine only (sim/calibrate.py, ENGINE_SPECIFIC_BOUNDS). The step
    # is smooth (a Hill function of order 4, a factor 1.2 either side of the knee covers 30-70%
    # of it) so that least squares can move the knee.
    large_step_s_per_token_layer: float = 0.0
    large_step_knee_tokens: float = 4096.0

    @classmethod
    def from_mapping(cls, values: dict[str, Any], where: str = "perf factors") -> PerfFactors:
        """Build from a JSON object; unknown keys or non-positive numbers name the entry."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{where}.{key}: expected a non-negative number, got {value!r}")
        return cls(**{k: float(v) for k, v in values.items()})

    def as_dict(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}


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


def _parse_factors_document(raw: Any, where: str) -> dict[str, PerfFactors]:
    if not isinstance(raw, dict) or not isinstance(raw.get("gpus", {}), dict):
        raise ValueError(f"{where}: expected an object with 'gpus' (name -> factors) and 'default'")
    if not raw.get("gpus") and "default" not in raw:
        # Without either, every GPU would take bare PerfFactors(): neither this file's fit
        # nor the packaged one, silently.
        raise ValueError(f"{where}: no factors in it (neither 'gpus' nor 'default'); expected a file written by "
                         "`tokenyard calibrate --write`")
    table = {
        str(name).lower(): PerfFactors.from_mapping(values, f"{where}: gpus.{name}")
        for name, values in raw.get("gpus", {}).items()
    }
    table["*"] = (
        PerfFactors.from_mapping(raw["default"], f"{where}: default") if "default" in raw else PerfFactors()
    )
    return table


@lru_cache(maxsize=1)
def fitted_factors() -> dict[str, PerfFactors]:
    """Factors per GPU name (lower-case) from the packaged fit; `"*"` is the fallback."""
    try:
        text = resources.files("scheduler").joinpath("perf_factors.json").read_text()
    except FileNotFoundError:
        return {"*": PerfFactors()}
    return _parse_factors_document(json.loads(text), "scheduler/perf_factors.json")


def load_factors_file(path: str) -> dict[str, PerfFactors]:
    """Read a factors file written by `tokenyard calibrate` (same layout as the packaged one):
    GPU name (lower case) -> factors, `"*"` the fallback. The one loader every `--factors`
    option (sim, engine, model predict, the planner) goes through; a missing, unreadable or
    malformed file is a ValueError naming the file and what was expected."""
    try:
        with open(path) as handle:
            document = json.load(handle)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the factors file ({exc.strerror or exc})") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON (line {exc.lineno}: {exc.msg}); expected a file written by "
                         "`tokenyard calibrate --write`") from exc
    return _parse_factors_document(document, path)


def factors_from_table(table: Mapping[str, PerfFactors], gpu: GpuSpec) -> PerfFactors:
    """The entry of a factors table for `gpu`, or its `"*"` fallback."""
    return table.get(gpu.name.lower()) or table.get("*") or PerfFactors()


def factors_for(gpu: GpuSpec) -> PerfFactors:
    return factors_from_table(fitted_factors(), gpu)


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
        m = model
        # Per-token and per-byte constants, precomputed: iteration_time_s is on the hot path.
        flops = gpu.bf16_tflops * 1e12 * tp * f.compute_efficiency
        bandwidth = gpu.hbm_gbps * 1e9 * tp * f.memory_efficiency
        self._s_per_linear_token = 2.0 * m.num_layers * m.active_linear_params_per_layer / flops
        # vLLM computes logits only for the last position of each sequence.
        self._s_per_lm_head_seq = 2.0 * m.lm_head_params / flops
        # Weight reads: attention, shared experts and LM head always; of the routed MoE
        # experts only those the batch's tokens are routed to.
        dense_params = m.num_layers * (m.attention_params_per_layer + m.shared_mlp_params_per_layer) + m.lm_head_params
        expert_params = m.num_layers * m.mlp_params_per_expert_per_layer
        self._num_experts = m.num_experts
        if m.num_experts > 1:
            self._dense_read_s = dense_params * m.dtype_bytes / bandwidth
            self._expert_read_s = expert_params * m.dtype_bytes / bandwidth
            # Uniform top-k routing: T tokens touch E (1 - (1 - k/E)^T) distinct experts.
            self._log_miss = math.log1p(-min(m.experts_per_token, m.num_experts - 1) / m.num_experts)
        else:
            self._dense_read_s = (dense_params + expert_params) * m.dtype_bytes / bandwidth
            self._expert_read_s = 0.0
            self._log_miss = 0.0
        self._overlap_loss = f.roofline_overlap_loss
        attn_flops_per_pair = 4.0 * m.num_layers * m.num_attention_heads * m.head_dim
        peak = gpu.bf16_tflops * 1e12 * tp
        self._s_per_attn_pair = attn_flops_per_pair / (peak * f.attention_efficiency)
        self._s_per_prefill_pair = attn_flops_per_pair / (peak * f.prefill_attention_efficiency)
        self._s_per_context_token = m.kv_bytes_per_token / bandwidth
        # Decode attention per context token: compute or KV reads, whichever binds.
        self._s_per_decode_context = max(self._s_per_attn_pair, self._s_per_context_token)
        if tp > 1:
            # Two all-reduces per layer of (tokens x hidden) activations; a ring all-reduce
            # moves 2 (tp - 1) / tp of the data over each GPU's one-way link bandwidth.
            self._s_per_comm_token = 2 * m.num_layers * self._allreduce_s_per_byte() * m.hidden_size * m.dtype_bytes
            # Barrier depth grows like the all-reduce's step count, log2(tp).
            self._comm_fixed_s = 2 * m.num_layers * self.allreduce_time_s(0.0) + (
                m.num_layers * math.log2(tp) * f.tp_sync_s_per_layer
            )
        else:
            self._s_per_comm_token = 0.0
            self._comm_fixed_s = 0.0
        self._s_per_route_token = m.num_layers * f.moe_route_s_per_token_layer if m.num_experts > 1 else 0.0
        self._cpu_fixed_s = f.iteration_overhead_s + m.num_layers * f.layer_overhead_s
        self._per_seq_s = f.per_seq_overhead_s + m.vocab_size * f.sampling_s_per_vocab_seq
        self._s_per_token = self._s_per_comm_token + m.num_layers * f.unsharded_s_per_token_layer + self._s_per_route_token
        self._large_step_s = m.num_layers * f.large_step_s_per_token_layer
        self._knee4 = f.large_step_knee_tokens ** 4

    @property
    def name(self) -> str:
        return f"{self.model.name}@{self.gpu.name}x{self.tp}"

    def _allreduce_s_per_byte(self) -> float:
        if self.tp <= 1:
            return 0.0
        link_bytes_per_s = self.gpu.interconnect_gbps * 1e9 / 2.0 * self.factors.interconnect_efficiency
        return 2.0 * (self.tp - 1) / self.tp / link_bytes_per_s

    def experts_touched(self, tokens: float) -> float:
        """Expected distinct routed experts per layer for `tokens` tokens (MoE; else 0)."""
        if not self._expert_read_s:
            return 0.0
        return self._num_experts * -math.expm1(tokens * self._log_miss)

    def _linear_s(self, tokens: float, seqs: float) -> float:
        compute = tokens * self._s_per_linear_token + seqs * self._s_per_lm_head_seq
        memory = self._dense_read_s
        if self._expert_read_s:
            memory += self._expert_read_s * self._num_experts * -math.expm1(tokens * self._log_miss)
        if compute > memory:
            return compute + self._overlap_loss * memory
        return memory + self._overlap_loss * compute

    def iteration_time_s(
        self,
        prefill_tokens: float = 0,
        decode_seqs: float = 0,
        context_tokens: float = 0,
        prefill_attention_pairs: float = 0.0,
        prefill_seqs: float | None = None,
    ) -> float:
        """Wall time of one iteration computing the given batch: `gpu_time_s + cpu_time_s`.

        prefill_seqs: sequences whose prefill chunk is in the batch (each emits logits);
        `None` counts one when there are prefill tokens.

        Form: with T = prefill_tokens + decode_seqs and S = decode_seqs + prefill_seqs,

            t = linear(T, S) + a_p * pairs + a_d * ctx + T * c_tok + o_tp + o_cpu + o_s * S

        plus, for an engine with a large-iteration step (not the packaged one), T * step * h(T)
        with h the Hill function of `large_step_share`;
        where linear(T, S) = max(C, M) + loss * min(C, M) with C = T * c_lin + S * c_head
        (GEMM FLOPs) and M the weight-read time (constant for dense models, rising with T
        towards all experts for MoE), a_p the prefill-attention time per query x key pair,
        a_d = max(FLOPs, KV bytes) per decode context token, c_tok the per-token all-reduce
        bytes, unsharded work and MoE routing, o_tp the fixed all-reduce latency and TP
        synchronisation, o_cpu + o_s * S the CPU time. For a fixed batch (T, S, pairs) the
        time is exactly linear in ctx, t = t0 + ctx * a_d: see `decode_step_linear_s`.
        """
        tokens = prefill_tokens + decode_seqs
        if tokens <= 0:
            return 0.0
        if prefill_seqs is None:
            prefill_seqs = 1 if prefill_tokens else 0
        seqs = decode_seqs + prefill_seqs
        total = (
            self._linear_s(tokens, seqs)
            + prefill_attention_pairs * self._s_per_prefill_pair
            + context_tokens * self._s_per_decode_context
            + tokens * self._s_per_token
            + self._comm_fixed_s
            + self._cpu_fixed_s
            + seqs * self._per_seq_s
        )
        if self._large_step_s:
            total += self._large_step_s * tokens * self.large_step_share(tokens)
        return total

    def large_step_share(self, tokens: float) -> float:
        """How much of the large-iteration step applies at `tokens` tokens: T^4 / (T^4 + knee^4),
        0 well below the knee, 1/2 at it, 1 well above."""
        t4 = tokens * tokens * tokens * tokens
        return t4 / (t4 + self._knee4) if t4 + self._knee4 > 0 else 1.0

    def cpu_time_s(self, seqs: float) -> float:
        """The CPU part of an iteration over `seqs` sequences: scheduling, input preparation
        and launches (fixed, and per layer in eager mode), sampling and detokenisation per
        sequence."""
        return self._cpu_fixed_s + seqs * self._per_seq_s if seqs > 0 else 0.0

    def gpu_time_s(
        self, prefill_tokens: float = 0, decode_seqs: float = 0, context_tokens: float = 0,
        prefill_attention_pairs: float = 0.0, prefill_seqs: float | None = None,
    ) -> float:
        """The GPU part of an iteration (kernels and collectives): the rest of `iteration_time_s`."""
        if prefill_seqs is None:
            prefill_seqs = 1 if prefill_tokens else 0
        total = self.iteration_time_s(prefill_tokens, decode_seqs, context_tokens, prefill_attention_pairs,
                                      prefill_seqs)
        return total - self.cpu_time_s(decode_seqs + prefill_seqs)

    def serving_tpot_s(
        self, running_seqs: float, prompt_tokens: float, output_tokens: float, chunked_prefill: bool = False
    ) -> float:
        """Mean time per output token of an engine that keeps `running_seqs` sequences running,
        each with a prompt of `prompt_tokens` and `output_tokens` generated tokens (averages).

        In steady state each decode step emits a token for every running sequence, and
        running_seqs / output_tokens requests finish and are replaced per step. With chunked
        prefill the newcomers' prompts ride in the decode steps (one mixed iteration). Without
        it (vLLM V0's default), the scheduler runs a separate prefill step whenever a request
        waits: 1 - exp(-running / output) of them per decode step (the chance that at least
        one request finished), each prefilling the newcomers since the last. That count
        saturates at one per decode step, which is why measured TPOT grows ever more slowly
        with the batch size.
        """
        if running_seqs <= 0 or output_tokens <= 0:
            return 0.0
        admitted = running_seqs / max(output_tokens, 1.0)
        context = running_seqs * (prompt_tokens + output_tokens / 2.0)
        pairs = BatchShape.prefill_pairs(int(prompt_tokens), 0)
        if chunked_prefill:
            return self.iteration_time_s(admitted * prompt_tokens, running_seqs, context, admitted * pairs, admitted)
        decode = self.iteration_time_s(decode_seqs=running_seqs, context_tokens=context)
        prefill_steps = -math.expm1(-admitted)
        per_step = admitted / prefill_steps
        prefill = self.iteration_time_s(
            prefill_tokens=per_step * prompt_tokens, prefill_attention_pairs=per_step * pairs, prefill_seqs=per_step
        )
        return decode + prefill_steps * prefill

    def decode_step_linear_s(self, decode_seqs: int) -> tuple[float, float]:
        """(t0, slope): a pure decode step of `decode_seqs` sequences with `ctx` context
        tokens in total takes exactly t0 + slope * ctx seconds (see `iteration_time_s`).

        Summing over decode steps whose context grows by `decode_seqs` each step is then
        an arithmetic series: n steps from ctx0 take n * t0 + slope * (n * ctx0 + b n (n-1) / 2).
        """
        if decode_seqs <= 0:
            return 0.0, 0.0
        t0 = self.iteration_time_s(decode_seqs=decode_seqs)
        return t0, self._s_per_decode_context

    def batch_time_s(self, batch: BatchShape) -> float:
        return self.iteration_time_s(
            batch.prefill_tokens, batch.decode_seqs, batch.context_tokens, batch.prefill_attention_pairs
        )

    def prefill_time_s(self, prompt_tokens: int, batch_size: int = 1) -> float:
        """Time to prefill `batch_size` prompts of `prompt_tokens` each in one iteration."""
        pairs = batch_size * BatchShape.prefill_pairs(prompt_tokens, 0)
        return self.iteration_time_s(
            prefill_tokens=prompt_tokens * batch_size, prefill_attention_pairs=pairs, prefill_seqs=batch_size
        )

    def decode_time_per_token_s(self, batch_size: int, context_tokens_per_seq: int) -> float:
        """Time of one decode iteration of `batch_size` sequences of the given context length."""
        return self.iteration_time_s(
            decode_seqs=batch_size, context_tokens=batch_size * context_tokens_per_seq
        )

    def linear_time_per_layer_s(self, num_tokens: int) -> float:
        """Time of one layer's projection GEMMs (QKV, O, MLP up/gate, down) on one TP shard,
        the quantity Vidur's per-layer operator profiles measure."""
        layers = self.model.num_layers
        compute = num_tokens * self._s_per_linear_token / layers
        memory = (self._dense_read_s - self._lm_head_read_s()) / layers
        if self._expert_read_s:
            memory += self._expert_read_s * self.experts_touched(num_tokens) / layers
        if compute > memory:
            return compute + self._overlap_loss * memory
        return memory + self._overlap_loss * compute

    def _lm_head_read_s(self) -> float:
        bandwidth = self.gpu.hbm_gbps * 1e9 * self.tp * self.factors.memory_efficiency
        return self.model.lm_head_params * self.model.dtype_bytes / bandwidth

    def allreduce_time_s(self, num_bytes: float) -> float:
        """One all-reduce of `num_bytes` over this instance's `tp` GPUs (0 without TP).

        Latency grows with log2(tp) (tree-like step count), bandwidth as a ring all-reduce.
        """
        if self.tp <= 1:
            return 0.0
        return self.factors.allreduce_latency_s * math.log2(self.tp) + num_bytes * self._allreduce_s_per_byte()

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


@dataclass(frozen=True, slots=True)
class FrontEndCost:
    """What a client waits for outside the engine's iterations, per request: the router
    (authentication, dispatch, forwarding) and the engine's API server (HTTP, JSON, chat
    template, tokenisation), a fixed part and a part per prompt token.

    Defaults measured on this project's own parts (docs/benchmarks.md, "Front-end cost"):
    the emulated engine's API path with its engine time off, 1.19 ms + 0.73 us per prompt
    token (bench/front_end_cost.py, prompts of 16 to 16k tokens), plus the router's added p50
    at concurrency 1, 0.35 ms (bench/router_overhead.py).
    """

    fixed_s: float = 0.00154
    s_per_prompt_token: float = 0.73e-6

    def time_s(self, prompt_tokens: int) -> float:
        return self.fixed_s + prompt_tokens * self.s_per_prompt_token

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str = "front_end") -> FrontEndCost:
        """From `{fixed_ms: .., per_prompt_token_us: ..}` (either optional); errors name the key."""
        unknown = sorted(set(values) - {"fixed_ms", "per_prompt_token_us"})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: fixed_ms, per_prompt_token_us")
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{where}.{key}: expected a non-negative number, got {value!r}")
        default = cls()
        return cls(float(values.get("fixed_ms", default.fixed_s * 1e3)) / 1e3,
                   float(values.get("per_prompt_token_us", default.s_per_prompt_token * 1e6)) / 1e6)


NO_FRONT_END = FrontEndCost(0.0, 0.0)
