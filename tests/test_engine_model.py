"""Shape properties of the engine performance model, with the packaged (fitted) factors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.catalog import default_catalog
from scheduler.engine_model import (
    BatchShape,
    EngineModel,
    PerfFactors,
    factors_for,
    fitted_factors,
    load_factors_file,
)

CATALOG = default_catalog()


def engine(gpu: str = "A100-80GB", model: str = "llama-3-8b", tp: int = 1) -> EngineModel:
    return EngineModel(CATALOG.gpu(gpu), CATALOG.model(model), tp=tp)


def test_packaged_factors_are_the_fitted_ones() -> None:
    table = fitted_factors()
    assert {"a100-80gb", "h100-80gb", "*"} <= set(table)
    # A GPU type without measurements gets the fallback, measured ones their own fit.
    assert factors_for(CATALOG.gpu("L4")) == table["*"]
    assert factors_for(CATALOG.gpu("H100-80GB")) == table["h100-80gb"]
    assert factors_for(CATALOG.gpu("H200")) == table["h100-80gb"]  # same chip, same fit
    for factors in table.values():
        assert 0.05 <= factors.compute_efficiency <= 1.0
        assert 0.05 <= factors.memory_efficiency <= 1.0


def test_prefill_grows_about_linearly_once_compute_bound() -> None:
    model = engine()
    times = {n: model.prefill_time_s(n) for n in (1024, 2048, 4096)}
    # Linear layers dominate: doubling the prompt roughly doubles the time (attention adds
    # a quadratic share, fixed costs a constant one).
    for small, large in ((1024, 2048), (2048, 4096)):
        assert 1.6 < times[large] / times[small] < 2.5
    # And a batch of prompts costs about the sum of its tokens.
    assert model.prefill_time_s(1024, batch_size=4) == pytest.approx(4 * times[1024], rel=0.35)


def test_decode_step_nearly_flat_in_batch_at_small_batch() -> None:
    model = engine()
    one = model.decode_time_per_token_s(1, 512)
    eight = model.decode_time_per_token_s(8, 512)
    assert one < eight < 1.3 * one  # memory-bound: the weights are read once per step
    # ... and throughput rises almost linearly with the batch there.
    assert 8 / eight > 6 * (1 / one)


def test_tensor_parallelism_speeds_up_a_70b_iteration() -> None:
    for gpu in ("A100-80GB", "H100-80GB"):
        decode = [engine(gpu, "llama-3-70b", tp).decode_time_per_token_s(8, 1024) for tp in (1, 2, 4, 8)]
        prefill = [engine(gpu, "llama-3-70b", tp).prefill_time_s(2048) for tp in (1, 2, 4, 8)]
        assert decode == sorted(decode, reverse=True) and decode[1] < decode[0]
        assert prefill == sorted(prefill, reverse=True) and prefill[3] < prefill[0] / 2


def test_faster_gpus_are_faster() -> None:
    # Per-GPU fits must not reorder the hardware: newer chips win at every model size.
    for model in ("qwen2.5-0.5b", "llama-3-8b", "qwen2.5-7b"):
        for shape in ((1, 1024), (32, 1024)):
            times = [engine(gpu, model).decode_time_per_token_s(*shape) for gpu in ("L4", "A100-80GB", "H100-80GB")]
            assert times == sorted(times, reverse=True), (model, shape, times)
        prefill = [engine(gpu, model).prefill_time_s(2048) for gpu in ("L4", "A100-80GB", "H100-80GB")]
        assert prefill == sorted(prefill, reverse=True), (model, prefill)
    assert engine("H200", "llama-3-8b").decode_time_per_token_s(64, 4096) < engine("H100-80GB", "llama-3-8b").decode_time_per_token_s(64, 4096)


def test_kv_capacity() -> None:
    small = engine("A100-80GB", "llama-3-8b")
    assert small.kv_capacity_tokens() > 100_000
    assert small.kv_capacity_blocks(16) == small.kv_capacity_tokens() // 16
    assert small.fits()
    too_big = engine("L4", "llama-3-70b")
    assert too_big.kv_capacity_tokens() == 0
    assert too_big.kv_capacity_blocks() == 0
    assert not too_big.fits()
    # More GPUs, more room for KV.
    assert engine("H100-80GB", "llama-3-70b", 4).kv_capacity_tokens() > engine("H100-80GB", "llama-3-70b", 2).kv_capacity_tokens()


@pytest.mark.parametrize("gpu", ["A100-80GB", "H100-80GB", "L4", "H200"])
def test_decode_time_is_monotone_in_context(gpu: str) -> None:
    model = engine(gpu, "qwen2.5-7b")
    times = [model.decode_time_per_token_s(4, context) for context in (1, 128, 1024, 8192, 32768)]
    assert times == sorted(times)
    assert times[-1] > times[0]


@settings(max_examples=60, deadline=None)
@given(
    prefill_tokens=st.integers(0, 8192),
    decode_seqs=st.integers(0, 256),
    context_tokens=st.integers(0, 500_000),
    cached_tokens=st.integers(0, 8192),
    extra_context=st.integers(1, 100_000),
)
def test_iteration_time_is_monotone_and_piecewise_linear_in_context(
    prefill_tokens: int, decode_seqs: int, context_tokens: int, cached_tokens: int, extra_context: int
) -> None:
    model = engine("H100-80GB", "llama-3-8b")
    pairs = BatchShape.prefill_pairs(prefill_tokens, cached_tokens)
    t = model.iteration_time_s(prefill_tokens, decode_seqs, context_tokens, pairs)
    t_more = model.iteration_time_s(prefill_tokens, decode_seqs, context_tokens + extra_context, pairs)
    if prefill_tokens + decode_seqs == 0:
        assert t == 0.0
        return
    assert t_more >= t > 0
    if decode_seqs and not prefill_tokens:
        # Pure decode: exactly linear in context, as decode_step_linear_s promises.
        t0, slope = model.decode_step_linear_s(decode_seqs)
        assert t == pytest.approx(t0 + slope * context_tokens, rel=1e-9)
        assert t_more == pytest.approx(t0 + slope * (context_tokens + extra_context), rel=1e-9)


def test_batch_shape_matches_iteration_arguments() -> None:
    model = engine()
    shape = BatchShape(prefill_tokens=512, decode_seqs=7, context_tokens=9000,
                       prefill_attention_pairs=BatchShape.prefill_pairs(512, 100))
    assert model.batch_time_s(shape) == model.iteration_time_s(512, 7, 9000, shape.prefill_attention_pairs)
    assert BatchShape.prefill_pairs(4, 0) == 4 * 2.5


def test_moe_reads_fewer_weights_at_batch_one() -> None:
    # Mixtral at batch 1 touches 2 of 8 experts: faster than a dense model of its full size.
    mixtral = engine("H100-80GB", "mixtral-8x7b")
    dense = CATALOG.model("llama-2-70b")
    assert mixtral.decode_time_per_token_s(1, 256) < EngineModel(CATALOG.gpu("H100-80GB"), dense).decode_time_per_token_s(1, 256)
    assert mixtral.decode_time_per_token_s(1, 256) < mixtral.decode_time_per_token_s(64, 256)


def test_explicit_factors_override_and_validation(tmp_path: Path) -> None:
    slow = PerfFactors(compute_efficiency=0.1)
    assert engine().prefill_time_s(4096) < EngineModel(CATALOG.gpu("A100-80GB"), CATALOG.model("llama-3-8b"), factors=slow).prefill_time_s(4096)
    with pytest.raises(ValueError, match="tensor parallel degree"):
        EngineModel(CATALOG.gpu("A100-80GB"), CATALOG.model("llama-3-8b"), tp=0)
    path = tmp_path / "factors.json"
    path.write_text(json.dumps({"gpus": {"L4": {"compute_efficiency": 0.5}}, "default": {}}))
    assert load_factors_file(str(path))["l4"].compute_efficiency == 0.5
    path.write_text(json.dumps({"gpus": {"L4": {"compute_efficency": 0.5}}}))
    with pytest.raises(ValueError, match=r"gpus\.L4: unknown key\(s\) compute_efficency"):
        load_factors_file(str(path))
    path.write_text(json.dumps({"gpus": {"L4": {"memory_efficiency": -1}}}))
    with pytest.raises(ValueError, match=r"gpus\.L4\.memory_efficiency: expected a non-negative number"):
        load_factors_file(str(path))
    # A JSON object with no factors gave every GPU bare PerfFactors(): neither a fit nor the packaged one.
    for empty in ({"x": 1}, {"gpus": {}}):
        path.write_text(json.dumps(empty))
        with pytest.raises(ValueError, match=r"no factors in it \(neither 'gpus' nor 'default'\)"):
            load_factors_file(str(path))


def test_moe_weight_reads_follow_the_expected_distinct_experts() -> None:
    m = engine("H100-80GB", "mixtral-8x7b")
    assert m.experts_touched(1) == pytest.approx(2.0)
    # Uniform top-2 of 8: 4 tokens touch 8 (1 - 0.75^4) = 5.47 experts, far from all 8.
    assert m.experts_touched(4) == pytest.approx(8 * (1 - 0.75**4))
    assert 7.99 < m.experts_touched(64) <= 8.0
    steps = [m.decode_time_per_token_s(b, 512) for b in (1, 2, 4, 8, 16)]
    assert steps == sorted(steps) and steps[2] - steps[0] > steps[4] - steps[3]  # concave while experts fill


def test_cpu_and_gpu_time_add_up_and_tp_sync_grows_with_workers() -> None:
    m = engine("A100-80GB", "llama-3-70b", tp=4)
    total = m.iteration_time_s(512, 32, 32 * 1000, BatchShape.prefill_pairs(512, 0), 1)
    assert m.cpu_time_s(33) + m.gpu_time_s(512, 32, 32 * 1000, BatchShape.prefill_pairs(512, 0), 1) == pytest.approx(total)
    assert m.cpu_time_s(33) > 0 and m.gpu_time_s(0, 32, 32000) > 0
    base = engine("A100-80GB", "llama-3-70b", tp=8).factors
    synced = replace(base, tp_sync_s_per_layer=1e-4)
    tp = {n: EngineModel(m.gpu, m.model, n, replace(synced, interconnect_efficiency=1.0)) for n in (2, 4, 8)}
    plain = {n: EngineModel(m.gpu, m.model, n, replace(base, tp_sync_s_per_layer=0.0, interconnect_efficiency=1.0))
             for n in (2, 4, 8)}
    extra = [tp[n].decode_time_per_token_s(1, 100) - plain[n].decode_time_per_token_s(1, 100) for n in (2, 4, 8)]
    assert extra[0] == pytest.approx(80 * 1e-4) and extra == sorted(extra)


def test_serving_tpot_includes_the_prefill_share() -> None:
    m = engine("H100-80GB", "llama-3.1-8b")
    decode_only = m.decode_time_per_token_s(64, 1000)
    chunked = m.serving_tpot_s(64, 800, 400, chunked_prefill=True)
    separate = m.serving_tpot_s(64, 800, 400)
    assert decode_only < chunked and decode_only < separate
    # Longer outputs dilute the prefill share towards the pure decode step.
    assert m.serving_tpot_s(64, 800, 40000, chunked_prefill=True) == pytest.approx(
        m.decode_time_per_token_s(64, 800 + 20000), rel=0.02)
    batches = [m.serving_tpot_s(b, 500, 300) for b in (8, 32, 128, 512)]
    assert batches == sorted(batches)


def test_large_iteration_step_is_off_in_the_packaged_factors() -> None:
    # Only Splitwise's older engine shows the step; the packaged (current-engine) factors keep 0,
    # so their iteration time is the plain closed form.
    for factors in fitted_factors().values():
        assert factors.large_step_s_per_token_layer == 0.0
    m = engine("H100-80GB", "llama-3-8b")
    pairs = BatchShape.prefill_pairs(16384, 0)
    plain = EngineModel(m.gpu, m.model, factors=replace(m.factors, large_step_knee_tokens=64.0))
    assert plain.iteration_time_s(16384, 0, 0, pairs) == m.iteration_time_s(16384, 0, 0, pairs)


def test_large_iteration_step_is_a_smooth_step_at_the_knee() -> None:
    base = engine("H100-80GB", "llama-2-70b", tp=8)
    step = 5e-7
    stepped = EngineModel(base.gpu, base.model, 8, replace(base.factors, large_step_s_per_token_layer=step,
                                                         large_step_knee_tokens=2000.0))
    assert stepped.large_step_share(2000) == pytest.approx(0.5)
    assert stepped.large_step_share(200) < 1e-3 and stepped.large_step_share(20000) > 0.999

    def extra(tokens: int) -> float:
        pairs = BatchShape.prefill_pairs(tokens, 0)
        return stepped.iteration_time_s(tokens, 0, 0, pairs) - base.iteration_time_s(tokens, 0, 0, pairs)

    layers = base.model.num_layers
    assert extra(2000) == pytest.approx(0.5 * 2000 * layers * step)
    assert extra(256) < 1e-3 * 256 * layers * step
    assert extra(32768) == pytest.approx(32768 * layers * step, rel=1e-3)
    # Per token the step only rises with the iteration's size; decode stays linear in context.
    per_token = [extra(n) / n for n in (512, 1024, 2048, 4096, 8192)]
    assert per_token == sorted(per_token)
    t0, slope = stepped.decode_step_linear_s(64)
    assert stepped.decode_time_per_token_s(64, 3000) == pytest.approx(t0 + slope * 64 * 3000)
