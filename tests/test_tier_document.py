"""The tier decision in the one policy document: the `tiers:` section validates and round
trips, the router reads it (and converts the older top-level key), `tokenyard sim run`
routes alias requests by it, and the router lists the alias in /v1/models and counts its
choices."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from router.config import parse_router_config
from router.state import InstanceRecord
from scheduler.policy_document import PolicyDocumentError, load_policy_document
from sim.cli import SimJob, TraceOptions, run_job
from sim.tier_noise import NoisyTierScores, TierNoise
from tests.test_router_support import emulated_engine, running_router
from tokenyard.config import ConfigError

SMALL, LARGE = "qwen2.5-1.5b", "llama-3-8b"
TIERS = {"alias": "auto", "small_model": SMALL, "large_model": LARGE, "policy": "quality_only",
         "default": {"quality_target": 0.9, "quality_floor": 0.5},
         "classes": {"batch": {"cost_budget": 0.2, "quality_floor": 0.3}},
         "tenants": {"acme": {"quality_floor": 0.8, "quality_target": 0.95}}}


def test_tiers_section_round_trips() -> None:
    doc = load_policy_document({"tiers": TIERS})
    assert doc.tiers is not None and doc.tiers.tenants["acme"].quality_target == 0.95
    assert load_policy_document(doc.to_dict()) == doc
    assert load_policy_document(doc.to_dict(minimal=True)) == doc
    assert doc.to_dict(minimal=True)["tiers"]["classes"] == {"batch": {"cost_budget": 0.2, "quality_floor": 0.3}}
    assert doc.tiers.to_section(with_model_file=False)["tenants"] == TIERS["tenants"]
    assert load_policy_document({}).tiers is None


@pytest.mark.parametrize(("change", "message"), [
    ({"policy": "best"}, r"^policy\.tiers\.policy: unknown tier policy 'best'; known: always_large, "),
    ({"alias": SMALL}, r"^policy\.tiers\.alias: expected a name other than the two models"),
    ({"colour": 1}, r"^policy\.tiers\.colour: unknown key; allowed: alias, small_model, .*\(got 1\)"),
    ({"default": {"quality_target": 2}}, r"^policy\.tiers\.default\.quality_target: .*less than or equal to 1 \(got 2\)"),
    ({"default": {"quality_target": 0.3, "cost_budget": 0.2}}, r"^policy\.tiers\.default: give quality_target or cost_budget"),
    ({"tenants": {"acme": {"floor": 1}}}, r"^policy\.tiers\.tenants\.acme\.floor: unknown key; allowed: quality_target"),
    ({"pressure": {"start": 1.0, "full": 0.5}}, r"^policy\.tiers\.pressure: expected 0 <= start < full"),
])
def test_tiers_section_errors_name_path_value_and_allowed(change: dict, message: str) -> None:
    with pytest.raises(PolicyDocumentError, match=message):
        load_policy_document({"tiers": {**TIERS, **change}})
    with pytest.raises(PolicyDocumentError, match=r"^policy\.tiers\.small_model: Field required"):
        load_policy_document({"tiers": {"large_model": LARGE}})


def test_router_reads_tiers_from_the_document_and_converts_the_old_key() -> None:
    old = parse_router_config({"tiers": TIERS}, "t.yaml")
    new = parse_router_config({"policy": {"tiers": TIERS}}, "t.yaml")
    assert old.policy.tiers == new.policy.tiers and old.policy.tiers is not None
    assert old.tiers == new.tiers and old.tiers["tenants"] == TIERS["tenants"]
    with pytest.raises(ConfigError, match=r"t.yaml: tiers: the policy document has a `tiers:` section"):
        parse_router_config({"policy": {"tiers": TIERS}, "tiers": TIERS}, "t.yaml")
    with pytest.raises(ConfigError, match=r"t.yaml: policy.tiers.model_file: .*cannot read"):
        parse_router_config({"policy": {"tiers": {**TIERS, "model_file": "/nope.json"}}}, "t.yaml")
    assert parse_router_config({}, "t.yaml").tiers == {}


def load_predictor_thresholds_normal() -> float:
    """The default class's threshold under the packaged tier model (quality_target 0.9)."""
    from scheduler.predictors.tier import load_predictor
    from scheduler.tiers import TierClassPolicy, class_thresholds

    return class_thresholds(TierClassPolicy(quality_target=0.9), load_predictor().thresholds).normal


