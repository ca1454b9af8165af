"""The policy document: schema, errors, round trip, both dialects, the plugin contract."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.config import load_router_config, parse_router_config
from scheduler.dispatch import ClusterView, build_policy, params_model, register_builtins
from scheduler.dispatch_parts import SCORERS, DispatchContext, PolicyConfigError
from scheduler.layer import DecisionLayer
from scheduler.policy_document import PolicyDocument, PolicyDocumentError, load_policy_document
from scheduler.types import InstanceState, RequestInfo
from sim.cluster import parse_cluster
from tokenyard.config import ConfigError

REPO = Path(__file__).resolve().parents[1]

FULL = {
    "version": 1,
    "seed": 7,
    "slo_classes": {
        "interactive": {"ttft_ms": 800, "tpot_ms": 80, "priority": 0, "queue_timeout_ms": 2000},
        "batch": {"ttft_ms": 60000, "tpot_ms": 1000, "priority": 2, "sheddable": True},
        "default": {"ttft_ms": 3000, "tpot_ms": 200, "priority": 1},
    },
    "profiles": {
        "default": {"scorers": ["least_outstanding"]},
        "headroom": {"filters": ["model", "healthy", "not_draining", "kv_room"],
                     "scorers": [{"slo_headroom": {"weight": 1.0}}, {"least_outstanding": {"weight": 0.2}}],
                     "picker": {"session_affinity": {"load_factor": 1.5}}},
    },
    "selection": {"default": "default", "by_slo_class": {"interactive": "headroom"}, "by_tenant": {"acme": "default"}},
    "window": {"max_candidates": 8},
    "affinity": {"enabled": True, "ttl_s": 120},
    "queue": {"sort": "slo_priority", "engine_priority": "slo_priority"},
    "admission": {"enabled": True, "max_queue_depth": 64, "saturation": {"max_queued_per_instance": 4,
                                                                         "max_kv_usage": 0.95}},
}


def test_defaults_and_full_document_round_trip() -> None:
    default = load_policy_document({})
    assert load_policy_document(default.to_dict()) == default
    assert default.window.max_candidates == 16 and not default.admission.enabled
    doc = load_policy_document(FULL)
    again = load_policy_document(doc.to_dict())
    assert again == doc and again.to_dict() == doc.to_dict()
    assert doc.profile_for("acme", "interactive") == "default"  # tenant first
    assert doc.profile_for("other", "interactive") == "headroom"
    assert doc.profile_for("other", "batch") == "default"
    assert doc.slo_class_map()["batch"].sheddable


@settings(max_examples=40, deadline=None)
@given(max_candidates=st.integers(0, 1000), seed=st.integers(0, 2**31), ttl=st.floats(1, 1e5),
       depth=st.integers(0, 10_000), weight=st.floats(0, 10), sort=st.sampled_from(["fcfs", "slo_priority"]))
def test_round_trip_property(max_candidates: int, seed: int, ttl: float, depth: int, weight: float,
                             sort: str) -> None:
    raw = {"seed": seed, "window": {"max_candidates": max_candidates}, "affinity": {"ttl_s": ttl},
           "admission": {"max_queue_depth": depth}, "queue": {"sort": sort},
           "profiles": {"default": {"scorers": [{"least_kv": {"weight": weight}}]}}}
    doc = load_policy_document(raw)
    assert load_policy_document(doc.to_dict()) == doc


@pytest.mark.parametrize(("raw", "expected"), [
    ({"profiles": {"a": {"scorer": []}}, "selection": {"default": "a"}},
     "policy.profiles.a.scorer: unknown key; allowed: filters, scorers, picker, seed (got [])"),
    ({"slo_classes": {"x": {"ttft_ms": -1, "tpot_ms": 1}}},
     "policy.slo_classes.x.ttft_ms: Input should be greater than 0 (got -1)"),
    ({"window": {"max_candidates": -2}}, "policy.window.max_candidates: Input should be greater than or equal to 0"),
    ({"selection": {"default": "nope"}}, "policy.selection.default: unknown profile 'nope'; known: default"),
    ({"selection": {"by_slo_class": {"gold": "default"}}}, "policy.selection.by_slo_class.gold: unknown SLO class"),
    ({"profiles": {"default": {"scorers": [{"slo_headroom": {"weight": -1}}]}}},
     "policy.profiles.default.scorers[0].slo_headroom.weight: expected a number >= 0"),
    ({"profiles": {"default": {"picker": {"session_affinity": {"load_factor": "x"}}}}},
     "policy.profiles.default.picker.session_affinity.load_factor: Input should be a valid number"),
    ({"profiles": {"default": {"picker": {"session_affinity": {"lod": 1}}}}},
     "policy.profiles.default.picker.session_affinity.lod: unknown key; allowed: load_factor, slack_requests, "
     "virtual_nodes (got 1)"),
    ({"profiles": {"default": {"picker": {"max_score": {"x": 1}}}}},
     "policy.profiles.default.picker.max_score.x: unknown key; allowed: none"),
    ({"profiles": {"default": {"scorers": ["nope"]}}},
     "policy.profiles.default.scorers[0]: unknown scorer 'nope'; known: least_kv, least_outstanding"),
    ({"queue": {"sort": "lol"}}, "policy.queue.sort: unknown queue sort 'lol'; known: fcfs, input_length, learned_rank, slo_priority"),
    ({"admission": {"saturation": {"max_kv_usage": 2}}},
     "policy.admission.saturation.max_kv_usage: Input should be less than or equal to 1 (got 2)"),
    ({"versionx": 1}, "policy.versionx: unknown key; allowed: version, seed, slo_classes"),
    ({"version": 2}, "policy.version: Input should be 1 (got 2)"),
])
def test_errors_name_path_value_and_allowed(raw: dict[str, object], expected: str) -> None:
    with pytest.raises(PolicyDocumentError) as info:
        load_policy_document(raw)
    message = str(info.value)
    assert expected in message and "\n" not in message


def test_router_old_dialect_converts_with_its_meaning() -> None:
    cfg = parse_router_config({
        "slo_classes": {"gold": {"ttft_ms": 500, "tpot_ms": 50, "priority": 0},
                        "default": {"ttft_ms": 3000, "tpot_ms": 200, "priority": 1}},
        "policies": {"default": {"scorers": ["least_outstanding"]}, "fast": {"scorers": ["slo_headroom"]}},
        "dispatch": {"by_slo_class": {"gold": "fast"}, "max_candidates": 4, "affinity_ttl_s": 30,
                     "forward_priority": False},
        "tenants": {"acme": {"api_keys": ["k1"], "slo_class": "gold", "policy": "default"}},
    }, "r.yaml")
    doc = cfg.policy
    assert doc.window.max_candidates == 4 and doc.affinity.ttl_s == 30 and doc.affinity.enabled
    assert doc.selection.by_slo_class == {"gold": "fast"} and doc.selection.by_tenant == {"acme": "default"}
    assert doc.queue.engine_priority == "fcfs" and not cfg.forward_priority
    layer = DecisionLayer(doc)
    scorer = layer.profiles["fast"].scorers[0][0]
    assert scorer.ttft_slo_s["gold"] == 0.5  # type: ignore[attr-defined]  # the document's targets


def test_router_policy_key_embedded_and_by_path(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text(
        "profiles: {p: {scorers: [least_kv]}}\nselection: {default: p}\nwindow: {max_candidates: 3}\n"
        "queue: {engine_priority: slo_priority}\n")
    (tmp_path / "router.yaml").write_text("listen: {port: 8123}\npolicy: policy.yaml\n")
    cfg = load_router_config(tmp_path / "router.yaml")
    assert cfg.max_candidates == 3 and cfg.default_policy == "p" and cfg.forward_priority
    with pytest.raises(ConfigError, match=r"r.yaml: dispatch: the policy document \(`policy:`\) replaces this key"):
        parse_router_config({"policy": {}, "dispatch": {"max_candidates": 2}}, "r.yaml")
    (tmp_path / "bad.yaml").write_text("policy: {window: {max_candidates: x}}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: policy.window.max_candidates: Input should be a valid integer"):
        load_router_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize(("doc", "expected"), [
    ({"listen": {"port": 70000}}, "r.yaml: listen.port: expected a TCP port 1-65535 (0: any free port), got 70000"),
    ({"control": {"port": -1}}, "r.yaml: control.port: expected a TCP port 1-65535"),
    ({"store": "redis://127.0.0.1:6379/16"}, "r.yaml: store: Redis database index must be an integer 0-15"),
    ({"store": "redis://127.0.0.1:6379/x"}, "r.yaml: store: Redis database index must be an integer 0-15"),
    ({"store": "redis://127.0.0.1:99999/0"}, "r.yaml: store: invalid Redis URL"),
])
def test_router_schema_ranges(doc: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_router_config(doc, "r.yaml")
    assert expected in str(info.value)


def test_router_empty_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n")
    with pytest.raises(ConfigError, match="the config file is empty; expected a mapping"):
        load_router_config(path)


POOLS = [{"name": "a", "gpu": "A100-80GB", "model": "llama-3-8b", "count": 2}]


def test_sim_old_dialect_and_policy_key() -> None:
    old = parse_cluster({"pools": POOLS, "dispatch": {"scorers": ["least_kv"],
                                                      "per_slo_class": {"batch": {"picker": "round_robin"}}},
                         "queue": {"policy": "slo_priority"}}, "c.yaml")
    doc = old.document()
    assert doc.window.max_candidates == 0 and not doc.affinity.enabled and not doc.admission.enabled
    assert doc.selection.by_slo_class == {"batch": "slo_batch"}
    assert doc.profiles["slo_batch"].picker == "round_robin" and doc.profiles["slo_batch"].scorers == ["least_kv"]
    assert doc.queue.engine_priority == "slo_priority"
    new = parse_cluster({"pools": POOLS, "policy": FULL}, "c.yaml")
    assert new.document() == load_policy_document(FULL)
    assert new.pools[0].engine.scheduling_policy == "priority"  # the document's engine priority needs it
    with pytest.raises(ConfigError, match=r"c.yaml: queue: the policy document"):
        parse_cluster({"pools": POOLS, "policy": {}, "queue": {"policy": "fcfs"}}, "c.yaml")


def test_shipped_examples_load() -> None:
    cfg = load_router_config(REPO / "router" / "examples" / "production.yaml")
    assert cfg.policy.profiles
    for path in sorted((REPO / "sim" / "examples").glob("*.yaml")):
        from sim.cluster import load_cluster

        assert load_cluster(path).document().profiles


# -- the plugin contract ---------------------------------------------------------------

instances_st = st.lists(st.builds(
    InstanceState, instance_id=st.uuids().map(str), model=st.just("m"), gpu=st.sampled_from(["A100-80GB", "L4", "?"]),
    running=st.integers(0, 300), waiting=st.integers(0, 300), kv_blocks_used=st.integers(0, 5000),
    kv_blocks_total=st.integers(0, 5000), router_inflight=st.integers(0, 500)), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(instances=instances_st, prompt=st.integers(1, 30000), slo_class=st.sampled_from(["interactive", "batch", "x"]))
def test_builtin_scores_are_in_unit_interval(instances: list[InstanceState], prompt: int, slo_class: str) -> None:
    register_builtins(entry_points=False)
    request = RequestInfo("r", "m", prompt, slo_class=slo_class)
    ctx = DispatchContext(0.0, __import__("random").Random(0))
    for name in ("least_outstanding", "least_kv", "slo_headroom"):
        scorer = SCORERS[name]()
        assert scorer.normalized
        for value in scorer.score_all(request, instances, ctx):
            assert 0.0 <= value <= 1.0, (name, value)


def test_unnormalised_scorer_is_clamped_and_decision_explains_itself() -> None:
    from scheduler.dispatch_parts import Scorer, register_scorer

    @register_scorer("test_raw_outstanding")
    class RawOutstanding(Scorer):
        def score(self, request: RequestInfo, instance: InstanceState, ctx: DispatchContext) -> float:
            return float(instance.outstanding) - 1.0  # -1 .. n: out of [0, 1] on both sides

    try:
        policy = build_policy({"scorers": [{"test_raw_outstanding": {"weight": 2}}, "least_outstanding"]},
                              name="p")
        states = [InstanceState(f"i{k}", "m", running=k) for k in range(4)]
        decision = policy.decide(ClusterView(states), RequestInfo("r", "m", 10), explain=True)
        explanation = decision.explanation
        assert explanation is not None and explanation.profile == "p"
        by_id = {iid: (total, parts) for iid, total, parts in explanation.candidates}
        assert by_id["i0"][1] == (0.0, 1.0)  # clamped up from -1
        assert by_id["i3"][1] == (1.0, 0.25)  # clamped down from 2
        for iid, total in decision.scores:
            assert total == pytest.approx(2 * by_id[iid][1][0] + by_id[iid][1][1])
        assert explanation.to_dict()["weights"] == {"test_raw_outstanding": 2.0, "least_outstanding": 1.0}
    finally:
        SCORERS.pop("test_raw_outstanding", None)


def test_observer_sees_every_part() -> None:
    seen: list[tuple[str, str]] = []

    class Observer:
        def sample(self) -> bool:
            return True

        def clock_s(self) -> float:
            return 0.0

        def observe(self, kind: str, name: str, seconds: float) -> None:
            seen.append((kind, name))

    policy = build_policy({"scorers": ["least_outstanding", "least_kv"], "picker": "round_robin"})
    policy.observer = Observer()
    states = [InstanceState(f"i{k}", "m") for k in range(3)]
    plain = build_policy({"scorers": ["least_outstanding", "least_kv"], "picker": "round_robin"})
    request = RequestInfo("r", "m", 10)
    assert policy.decide(ClusterView(states), request) == plain.decide(ClusterView(states), request)
    assert seen == [("filter", "model"), ("filter", "healthy"), ("filter", "not_draining"),
                    ("filter", "not_cordoned"), ("scorer", "least_outstanding"), ("scorer", "least_kv"), ("picker", "round_robin")]


def test_params_model_is_typed() -> None:
    register_builtins(entry_points=False)
    from scheduler.dispatch_parts import PICKERS

    fields = params_model(PICKERS["prefix_affinity"]).model_fields
    assert fields["capacity_blocks"].annotation is int and fields["load_factor"].annotation is float
    with pytest.raises(PolicyConfigError, match=r"prefix_affinity.capacity_blocks: Input should be a valid integer"):
        build_policy({"picker": {"prefix_affinity": {"capacity_blocks": "many"}}})


def test_out_of_tree_plugin_loads_through_entry_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/plugin is found the way an installed package is: its dist-info metadata
    on the import path names its entry point in the `tokenyard.policies` group."""
    dist = tmp_path / "tokenyard_plugin_example-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tokenyard-plugin-example\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text(
        "[tokenyard.policies]\nprefer_pool = tokenyard_plugin_example:register\n")
    monkeypatch.syspath_prepend(str(REPO / "examples" / "plugin"))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        loaded = register_builtins()
        assert loaded["prefer_pool"] == "tokenyard_plugin_example:register"
        doc = load_policy_document({"profiles": {"default": {
            "scorers": [{"prefer_pool": {"pool": "h100", "weight": 1.0}}, {"least_outstanding": {"weight": 0.1}}]}}})
        states = [InstanceState("a", "m", pool="a100"), InstanceState("b", "m", pool="h100", running=3)]
        decision = DecisionLayer(doc).decide(DecisionLayer(doc).profiles["default"], states,
                                             RequestInfo("r", "m", 5), 0.0)
        assert decision.instance_id == "b"  # the plugin's preference outweighs the load
        with pytest.raises(PolicyDocumentError, match=r"prefer_pool.pool: Input should be a valid string"):
            load_policy_document({"profiles": {"default": {"scorers": [{"prefer_pool": {"pool": 3}}]}}})
    finally:
        SCORERS.pop("prefer_pool", None)
        sys.modules.pop("tokenyard_plugin_example", None)


