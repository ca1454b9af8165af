"""The emulated engine without HTTP: text generation, the real-clock loop, metrics, Worker gRPC."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys

import grpc
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sim.emulated_engine import EmulatedEngine, EmulatedEngineConfig, EngineRequestError
from sim.engine_core import EngineConfig
from sim.textgen import (
    OutputLengthDist,
    OutputLengthError,
    OutputText,
    count_tokens,
    prefix_block_hashes,
    render_chat,
    request_seed,
    tokenize,
)
from sim.worker_grpc import start_worker_server
from tests.conftest import free_port
from tokenyard.v1 import worker_pb2, worker_pb2_grpc


# ----------------------------------------------------------------- textgen
def test_tokenize_covers_the_text_and_counts_agree() -> None:
    text = "Hello, world! The internationalization of snake_case 12345 costs $3.50.\n\nNext <|eot_id|> end"
    pieces = tokenize(text)
    assert "".join(pieces) == text
    assert count_tokens(text) == len(pieces)
    assert "<|eot_id|>" in [p.strip() for p in pieces]  # a special marker is one token
    assert " 123" in pieces and "45" in pieces  # digits in runs of at most three
    assert max(len(p) for p in pieces if p.strip().isalpha()) <= 10


def test_token_count_is_near_four_characters_per_token_on_real_outputs(shared_data) -> None:
    import json

    root = shared_data / "lengths" / "alpaca_eval" / "model_outputs"
    outputs = json.loads(next(iter(sorted(root.iterdir()))).joinpath("model_outputs.json").read_text())
    text = "\n".join(o["output"] for o in outputs[:200])
    chars_per_token = len(text) / count_tokens(text)
    assert 3.5 < chars_per_token < 5.0


def test_chat_rendering_keeps_a_shared_prefix() -> None:
    system = {"role": "system", "content": "You are a careful assistant. " * 20}
    first = render_chat([system, {"role": "user", "content": "What is a KV cache?"}])
    second = render_chat([system, {"role": "user", "content": [{"type": "text", "text": "Another question"}]}])
    a, b = prefix_block_hashes(tokenize(first)), prefix_block_hashes(tokenize(second))
    shared = 0
    while shared < min(len(a), len(b)) and a[shared] == b[shared]:
        shared += 1
    assert shared >= 5  # the system prompt's blocks are shared
    assert a[shared:] != b[shared:] or len(a) != len(b)
    with pytest.raises(ValueError, match=r"messages\[0\]\.role"):
        render_chat([{"content": "no role"}])


def test_prefix_hashes_are_chained_and_stable_across_processes() -> None:
    tokens = tokenize("one two three four five six seven eight nine ten " * 8)
    hashes = prefix_block_hashes(tokens, 16)
    assert len(hashes) == len(tokens) // 16
    changed = ["zero", *tokens[1:]]
    # Changing the first token changes every block's key, not only the first.
    assert all(x != y for x, y in zip(hashes, prefix_block_hashes(changed, 16), strict=True))
    code = (
        "from sim.textgen import prefix_block_hashes, tokenize;"
        "print(prefix_block_hashes(tokenize('one two three four five six seven eight nine ten ' * 8), 16))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={"PYTHONHASHSEED": "123", "PATH": ""},
    )
    assert other.stdout.strip() == str(hashes)


def test_output_text_is_deterministic_per_seed() -> None:
    seed = request_seed(7, "a prompt")
    first = OutputText(seed).take(20)
    assert OutputText(seed).take(20) == first
    assert OutputText(request_seed(8, "a prompt")).take(20) != first
    split = OutputText(seed)
    assert split.take(7) + split.take(13) == first


@pytest.mark.parametrize(
    ("spec", "low", "high"),
    [("fixed:12", 12, 12), ("uniform:5:9", 5, 9), ("lognormal:100:0.5", 1, 10_000)],
)
def test_output_length_distributions(spec: str, low: int, high: int) -> None:
    dist = OutputLengthDist.parse(spec)
    rng = random.Random(1)
    samples = [dist.sample(rng) for _ in range(2000)]
    assert all(low <= s <= high for s in samples)
    if spec.startswith("lognormal"):
        median = sorted(samples)[len(samples) // 2]
        assert 80 <= median <= 125
    assert OutputLengthDist.parse(str(dist)) == dist


@pytest.mark.parametrize("spec", ["fixed", "fixed:0", "fixed:2.5", "uniform:9:5", "lognormal:100", "gamma:1:2", "fixed:x"])
def test_bad_output_length_specs_say_what_is_expected(spec: str) -> None:
    with pytest.raises(OutputLengthError, match="expected fixed:N, uniform:A:B or lognormal:MEDIAN:SIGMA"):
        OutputLengthDist.parse(spec)


# ----------------------------------------------------------------- engine loop
def _engine(**engine_kwargs: object) -> EmulatedEngine:
    time_scale = float(engine_kwargs.pop("time_scale", 0.0))  # type: ignore[arg-type]
    return EmulatedEngine(
        EmulatedEngineConfig(engine=EngineConfig(**engine_kwargs), time_scale=time_scale)  # type: ignore[arg-type]
    )


async def test_requests_get_all_their_tokens_and_finish_reasons() -> None:
    engine = _engine()
    await engine.start()
    try:
        handles = [
            engine.submit(prompt_tokens=30 + i, output_tokens=5 + i, max_tokens=10, text_seed=i)
            for i in range(8)
        ]
        await asyncio.wait_for(asyncio.gather(*(h.wait_finished() for h in handles)), 10)
        for i, handle in enumerate(handles):
            assert handle.emitted == 5 + i
            assert handle.finish_reason == ("length" if 5 + i >= 10 else "stop")
            assert handle.first_token_s is not None and handle.finish_s is not None
            assert handle.arrival_s <= handle.first_token_s <= handle.finish_s
        load = engine.load()
        assert (load.running, load.waiting, load.kv_blocks_used) == (0, 0, 0)
        engine.core.check_invariants()
    finally:
        await engine.stop()


async def test_submit_before_start_and_oversize_requests_are_refused() -> None:
    engine = _engine(num_kv_blocks=4)
    with pytest.raises(RuntimeError, match="not started"):
        engine.submit(prompt_tokens=1, output_tokens=1, max_tokens=1, text_seed=0)
    await engine.start()
    try:
        with pytest.raises(EngineRequestError, match="KV blocks"):
            engine.submit(prompt_tokens=60, output_tokens=10, max_tokens=10, text_seed=0)
    finally:
        await engine.stop()


async def test_abort_frees_the_request_and_counts_it() -> None:
    engine = _engine(time_scale=0.05)
    await engine.start()
    try:
        handle = engine.submit(prompt_tokens=20, output_tokens=5000, max_tokens=5000, text_seed=1)
        while handle.emitted < 3:
            await asyncio.wait_for(handle.next_tokens(), 5)
        assert engine.load().running == 1
        assert engine.abort(handle.request_id)
        assert handle.done and handle.finish_reason == "abort"
        await handle.next_tokens()  # what came out before the abort can still be read
        assert await handle.next_tokens() == 0
        assert engine.load().running == 0 and engine.load().kv_blocks_used == 0
        assert not engine.abort(handle.request_id)
        assert engine.metrics.request_success["abort"] == 1
    finally:
        await engine.stop()


async def test_priority_policy_admits_the_lower_value_first() -> None:
    engine = _engine(max_num_seqs=1, scheduling_policy="priority", time_scale=0.0)
    await engine.start()
    try:
        blocker = engine.submit(prompt_tokens=10, output_tokens=30, max_tokens=30, text_seed=0)
        late_low = engine.submit(prompt_tokens=10, output_tokens=3, max_tokens=3, text_seed=1, priority=5)
        later_high = engine.submit(prompt_tokens=10, output_tokens=3, max_tokens=3, text_seed=2, priority=-1)
        await asyncio.wait_for(asyncio.gather(blocker.wait_finished(), late_low.wait_finished(),
                                              later_high.wait_finished()), 10)
        assert later_high.finish_s is not None and late_low.finish_s is not None
        assert later_high.finish_s < late_low.finish_s
    finally:
        await engine.stop()


def test_engine_cli_admit_preemption_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """`tokenyard engine --admit-preemption` (vLLM V0's priority admission) needs the
    priority policy; without the flag the engine admits as vLLM V1 does."""
    from cli.main import build_parser, main
    from sim.cli_engine import build_config

    parser = build_parser()
    assert not build_config(parser.parse_args(["engine", "--scheduling-policy", "priority"])).engine.admit_preemption
    args = parser.parse_args(["engine", "--scheduling-policy", "priority", "--admit-preemption"])
    assert build_config(args).engine.admit_preemption
    assert main(["engine", "--admit-preemption"]) == 2
    assert "--admit-preemption preempts by request priority: it needs --scheduling-policy priority" in (
        capsys.readouterr().err)


async def test_kv_pressure_preempts_and_everything_still_finishes() -> None:
    engine = _engine(num_kv_blocks=24, time_scale=0.0)
    await engine.start()
    try:
        handles = [
            engine.submit(prompt_tokens=50, output_tokens=120, max_tokens=120, text_seed=i) for i in range(4)
        ]
        await asyncio.wait_for(asyncio.gather(*(h.wait_finished() for h in handles)), 20)
        assert all(h.emitted == 120 for h in handles)
        assert engine.core.preemptions_total > 0
        families = {f.name: f for f in text_string_to_metric_families(generate_latest(engine.registry).decode())}
        assert families["vllm:num_preemptions"].samples[0].value == engine.core.preemptions_total
        engine.core.check_invariants()
    finally:
        await engine.stop()


async def test_two_engines_in_one_loop_keep_separate_metrics() -> None:
    a = EmulatedEngine(EmulatedEngineConfig(model="llama-3-8b", gpu="A100-80GB", time_scale=0.0))
    b = EmulatedEngine(EmulatedEngineConfig(model="qwen2.5-7b", gpu="L4", time_scale=0.0))
    await a.start()
    await b.start()
    try:
        await a.submit(prompt_tokens=10, output_tokens=7, max_tokens=7, text_seed=0).wait_finished()
        await b.submit(prompt_tokens=10, output_tokens=3, max_tokens=3, text_seed=0).wait_finished()
        for engine, tokens, name in ((a, 7, "llama-3-8b"), (b, 3, "qwen2.5-7b")):
            families = {f.name: f for f in text_string_to_metric_families(generate_latest(engine.registry).decode())}
            sample = families["vllm:generation_tokens"].samples[0]
            assert sample.value == tokens
            assert sample.labels["model_name"] == name
    finally:
        await a.stop()
        await b.stop()


async def test_the_loop_sleeps_the_modelled_iteration_time() -> None:
    # Loose: the wall time of a decode run is at least the modelled time (the loop never
    # runs ahead of the model), and the modelled inter-token time is what the core reported.
    engine = _engine(time_scale=1.0)
    await engine.start()
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        handle = engine.submit(prompt_tokens=20, output_tokens=12, max_tokens=12, text_seed=0)
        await asyncio.wait_for(handle.wait_finished(), 10)
        elapsed = loop.time() - started
        stats = engine.stats()
        assert stats["iterations"] == 12
        assert elapsed >= stats["model_clock_s"] * 0.95
        expected_itl = engine.engine_model.decode_time_per_token_s(1, 25)
        assert stats["modelled_itl_count"] == 11
        assert stats["modelled_itl_mean_s"] == pytest.approx(expected_itl, rel=0.1)
    finally:
        await engine.stop()


async def test_worker_grpc_describe_and_status_come_from_the_engine() -> None:
    engine = _engine(time_scale=0.02, num_kv_blocks=500)
    await engine.start()
    port = free_port()
    server = await start_worker_server(engine, "127.0.0.1", port)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            description = await stub.Describe(worker_pb2.DescribeRequest(), timeout=5)
            assert description.instance_id == engine.instance_id
            assert description.model == "llama-3-8b" and description.gpu == "A100-80GB"
            assert description.num_kv_blocks == 500 and description.block_size_tokens == 16
            handle = engine.submit(prompt_tokens=64, output_tokens=400, max_tokens=400, text_seed=0)
            stream = stub.Status(worker_pb2.StatusRequest(interval_ms=50), timeout=10)
            seen_running = False
            async for snapshot in stream:
                assert snapshot.kv_blocks_total == 500
                if snapshot.running == 1 and snapshot.kv_blocks_used >= 4:
                    seen_running = True
                    break
            stream.cancel()
            assert seen_running
            engine.abort(handle.request_id)
    finally:
        await server.stop(0)
        await engine.stop()