def _files(tmp_path: Path, default_model: str, with_scores: bool) -> tuple[Path, Path]:
    rows = ["arrival_s,input_tokens,output_tokens" + (",p_small_ok" if with_scores else "")]
    for i in range(120):
        rows.append(f"{i * 0.05:.2f},200,16" + ((",0.99" if i % 2 else ",0.01") if with_scores else ""))
    trace = tmp_path / "t.csv"
    trace.write_text("\n".join(rows) + "\n")
    cluster = tmp_path / "c.yaml"
    cluster.write_text(
        f"default_model: {default_model}\n"
        "pools:\n"
        f"  - {{name: small, gpu: L4, model: {SMALL}, count: 1, engine: {{max_num_seqs: 32}}}}\n"
        f"  - {{name: large, gpu: A100-80GB, model: {LARGE}, count: 1, engine: {{max_num_seqs: 32}}}}\n"
        "policy:\n"
        f"  tiers: {{alias: auto, small_model: {SMALL}, large_model: {LARGE}, policy: quality_only,\n"
        "          default: {quality_target: 0.9}}\n")
    return cluster, trace


def test_sim_run_routes_alias_requests_to_both_models(tmp_path: Path) -> None:
    cluster, trace = _files(tmp_path, "auto", with_scores=False)
    records = run_job(SimJob(cluster_path=str(cluster), trace=TraceOptions(str(trace)))).result.records
    served = {r.request_id: r.model for r in records}
    assert set(served.values()) == {SMALL, LARGE}
    # The noise model (AUC 0.5 by default): the same score per request id, sent small above the threshold.
    small = {rid for rid, model in served.items() if model == SMALL}
    threshold = load_predictor_thresholds_normal()
    from scheduler.predictors.tier import load_predictor

    noisy = NoisyTierScores(TierNoise(), 0, tuple(load_predictor().thresholds), load_predictor().meta["small_ok_share"])
    assert small == {rid for rid in served if noisy.score(rid) >= threshold}
    # The trace's own p_small_ok wins, and `--model auto` names the alias for rows without a model.
    cluster, trace = _files(tmp_path, LARGE, with_scores=True)
    records = run_job(SimJob(cluster_path=str(cluster), trace=TraceOptions(str(trace)), model="auto")).result.records
    by_index = {int(r.request_id.removeprefix("req-")): r.model for r in records}
    assert all(model == (SMALL if i % 2 else LARGE) for i, model in by_index.items())
    plain = run_job(SimJob(cluster_path=str(cluster), trace=TraceOptions(str(trace)))).result.records
    assert {r.model for r in plain} == {LARGE}  # without --model rows ask for the default model


def test_sim_cli_checks_the_model_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import main

    cluster, trace = _files(tmp_path, LARGE, with_scores=False)
    assert main(["sim", "run", str(cluster), "--trace", str(trace), "--model", "gpt-5", "--no-progress"]) != 0
    assert "--model: no pool serves 'gpt-5' and it is not the tier alias" in capsys.readouterr().err
    out = tmp_path / "out"
    assert main(["sim", "run", str(cluster), "--trace", str(trace), "--model", "auto", "--no-plots",
                 "--no-progress", "--out", str(out)]) == 0


async def test_router_lists_the_alias_and_counts_tier_choices() -> None:
    doc = {"policy": {"tiers": {**TIERS, "tenants": {"thrifty": {"cost_budget": 0.0}}}},
           "tenants": {"thrifty": {"api_keys": ["sk-thrifty"]}}}
    async with emulated_engine(SMALL, "L4") as small, emulated_engine(LARGE, "A100-80GB") as large:
        records = [InstanceRecord("s0", small.base_url, SMALL, gpu="L4"), InstanceRecord("l0", large.base_url, LARGE)]
        async with running_router(records, doc) as server, httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            headers = {"Authorization": "Bearer sk-thrifty"}
            models = (await client.get("/v1/models", headers=headers)).json()
            assert {m["id"] for m in models["data"]} == {SMALL, LARGE, "auto"}
            for _ in range(2):
                response = await client.post("/v1/completions", headers=headers,
                                             json={"model": "auto", "prompt": "What is 2+2?", "max_tokens": 4})
                assert response.status_code == 200 and response.json()["model"] == SMALL
            metrics = (await client.get("/metrics")).text
            assert f'tokenyard_router_tier_choices_total{{model="{SMALL}",tier="small"}} 2.0' in metrics


def test_config_migrate_moves_the_top_level_tiers_into_the_document() -> None:
    from cli.config_cmd import migrated

    raw = {"tiers": TIERS, "policy": {"seed": 3}}
    out = migrated("router", raw, parse_router_config(raw, "t.yaml"))
    assert "tiers" not in out and out["policy"]["seed"] == 3
    assert parse_router_config(out, "t.yaml").policy == parse_router_config(raw, "t.yaml").policy
    assert out["policy"]["tiers"]["tenants"] == TIERS["tenants"]
