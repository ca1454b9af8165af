"""The router's request records (router/records.py): the config section, the bounded writer
(rotation, drops counted when the writer is stuck on a real blocking file), the records of
real HTTP requests through a router (streamed and not, with and without a usage block, a
failed upstream), the privacy default, and `tokenyard train rank` retraining from records
of real streamed requests."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from cli.main import main
from learn.rank_data import RankDataError, load_examples
from router.config import parse_router_config
from router.records import (
    RecordsMetrics,
    RecordsSettings,
    RecordWriter,
    RequestRecords,
    per_worker,
    read_recent,
    record_files,
)
from router.state import InstanceRecord
from scheduler.predictors.rank import load_rank_model
from tests.conftest import free_port
from tests.test_router_support import fake_engines, running_router
from tokenyard.config import ConfigError

CHAT = "/v1/chat/completions"


@pytest.mark.parametrize("raw, message", [
    ({}, "records.path: expected a file path"),
    ({"path": "r.jsonl", "max_bytes": 10}, "records.max_bytes: expected an integer >= 4096"),
    ({"path": "r.jsonl", "keep_files": 0}, "records.keep_files"),
    ({"path": "r.jsonl", "queue_max": True}, "records.queue_max"),
    ({"path": "r.jsonl", "include_prompt_text": "yes"}, "records.include_prompt_text: expected true or false"),
    ({"path": "r.jsonl", "rotate": 3}, "unknown key"),
    ("r.jsonl", "expected a mapping"),
])
def test_records_section_errors_say_where(raw: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_router_config({"records": raw}, "r.yaml")


def _record(i: int, arrival_s: float) -> dict[str, Any]:
    return {"request_id": f"r{i}", "arrival_s": arrival_s, "input_tokens": 10, "output_tokens": 20, "pad": "x" * 100}


def _dropped(registry: CollectorRegistry, reason: str) -> float:
    return registry.get_sample_value("tokenyard_router_records_dropped_total", {"reason": reason}) or 0.0


def test_writer_rotates_by_size_and_keeps_n_files(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    path = tmp_path / "records.jsonl"
    writer = RecordWriter(RecordsSettings(str(path), max_bytes=4096, keep_files=2), RecordsMetrics(registry))
    now = time.time()
    for i in range(300):
        assert writer.submit(_record(i, now))
    writer.close()
    files = record_files(path, 5)
    assert [f.name for f in files] == ["records.jsonl.2", "records.jsonl.1", "records.jsonl"]
    assert all(f.stat().st_size <= 4096 for f in files)
    assert not (tmp_path / "records.jsonl.3").exists()  # the oldest went
    assert registry.get_sample_value("tokenyard_router_records_written_total") == 300
    lines, truncated = read_recent(path, 2, now - 1, 10_000, 1 << 20)
    ids = [json.loads(line)["request_id"] for line in lines]
    assert not truncated and ids == [f"r{i}" for i in range(300 - len(ids), 300)]  # the newest, in order
    lines, truncated = read_recent(path, 2, now - 1, 5, 1 << 20)
    assert truncated and [json.loads(line)["request_id"] for line in lines] == [f"r{i}" for i in range(295, 300)]
    assert read_recent(path, 2, now + 3600, 100, 1 << 20) == ([], False)  # nothing that recent


def test_a_stuck_writer_drops_and_counts_and_never_blocks(tmp_path: Path) -> None:
    """The records file is a FIFO nobody reads: the writer thread blocks in open(), the
    bounded queue fills, and submit() drops (counted) without waiting."""
    registry = CollectorRegistry()
    fifo = tmp_path / "records.jsonl"
    os.mkfifo(fifo)
    writer = RecordWriter(RecordsSettings(str(fifo), max_bytes=1 << 20, queue_max=3), RecordsMetrics(registry))
    started = time.monotonic()
    accepted = sum(writer.submit(_record(i, time.time())) for i in range(50))
    assert time.monotonic() - started < 0.5  # never waited for the writer
    assert accepted <= 6  # the queue's 3, and at most one drain of 3 the thread took before it blocked
    assert _dropped(registry, "queue_full") == 50 - accepted
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()  # a reader unblocks the writer; what was queued is written
    writer.close()
    reader.join(5)
    assert len(got[0].splitlines()) == accepted


def test_write_errors_are_counted_not_raised(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    (tmp_path / "a-file").write_text("")  # the records "folder" is a file: nothing can be written
    writer = RecordWriter(RecordsSettings(str(tmp_path / "a-file" / "r.jsonl")), RecordsMetrics(registry))
    assert writer.submit(_record(1, time.time()))
    writer.close()
    assert _dropped(registry, "write_error") == 1


def test_router_workers_write_files_of_their_own_and_read_them_all(tmp_path: Path) -> None:
    config = parse_router_config({"records": {"path": str(tmp_path / "records.jsonl")}}, "r.yaml")
    workers = [per_worker(config, i, 2) for i in range(2)]
    assert [w.records.path for w in workers] == [str(tmp_path / "records.w0.jsonl"), str(tmp_path / "records.w1.jsonl")]
    now = time.time()
    for index, worker in enumerate(workers):
        records = RequestRecords(worker.records, CollectorRegistry(), slo_targets_s=lambda _: (1.0, 0.1))
        for i in range(3):
            records.writer.submit(_record(i * 2 + index, now + i * 2 + index))  # interleaved arrivals
        records.close()
    reader = RequestRecords(workers[0].records, CollectorRegistry(), slo_targets_s=lambda _: (1.0, 0.1))
    lines, truncated = reader.recent(now - 1, 4, 1 << 20)
    reader.close()
    assert truncated and [json.loads(line)["request_id"] for line in lines] == ["r2", "r3", "r4", "r5"]


async def _stream(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> bytes:
    async with client.stream("POST", path, json=body) as reply:
        assert reply.status_code == 200
        return b"".join([chunk async for chunk in reply.aiter_bytes()])


async def test_router_records_every_request_streamed_or_not(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    doc = {"records": {"path": str(path)}, "rank": {}}
    dead = InstanceRecord("dead", f"http://127.0.0.1:{free_port()}", "qwen2.5-1.5b", gpu="L4", pool="l4")
    messages = [{"role": "user", "content": "Tell me a secret about the sea."}]
    with fake_engines(()) as (engine,):
        async with running_router([engine.record("e0"), dead], doc) as server, \
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as client:
            reply = await client.post(CHAT, json={"model": "llama-3-8b", "messages": messages, "max_tokens": 5})
            assert reply.status_code == 200
            await _stream(client, CHAT, {"model": "llama-3-8b", "messages": messages, "max_tokens": 7,
                                         "stream": True})
            await _stream(client, "/v1/completions", {"model": "llama-3-8b", "prompt": "Tell me", "max_tokens": 9,
                                                      "stream": True, "stream_options": {"include_usage": True}})
            failed = await client.post(CHAT, json={"model": "qwen2.5-1.5b", "messages": messages})
            assert failed.status_code == 502
            metrics = (await client.get("/metrics")).text
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert "tokenyard_router_records_written_total" in metrics  # exported (its value: the writer's pace)
    assert len(rows) == 4
    plain, chat_stream, text_stream, broken = rows
    assert (plain["stream"], plain["output_tokens"], plain["output_tokens_from"]) == (False, 5, "usage")
    assert plain["first_token_s"] is None and plain["ttft_ms"] is None  # a body's first byte is its last
    assert (chat_stream["output_tokens"], chat_stream["output_tokens_from"]) == (7, "events")  # no usage: counted
    assert (text_stream["output_tokens"], text_stream["output_tokens_from"]) == (9, "usage")
    for row in (plain, chat_stream, text_stream):
        assert (row["instance_id"], row["pool"], row["gpu"], row["status"], row["rejected"]) == \
            ("e0", "default", "A100-80GB", 200, False)
        assert row["tenant"] == "anonymous" and row["slo_class"] == "default" and row["model"] == "llama-3-8b"
        assert row["finish_s"] >= row["arrival_s"] and row["e2e_ms"] >= 0 and row["instance_inflight"] == 1
        assert row["ttft_slo_s"] == 3.0 and row["tpot_slo_s"] == 0.2 and len(row["dense"]) > 10
        assert "prompt" not in row and "instruction_text" not in row  # privacy: no text unless configured
    for row in (chat_stream, text_stream):
        assert row["arrival_s"] <= row["first_token_s"] <= row["finish_s"] and row["tpot_ms"] is not None
    assert (broken["status"], broken["rejected"], broken["instance_id"], broken["output_tokens"]) == \
        (502, True, "", 0)
    assert broken["finish_s"] is None and "HTTP 502" in broken["reject_reason"]


async def test_prompt_text_only_when_configured(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    doc = {"records": {"path": str(path), "include_prompt_text": True}}
    with fake_engines(()) as (engine,):
        async with running_router([engine.record("e0")], doc) as server, \
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as client:
            await client.post(CHAT, json={"model": "llama-3-8b", "max_tokens": 3, "messages": [
                {"role": "system", "content": "be brief"}, {"role": "user", "content": "What is a tide?"}]})
    (row,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert row["prompt"] == "What is a tide?" and "dense" not in row  # no ranker, no features


async def test_train_rank_retrains_from_records_of_streamed_requests(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Streamed answers reach the retraining data: real streams through a router with the
    ranker on, then `tokenyard train rank --data RECORDS.jsonl` on them."""
    path = tmp_path / "records.jsonl"
    doc = {"records": {"path": str(path)}, "rank": {}}
    words = ["tides", "stars", "rivers", "cats", "bridges", "engines", "forests", "cities"]
    with fake_engines(()) as (engine,):
        async with running_router([engine.record("e0")], doc) as server, \
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as client:
            for i in range(160):
                long = i % 2 == 0
                prompt = (f"Write a detailed {300 + i}-word essay about {words[i % 8]}." if long
                          else f"In one word: what colour are {words[i % 8]}?")
                await _stream(client, CHAT, {"model": "llama-3-8b", "stream": True,
                                             "max_tokens": 200 + i if long else 2 + i % 3,
                                             "messages": [{"role": "user", "content": prompt}]})
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 160 and all(r["stream"] and r["dense"] for r in rows)
    examples, _ = load_examples([path])
    assert sorted(e.output_tokens for e in examples) == sorted(r["output_tokens"] for r in rows)
    out = tmp_path / "model.json.gz"
    code = main(["train", "rank", "--data", str(path), "--out", str(out), "--trees", "30", "--no-refit",
                 "--no-word-models"])
    assert code == 0, capsys.readouterr().err
    model = load_rank_model(out)
    long_req = {"messages": [{"role": "user", "content": "Write a detailed 500-word essay about lakes."}],
                "max_tokens": 400, "input_tokens": 12}
    short_req = {"messages": [{"role": "user", "content": "In one word: what colour are lakes?"}],
                 "max_tokens": 3, "input_tokens": 10}
    assert model.score(long_req) > model.score(short_req)


