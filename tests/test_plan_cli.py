"""`tokenyard plan` end to end: capacities by simulation (cached), plans verified in the
simulator, and the one-line errors for bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from cli.main import main
from scheduler.catalog import default_catalog
from scheduler.types import SloClass
from sim.capacity import CapacityCache, CapacityQuery, measure

CATALOG = default_catalog()
PUBLISHED = {  # Mélange's published example (tests/test_plan_solver.py solves it directly)
    "gpu_info": {"A10G": {"cost": 1.01, "tputs": [[2, 1], [5, 2]]},
                 "A100-80GB": {"cost": 3.67, "tputs": [[20, 20], [40, 20]]}},
    "workload_distribution": [[0.2, 0.1], [0.5, 0.2]],
    "total_request_rate": 30,
    "slice_factor": 8,
}
SLO = SloClass("default", 3000.0, 200.0)


def _trace(path: Path, n: int = 400, rate_rps: float = 6.0, seed: int = 1) -> Path:
    rng = random.Random(seed)
    t = 0.0
    lines = ["arrival_s,input_tokens,output_tokens"]
    for _ in range(n):
        t += rng.expovariate(rate_rps)
        long_prompt = rng.random() < 0.3
        lines.append(f"{t:.4f},{rng.randint(1500, 3000) if long_prompt else rng.randint(50, 400)},"
                     f"{rng.randint(20, 200)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_capacity_grows_with_the_gpu_and_is_cached(tmp_path: Path) -> None:
    shapes = ((300, 100), (500, 150))
    small = CapacityQuery(CATALOG.gpu("L4"), CATALOG.model("llama-3-8b"), 1, shapes, SLO)
    big = CapacityQuery(CATALOG.gpu("H100-80GB"), CATALOG.model("llama-3-8b"), 1, shapes, SLO)
    cache = CapacityCache(tmp_path / "cache")
    first = cache.get(small)
    assert 0 < first.rate_rps < cache.get(big).rate_rps
    assert cache.get(small) == first and cache.hits == 1 and cache.misses == 2
    stricter = CapacityQuery(small.gpu, small.model, 1, shapes, SloClass("default", 3000.0, 50.0))
    assert stricter.key() != small.key()
    assert measure(stricter).rate_rps == 0.0  # L4 decodes llama-3-8b slower than 50 ms/token
    too_big = measure(CapacityQuery(CATALOG.gpu("A10G"), CATALOG.model("llama-3-70b"), 1, shapes, SLO))
    assert too_big.rate_rps == 0.0 and "does not fit" in too_big.reason


def test_melange_config_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "melange.json"
    config.write_text(json.dumps(PUBLISHED))
    assert main(["plan", "--melange-config", str(config), "--json", "--baseline"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["A10G"], out["A100-80GB"], out["cost"]) == (2, 1, 5.69)
    assert out["melange_baseline"]["cost"] == pytest.approx(5.69)


def test_bad_melange_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({**PUBLISHED, "total_request_rate": "fast"}))
    assert main(["plan", "--melange-config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "total_request_rate: expected a number" in err


def test_trace_plan_is_verified_in_the_simulator(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = _trace(tmp_path / "trace.csv")
    out = tmp_path / "plan.json"
    args = ["plan", "--trace", str(trace), "--gpus", "L4,A100-80GB", "--slo", "default=3000:200",
            "--input-edges", "0,1024", "--output-edges", "0,128", "--cache-dir", str(tmp_path / "cache"),
            "--verify", "--no-progress", "--out", str(out), "--json"]
    assert main(args) == 0
    plan = json.loads(out.read_text())
    assert plan["verified"]["accepted"] and plan["verified"]["attainment"]["default"] >= 0.95
    assert plan["cost"] == pytest.approx(sum(p["usd_per_hour"] for p in plan["pools"]))
    assert plan["routing"]["default"]["input_edges"][0] == 0
    capsys.readouterr()
    # Applying it (dry run) prints the replica changes and the kubectl commands.
    assert main(["plan", "apply", "--plan", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "kubectl -n default scale deployment/tokenyard-" in printed


def test_day_schedule_from_a_rate_series(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = _trace(tmp_path / "trace.csv")
    args = ["plan", "--trace", str(trace), "--gpus", "L4,A100-80GB", "--slo", "default=3000:200",
            "--input-edges", "0,1024", "--output-edges", "0,128", "--cache-dir", str(tmp_path / "cache"),
            "--rates", "0,2,12,4", "--step-s", "3600", "--no-progress", "--json"]
    assert main(args) == 0
    day = json.loads(capsys.readouterr().out)
    assert day["steps"][0]["usd_per_hour"] == 0 and day["scheduled_usd"] < day["static_peak_usd"]


@pytest.mark.parametrize(("extra", "expected"), [
    (["--slo", "default=50:200"], "nearest relaxation: TTFT >="),
    (["--availability", "L4=0,A100-80GB=0"], "availability: the workload needs more GPUs"),
    (["--window", "9000:9999"], "empty"),
    (["--tp", "0"], "--tp: expected positive integers"),
])
def test_bad_input_names_the_constraint(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        extra: list[str], expected: str) -> None:
    trace = _trace(tmp_path / "trace.csv", n=80)
    args = ["plan", "--trace", str(trace), "--gpus", "L4,A100-80GB", "--input-edges", "0,1024",
            "--output-edges", "0,128", "--cache-dir", str(tmp_path / "cache"), "--no-progress", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err


def test_two_slo_classes_get_their_own_capacities_and_routes(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    rng = random.Random(5)
    lines = ["arrival_s,input_tokens,output_tokens,slo_class"]
    t = 0.0
    for _ in range(300):
        t += rng.expovariate(5.0)
        lines.append(f"{t:.4f},{rng.randint(50, 800)},{rng.randint(20, 150)},{rng.choice(['chat', 'batch'])}")
    trace = tmp_path / "classes.csv"
    trace.write_text("\n".join(lines) + "\n")
    rates = tmp_path / "rates.txt"
    rates.write_text("# req/s per hour\n2\n6\n")
    base = ["plan", "--trace", str(trace), "--gpus", "L4,A100-80GB", "--slo", "chat=1000:60",
            "--slo", "batch=20000:1000", "--input-edges", "0,1024", "--output-edges", "0,256",
            "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--json"]
    assert main([*base, "--verify"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert set(plan["routing"]) == {"batch", "chat"}
    assert set(plan["verified"]["attainment"]) == {"batch", "chat"}
    assert {b["slo_class"] for b in plan["buckets"]} == {"batch", "chat"}
    assert main([*base, "--rates", f"@{rates}"]) == 0
    assert [s["rate_rps"] for s in json.loads(capsys.readouterr().out)["steps"]] == [2.0, 6.0]


def test_burst_factor_sees_bursts_not_poisson() -> None:
    from sim.plan_workload import burst_factor

    rng = random.Random(0)
    steady, t = [], 0.0
    for _ in range(3000):
        t += rng.expovariate(5.0)
        steady.append(t)
    assert 1.0 <= burst_factor(steady, 3.0) < 1.5
    burst = sorted([*steady, *(100.0 + k * 0.01 for k in range(200))])  # 200 requests in 2 s
    assert burst_factor(burst, 1.0) > 5.0
    assert burst_factor([1.0], 1.0) == 1.0


def test_factors_file_changes_the_capacities(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--factors` (a `tokenyard calibrate --write` file) replaces the packaged fit in the
    capacity simulations and the verification: an L4 calibrated at 1/1.6 of the memory
    bandwidth and compute the packaged fit assumes needs more instances for the same trace."""
    from scheduler.engine_model import factors_for

    packaged = factors_for(CATALOG.gpu("L4")).as_dict()
    slow = {**packaged, "memory_efficiency": packaged["memory_efficiency"] / 1.6,
            "compute_efficiency": packaged["compute_efficiency"] / 1.6}
    factors = tmp_path / "factors.json"
    factors.write_text(json.dumps({"gpus": {"L4": slow}, "default": packaged}))
    trace = _trace(tmp_path / "trace.csv", n=300)
    base = ["plan", "--trace", str(trace), "--gpus", "L4", "--slo", "default=3000:200", "--input-edges", "0,1024",
            "--output-edges", "0,128", "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--json",
            "--no-bursts"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*base, "--factors", str(factors), "--verify"]) == 0
    calibrated = json.loads(capsys.readouterr().out)
    assert calibrated["verified"]["accepted"]  # the verification ran on the calibrated engines too
    assert calibrated["pools"][0]["instances"] > plain["pools"][0]["instances"]
    # The capacity cache keys on the factors: the calibrated entries are new ones.
    shapes = ((300, 100),)
    query = CapacityQuery(CATALOG.gpu("L4"), CATALOG.model("llama-3-8b"), 1, shapes, SLO)
    from scheduler.engine_model import load_factors_file

    table = load_factors_file(str(factors))
    assert query.key() != CapacityQuery(query.gpu, query.model, 1, shapes, SLO, factors=table["l4"]).key()
    assert measure(CapacityQuery(query.gpu, query.model, 1, shapes, SLO, factors=table["l4"])).rate_rps < \
        measure(query).rate_rps
    factors.write_text("{not json")
    assert main([*base, "--factors", str(factors)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--factors" in err and "not JSON" in err, err


@pytest.mark.parametrize(("extra", "expected"), [
    (["--rate", "5", "--rates", "1,2"], "--rate and --rates: give one"),
    (["--rates", "1,2", "--verify"], "--verify: not with --rates"),
    (["--rate", "5", "--limit", "0"], "--limit: expected a positive number"),
    (["--rate", "5", "--out", "{tmp}/file/plan.json"], "is a file, so no folder can be made there"),
    (["--rate", "5", "--out", "{tmp}"], "--out {tmp}: is a folder; expected a file path"),
])
def test_flags_that_make_no_sense_together_or_cannot_be_written_are_refused_before_the_solve(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], expected: str) -> None:
    """Were silently ignored (--rate beside --rates, --verify beside --rates), or an OSError
    after the solve ('[Errno 17] File exists') (audit, stop 24)."""
    trace = _trace(tmp_path / "trace.csv", n=80)
    (tmp_path / "file").write_text("x")
    args = ["plan", "--trace", str(trace), "--gpus", "L4,A100-80GB", "--input-edges", "0,1024",
            "--output-edges", "0,128", "--cache-dir", str(tmp_path / "cache"), "--no-progress",
            *[a.replace("{tmp}", str(tmp_path)) for a in extra]]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected.replace("{tmp}", str(tmp_path)) in err, err
    assert not (tmp_path / "cache").exists()  # nothing was measured


def test_apply_refuses_negative_current_replicas(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"pools": [{"name": "l4-tp1", "instances": 2}]}))
    assert main(["plan", "apply", "--plan", str(plan), "--dry-run", "--current", "l4-tp1=-3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--current: expected replica counts >= 0" in err, err
    assert main(["plan", "apply", "--plan", str(plan)]) == 2
    assert "tokenyard controlplane" in capsys.readouterr().err


def test_a_histogram_of_the_wrong_shape_says_which_key_and_what_it_got(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Said only "the rate grid must be 1 rows x 1 columns"."""
    histogram = tmp_path / "h.yaml"
    histogram.write_text("input_edges: [0, 100]\noutput_edges: [0, 50]\nrates: [[1, 2]]\n")
    assert main(["plan", "--histogram", str(histogram), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "h.yaml: rates: expected 1 row(s) (one per input bucket of input_edges) of 1 value(s)" in err
    assert "got 1 rows of [2] values" in err
