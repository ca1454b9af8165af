"""`tokenyard calibrate --from`: readers of a deployment's own measurements, the fit, the round trip."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from cli.main import main as main_for_tests
from scheduler.catalog import default_catalog
from scheduler.engine_model import EngineModel, factors_for, load_factors_file
from sim.calibrate_from import (
    FROM_FIT_FACTORS,
    CalibrationDataError,
    ServingSample,
    bench_serve_samples,
    fit_deployment,
    guidellm_samples,
    predict,
    read_samples,
    records_samples,
    synthetic_scrapes,
)

# A deployment's varied load: (running batch, prompt tokens, output tokens, seconds).
INTERVALS = [(1, 200, 300, 30), (4, 1500, 200, 30), (16, 400, 500, 30), (48, 3000, 250, 30),
             (96, 800, 400, 30), (160, 2000, 300, 30), (240, 600, 200, 30), (2, 6000, 100, 30)]


def _engine(factors: object = None) -> EngineModel:
    catalog = default_catalog()
    gpu = catalog.gpu("H100-80GB")
    return EngineModel(gpu, catalog.model("llama-3.1-8b"), tp=1, factors=factors or factors_for(gpu))  # type: ignore[arg-type]


def _write_scrapes(folder: Path, scrapes: list[str]) -> Path:
    folder.mkdir()
    for i, text in enumerate(scrapes):
        (folder / f"scrape-{i}.prom").write_text(text)
    return folder


@pytest.mark.parametrize("deprecated", [False, True])
def test_round_trip_recovers_known_factors_within_5_percent(tmp_path: Path, deprecated: bool) -> None:
    packaged = _engine()
    # The "true" engine of the synthetic deployment differs from the packaged fit in every
    # factor the calibration fits.
    truth = replace(packaged.factors, compute_efficiency=packaged.factors.compute_efficiency * 0.8,
                    memory_efficiency=packaged.factors.memory_efficiency * 0.9,
                    iteration_overhead_s=0.0035, per_seq_overhead_s=6e-5)
    folder = _write_scrapes(tmp_path / "metrics", synthetic_scrapes(_engine(truth), INTERVALS, deprecated))
    samples = read_samples(folder)
    assert {s.metric for s in samples} == {"tpot", "ttft"} and len(samples) == 2 * len(INTERVALS)
    fit = fit_deployment(packaged, samples)
    assert fit.fitted == tuple(FROM_FIT_FACTORS) and not fit.problems
    for name in FROM_FIT_FACTORS:
        assert getattr(fit.factors, name) == pytest.approx(getattr(truth, name), rel=0.05), name
    assert fit.errors["tpot"][2] < 1.0 < fit.errors["tpot"][1]  # after < 1% < before


def test_too_little_data_says_what_is_missing(tmp_path: Path) -> None:
    engine = _engine()
    small = [(2, 500, 200, 30), (4, 500, 200, 30), (8, 500, 200, 30), (6, 500, 200, 30)]
    folder = _write_scrapes(tmp_path / "m", synthetic_scrapes(engine, small))
    fit = fit_deployment(engine, read_samples(folder))
    assert "no decode samples at batch > 64" in fit.problems["per_seq_overhead_s"]
    assert "memory_efficiency" in fit.problems and "per_seq_overhead_s" not in fit.fitted
    with pytest.raises(CalibrationDataError, match="too little data: 1 TPOT sample"):
        fit_deployment(engine, [ServingSample("x", "tpot", 0.02, 8, 100, 100)])
    with pytest.raises(CalibrationDataError, match="at least 2 scrapes"):
        read_samples(_write_scrapes(tmp_path / "one", synthetic_scrapes(engine, [])))


def test_bench_serve_and_guidellm_results(tmp_path: Path) -> None:
    bench = {"completed": 500, "request_throughput": 4.0, "mean_tpot_ms": 25.0, "mean_ttft_ms": 80.0,
             "total_input_tokens": 500 * 1000, "total_output_tokens": 500 * 201}
    tpot, ttft = bench_serve_samples(bench, "bench.json")
    # Little's law on the decode phase: 4 req/s x 25 ms x 200 tokens = 20 sequences decoding.
    assert tpot.running_seqs == pytest.approx(20.0) and tpot.value_s == pytest.approx(0.025)
    assert ttft.metric == "ttft" and ttft.prompt_tokens == pytest.approx(1000)
    guide = {"benchmarks": [{"metrics": {
        "time_per_output_token_ms": {"successful": {"mean": 30.0}},
        "time_to_first_token_ms": {"successful": {"mean": 120.0}},
        "prompt_token_count": {"successful": {"mean": 512}}, "output_token_count": {"successful": {"mean": 101}},
        "requests_per_second": {"successful": {"mean": 2.0}}}}]}
    samples = guidellm_samples(guide, "g.json")
    assert samples[0].running_seqs == pytest.approx(2.0 * 0.030 * 100)
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench))
    assert len(read_samples(path)) == 2
    with pytest.raises(CalibrationDataError, match="mean_tpot_ms"):
        bench_serve_samples({"completed": 3}, "bad.json")
    (tmp_path / "odd.json").write_text("{}")
    with pytest.raises(CalibrationDataError, match="unknown kind"):
        read_samples(tmp_path / "odd.json")


def test_request_records_give_tpot_by_running_batch(tmp_path: Path) -> None:
    engine = _engine()
    lines = ["request_id,instance_id,arrival_s,first_token_s,finish_s,input_tokens,output_tokens"]
    # 10 requests decoding side by side, then 1 alone: the batch each saw is 10 and 1.
    together = predict(engine, ServingSample("", "tpot", 0, 10, 100, 101))
    for i in range(10):
        lines.append(f"r{i},a,0,0.1,{0.1 + 100 * together},100,101")
    alone = predict(engine, ServingSample("", "tpot", 0, 1, 100, 101))
    lines.append(f"s,a,1000,1000.1,{1000.1 + 100 * alone},100,101")
    path = tmp_path / "records.csv"
    path.write_text("\n".join(lines) + "\n")
    samples = records_samples(path, bins=11)
    batches = sorted(round(s.running_seqs, 6) for s in samples)
    assert batches[0] == 1.0 and batches[-1] == 10.0
    assert min(samples, key=lambda s: s.running_seqs).value_s == pytest.approx(alone)


def test_cli_writes_a_factors_file_that_sim_and_engine_load(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    truth = replace(_engine().factors, per_seq_overhead_s=8e-5)
    folder = _write_scrapes(tmp_path / "metrics", synthetic_scrapes(_engine(truth), INTERVALS))
    out = tmp_path / "factors.json"
    code = main_for_tests(["calibrate", "--from", str(folder), "--gpu", "H100-80GB", "--model",
                           "meta-llama/Llama-3.1-8B-Instruct", "--write", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and "tpot" in text and "wrote" in text
    table = load_factors_file(str(out))
    assert table["h100-80gb"].per_seq_overhead_s == pytest.approx(8e-5, rel=0.05)
    assert main_for_tests(["calibrate", "--from", str(folder)]) == 2
    assert "--gpu and --model" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        load_factors_file(str(bad))