def test_document_type_is_the_schema() -> None:
    assert PolicyDocument.model_json_schema()["properties"]["window"]


OLD_ROUTER = """\
listen: {port: 8001}
slo_classes:
  interactive: {ttft_ms: 800, tpot_ms: 80, priority: 0}
  default: {ttft_ms: 3000, tpot_ms: 200, priority: 1}
policies:
  default: {scorers: [least_outstanding]}
  fast: {scorers: [slo_headroom, {least_outstanding: {weight: 0.1}}]}
dispatch: {by_slo_class: {interactive: fast}, max_candidates: 4}
tenants:
  acme: {api_keys: [k1], slo_class: interactive}
"""


def test_config_migrate_keeps_the_meaning(tmp_path: Path) -> None:
    from cli.main import main
    from sim.cluster import load_cluster

    old = tmp_path / "router.yaml"
    old.write_text(OLD_ROUTER)
    new = tmp_path / "router.v2.yaml"
    assert main(["config", "migrate", str(old), "--out", str(new)]) == 0
    assert "policy:" in new.read_text() and "policies:" not in new.read_text()
    assert load_router_config(new).policy == load_router_config(old).policy
    assert main(["config", "migrate", str(old), "--out", str(old)]) == 2  # never over its input
    assert old.read_text() == OLD_ROUTER
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("pools: [{name: a, gpu: A100-80GB, model: llama-3-8b, count: 2}]\n"
                       "dispatch: {scorers: [least_kv], per_slo_class: {batch: {picker: round_robin}}}\n"
                       "queue: {policy: slo_priority}\n")
    migrated = tmp_path / "cluster.v2.yaml"
    assert main(["config", "migrate", str(cluster), "--out", str(migrated)]) == 0
    assert load_cluster(migrated).document() == load_cluster(cluster).document()
    assert main(["config", "check", str(migrated)]) == 0
    (tmp_path / "bad.yaml").write_text("policy: {window: {max_candidates: -1}}\n")
    assert main(["config", "check", str(tmp_path / "bad.yaml")]) == 2


