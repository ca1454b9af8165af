"""The router's ranker: predicted_rank per request, the rank priority forwarded to engines
over real HTTP, and the finished-request log that retraining reads."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from learn.rank_data import load_examples
from router.config import parse_router_config
from router.rank import RankLog, RankSettings, RequestRanker, completion_tokens
from scheduler.predictors.features import FEATURE_SPEC_VERSION, request_features
from scheduler.queueing import build_queue_policy
from scheduler.rank_queue import CLASS_STRIDE
from scheduler.types import RequestInfo
from tests.test_router_support import fake_engines, running_router
from tokenyard.config import ConfigError


@pytest.mark.parametrize("raw, message", [
    ({"modle": "x"}, "unknown key"),
    ({"model": 3}, "rank.model: expected a file path"),
    ({"log_max_bytes": 10}, "log_max_bytes"),
    ({"queue_policy": {"learned_rank": {}}}, "moved to the policy document: set policy.queue.engine_priority"),
])
def test_rank_section_errors_say_where(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_router_config({"rank": raw}, "r.yaml")


def test_completion_tokens_from_bodies_and_events() -> None:
    assert completion_tokens(b'{"usage": {"prompt_tokens": 3, "completion_tokens": 17}}') == 17
    assert completion_tokens(b'data: {"choices": [], "usage": {"completion_tokens": 4}}\n\n') == 4
    assert completion_tokens(b'{"choices": []}') is None
    assert completion_tokens(b'{"usage": {"completion_tokens": "many"}}') is None


def test_rank_log_appends_and_rotates(tmp_path: Path) -> None:
    path = tmp_path / "rank.jsonl"
    log = RankLog(path, max_bytes=4096)
    feats = request_features({"prompt": "Write a poem about the sea", "model": "m"})
    for _ in range(40):
        log.append(feats, "m", 12)
    assert path.exists() and (tmp_path / "rank.jsonl.1").exists()
    assert path.stat().st_size <= 4096
    examples, _ = load_examples([path])
    assert examples and all(e.output_tokens == 12 and e.features == feats for e in examples)


async def test_annotate_sets_the_rank_off_the_loop_and_logs_the_finish(tmp_path: Path) -> None:
    ranker = RequestRanker(RankSettings(log_path=str(tmp_path / "log.jsonl")))
    engine_priority = build_queue_policy({"learned_rank": {"max_wait_s": 30}})
    try:
        body = {"model": "llama-3-8b", "messages": [{"role": "user", "content": "Write a long essay on tides."}]}
        info = RequestInfo("r1", "llama-3-8b", 12, arrival_s=100.0)
        ranked = await ranker.annotate(info, body)
        assert ranked.predicted_rank is not None and ranked.predicted_rank > 0
        prio = engine_priority.priority(ranked, None, 100.0)  # what the document's engine_priority gives
        assert prio is not None and CLASS_STRIDE <= prio < 2 * CLASS_STRIDE  # unknown class -> 1
        ranker.finished(ranked, b'{"usage": {"completion_tokens": 321}}')
    finally:
        ranker.close()
    line = json.loads((tmp_path / "log.jsonl").read_text())
    assert line["output_tokens"] == 321 and line["model"] == "llama-3-8b" and line["feature_spec"] == FEATURE_SPEC_VERSION


async def test_router_forwards_the_rank_priority_and_logs_finished_requests(tmp_path: Path) -> None:
    log = tmp_path / "live.jsonl"
    doc = {"rank": {"log": str(log)},
           "policy": {"queue": {"engine_priority": {"learned_rank": {"max_wait_s": None}}}}}
    prompts = ["Write a 1500-word story about a lighthouse keeper and her cat.",
               "Reply with one word: what colour is the sky?"]
    with fake_engines(()) as (engine,):
        async with running_router([engine.record("e0")], doc) as server:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
                for prompt in prompts:
                    reply = await client.post("/v1/chat/completions", json={
                        "model": "llama-3-8b", "messages": [{"role": "user", "content": prompt}], "max_tokens": 2000})
                    assert reply.status_code == 200, reply.text
            priorities = (await engine.stats())["priorities"]
    assert len(priorities) == 2
    assert priorities[0] > priorities[1]  # the long story goes after the one-word answer
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["output_tokens"] for r in rows] == [2000, 2000]  # the fake engine writes max_tokens
    assert rows[0]["instruction_text"] == prompts[0]
