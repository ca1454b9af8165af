"""Front-end cost in the simulator: router + API-server time shifts TTFT and E2E, not TPOT."""

from __future__ import annotations

import pytest

from scheduler.engine_model import FrontEndCost
from sim.cluster import parse_cluster
from sim.simulator import simulate
from sim.workload import TraceRequest
from tokenyard.config import ConfigError


def _cluster(front_end: object) -> object:
    doc = {"pools": [{"name": "a", "gpu": "A100-80GB", "model": "llama-3-8b", "count": 1}], "front_end": front_end}
    return parse_cluster(doc, "fe.yaml")


def test_front_end_adds_its_cost_to_ttft_only() -> None:
    requests = [TraceRequest("short", 0.0, 100, 20), TraceRequest("long", 10.0, 8000, 20)]
    plain = {r.request_id: r for r in simulate(_cluster(False), requests).records}  # type: ignore[arg-type]
    costed = {r.request_id: r for r in simulate(_cluster({"fixed_ms": 5, "per_prompt_token_us": 2}),  # type: ignore[arg-type]
                                                requests).records}
    for rid, prompt in (("short", 100), ("long", 8000)):
        extra = 0.005 + prompt * 2e-6
        assert costed[rid].ttft_s == pytest.approx(plain[rid].ttft_s + extra)
        assert costed[rid].e2e_s == pytest.approx(plain[rid].e2e_s + extra)
        assert costed[rid].tpot_s == pytest.approx(plain[rid].tpot_s)
        assert costed[rid].arrival_s == requests[0 if rid == "short" else 1].arrival_s
    default = {r.request_id: r for r in simulate(_cluster(True), requests).records}  # type: ignore[arg-type]
    assert default["short"].ttft_s - plain["short"].ttft_s == pytest.approx(FrontEndCost().time_s(100))


def test_a_long_prompt_can_be_overtaken_by_a_later_short_one() -> None:
    # The 8k-token prompt's tokenisation (16 ms at 2 us/token) lets the request sent 1 ms
    # later reach the engine first: it is scheduled first.
    requests = [TraceRequest("long", 0.0, 8000, 5), TraceRequest("short", 0.001, 10, 5)]
    records = {r.request_id: r for r in simulate(_cluster({"fixed_ms": 0, "per_prompt_token_us": 2}),  # type: ignore[arg-type]
                                                 requests).records}
    assert records["short"].first_token_s < records["long"].first_token_s  # type: ignore[operator]


@pytest.mark.parametrize("raw, expected", [("yes", "expected true, false or a mapping"),
                                           ({"fixed_ms": -1}, "fixed_ms: expected a non-negative number"),
                                           ({"fixed": 1}, "unknown key(s) fixed")])
def test_bad_front_end_names_the_key(raw: object, expected: str) -> None:
    with pytest.raises(ConfigError, match="front_end") as error:
        _cluster(raw)
    assert expected in str(error.value)
