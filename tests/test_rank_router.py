"""The router's ranker: predicted_rank per request, the rank priority forwarded to engines
over real HTTP, and its features in the request records that retraining reads (`rank.log`
is an alias of the records; tests/test_records.py tests the records themselves)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from learn.rank_data import load_examples
from router.config import parse_router_config
from router.rank import RankSettings, RequestRanker, completion_tokens
from router.records import RecordsSettings
from scheduler.predictors.features import FEATURE_SPEC_VERSION
from scheduler.queue_orders import build_queue_policy
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


def test_rank_log_is_an_alias_of_the_records(tmp_path: Path) -> None:
    cfg = parse_router_config({"rank": {"log": str(tmp_path / "rank.jsonl"), "log_max_bytes": 8192}}, "r.yaml")
    assert cfg.records == RecordsSettings(str(tmp_path / "rank.jsonl"), max_bytes=8192, keep_files=1,
                                          include_prompt_text=True)
    with pytest.raises(ConfigError, match="rank.log.*set only records.path"):
        parse_router_config({"rank": {"log": "a.jsonl"}, "records": {"path": "b.jsonl"}}, "r.yaml")


async def test_annotate_sets_the_rank_off_the_loop_and_keeps_the_features(tmp_path: Path) -> None:
    ranker = RequestRanker(RankSettings(), keep_features=True)
    engine_priority = build_queue_policy({"learned_rank": {"max_wait_s": 30}})
    try:
        body = {"model": "llama-3-8b", "messages": [{"role": "user", "content": "Write a long essay on tides."}]}
        info = RequestInfo("r1", "llama-3-8b", 12, arrival_s=100.0)
        ranked = await ranker.annotate(info, body)
        assert ranked.predicted_rank is not None and ranked.predicted_rank > 0
        prio = engine_priority.priority(ranked, None, 100.0)  # what the document's engine_priority gives
        assert prio is not None and CLASS_STRIDE <= prio < 2 * CLASS_STRIDE  # unknown class -> 1
        features = ranker.take_features("r1")
        assert features is not None and features.instruction_text == "Write a long essay on tides."
        assert ranker.take_features("r1") is None  # taken once: the pending table stays bounded
    finally:
        ranker.close()


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
    assert rows[0]["instruction_text"] == prompts[0] and rows[0]["feature_spec"] == FEATURE_SPEC_VERSION
    examples, _ = load_examples([log])
    assert [e.output_tokens for e in examples] == [2000, 2000]