async def test_router_explains_a_decision_when_asked() -> None:
    import json

    import httpx

    from router.admission import PluginMetrics
    from tests.test_router_support import fake_engines, running_router

    doc = {"policy": {"profiles": {"default": {"scorers": ["least_outstanding", {"least_kv": {"weight": 0.5}}]}}}}
    with fake_engines((), ()) as engines:
        records = [engine.record(f"e{k}") for k, engine in enumerate(engines)]
        async with running_router(records, doc) as server:
            url = f"http://127.0.0.1:{server.port}/v1/completions"
            body = {"model": "llama-3-8b", "prompt": "hi", "max_tokens": 2}
            server.router.dispatcher.layer.set_observer(PluginMetrics(server.router.metrics, sample_every=1))
            async with httpx.AsyncClient(timeout=10) as client:
                plain = await client.post(url, json=body)
                explained = await client.post(url, json=body, headers={"x-tokenyard-explain": "1"})
                metrics = (await client.get(f"http://127.0.0.1:{server.port}/metrics")).text
    assert plain.status_code == explained.status_code == 200
    assert "x-tokenyard-explain" not in plain.headers
    explanation = json.loads(explained.headers["x-tokenyard-explain"])
    assert explanation["profile"] == "default" and explanation["weights"] == {"least_outstanding": 1.0,
                                                                              "least_kv": 0.5}
    chosen = explanation["candidates"][0]
    assert chosen["id"] == explained.headers["x-tokenyard-instance"]
    assert chosen["total"] == pytest.approx(chosen["scores"]["least_outstanding"] + 0.5 * chosen["scores"]["least_kv"],
                                            abs=1e-5)
    assert {c["id"] for c in explanation["candidates"]} == {"e0", "e1"}
    assert 'tokenyard_router_plugin_seconds_count{kind="scorer",name="least_kv"}' in metrics


def test_the_documented_policy_documents_are_valid() -> None:
    import re

    import yaml

    text = (REPO / "docs" / "policy.md").read_text()
    complete = yaml.safe_load(re.findall(r"```yaml\n(.*?)```", text, re.S)[0])
    doc = load_policy_document(complete)
    assert doc.admission.enabled and doc.selection.by_tenant == {"acme": "sessions"}
    plugin_doc = (REPO / "docs" / "plugins.md").read_text()
    assert "tokenyard.policies" in plugin_doc and "examples/plugin" in plugin_doc
