"""The workload histogram the routers record (router/workload_recorder.py).

Two real routers share one embedded state store and one emulated engine on loopback;
requests through both (plain, streamed with usage, streamed without) land in the store,
and `read_workload` merges the replicas' histograms per model with the usage's lengths.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from router.state import FileStateStore, InstanceRecord
from router.workload_recorder import (
    _COMPLETION,
    _PROMPT,
    STORE_KEY_PREFIX,
    UsageMeter,
    WorkloadRecorder,
    _last_match,
    merge_documents,
    read_workload,
)
from tests.test_router_support import emulated_engine, running_router

MODEL = "llama-3-8b"


async def _send(url: str, stream: bool, usage: bool) -> None:
    body: dict[str, object] = {"model": MODEL, "prompt": "hello " * 300, "max_tokens": 8, "stream": stream}
    if usage:
        body["stream_options"] = {"include_usage": True}
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.post(url + "/v1/completions", json=body)
        assert response.status_code == 200, response.text


def test_two_routers_record_into_one_histogram(tmp_path: Path) -> None:
    async def main() -> None:
        store_a = FileStateStore(tmp_path / "state.db")
        store_b = FileStateStore(tmp_path / "state.db")
        async with emulated_engine(MODEL, "A100-80GB") as engine:
            record = InstanceRecord("e0", f"http://127.0.0.1:{engine.port}", MODEL, gpu="A100-80GB")
            async with running_router([record], store=store_a) as ra, running_router([record], store=store_b) as rb:
                for _ in range(3):
                    await _send(ra.url, stream=False, usage=False)
                await _send(rb.url, stream=True, usage=True)
                await _send(rb.url, stream=True, usage=False)
                assert ra.router.workload is not None and rb.router.workload is not None
                assert ra.router.workload.replica_id != rb.router.workload.replica_id
                await ra.router.workload.flush()
                await rb.router.workload.flush()
                merged = await read_workload(store_a)
        assert set(merged) == {MODEL}
        hist = merged[MODEL]
        # ~300-word prompt: input bucket [256, 1024) (row 1); 8 output tokens: column 0.
        cells = {(klass, i, j): n for (_, klass, i, j), n in hist.counts.items()}
        assert sum(cells.values()) == 5
        assert cells.get(("default", 1, 0), 0) == 5, cells
        # Rates over the slots so far: 5 requests in the current slot count once it closes.
        later_s = time.time() + hist.slot_s
        assert sum(hist.rates(later_s, hist.slot_s).values()) == pytest.approx(5 / hist.slot_s)

    asyncio.run(main())


def test_usage_meter_reads_usage_and_counts_stream_events() -> None:
    sent: list[dict[str, object]] = []

    async def sink(message: dict[str, object]) -> None:
        sent.append(message)

    async def main() -> None:
        meter = UsageMeter(sink)
        await meter({"type": "http.response.start", "status": 200, "headers": []})
        await meter({"type": "http.response.body", "body": b'{"x": "' + b"y" * 5000 + b'", "usage": '
                     b'{"prompt_tokens": 812, "completion_tokens": 33}}'})
        assert meter.usage() == (812, 33)
        stream = UsageMeter(sink)
        await stream({"type": "http.response.start", "status": 200})
        for _ in range(7):
            await stream({"type": "http.response.body", "body": b'data: {"choices": []}\n\n', "more_body": True})
        await stream({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True})
        assert stream.usage() == (None, 7)
        assert len(stream.tail) <= 2048 and len(sent) == 11  # everything passed through

    asyncio.run(main())


def test_usage_numbers_are_read_as_the_regex_reads_them() -> None:
    """`_last_match` reads the number after the key with a byte loop (`_number_after`), not
    the regex: the same answer for every spacing, digit run and malformed tail."""
    import random

    rng = random.Random(7)
    pieces = [b" ", b"\t", b"\n", b"\r", b"\x0b", b"\x0c", b":", b"0", b"7", b"12", b"-", b"x", b'"', b",", b"}",
              b"\xa0", b"\x85", b'"completion_tokens"', b'"prompt_tokens"']
    tails = [b'{"usage": {"prompt_tokens": 812, "completion_tokens": 33}}', b'"completion_tokens":', b"",
             b'"completion_tokens" : \n 0042}', b'"completion_tokens": 5, "completion_tokens": x',
             b'"completion_tokens"\xa0: 5']
    tails += [b"".join(rng.choice(pieces) for _ in range(rng.randrange(1, 14))) for _ in range(4000)]
    for tail in tails:
        for pattern, key in ((_COMPLETION, b'"completion_tokens"'), (_PROMPT, b'"prompt_tokens"')):
            at = tail.rfind(key)
            found = pattern.match(tail, at) if at >= 0 else None
            every = pattern.findall(tail, 0, at) if at >= 0 else []
            expected = (int(found.group(1)) if found is not None else int(every[-1]) if every else None) \
                if at >= 0 else None
            assert _last_match(pattern, key, tail) == expected, tail


def test_recorder_is_bounded_and_drops_old_slots(tmp_path: Path) -> None:
    now = [1_800_000_000.0]

    async def main() -> None:
        store = FileStateStore(tmp_path / "s.db")
        rec = WorkloadRecorder(store, "r1", slot_s=10, keep_slots=3, max_models=2, clock=lambda: now[0])
        for k in range(50):
            now[0] += 1.0
            rec.record(f"m{k % 3}", "default", 100, 10)
        assert rec.dropped == 50 // 3 + (1 if 50 % 3 > 2 else 0)  # the third model is never recorded
        await rec.flush()
        slots = {slot for hist in rec._histograms.values() for (slot, *_rest) in hist.counts}
        assert max(slots) - min(slots) <= 3  # older slots dropped at flush
        docs = await store.get_loads()
        assert set(docs) == {STORE_KEY_PREFIX + "r1"}
        assert set(merge_documents(docs)) == {"m0", "m1"}
        # A replica with other edges is skipped, not merged into garbage.
        bad = dict(docs[STORE_KEY_PREFIX + "r1"])
        bad["models"] = {"m0": {**bad["models"]["m0"], "input_edges": [0, 5]}}
        merged = merge_documents({**docs, STORE_KEY_PREFIX + "r2": bad})
        assert sum(merged["m0"].counts.values()) == sum(rec._histograms["m0"].counts.values())
        await store.close()

    asyncio.run(main())


def test_the_recorders_bucket_search_is_the_planners() -> None:
    import random

    from router.workload_recorder import _bucket_of
    from scheduler.planner.problem import bucket_of

    rng = random.Random(17)
    for _ in range(2000):
        edges = tuple(rng.randint(-50, 5000) for _ in range(rng.randint(2, 9)))
        if rng.random() < 0.8:
            edges = tuple(sorted(edges))  # the usual case; unsorted ones must agree too
        for tokens in (rng.randint(-100, 6000), edges[0], edges[-1], edges[len(edges) // 2] - 1, 10**30):
            assert _bucket_of(edges, tokens) == bucket_of(edges, tokens), (edges, tokens)
