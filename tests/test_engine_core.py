"""EngineCore: block accounting and conservation under random workloads, and the decode
fast-forward (`plan_decode_run` / `complete_run`) against stepping one iteration at a time."""

from __future__ import annotations

import copy
import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.catalog import default_catalog
from scheduler.engine_model import EngineModel
from sim.engine_core import Batch, DecodeRun, EngineConfig, EngineCore, EngineRequest, RequestStatus

CATALOG = default_catalog()
MODEL = EngineModel(CATALOG.gpu("A100-80GB"), CATALOG.model("llama-3-8b"))


def make_core(num_kv_blocks: int, policy: str = "fcfs", max_num_seqs: int = 8, budget: int = 256,
              block_size: int = 4) -> EngineCore:
    return EngineCore(MODEL, EngineConfig(block_size=block_size, max_num_seqs=max_num_seqs,
                                          max_num_batched_tokens=budget, scheduling_policy=policy,
                                          num_kv_blocks=num_kv_blocks, max_model_len=4096))


def random_request(rng: random.Random, n: int, t: float, block_tokens: int = 8) -> EngineRequest:
    prompt = rng.randint(1, 80)
    shared = rng.randint(0, 3)  # leading prefix blocks shared with other requests
    hashes = tuple(range(1, shared + 1)) + tuple(1000 * n + k for k in range(prompt // block_tokens))
    return EngineRequest(f"r{n}", prompt_tokens=prompt, output_tokens=rng.randint(1, 40), arrival_s=t,
                         priority=rng.randint(0, 2), prefix_hashes=hashes[: prompt // block_tokens + 1],
                         prefix_block_tokens=block_tokens)


def state_of(core: EngineCore) -> tuple[object, ...]:
    core.sync()
    reqs = sorted(
        (r.request_id, r.status.value, r.computed_tokens, r.generated_tokens, r.own_blocks,
         tuple(r.shared_hashes), r.first_token_s, r.last_token_s, r.finish_s, r.preemptions)
        for r in core.requests.values()
    )
    return (core.free_blocks, core._evictable_blocks, list(core._cache), core.iterations_total,
            core.preemptions_total, core.prefix_cache_queries_tokens, core.prefix_cache_hits_tokens,
            [r.request_id for r in core.running], core.num_waiting, reqs)


def entries(core: EngineCore, batch: Batch) -> list[tuple[str, int]]:
    """Everyone a batch computes, in running order: a `schedule_fast` batch lists only the
    requests outside the decoding cohort; cohort members decode one token each."""
    listed = [(r.request_id, n) for r, n in batch.scheduled]
    if batch.cohort_decodes < 0:
        return listed
    members = [(r.request_id, 1) for r in core.running if r._in_cohort]
    assert len(members) == batch.cohort_decodes
    order = {r.request_id: k for k, r in enumerate(core.running)}
    return sorted(members + listed, key=lambda entry: order[entry[0]])


def shape(batch: Batch) -> tuple[object, ...]:
    return (batch.prefill_tokens, batch.decode_seqs, batch.context_tokens, batch.prefill_attention_pairs,
            batch.duration_s, [r.request_id for r in batch.preempted])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), blocks=st.integers(30, 300), policy=st.sampled_from(["fcfs", "priority"]),
       budget=st.sampled_from([16, 64, 512]), caching=st.booleans(), cut=st.booleans(),
       seats=st.sampled_from([2, 8, 64]), block_size=st.sampled_from([4, 16]), admit=st.booleans())
def test_fast_path_equals_stepping(seed: int, blocks: int, policy: str, budget: int, caching: bool, cut: bool,
                                   seats: int, block_size: int, admit: bool) -> None:
    """The simulator's path (`schedule_fast`, `plan_decode_run`, `complete_run`, with the
    cohort's progress held lazily) against `schedule`/`complete` one step at a time on a
    copy: the same batches, the same load an observer sees inside every run, the same
    finishes in the same order, and the same engine and request state after every step
    or run, on random workloads (prefix caching and eviction, priorities and preemption,
    with and without preemption to admit, small token budgets with chunked prompts, runs
    cut short, aborts)."""
    rng = random.Random(seed)
    fast = EngineCore(MODEL, EngineConfig(block_size=block_size, max_num_seqs=seats, max_num_batched_tokens=budget,
                                          scheduling_policy=policy, num_kv_blocks=blocks * 4 // block_size + 8,
                                          enable_prefix_caching=caching, max_model_len=4096,
                                          admit_preemption=admit and policy == "priority"))
    ref = copy.deepcopy(fast)
    t = 0.0
    n = 0
    runs = fast_steps = 0
    for _ in range(250):
        if rng.random() < 0.3 or not fast.has_work():
            req = random_request(rng, n, t, block_tokens=block_size * 2)
            fast.add_request(req)
            ref.add_request(copy.deepcopy(req))
            n += 1
        if rng.random() < 0.03 and fast.requests:
            victim = rng.choice(sorted(fast.requests))
            assert (fast.abort(victim) is None) == (ref.abort(victim) is None)
        batch = fast.schedule_fast()
        ref_batch = ref.schedule()
        assert entries(fast, batch) == entries(ref, ref_batch)
        assert shape(batch) == shape(ref_batch)
        fast_steps += batch.cohort_decodes >= 0
        run = fast.plan_decode_run(batch, t)
        if run is None:
            t += batch.duration_s
            out = fast.complete(batch, t)
            ref_out = ref.complete(ref_batch, t)
        else:
            runs += 1
            if cut and run.steps > 2:
                run.truncate(rng.randint(1, run.steps))
            step_batch = ref_batch
            step_t = t
            ref_finished: list[EngineRequest] = []
            for j in range(run.steps):
                assert ref.kv_blocks_used == run.kv_blocks_used_at(j)
                assert ref.tokens_in_flight == run.tokens_in_flight_at(j)
                if j > 0:  # step 0 may also finish prompts; every later step only decodes
                    assert step_batch.decode_seqs == run.sequences and not step_batch.prefill_tokens
                step_t += step_batch.duration_s
                assert step_t == pytest.approx(run.step_end_s(j + 1), rel=1e-12, abs=1e-12)
                assert run.steps_done_by(run.step_end_s(j + 1)) == j + 1
                ref_out = ref.complete(step_batch, run.step_end_s(j + 1))
                ref_finished += ref_out.finished
                assert not ref_out.finished or j == run.steps - 1
                if j < run.steps - 1:
                    step_batch = ref.schedule()
                    assert not step_batch.preempted
            out = fast.complete_run(run, run.end_s)
            t = run.end_s
        assert [r.request_id for r in out.finished] == [r.request_id for r in ref_out.finished]
        fast.check_invariants()
        ref.check_invariants()
        assert state_of(fast) == state_of(ref)
        assert fast.tokens_in_flight == ref.tokens_in_flight
    assert fast_steps > 0
    if budget == 512 and seats == 64:
        assert runs > 0


@settings(max_examples=200, deadline=None)
@given(block_size=st.integers(1, 32), slacks=st.lists(st.integers(0, 31), min_size=1, max_size=40),
       steps=st.integers(0, 200))
def test_blocks_allocated_in_closed_form(block_size: int, slacks: list[int], steps: int) -> None:
    """`DecodeRun.blocks_allocated` (O(1) from cumulative slack counts) equals summing each
    sequence's ceil((steps - slack) / block_size) new blocks."""
    slacks = [s % block_size for s in slacks]
    counts = [slacks.count(k) for k in range(block_size)]
    run = DecodeRun(batch=None, start_s=0.0, steps=max(1, steps), first_step_s=1.0,  # type: ignore[arg-type]
                    second_step_s=1.0, step_growth_s=0.0, sequences=len(slacks), block_size=block_size,
                    kv_blocks_used_start=0, tokens_in_flight_start=0,
                    _slack_at_most=list(itertools.accumulate(counts)))
    expected = sum(-(-(steps - s) // block_size) for s in slacks if steps > s)
    assert run.blocks_allocated(steps) == expected


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), blocks=st.integers(32, 120), policy=st.sampled_from(["fcfs", "priority"]),
       caching=st.booleans())
def test_conservation_and_block_bounds(seed: int, blocks: int, policy: str, caching: bool) -> None:
    rng = random.Random(seed)
    core = EngineCore(MODEL, EngineConfig(block_size=4, max_num_seqs=6, max_num_batched_tokens=64,
                                          scheduling_policy=policy, num_kv_blocks=blocks,
                                          enable_prefix_caching=caching, max_model_len=4096))
    wanted: dict[str, int] = {}
    finished: dict[str, int] = {}
    t = 0.0
    for n in range(30):
        req = random_request(rng, n, t)
        core.add_request(req)
        wanted[req.request_id] = req.output_tokens
        for _ in range(rng.randint(0, 5)):
            batch = core.schedule()
            t += batch.duration_s
            for done in core.complete(batch, t).finished:
                assert done.request_id not in finished
                finished[done.request_id] = done.generated_tokens
            core.check_invariants()
            assert 0 <= core.kv_blocks_used <= core.num_kv_blocks
    for _ in range(20_000):
        if not core.has_work():
            break
        batch = core.schedule()
        assert batch.scheduled, "an engine with work must schedule something"
        t += batch.duration_s
        for done in core.complete(batch, t).finished:
            assert done.request_id not in finished
            assert done.first_token_s is not None and done.first_token_s <= done.finish_s == t
            finished[done.request_id] = done.generated_tokens
        core.check_invariants()
        assert 0 <= core.free_blocks <= core.num_kv_blocks
    assert finished == wanted  # every request finished once, with exactly its tokens
    assert core.free_blocks + core._evictable_blocks == core.num_kv_blocks


def test_run_stops_before_kv_runs_out_and_at_the_first_finish() -> None:
    core = make_core(num_kv_blocks=40, block_size=4)
    for i, out in enumerate((100, 12, 100)):
        core.add_request(EngineRequest(f"r{i}", prompt_tokens=10, output_tokens=out))
    batch = core.schedule_fast()  # prefill
    core.complete(batch, batch.duration_s)
    batch = core.schedule_fast()
    run = core.plan_decode_run(batch, 1.0)
    assert run is not None
    assert run.steps == 11  # r1 has 11 tokens left; its last one ends the run
    out = core.complete_run(run, run.end_s)
    assert [r.request_id for r in out.finished] == ["r1"]
    # Now only the free blocks limit the stretch: 40 blocks of 4 tokens.
    batch = core.schedule_fast()
    run = core.plan_decode_run(batch, out.finished[0].finish_s or 0.0)
    assert run is not None and run.sequences == 2
    needed = run.blocks_allocated(run.steps - 1)
    assert needed <= core.free_blocks < run.blocks_allocated(run.steps)
    core.complete_run(run, run.end_s)
    assert all(r.status is RequestStatus.RUNNING for r in core.running)
    # schedule() (the step path) writes the cohort's progress back first.
    assert core.schedule().preempted


def test_runs_may_start_with_the_last_prompt_chunk_but_not_an_earlier_one() -> None:
    core = make_core(num_kv_blocks=100, budget=32)
    core.add_request(EngineRequest("a", prompt_tokens=40, output_tokens=5))
    batch = core.schedule_fast()  # first 32-token chunk of a 40-token prompt
    assert core.plan_decode_run(batch, 0.0) is None
    core.complete(batch, 1.0)
    batch = core.schedule_fast()  # the last 8 tokens: a's first token comes at the end
    run = core.plan_decode_run(batch, 1.0)
    assert run is not None and run.steps == 5
    out = core.complete_run(run, run.end_s)
    req = out.finished[0]
    assert req.first_token_s == run.step_end_s(1) == pytest.approx(1.0 + batch.duration_s)
    assert req.generated_tokens == 5 and req.computed_tokens == 44
    # A prompt finishing while another request waits for a seat: the waiting one could be
    # admitted in step 1, so no run.
    core = make_core(num_kv_blocks=100, budget=40)
    core.add_request(EngineRequest("b", prompt_tokens=40, output_tokens=5))
    core.add_request(EngineRequest("c", prompt_tokens=40, output_tokens=5))
    batch = core.schedule_fast()  # b's prompt; c does not fit the token budget
    assert core.num_waiting == 1 and core.plan_decode_run(batch, 0.0) is None
    # A prompt with prefix blocks to promote into the cache: no run either.
    core = make_core(num_kv_blocks=100)
    core.add_request(EngineRequest("d", prompt_tokens=40, output_tokens=5, prefix_hashes=(1, 2), prefix_block_tokens=8))
    assert core.plan_decode_run(core.schedule_fast(), 0.0) is None
    # A batch from the step path is never planned.
    core = make_core(num_kv_blocks=100)
    core.add_request(EngineRequest("e", prompt_tokens=8, output_tokens=5))
    core.complete(core.schedule(), 1.0)
    assert core.plan_decode_run(core.schedule(), 1.0) is None


def test_prefix_cache_queries_are_counted_once_per_admission() -> None:
    """A waiting request blocked on KV is looked up again every step; vLLM counts a lookup
    when the request is scheduled, so the query counter grows once per admission."""
    from scheduler.catalog import default_catalog
    from scheduler.engine_model import EngineModel
    from sim.engine_core import EngineConfig, EngineCore, EngineRequest

    catalog = default_catalog()
    model = EngineModel(catalog.gpu("A100-80GB"), catalog.model("llama-3-8b"))
    core = EngineCore(model, EngineConfig(num_kv_blocks=12, block_size=16))
    # The first request holds 11 of 12 blocks for a while; the second (96-token prompt, 6
    # blocks) waits for many steps before it fits.
    core.add_request(EngineRequest("hog", 160, 20, prefix_hashes=tuple(range(10)), prefix_block_tokens=16))
    core.add_request(EngineRequest("late", 96, 4, arrival_s=0.1, prefix_hashes=(100, 101, 102, 103, 104, 105),
                                   prefix_block_tokens=16))
    t = 0.0
    blocked_steps = 0
    while core.has_work():
        batch = core.schedule()
        blocked_steps += core.num_waiting
        t += batch.duration_s
        core.complete(batch, t)
        core.check_invariants()
    assert blocked_steps > 5  # the second request really was re-examined many times
    assert core.prefix_cache_queries_tokens == 160 + 96
    assert core.prefix_cache_hits_tokens == 0  # nothing shared


def _kv_full_of_low_priority(admit_preemption: bool, fast: bool) -> EngineCore:
    """10 blocks of 4 tokens; a low-priority request decoding in 8 of them; a high-priority
    one arrives that needs 3 (it does not fit in the 2 left)."""
    core = EngineCore(MODEL, EngineConfig(block_size=4, max_num_seqs=8, max_num_batched_tokens=256,
                                          scheduling_policy="priority", num_kv_blocks=10, max_model_len=4096,
                                          admit_preemption=admit_preemption))
    core.add_request(EngineRequest("low", prompt_tokens=30, output_tokens=8, arrival_s=0.0, priority=5))
    batch = core.schedule_fast() if fast else core.schedule()
    core.complete(batch, 1.0)  # low's prompt: 8 blocks held (30 tokens + the next one's slot)
    core.add_request(EngineRequest("high", prompt_tokens=12, output_tokens=4, arrival_s=1.0, priority=0))
    return core


@pytest.mark.parametrize("fast", [False, True])
def test_a_waiting_high_priority_request_does_not_preempt_to_be_admitted(fast: bool) -> None:
    """vLLM V1: the waiting loop stops at the first request that does not fit in KV; only a
    running request that must grow preempts (vllm/v1/core/sched/scheduler.py `schedule`)."""
    core = _kv_full_of_low_priority(admit_preemption=False, fast=fast)
    batch = core.schedule_fast() if fast else core.schedule()
    assert not batch.preempted and core.preemptions_total == 0
    assert [r.request_id for r in core.running] == ["low"] and core.num_waiting == 1
    t = 1.0
    while core.has_work():  # high is admitted when low finishes and frees its blocks
        t += batch.duration_s
        out = core.complete(batch, t)
        core.check_invariants()
        if out.finished:
            assert [r.request_id for r in out.finished] == ["low"]
            break
        batch = core.schedule_fast() if fast else core.schedule()
        assert not batch.preempted
    assert core.requests["high"].status is RequestStatus.WAITING
    batch = core.schedule_fast() if fast else core.schedule()
    assert [r.request_id for r in core.running] == ["high"] and core.preemptions_total == 0


@pytest.mark.parametrize("fast", [False, True])
def test_admit_preemption_preempts_the_lower_priority_to_admit(fast: bool) -> None:
    """`admit_preemption` (vLLM V0's priority scheduler): the lower-priority running
    request gives its blocks to the higher-priority waiting one."""
    core = _kv_full_of_low_priority(admit_preemption=True, fast=fast)
    batch = core.schedule_fast() if fast else core.schedule()
    assert [r.request_id for r in batch.preempted] == ["low"] and core.preemptions_total == 1
    assert [r.request_id for r in core.running] == ["high"]
    assert core.requests["low"].status is RequestStatus.WAITING and core.requests["low"].computed_tokens == 0
    core.check_invariants()


@pytest.mark.parametrize("admit_preemption", [False, True])
def test_running_requests_preempt_the_lowest_priority_to_grow(admit_preemption: bool) -> None:
    """With or without preemption to admit, a running request that needs a block when KV
    is full preempts the lowest-priority running request (max of priority, arrival), as
    vLLM V1's running loop does, and runs on in the same step."""
    core = EngineCore(MODEL, EngineConfig(block_size=4, max_num_seqs=8, max_num_batched_tokens=256,
                                          scheduling_policy="priority", num_kv_blocks=7, max_model_len=4096,
                                          admit_preemption=admit_preemption))
    core.add_request(EngineRequest("low", prompt_tokens=8, output_tokens=20, arrival_s=0.0, priority=9))
    core.complete(core.schedule(), 1.0)  # low: 2 blocks
    core.add_request(EngineRequest("high", prompt_tokens=8, output_tokens=20, arrival_s=1.0, priority=0))
    core.add_request(EngineRequest("mid", prompt_tokens=8, output_tokens=20, arrival_s=1.0, priority=3))
    batch = core.schedule()  # low grows to 3 blocks; high and mid fit in 2 each: KV is full
    assert [r.request_id for r, _ in batch.scheduled] == ["low", "high", "mid"] and not batch.preempted
    assert core.free_blocks == 0
    core.complete(batch, 2.0)
    # high and mid need a 3rd block for their 9th token. The victim is low, first in the
    # running order: chosen by priority, not position (FCFS would take the last, mid).
    batch = core.schedule()
    assert [r.request_id for r in batch.preempted] == ["low"]
    assert [r.request_id for r, _ in batch.scheduled] == ["high", "mid"]
    assert core.requests["low"].status is RequestStatus.WAITING and core.preemptions_total == 1
    core.check_invariants()


def test_admit_preemption_needs_the_priority_policy() -> None:
    from sim.engine_core import EngineConfigError

    with pytest.raises(EngineConfigError, match="admit_preemption: .* needs scheduling_policy 'priority'"):
        EngineConfig(admit_preemption=True)
    assert EngineConfig(scheduling_policy="priority", admit_preemption=True).admit_preemption
    assert not EngineConfig(scheduling_policy="priority").admit_preemption  # vLLM V1 by default
