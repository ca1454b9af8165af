"""The mypyc-compiled simulator (sim/native.py) gives exactly the records of the plain modules.

The build is real: mypyc compiles sim/engine_core.py and sim/simulator.py with the machine's
C compiler into a temporary cache folder (about 20 s), once for this module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sim import native

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TOKENYARD_SHARED_DATA", REPO.parent / "shared" / "data"))
MOONCAKE = SHARED / "traces" / "mooncake" / "synthetic_trace.jsonl"
AZURE = SHARED / "traces" / "azure_llm_2023" / "AzureLLMInferenceTrace_conv.csv"

# A workload that takes the engine core off its fast path as well as along it: prefix
# caching with eviction (Mooncake hash_ids), preemption on small KV caches, SLO-priority
# queues, two pools, a policy that reads KV use inside decode stretches.
CLUSTER = """
pools:
  - {name: h100, gpu: H100-80GB, model: qwen2.5-7b, count: 2, engine: {num_kv_blocks: 5000}}
  - {name: a100, gpu: A100-80GB, model: qwen2.5-7b, count: 3, engine: {num_kv_blocks: 3000}}
queue: {policy: slo_priority}
dispatch: {scorers: [least_kv], picker: max_score}
slo_classes:
  default: {ttft_ms: 2000, tpot_ms: 100}
"""

DIGEST = """
import hashlib, sys
from sim.cluster import load_cluster
from sim.simulator import simulate
from sim.traces import read_trace
import sim.engine_core
cluster = load_cluster(sys.argv[1])
result = simulate(cluster, read_trace(sys.argv[2], limit=int(sys.argv[3]), rate_scale=float(sys.argv[4])),
                  fast_forward=sys.argv[5] == "1")
digest = hashlib.sha256()
for r in result.records:
    digest.update(repr((r.request_id, r.instance_id, r.first_token_s, r.finish_s, r.output_tokens,
                        r.cached_prompt_tokens, r.preemptions, r.rejected)).encode())
preempted = sum(r.preemptions for r in result.records)
cached = sum(r.cached_prompt_tokens for r in result.records)
print(sim.engine_core.__file__, len(result.records), preempted, cached, digest.hexdigest())
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    cache_home = tmp_path_factory.mktemp("cache")
    root = native.build(cache_home / "tokenyard" / "native")
    return cache_home, root


def digest(tmp_path: Path, trace: Path, limit: int, rate: float, fast: bool, pythonpath: Path | None) -> list[str]:
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(CLUSTER)
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    out = subprocess.run([sys.executable, "-P", "-c", DIGEST, str(cluster), str(trace), str(limit), str(rate),
                          "1" if fast else "0"], env=env, capture_output=True, text=True, cwd=REPO, check=True)
    return out.stdout.split()


@pytest.mark.parametrize(("trace", "limit", "rate"), [(MOONCAKE, 1500, 2.0), (AZURE, 2500, 8.0)])
def test_compiled_simulator_gives_the_plain_records(built: tuple[Path, Path], tmp_path: Path, trace: Path,
                                                    limit: int, rate: float) -> None:
    _, root = built
    compiled = digest(tmp_path, trace, limit, rate, True, root)
    plain = digest(tmp_path, trace, limit, rate, True, None)
    assert not compiled[0].endswith(".py") and compiled[0].startswith(str(root))  # really compiled
    assert plain[0].endswith("engine_core.py")
    assert int(plain[1]) == limit
    assert int(plain[2]) > 0  # preemptions happened (the step path ran too)
    if trace == MOONCAKE:
        assert int(plain[3]) > 0  # prefix-cache hits
    assert compiled[1:] == plain[1:]
    # And with every iteration stepped (no fast-forward; its float sums differ in the last
    # bits from the closed form, so it is compared with plain stepping).
    assert digest(tmp_path, trace, limit, rate, False, root)[1:] == digest(tmp_path, trace, limit, rate, False, None)[1:]


def test_build_is_cached_by_source_and_leaves_the_tree_alone(built: tuple[Path, Path]) -> None:
    cache_home, root = built
    assert root.name == native.build_key()
    assert native.build(cache_home / "tokenyard" / "native") == root  # found, not rebuilt
    assert not list((REPO / "sim").glob("*.so"))  # nothing compiled next to the sources
    assert not native.active()  # this process runs the plain modules


def test_cli_native_reruns_the_command_on_the_compiled_modules(built: tuple[Path, Path], tmp_path: Path) -> None:
    cache_home, _ = built
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(CLUSTER)
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home)}
    outputs = {}
    for mode in ("plain", "native"):
        out = tmp_path / mode
        command = [sys.executable, "-m", "cli.main", "--log-format", "json", "sim", "run", str(cluster),
                   "--trace", str(AZURE), "--limit", "800", "--rate-scale", "8", "--out", str(out), "--no-plots",
                   "--no-progress", "--records", str(out / "records.csv")]
        if mode == "native":
            command.append("--native")
        done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 0, done.stderr
        assert ("native simulator active" in done.stderr) == (mode == "native")
        outputs[mode] = out
    assert (outputs["native"] / "records.csv").read_text() == (outputs["plain"] / "records.csv").read_text()
    plain, compiled = (json.loads((outputs[m] / "summary.json").read_text()) for m in ("plain", "native"))
    for key in ("requests", "completed", "ttft_p99_ms", "tpot_p50_ms", "e2e_p90_ms", "goodput_rps", "preemptions"):
        assert compiled[key] == plain[key], key


def test_a_failed_build_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.raises(native.NativeBuildError, match="C compiler"):
        native.build(tmp_path / "cache")
    assert not any(p.name == native.build_key() for p in (tmp_path / "cache").iterdir())  # nothing half-built
    assert subprocess.run([sys.executable, "-m", "sim.native", "frobnicate"], cwd=REPO,
                          capture_output=True).returncode == 2
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(native.NativeBuildError, match="cannot create the build folder"):
        native.build(blocked / "cache")
