"""`tokenyard sim run|compare|sweep` end to end on the real traces (small limits), and errors."""

from __future__ import annotations

import json
import sys

import pyarrow.parquet as pq
import pytest

from cli.main import main

CLUSTER = "sim/examples/small.yaml"
CONV = "traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])


def test_run_writes_consistent_summary_records_and_plots(shared_data, tmp_path, capsys):
    out = tmp_path / "out"
    extra = tmp_path / "extra" / "s.json"
    code = main(["sim", "run", CLUSTER, "--trace", str(shared_data / CONV), "--limit", "300",
                 "--rate-scale", "2", "--out", str(out), "--summary-json", str(extra), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "TTFT ms" in printed and "goodput" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(extra.read_text()) == summary
    rows = pq.read_table(out / "records.parquet").to_pylist()
    assert summary["requests"] == len(rows) == 300
    assert summary["completed"] == sum(1 for r in rows if r["finish_s"] is not None and not r["rejected"])
    assert summary["goodput_fraction"] == pytest.approx(sum(r["goodput"] for r in rows) / len(rows))
    ttfts = sorted(r["ttft_ms"] for r in rows if r["ttft_ms"] is not None)
    assert summary["ttft_max_ms"] == pytest.approx(ttfts[-1])
    assert summary["output_tokens_per_s"] == pytest.approx(
        sum(r["output_tokens"] for r in rows if r["finish_s"] is not None) / summary["duration_s"])
    assert set(summary["pools"]) == {"a100", "l4"}
    assert summary["trace"]["format"] == "azure" and summary["trace"]["rate_scale"] == 2.0
    for name in ("latency_cdfs.png", "load_over_time.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC)


def test_compare_policies_one_table(shared_data, tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["sim", "compare", CLUSTER, "--trace", str(shared_data / CONV), "--limit", "200",
                 "--policy", "round_robin", "--policy", "least_outstanding", "--out", str(out),
                 "--no-progress"])
    assert code == 0
    table = capsys.readouterr().out
    assert "round_robin" in table and "least_outstanding" in table
    doc = json.loads((out / "compare.json").read_text())
    assert set(doc["runs"]) == {"round_robin", "least_outstanding"}
    assert all(run["requests"] == 200 for run in doc["runs"].values())
    assert (out / "latency_cdfs.png").read_bytes().startswith(PNG_MAGIC)


def test_sweep_in_worker_processes(shared_data, tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(["sim", "sweep", CLUSTER, "--trace", str(shared_data / CONV), "--limit", "150",
                 "--rate-scales", "1,4", "--pool-counts", "a100=1,2", "--workers", "2",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    doc = json.loads((out / "sweep.json").read_text())
    assert len(doc["points"]) == 4
    assert {(p["pool_counts"]["a100"], p["rate_scale"]) for p in doc["points"]} == {(1, 1.0), (1, 4.0), (2, 1.0), (2, 4.0)}
    assert all(p["summary"]["cluster"]["pools"]["a100"] == p["pool_counts"]["a100"] for p in doc["points"])
    assert (out / "sweep.png").read_bytes().startswith(PNG_MAGIC)


def _sweep_points(out) -> list[tuple[object, ...]]:
    doc = json.loads((out / "sweep.json").read_text())
    return [(p["series"], p["rate_scale"], p["summary"]["completed"], p["summary"]["ttft_p99_ms"],
             p["summary"]["tpot_p50_ms"], p["summary"]["goodput_rps"], p["summary"]["preemptions"])
            for p in doc["points"]]


def test_sweep_on_a_local_ray_instance_matches_worker_processes(shared_data, tmp_path):
    """--ray runs the grid as Ray tasks (here on a Ray instance it starts on this machine)
    with the results of the process pool."""
    import subprocess

    import ray  # noqa: F401  (a dev dependency: pyproject [dev])

    common = ["sim", "sweep", CLUSTER, "--trace", str(shared_data / CONV), "--limit", "150",
              "--rate-scales", "2,8", "--pool-counts", "l4=2,4", "--no-plots", "--no-progress"]
    env = {**__import__("os").environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ""}
    stderr = {}
    for name, extra in (("ray", ["--ray", "local"]), ("pool", ["--workers", "2"])):
        done = subprocess.run([sys.executable, "-m", "cli.main", *common, "--out", str(tmp_path / name),
                               *extra], capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        stderr[name] = done.stderr
    assert "Started a local Ray instance" in stderr["ray"] and "Ray" not in stderr["pool"]
    on_ray, in_pool = _sweep_points(tmp_path / "ray"), _sweep_points(tmp_path / "pool")
    assert len(on_ray) == 4 and on_ray == in_pool


def test_sweep_ray_without_a_cluster_says_how_to_get_one(shared_data, tmp_path, capsys, monkeypatch):
    import ray  # noqa: F401  (a dev dependency: pyproject [dev])

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code = main(["sim", "sweep", CLUSTER, "--trace", str(shared_data / CONV), "--limit", "50", "--ray",
                 "--out", str(tmp_path / "o"), "--no-plots", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--ray: cannot reach a Ray cluster" in err and "--ray local" in err
    assert not (tmp_path / "o").exists()  # nothing written


def test_sweep_ray_missing_says_how_to_install(shared_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, installed or not
    code = main(["sim", "sweep", CLUSTER, "--trace", str(shared_data / CONV), "--ray",
                 "--out", str(tmp_path / "o")])
    assert code == 2
    assert "pip install 'ray[default]'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_errors_exit_2_with_one_line_and_nothing_written(shared_data, tmp_path, capsys):
    out = tmp_path / "out"
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("pools:\n  - name: a\n    gpu: NOPE\n    model: llama-3-8b\n    count: 1\n")
    assert main(["sim", "run", str(bad_yaml), "--trace", str(shared_data / CONV), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.yaml" in err[0] and "gpu" in err[0]

    bad_trace = tmp_path / "t.csv"
    bad_trace.write_text("arrival_s,input_tokens,output_tokens\n0,10,5\n1,x,5\n")
    assert main(["sim", "run", CLUSTER, "--trace", str(bad_trace), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "t.csv:3" in err[0] and "input_tokens" in err[0]

    assert main(["sim", "run", CLUSTER, "--trace", str(shared_data / CONV), "--window", "9:3",
                 "--out", str(out)]) == 2
    assert "--window" in capsys.readouterr().err
    assert main(["sim", "compare", CLUSTER, "--trace", str(shared_data / CONV), "--policy", "nope",
                 "--out", str(out)]) == 2
    assert "unknown policy 'nope'" in capsys.readouterr().err
    assert main(["sim", "sweep", CLUSTER, "--trace", str(shared_data / CONV), "--pool-counts", "gpu9=1",
                 "--out", str(out)]) == 2
    assert "unknown pool(s) gpu9" in capsys.readouterr().err
    assert not out.exists()

    # skipped bad rows are counted in the summary
    assert main(["sim", "run", CLUSTER, "--trace", str(bad_trace), "--skip-bad-rows", "--out", str(out),
                 "--no-progress", "--no-plots"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["requests"] == 1 and summary["trace"]["skipped"] == {"bad_number": 1}


@pytest.mark.parametrize(("command", "option", "where"), [
    ("run", "--out", "file"),  # --out is a file
    ("run", "--out", "file/sub"),  # --out under a file
    ("run", "--summary-json", "file/s.json"),
    ("run", "--records", "file/r.parquet"),
    ("run", "--summary-json", "folder"),  # a folder where the file goes
    ("compare", "--out", "file"),
    ("sweep", "--out", "file"),
])
def test_an_output_that_cannot_be_written_is_refused_before_the_run(shared_data, tmp_path, capsys,
                                                                    command, option, where):
    """Was an OSError traceback after the whole simulation had run (audit, stop 24)."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    argv = ["sim", command, CLUSTER, "--trace", str(shared_data / CONV), "--limit", "20", "--no-progress",
            "--no-plots"]
    if option != "--out":
        argv += ["--out", str(tmp_path / "out")]
    argv += [option, str(tmp_path / where)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "simulation finished" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"tokenyard sim {command}: error: {option} {tmp_path / where}: "), line
    assert "expected" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]


@pytest.mark.parametrize(("option", "value"), [("--rate-scale", "nan"), ("--rate-scale", "inf"),
                                               ("--timeline-interval", "0"), ("--timeline-interval", "nan")])
def test_non_finite_or_zero_numbers_name_their_flag(shared_data, tmp_path, capsys, option, value):
    argv = ["sim", "run", CLUSTER, "--trace", str(shared_data / CONV), "--limit", "20", "--no-progress",
            "--out", str(tmp_path / "out"), option, value]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"tokenyard sim run: error: {option}: expected")
    assert not (tmp_path / "out").exists()


def test_run_says_why_requests_were_rejected(tmp_path, capsys):
    """The summary said "1 rejected" and nothing more; the reason was only in the records."""
    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,input_tokens,output_tokens\n0,100,5\n1,20000,5\n2,100,5\n")
    assert main(["sim", "run", CLUSTER, "--trace", str(trace), "--out", str(tmp_path / "out"), "--no-progress",
                 "--no-plots"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("rejected: "))
    assert line.startswith("rejected: 1 x no instance can take it") and "maximum context length" in line


def test_sweep_refuses_rate_scale_instead_of_taking_it_for_rate_scales(shared_data, tmp_path, capsys):
    """argparse read `--rate-scale 2` as an abbreviation of --rate-scales and ran x2 only,
    dropping the --rate-scales 1,4 given before it."""
    assert main(["sim", "sweep", CLUSTER, "--trace", str(shared_data / CONV), "--limit", "20", "--rate-scales", "1,4",
                 "--rate-scale", "2", "--no-progress", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--rate-scale: sweep takes --rate-scales" in err[0]
    assert not (tmp_path / "out").exists()


def test_run_notes_trace_slo_classes_the_cluster_does_not_define(tmp_path, capsys):
    """A misspelt class in the trace was measured against 'default' without a word."""
    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,input_tokens,output_tokens,slo_class\n0,100,5,interactiv\n1,100,5,default\n")
    assert main(["sim", "run", CLUSTER, "--trace", str(trace), "--out", str(tmp_path / "out"), "--no-progress",
                 "--no-plots"]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "'interactiv'" in notes[0] and "class 'default'" in notes[0]
    assert "'default'," not in notes[0].split("define")[0]  # a known class is not listed as unknown
