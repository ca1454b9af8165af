"""Trace readers on the real public traces (../shared/data/traces) and on broken files."""

from __future__ import annotations

import csv
import json
import statistics
from datetime import datetime
from pathlib import Path

import pytest

from sim.traces import TraceError, detect_format, read_trace

REPO = Path(__file__).resolve().parents[1]
AZURE_CODE = "traces/azure_llm_2023/AzureLLMInferenceTrace_code.csv"
AZURE_CONV = "traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv"
MOONCAKE = "traces/mooncake/synthetic_trace.jsonl"
SERVEGEN = "traces/servegen/reason/deepseek-r1"


def _arrivals_sorted(requests) -> bool:
    return all(a.arrival_s <= b.arrival_s for a, b in zip(requests, requests[1:], strict=False))


# -- real traces -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("relpath", "rows", "rate_rps", "input_mean", "output_mean"),
    [(AZURE_CODE, 8819, 2.57, 2048, 28), (AZURE_CONV, 19366, 5.53, 1155, 211)],
)
def test_azure_rows_and_statistics_match_manifest(shared_data, relpath, rows, rate_rps, input_mean, output_mean):
    trace = read_trace(shared_data / relpath)
    assert trace.fmt == "azure"
    requests = trace.requests()
    assert len(requests) == rows
    assert trace.counts.rows_read == rows and trace.counts.skipped_total == 0
    assert requests[0].arrival_s == 0.0
    assert _arrivals_sorted(requests)
    duration_s = requests[-1].arrival_s
    assert len(requests) / duration_s == pytest.approx(rate_rps, rel=0.01)
    assert statistics.fmean(r.input_tokens for r in requests) == pytest.approx(input_mean, rel=0.01)
    assert statistics.fmean(r.output_tokens for r in requests) == pytest.approx(output_mean, rel=0.02)
    assert len({r.request_id for r in requests}) == rows


def test_azure_wall_clock_keeps_seven_fractional_digits(shared_data):
    path = shared_data / AZURE_CONV
    with path.open() as handle:
        rows = list(csv.reader(handle))[1:4]
    stamps = [datetime.fromisoformat(r[0][:26]) for r in rows]  # microseconds are enough to compare
    requests = read_trace(path, limit=3).requests()
    for stamp, req in zip(stamps, requests, strict=True):
        assert req.arrival_s == pytest.approx((stamp - stamps[0]).total_seconds(), abs=1e-6)
    assert [r.input_tokens for r in requests] == [int(r[1]) for r in rows]
    assert [r.output_tokens for r in requests] == [int(r[2]) for r in rows]


