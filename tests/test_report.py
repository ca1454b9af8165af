"""Reports on constructed run results: summary fields against hand-computed values, record
files, tables and plots."""

from __future__ import annotations

import json

import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from scheduler.types import SloClass
from sim.records import InstanceStats, RequestRecord, SimResult, TimelineSample
from sim.report import (
    atomic_path,
    comparison_table,
    format_summary,
    plot_latency_cdfs,
    plot_load_over_time,
    plot_sweep,
    summarize,
    write_json,
    write_records,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SLO = {"interactive": SloClass("interactive", ttft_slo_ms=500.0, tpot_slo_ms=50.0),
       "batch": SloClass("batch", ttft_slo_ms=10_000.0, tpot_slo_ms=500.0)}


def _record(rid: str, arrival: float, first: float | None, finish: float | None, out: int,
            slo_class: str = "interactive", pool: str = "a100", **kw) -> RequestRecord:
    return RequestRecord(
        request_id=rid, tenant="t", slo_class=slo_class, model="m", pool=pool,
        instance_id=f"{pool}-0", gpu="A100", arrival_s=arrival, dispatch_s=arrival,
        first_token_s=first, finish_s=finish, input_tokens=100, output_tokens=out, **kw)


def _result() -> SimResult:
    records = [
        # ttft 0.2 s, tpot (1.2-0.2)/10 = 0.1 s: ttft met, tpot missed (interactive)
        _record("r0", 0.0, 0.2, 1.2, 11),
        # ttft 0.1 s, tpot 0.02 s: both met
        _record("r1", 1.0, 1.1, 1.5, 21, cached_prompt_tokens=50),
        # ttft 1.0 s: ttft missed; batch class: both met
        _record("r2", 2.0, 3.0, 4.0, 3, slo_class="batch", pool="h100", preemptions=1),
        # one output token: tpot 0, counts as met
        _record("r3", 3.0, 3.3, 3.3, 1),
        _record("r4", 4.0, None, None, 0, rejected=True, reject_reason="no instance", pool=""),
    ]
    instances = [
        InstanceStats("a100-0", "a100", "A100", "m", tp=1, usd_per_hour=2.0, busy_s=5.0,
                      kv_usage_time_integral=2.5, preemptions=0, requests=3),
        InstanceStats("h100-0", "h100", "H100", "m", tp=2, usd_per_hour=8.0, busy_s=1.0,
                      kv_usage_time_integral=0.5, preemptions=1, requests=1),
    ]
    timeline = [TimelineSample(t, pool, running=int(t) % 3, waiting=int(t) % 2, kv_usage=0.1 * t)
                for t in range(6) for pool in ("a100", "h100")]
    return SimResult(records=records, instances=instances, timeline=timeline, start_s=0.0,
                     end_s=10.0, wall_s=0.5, events=42, policy="least_outstanding")


def test_summary_counts_rates_and_latencies():
    s = summarize(_result(), SLO)
    assert (s["requests"], s["completed"], s["rejected"], s["unfinished"]) == (5, 4, 1, 0)
    assert s["duration_s"] == 10.0
    assert s["throughput_rps"] == pytest.approx(0.4)
    assert s["output_tokens_per_s"] == pytest.approx((11 + 21 + 3 + 1) / 10)
    assert s["ttft_p50_ms"] == pytest.approx(250.0)  # median of 200, 100, 1000, 300
    assert s["ttft_mean_ms"] == pytest.approx(400.0)
    assert s["ttft_max_ms"] == pytest.approx(1000.0)
    # TPOT over multi-token outputs only: 100, 20, 500 ms
    assert s["tpot_p50_ms"] == pytest.approx(100.0)
    assert s["tpot_mean_ms"] == pytest.approx(620 / 3)
    assert s["e2e_max_ms"] == pytest.approx(2000.0)
    assert s["e2e_p99_ms"] <= s["e2e_max_ms"] and s["e2e_p50_ms"] <= s["e2e_p90_ms"] <= s["e2e_p99_ms"]
    assert s["sim_speed_x"] == pytest.approx(20.0)
    assert s["events"] == 42 and s["policy"] == "least_outstanding"


def test_summary_slo_goodput_cost_kv():
    s = summarize(_result(), SLO)
    # met both: r1, r2 (batch), r3 -> 3 of 5
    assert s["goodput_fraction"] == pytest.approx(3 / 5)
    assert s["goodput_rps"] == pytest.approx(0.3)
    inter = s["slo"]["interactive"]
    assert inter["requests"] == 4 and inter["completed"] == 3
    assert inter["ttft_attainment"] == pytest.approx(3 / 4)
    assert inter["tpot_attainment"] == pytest.approx(2 / 4)
    assert inter["both_attainment"] == pytest.approx(2 / 4)
    assert inter["ttft_slo_ms"] == 500.0 and inter["tpot_slo_ms"] == 50.0
    assert s["slo"]["batch"]["both_attainment"] == 1.0
    hours = 10 / 3600
    assert s["pools"]["a100"]["gpu_hours"] == pytest.approx(hours)
    assert s["pools"]["h100"]["gpu_hours"] == pytest.approx(2 * hours)
    assert s["gpu_hours"] == pytest.approx(3 * hours)
    assert s["cost_usd"] == pytest.approx(10.0 * hours)
    assert s["pools"]["h100"]["cost_usd"] == pytest.approx(8.0 * hours)
    assert s["kv_utilization_mean"] == pytest.approx(3.0 / 20)
    assert s["pools"]["a100"]["kv_utilization_mean"] == pytest.approx(0.25)
    assert s["pools"]["a100"]["busy_fraction"] == pytest.approx(0.5)
    assert s["preemptions"] == 1
    assert s["prefix_cache_hit_rate"] == pytest.approx(50 / 400)
    json.dumps(s, allow_nan=False)  # JSON-ready, no NaN


def test_record_slo_targets_win_over_class_defaults():
    result = _result()
    result.records[0].tpot_slo_s = 0.2  # the driver's own target: now r0 meets TPOT too
    assert summarize(result, SLO)["goodput_fraction"] == pytest.approx(4 / 5)
    # without classes and without per-record targets, every finished request is good
    plain = summarize(_result(), None)
    assert plain["goodput_fraction"] == pytest.approx(4 / 5)
    assert plain["slo"]["interactive"]["ttft_slo_ms"] is None


def test_empty_result_has_nulls_not_errors():
    s = summarize(SimResult(records=[], instances=[]), SLO)
    assert s["requests"] == 0 and s["throughput_rps"] is None and s["ttft_p99_ms"] is None
    json.dumps(s, allow_nan=False)
    assert "policy" in format_summary(s)


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_write_records_matches_summary(tmp_path, suffix):
    result = _result()
    path = write_records(result, tmp_path / f"records{suffix}", SLO)
    table = pq.read_table(path) if suffix == ".parquet" else pcsv.read_csv(path)
    rows = table.to_pylist()
    assert [r["request_id"] for r in rows] == ["r0", "r1", "r2", "r3", "r4"]
    assert rows[0]["ttft_ms"] == pytest.approx(200.0) and rows[0]["tpot_ms"] == pytest.approx(100.0)
    assert rows[4]["rejected"] is True and rows[4]["ttft_ms"] is None
    assert sum(r["goodput"] for r in rows) / len(rows) == summarize(result, SLO)["goodput_fraction"]
    assert rows[2]["ttft_slo_s"] == pytest.approx(10.0)
    assert not list(tmp_path.glob(".*tmp"))


def test_write_records_rejects_unknown_extension(tmp_path):
    with pytest.raises(ValueError, match=r"must end in .parquet or .csv"):
        write_records(_result(), tmp_path / "records.xlsx")


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out" / "summary.json"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert not target.exists() and list(target.parent.iterdir()) == []
    write_json({"a": 1}, target)
    assert json.loads(target.read_text()) == {"a": 1}


def test_comparison_table_is_aligned():
    a = summarize(_result(), SLO)
    b = dict(a, ttft_p99_ms=None, throughput_rps=123.456)
    table = comparison_table({"round_robin": a, "least_kv": b})
    lines = table.splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("run") and "TTFT p99 ms" in lines[0]
    assert lines[2].startswith("round_robin") and lines[3].startswith("least_kv")
    assert "123.46" in lines[3] and "60.0" in lines[2]  # goodput % of run a
    # right-aligned columns: every row ends at the same width as the header
    assert len({len(line) for line in (lines[0], lines[2], lines[3])}) == 1


def test_plots_are_pngs(tmp_path):
    result = _result()
    other = _result()
    for record in other.records:
        if record.finish_s is not None:
            record.finish_s += 1.0
    cdf = plot_latency_cdfs({"a": result, "b": other}, tmp_path / "cdf.png")
    load = plot_load_over_time(result, tmp_path / "load.png")
    sweep = plot_sweep([{"series": "a100=1", "rate_scale": r, "summary": summarize(result, SLO)}
                        for r in (1, 2, 4)], tmp_path / "sweep.png")
    for path in (cdf, load, sweep):
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