def test_records_without_features_say_what_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps({"request_id": "a", "status": 200, "rejected": False, "output_tokens": 5}) + "\n"
                    + json.dumps({"request_id": "b", "status": 502, "rejected": True, "output_tokens": 0}) + "\n")
    with pytest.raises(RankDataError, match="carry no ranker features: turn the ranker on"):
        load_examples([path])


async def test_requests_no_instance_takes_are_recorded_as_refused(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    doc = {"records": {"path": str(path)},
           "policies": {"default": {"filters": ["model", "healthy", "not_draining", "kv_room"],
                                    "scorers": ["least_outstanding"]}}}
    with fake_engines(()) as (engine,):
        async with running_router([engine.record("e0")], doc) as server, \
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as client:
            server.router.registry.update_load("e0", kv_blocks_total=1000, kv_blocks_used=999, block_size_tokens=16)
            small = await client.post("/v1/completions", json={"model": "llama-3-8b", "prompt": "word " * 100,
                                                               "max_tokens": 4})
            huge = await client.post("/v1/completions", json={"model": "llama-3-8b", "prompt": "word " * 30_000,
                                                              "max_tokens": 4, "stream": True})
            assert (small.status_code, huge.status_code) == (503, 400)
    busy, never = [json.loads(line) for line in path.read_text().splitlines()]
    assert (busy["status"], busy["rejected"], busy["max_tokens"], busy["stream"]) == (503, True, 4, False)
    assert (never["status"], never["rejected"], never["stream"]) == (400, True, True)
    assert busy["reject_reason"].startswith("no instance") and busy["input_tokens"] > 50
    assert never["finish_s"] is None and never["instance_id"] == ""


async def test_a_stream_without_usage_counts_the_events_that_carry_text() -> None:
    from router.workload_recorder import UsageMeter

    async def sink(message: Any) -> None:
        return None

    def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return b"data: " + json.dumps({"id": "c", "choices": [{"index": 0, "delta": delta,
                                                                 "finish_reason": finish}]}).encode() + b"\n\n"

    chunks = [event({"role": "assistant", "content": ""}), *(event({"content": f"t{i}"}) for i in range(5)),
              event({}, "length") + b"data: [DONE]\n\n"]
    meter = UsageMeter(sink, detail=True)
    await meter({"type": "http.response.start", "status": 200, "headers": [(b"x-tokenyard-instance", b"e0")]})
    for chunk in chunks:
        await meter({"type": "http.response.body", "body": chunk, "more_body": True})
    assert meter.output_tokens() == (5, "events") and meter.instance == "e0"
    single = UsageMeter(sink, detail=True)  # one chunk holding the whole stream
    await single({"type": "http.response.body", "body": b"".join(chunks), "more_body": True})
    assert single.output_tokens() == (5, "events")
    empty = UsageMeter(sink, detail=True)  # an answer with no text at all, in two sends
    await empty({"type": "http.response.body", "body": chunks[0], "more_body": True})
    await empty({"type": "http.response.body", "body": chunks[-1], "more_body": True})
    assert empty.output_tokens() == (0, "events")