def test_mooncake_prefix_blocks_and_reuse(shared_data):
    trace = read_trace(shared_data / MOONCAKE)
    assert trace.fmt == "mooncake"
    requests = trace.requests()
    assert len(requests) == 3993
    assert _arrivals_sorted(requests)
    assert len(requests) / requests[-1].arrival_s == pytest.approx(3.9, rel=0.02)
    assert statistics.fmean(r.input_tokens for r in requests) == pytest.approx(15300, rel=0.01)
    assert all(r.prefix_block_tokens == 512 for r in requests)
    # every hash covers 512 prompt tokens: a prompt has ceil(input / 512) blocks
    assert all(len(r.prefix_hashes) == -(-r.input_tokens // 512) for r in requests[:200])
    seen: set[int] = set()
    reused = total = 0
    for req in requests:
        for block in req.prefix_hashes:
            total += 1
            reused += block in seen
            seen.add(block)
    assert reused / total == pytest.approx(0.64, abs=0.02)  # MANIFEST: 64% reusable


def test_rate_scale_window_and_limit(shared_data):
    path = shared_data / AZURE_CONV
    base = read_trace(path).requests()
    fast = read_trace(path, rate_scale=4).requests()
    assert [r.arrival_s for r in fast] == pytest.approx([r.arrival_s / 4 for r in base])

    inside = [r for r in base if 600 <= r.arrival_s < 1200]
    trace = read_trace(path, window_s=(600, 1200))
    windowed = trace.requests()
    assert [r.request_id for r in windowed] == [r.request_id for r in inside]
    assert [r.arrival_s for r in windowed] == pytest.approx([r.arrival_s - 600 for r in inside])
    assert trace.counts.outside_window == sum(1 for r in base if r.arrival_s < 600) + 1
    both = read_trace(path, window_s=(600, 1200), rate_scale=2).requests()
    assert max(r.arrival_s for r in both) < 300

    limited = read_trace(path, limit=50)
    assert len(limited.requests()) == 50 and limited.counts.rows_read == 50
    # a trace is re-iterable, and counts reset on each pass
    assert len(limited.requests()) == 50 and limited.counts.requests == 50


def test_servegen_generation_is_deterministic_and_follows_rates(shared_data):
    folder = shared_data / SERVEGEN
    assert detect_format(folder) == "servegen"
    window = (36000.0, 39600.0)  # 10:00 to 11:00 of the ServeGen day
    first = read_trace(folder, window_s=window, seed=7).requests()
    again = read_trace(folder, window_s=window, seed=7).requests()
    other = read_trace(folder, window_s=window, seed=8).requests()
    assert first == again
    assert [r.arrival_s for r in first] != [r.arrival_s for r in other]
    assert _arrivals_sorted(first)
    assert first[0].arrival_s >= 0 and first[-1].arrival_s < 3600

    expected = 0.0
    for path in folder.glob("chunk-*-trace.csv"):
        for row in csv.reader(path.open()):
            if window[0] <= float(row[0]) < window[1]:
                expected += float(row[1]) * 600
    assert len(first) == pytest.approx(expected, rel=0.05)
    assert len({r.tenant for r in first}) > 5  # clients become tenants
    assert all(r.input_tokens >= 1 and r.output_tokens >= 1 for r in first)


def test_servegen_one_client_lengths_come_from_its_pdfs(shared_data):
    import ast

    path = shared_data / SERVEGEN / "chunk-1-trace.csv"
    requests = read_trace(path, window_s=(0, 21600), seed=1).requests()
    assert requests and {r.tenant for r in requests} == {"client1"}
    dataset = json.loads((shared_data / SERVEGEN / "chunk-1-dataset.json").read_text())
    pdf_in = ast.literal_eval(dataset["0"]["input_tokens"])
    pdf_out = ast.literal_eval(dataset["0"]["output_tokens"])
    assert {r.input_tokens for r in requests} <= {max(1, int(k)) for k in pdf_in}
    assert {r.output_tokens for r in requests} <= {max(1, int(k)) for k in pdf_out}
    mean_in = sum(int(k) * v for k, v in pdf_in.items()) / sum(pdf_in.values())
    assert statistics.fmean(r.input_tokens for r in requests) == pytest.approx(mean_in, rel=0.15)
    # selecting clients on the folder gives the same client's stream
    same = read_trace(path.parent, clients=[1], window_s=(0, 21600), seed=1).requests()
    assert same == requests
    with pytest.raises(TraceError, match="unknown ServeGen client"):
        read_trace(path.parent, clients=[999])


def test_burstgpt_real_head_and_failed_responses(tmp_path):
    trace = read_trace(REPO / "sim/examples/traces/burstgpt_head.csv")
    assert trace.fmt == "burstgpt"
    requests = trace.requests()
    assert [(r.arrival_s, r.input_tokens, r.output_tokens) for r in requests] == [
        (0.0, 472, 18), (40.0, 1087, 230), (113.0, 417, 276)]

    path = tmp_path / "burst.csv"
    path.write_text(
        "Timestamp,Session ID,Elapsed time,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "0,a,1,ChatGPT,100,10,110,Conversation log\n"
        "3,b,1,ChatGPT,300,0,300,Conversation log\n"
        "7,c,1,GPT-4,200,20,220,API log\n")
    trace = read_trace(path)
    assert [r.input_tokens for r in trace.requests()] == [100, 200]
    assert trace.counts.skipped == {"failed_response": 1}


def test_plain_csv_and_jsonl_with_optional_columns(tmp_path):
    csv_path = tmp_path / "plain.csv"
    csv_path.write_text(
        "arrival_s,input_tokens,output_tokens,prefix_hashes,tenant,slo_class,session_id,model,prompt\n"
        "10.5,100,5,1 2 3,acme,interactive,s1,llama-3-8b,hello there\n"
        "11.0,50,7,,,,,,\n")
    requests = read_trace(csv_path).requests()
    assert requests[0].arrival_s == 0.0 and requests[1].arrival_s == pytest.approx(0.5)
    assert requests[0].prefix_hashes == (1, 2, 3)
    assert (requests[0].tenant, requests[0].slo_class, requests[0].session_id, requests[0].model,
            requests[0].prompt) == ("acme", "interactive", "s1", "llama-3-8b", "hello there")
    assert (requests[1].tenant, requests[1].slo_class, requests[1].model) == ("default", "default", None)

    jsonl_path = tmp_path / "plain.jsonl"
    jsonl_path.write_text(
        json.dumps({"arrival_s": 1, "input_tokens": 10, "output_tokens": 2, "prefix_hashes": [9, 8],
                    "slo_class": "batch", "request_id": "x1"}) + "\n\n"
        + json.dumps({"arrival_s": 2, "input_tokens": 20, "output_tokens": 3}) + "\n")
    trace = read_trace(jsonl_path, default_slo_class="interactive")
    assert trace.fmt == "plain_jsonl"
    requests = trace.requests()
    assert [r.request_id for r in requests] == ["x1", "req-1"]
    assert requests[0].prefix_hashes == (9, 8) and requests[0].slo_class == "batch"
    assert requests[1].slo_class == "interactive"


# -- broken files ------------------------------------------------------------------------


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_bad_number_names_file_line_and_column(tmp_path):
    path = _write(tmp_path, "t.csv", "arrival_s,input_tokens,output_tokens\n0,10,5\n1,ten,5\n2,10,5\n")
    with pytest.raises(TraceError) as info:
        read_trace(path).requests()
    message = str(info.value)
    assert f"{path}:3" in message and "'input_tokens'" in message and "'ten'" in message
    assert "expected an integer token count" in message
    assert isinstance(info.value, ValueError) and info.value.line == 3

    trace = read_trace(path, skip_bad_rows=True)
    assert len(trace.requests()) == 2
    assert trace.counts.skipped == {"bad_number": 1} and trace.counts.rows_read == 3


def test_bad_azure_timestamp(tmp_path):
    path = _write(tmp_path, "azure.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n"
                  "2023-11-16 18:17:03.9799600,10,2\n2023-11-16 25:17:03.1,10,2\n")
    with pytest.raises(TraceError, match=r"azure.csv:3: column 'TIMESTAMP': expected a wall-clock time"):
        read_trace(path).requests()


def test_missing_column_fails_when_opening(tmp_path):
    path = _write(tmp_path, "t.csv", "arrival_s,input_tokens\n0,10\n")
    with pytest.raises(TraceError, match=r"t.csv:1: header lacks column\(s\) output_tokens"):
        read_trace(path, fmt="plain_csv")
    azure = _write(tmp_path, "a.csv", "TIMESTAMP,ContextTokens\n2023-11-16 18:17:03.9799600,10\n")
    with pytest.raises(TraceError, match="unknown CSV trace"):
        read_trace(azure)  # auto-detection cannot tell what it is
    with pytest.raises(TraceError, match="lacks column.*GeneratedTokens"):
        read_trace(azure, fmt="azure")


def test_short_row_and_missing_json_key(tmp_path):
    path = _write(tmp_path, "t.csv", "arrival_s,input_tokens,output_tokens\n0,10\n")
    with pytest.raises(TraceError, match=r"t.csv:2: column 'output_tokens': row has 2 field"):
        read_trace(path).requests()
    jsonl = _write(tmp_path, "m.jsonl", '{"timestamp": 0, "input_length": 5, "output_length": 1}\n'
                   '{"timestamp": 5, "input_length": 5}\n{not json\n')
    with pytest.raises(TraceError, match=r"m.jsonl:2: column 'output_length': missing key"):
        read_trace(jsonl).requests()
    trace = read_trace(jsonl, skip_bad_rows=True)
    assert len(trace.requests()) == 1
    assert trace.counts.skipped == {"missing_value": 1, "bad_json": 1}


def test_negative_and_zero_tokens(tmp_path):
    path = _write(tmp_path, "t.csv", "arrival_s,input_tokens,output_tokens\n0,-3,5\n1,4,0\n2,4,4\n")
    with pytest.raises(TraceError, match=r"t.csv:2: column 'input_tokens': expected a non-negative token count, got -3"):
        read_trace(path).requests()
    trace = read_trace(path, skip_bad_rows=True)
    assert [r.input_tokens for r in trace.requests()] == [4]
    assert trace.counts.skipped == {"negative_tokens": 1, "zero_tokens": 1}


def test_non_monotone_timestamps_error_skip_or_sort(tmp_path):
    path = _write(tmp_path, "t.csv", "arrival_s,input_tokens,output_tokens\n5,1,1\n7,2,2\n6,3,3\n9,4,4\n")
    with pytest.raises(TraceError, match=r"t.csv:4: timestamp goes backwards.*sort"):
        read_trace(path).requests()
    skipped = read_trace(path, skip_bad_rows=True)
    assert [r.input_tokens for r in skipped.requests()] == [1, 2, 4]
    assert skipped.counts.skipped == {"out_of_order": 1}
    ordered = read_trace(path, sort=True).requests()
    assert [r.input_tokens for r in ordered] == [1, 3, 2, 4]
    assert [r.arrival_s for r in ordered] == [0, 1, 2, 4]


def test_empty_and_unknown_files(tmp_path):
    empty = _write(tmp_path, "empty.csv", "")
    with pytest.raises(TraceError, match="empty.csv:1: empty file"):
        read_trace(empty)
    with pytest.raises(TraceError, match="empty file"):
        read_trace(empty, fmt="azure")
    blank_jsonl = _write(tmp_path, "blank.jsonl", "\n\n")
    with pytest.raises(TraceError, match="empty file"):
        read_trace(blank_jsonl, fmt="mooncake")
    header_only = _write(tmp_path, "h.csv", "arrival_s,input_tokens,output_tokens\n")
    assert read_trace(header_only).requests() == []
    with pytest.raises(TraceError, match="no such file"):
        read_trace(tmp_path / "missing.csv")
    weird = _write(tmp_path, "w.jsonl", '{"a": 1}\n')
    with pytest.raises(TraceError, match="unknown JSON-lines trace"):
        read_trace(weird)
    with pytest.raises(ValueError, match="unknown trace format 'parquet'"):
        read_trace(header_only, fmt="parquet")
    with pytest.raises(ValueError, match="rate_scale"):
        read_trace(header_only, rate_scale=0)
    with pytest.raises(ValueError, match="window_s"):
        read_trace(header_only, window_s=(10, 5))


def test_streaming_does_not_read_past_the_limit(tmp_path):
    # a bad row after the limit is never reached, which shows rows are read lazily
    lines = ["arrival_s,input_tokens,output_tokens"] + [f"{i},10,5" for i in range(1000)] + ["x,1,1"]
    path = _write(tmp_path, "big.csv", "\n".join(lines) + "\n")
    trace = read_trace(path, limit=10)
    iterator = iter(trace)
    first = next(iterator)
    assert first.arrival_s == 0 and trace.counts.rows_read == 1
    assert len(list(iterator)) == 9


def test_an_absurd_token_count_is_a_bad_row_not_a_run_of_years(tmp_path):
    """A cell of 10^20 tokens was read as a request: the simulator charged its front-end time
    per prompt token (years of simulated time) and sampled its timeline all the way there."""
    import pytest

    from sim.traces import MAX_TRACE_TOKENS, TraceError, read_trace

    path = tmp_path / "t.csv"
    path.write_text(f"arrival_s,input_tokens,output_tokens\n0,10,5\n1,{10**20},5\n2,{MAX_TRACE_TOKENS},5\n")
    with pytest.raises(TraceError, match=r"t\.csv:3: column 'input_tokens': expected a token count <= 100,000,000"):
        list(read_trace(path))
    path.write_text(f"arrival_s,input_tokens,output_tokens\n0,10,5\n1,10,{10**20}\n2,{MAX_TRACE_TOKENS},5\n")
    with pytest.raises(TraceError, match="output_tokens"):
        list(read_trace(path))
