"""Cluster YAML: the shipped examples are valid; every error names the file, the key path
and what is allowed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sim.cluster import DISPATCH_PRESETS, load_cluster, parse_cluster, policy_variants
from sim.simulator import simulate
from sim.workload import TraceRequest
from tokenyard.config import ConfigError

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "sim" / "examples").glob("*.yaml"))


def base(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"pools": [{"name": "a", "gpu": "A100-80GB", "model": "llama-3-8b", "count": 2}]}
    doc.update(changes)
    return doc


def pool(**changes: Any) -> dict[str, Any]:
    p = {"name": "a", "gpu": "A100-80GB", "model": "llama-3-8b", "count": 2}
    p.update(changes)
    return p


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid_and_simulate(path: Path) -> None:
    spec = load_cluster(path)
    assert spec.num_instances >= 2 and spec.source == str(path)
    spec.build_dispatch()
    spec.build_dispatch_per_class()
    requests = [TraceRequest(f"r{i}", i * 0.05, 300 + 10 * i, 20, slo_class="interactive") for i in range(20)]
    result = simulate(spec, requests)
    assert len(result.records) == 20 and not any(r.rejected for r in result.records)


def test_example_values_are_read() -> None:
    spec = load_cluster(next(p for p in EXAMPLES if p.name == "small.yaml"))
    assert [(p.name, p.gpu.name, p.model.name, p.count) for p in spec.pools] == [
        ("a100", "A100-80GB", "llama-3-8b", 2), ("l4", "L4", "llama-3-8b", 4)]
    assert spec.pools[1].engine.max_num_seqs == 64
    assert spec.slo_classes["interactive"].ttft_slo_ms == 1000
    qwen = load_cluster(next(p for p in EXAMPLES if p.name == "slo_prefix_qwen.yaml"))
    assert qwen.catalog.gpu("A100-80GB").usd_per_hour == 2.90
    assert qwen.pools[1].usd_per_hour == 2.90
    assert all(p.engine.scheduling_policy == "priority" for p in qwen.pools)  # slo_priority needs it
    assert not any(p.engine.admit_preemption for p in qwen.pools)  # vLLM V1's admission by default
    v0 = parse_cluster(base(queue={"policy": "slo_priority"}, pools=[pool(engine={"admit_preemption": True})]), "c.yaml")
    assert v0.pools[0].engine.admit_preemption and v0.pools[0].engine.scheduling_policy == "priority"
    assert qwen.load_refresh_s == 0.2


@pytest.mark.parametrize(
    ("doc", "where", "expected"),
    [
        (base(pools=[pool(gpu="A100-81GB")]), "c.yaml: pools[0].gpu", "known GPUs: A100-40GB, A100-80GB"),
        (base(pools=[pool(model="llama-9")]), "c.yaml: pools[0].model", "known models: .*llama-3-8b"),
        (base(pools=[pool(count=-1)]), "c.yaml: pools[0].count", "expected a value >= 0"),
        (base(pools=[pool(count="two")]), "c.yaml: pools[0].count", "expected an integer"),
        (base(pools=[pool(gpus="L4")]), "c.yaml: pools[0]", "unknown key.*gpus.*allowed: count, engine, gpu"),
        (base(pools=[pool(engine={"max_num_seq": 3})]), "c.yaml: pools[0].engine",
         "unknown key.*max_num_seq;.*max_num_seqs"),
        (base(pools=[pool(engine={"block_size": 0})]), "c.yaml: pools[0].engine.block_size", ">= 1"),
        (base(pools=[pool(engine={"scheduling_policy": "lifo"})]), "c.yaml: pools[0].engine.scheduling_policy",
         "one of fcfs, priority"),
        (base(pools=[pool(engine={"admit_preemption": True})]), "c.yaml: pools[0].engine.admit_preemption",
         "needs scheduling_policy 'priority'"),
        (base(pools=[pool(engine={"scheduling_policy": "priority", "admit_preemption": "yes"})]),
         "c.yaml: pools[0].engine.admit_preemption", "expected true or false"),
        (base(pools=[pool(), pool()]), "c.yaml: pools[1].name", "duplicate pool name"),
        (base(pools=[]), "c.yaml: pools", "non-empty list"),
        (base(pools=[pool(gpu="L4", model="llama-3-70b")]), "c.yaml: pools[0]", "does not fit on L4"),
        (base(dispatch={"picker": "best"}), "c.yaml", "dispatch.picker: unknown picker 'best'; known: .*round_robin"),
        (base(dispatch={"scorers": ["kv"]}), "c.yaml", "dispatch.scorers\\[0\\]: unknown scorer 'kv'; known: .*least_kv"),
        (base(dispatch={"pickers": "x"}), "c.yaml: dispatch", "unknown key.*pickers"),
        (base(dispatch={"per_slo_class": {"gold": {}}}), "c.yaml: dispatch.per_slo_class.gold",
         "unknown SLO class 'gold'; known: batch, default, interactive"),
        (base(dispatch={"per_slo_class": {"batch": {"picker": "nope"}}}), "c.yaml",
         "dispatch.per_slo_class.batch.picker: unknown picker"),
        (base(queue={"policy": "lifo"}), "c.yaml: queue.policy", "known: fcfs, input_length, learned_rank, slo_priority"),
        (base(queue={"policy": "slo_priority"}, pools=[pool(engine={"scheduling_policy": "fcfs"})]),
         "c.yaml: pools[0].engine.scheduling_policy", "must use 'priority'"),
        (base(default_model="qwen2.5-7b"), "c.yaml: default_model", "served models: llama-3-8b"),
        (base(slo_classes={"x": {"ttft_ms": 1}}), "c.yaml: slo_classes.x.tpot_ms", "required key is missing"),
        (base(load_refresh_s=-1), "c.yaml: load_refresh_s", ">= 0"),
        (base(catalog={"gpus": [{"name": "B300"}]}), "c.yaml: catalog", "missing"),
        (base(catalog=3), "c.yaml: catalog", "expected a path"),
        (base(extra=1), "c.yaml", "unknown key.*extra.*allowed: catalog"),
    ],
)
def test_errors_name_file_key_path_and_allowed_values(doc: dict[str, Any], where: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as info:
        parse_cluster(doc, "c.yaml")
    assert info.value.where == where, str(info.value)


def test_catalog_file_relative_to_the_cluster_file_and_yaml_errors(tmp_path: Path) -> None:
    (tmp_path / "cat.yaml").write_text(
        "gpus:\n  - {name: MI300X, memory_gib: 192, bf16_tflops: 1307, hbm_gbps: 5300,"
        " interconnect: nvlink, interconnect_gbps: 896, usd_per_hour: 6.0}\n"
    )
    (tmp_path / "c.yaml").write_text(
        "catalog: cat.yaml\npools:\n  - {name: m, gpu: MI300X, model: llama-3-70b, count: 1}\n"
    )
    spec = load_cluster(tmp_path / "c.yaml")
    assert spec.pools[0].gpu.memory_gib == 192 and spec.default_model == "llama-3-70b"
    (tmp_path / "bad.yaml").write_text("pools:\n  - {name: m, gpu: [\n")
    with pytest.raises(ConfigError, match="invalid YAML") as info:
        load_cluster(tmp_path / "bad.yaml")
    assert str(tmp_path / "bad.yaml") in str(info.value)
    with pytest.raises(ConfigError, match="cannot read"):
        load_cluster(tmp_path / "missing.yaml")


def test_policy_variants() -> None:
    spec = parse_cluster(base(dispatch={"filters": ["model", "healthy"]}), "c.yaml")
    variants = policy_variants(spec, ["configured", *DISPATCH_PRESETS])
    assert [v.label for v in variants] == ["configured", *DISPATCH_PRESETS]
    for v in variants:
        v.build_dispatch()
        assert v.dispatch.get("filters") == ["model", "healthy"]
    with pytest.raises(ConfigError, match="unknown policy 'best'; known: configured, least_kv"):
        policy_variants(spec, ["best"])
