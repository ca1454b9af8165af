"""The Helm chart (deploy/helm/tokenyard), rendered by Helm's own engine.

`helm-python-sdk` binds Helm's Go SDK (lint, schema validation and template rendering, no
cluster); `kubernetes-validate` checks every built-in object against the OpenAPI schemas of
a current Kubernetes release. What matters is then checked on the objects: the RBAC rules
are exactly the needed ones, the probes and the HPA metric point at what the router really
serves (a real router, started from the rendered config), and values reach the config the
router's own loader parses.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml

from cli.main import build_parser
from router.app import Router
from router.config import parse_router_config
from router.http_server import RouterServer
from router.k8s_loopback import LoopbackKubeAPI, make_endpoint_slice
from tokenyard.config import ConfigError

CHART = Path(__file__).resolve().parents[1] / "deploy" / "helm" / "tokenyard"
KUBE_VERSION = "1.35.0"  # a current release whose schemas kubernetes-validate ships
CRD_KINDS = {"InferencePool", "InferenceObjective", "ServiceMonitor"}  # not in the built-in schemas
_PORT = {"type": "object", "required": ["number"], "additionalProperties": False,
         "properties": {"number": {"type": "integer", "minimum": 1, "maximum": 65535}}}
_NAME = {"type": "string", "minLength": 1, "maxLength": 253}
# The custom resources' specs as their API references define them (Gateway API Inference
# Extension v1 InferencePool, v1alpha2 InferenceObjective; Prometheus Operator v1
# ServiceMonitor, the fields the chart uses), for the objects kubernetes-validate has no schema for.
CRD_SPECS: dict[tuple[str, str], dict[str, Any]] = {
    ("inference.networking.k8s.io/v1", "InferencePool"): {
        "type": "object", "required": ["selector", "targetPorts", "endpointPickerRef"], "additionalProperties": False,
        "properties": {
            "selector": {"type": "object", "required": ["matchLabels"], "additionalProperties": False,
                         "properties": {"matchLabels": {"type": "object", "minProperties": 1, "maxProperties": 64,
                                                        "additionalProperties": {"type": "string", "maxLength": 63}}}},
            "targetPorts": {"type": "array", "minItems": 1, "maxItems": 1, "items": _PORT},
            "endpointPickerRef": {"type": "object", "required": ["name", "port"], "additionalProperties": False,
                                  "properties": {"group": {"type": "string"}, "kind": {"type": "string"},
                                                 "name": _NAME, "port": _PORT,
                                                 "failureMode": {"enum": ["FailOpen", "FailClose"]}}}}},
    ("inference.networking.x-k8s.io/v1alpha2", "InferenceObjective"): {
        "type": "object", "required": ["poolRef"], "additionalProperties": False,
        "properties": {"priority": {"type": "integer"},
                       "poolRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                                   "properties": {"group": {"type": "string"}, "kind": {"type": "string"},
                                                  "name": _NAME}}}},
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object", "required": ["selector", "endpoints"],
        "properties": {"selector": {"type": "object"}, "targetLabels": {"type": "array", "items": {"type": "string"}},
                       "endpoints": {"type": "array", "minItems": 1, "items": {
                           "type": "object", "required": ["port"],
                           "properties": {"port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
                                          "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"}}}}}},
}
POOLS = [
    {"name": "l4", "gpu": "L4", "model": "Qwen/Qwen2.5-1.5B-Instruct", "servedModelName": "qwen2.5-1.5b",
     "replicas": 2, "nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-l4"},
     "resources": {"limits": {"nvidia.com/gpu": 1}}, "args": ["--max-model-len", "8192"]},
    {"name": "h100", "gpu": "H100-80GB", "model": "llama-3-8b", "tp": 2,
     "resources": {"limits": {"nvidia.com/gpu": 2}}},
]
CONTROL_PLANE = {"enabled": True, "pools": {
    "l4": {"usd_per_hour": 0.8, "capacity_rps": [[4.0, 1.5, 0.5], [1.2, 0.6, 0.2]], "max_replicas": 6},
    "h100": {"usd_per_hour": 13.8, "capacity_rps": [[30.0, 12.0, 4.0], [9.0, 5.0, 2.0]], "min_replicas": 1}}}
FULL = {
    "mode": "endpointPicker",
    "pools": POOLS,
    "controlPlane": CONTROL_PLANE,
    "serviceMonitor": {"enabled": True},
    "router": {"control": {"enabled": True}, "autoscaling": {"enabled": True}},
    "inferencePool": {"objectives": [{"name": "chat", "priority": 10}, {"name": "evals", "priority": -1}]},
    "config": {"tenants": {"chat": {"api_keys": ["sk-chat-1"], "slo_class": "interactive"}}},
}


@pytest.fixture(scope="module")
def chart() -> Any:
    loaded = helm.Chart.load(str(CHART))
    yield loaded
    loaded.close()


def render(chart: Any, values: dict[str, Any] | None = None, namespace: str = "llm") -> list[dict[str, Any]]:
    manifests = chart.render(values or {}, name="ty", namespace=namespace, is_install=True)
    docs: list[dict[str, Any]] = []
    for path, text in sorted(manifests.items()):
        if path.endswith(".txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered; have {[(d['kind'], d['metadata']['name']) for d in docs]}"
    return found[0]


def router_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    config = one(docs, "Secret", "ty-tokenyard-config")
    parsed: dict[str, Any] = yaml.safe_load(config["stringData"]["router.yaml"])
    return parsed


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def test_lint_is_clean_in_strict_mode() -> None:
    for values in ({}, FULL):
        report = helm.lint(str(CHART), values, strict=True, namespace="llm", kube_version=f"v{KUBE_VERSION}")
        assert report["errors"] == [] and report["messages"] == [], report


@pytest.mark.parametrize("values", [{}, FULL, {"redis": {"bundled": {"enabled": False},
                                                          "external": {"url": "redis://r:6379/0"}}},
                                    {"config": {"storage": "configMap"}, "discovery": {"kind": "pods"}}],
                         ids=["defaults", "everything", "external-redis", "configmap-pods"])
def test_every_object_validates_against_the_kubernetes_schemas(chart: Any, values: dict[str, Any]) -> None:
    docs = render(chart, values)
    builtin = [d for d in docs if d["kind"] not in CRD_KINDS]
    assert len(builtin) >= 8
    for doc in builtin:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            jsonschema.validate(doc["spec"], CRD_SPECS[(doc["apiVersion"], doc["kind"])])
    for doc in docs:
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), doc["metadata"]["name"]


def test_rbac_rules_are_exactly_the_needed_ones(chart: Any) -> None:
    docs = render(chart, {**FULL, "discovery": {"namespace": "engines"}})
    router_role = one(docs, "Role", "ty-tokenyard-router")
    assert router_role["metadata"]["namespace"] == "engines"  # where discovery watches
    assert router_role["rules"] == [
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]}]
    binding = one(docs, "RoleBinding", "ty-tokenyard-router")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ty-tokenyard-router", "namespace": "llm"}]
    cp_role = one(docs, "Role", "ty-tokenyard-controlplane")
    assert cp_role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
         "resourceNames": ["ty-tokenyard-controlplane"], "verbs": ["get", "update"]},
        {"apiGroups": ["apps"], "resources": ["deployments/scale"],
         "resourceNames": ["ty-tokenyard-pool-l4", "ty-tokenyard-pool-h100"], "verbs": ["get", "update", "patch"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]},  # the drained pod's deletion cost
    ]
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    # ServiceAccount tokens on the control port: the router may create TokenReviews, and only that.
    review = render(chart, {**FULL, "router": {"control": {"enabled": True, "tokenReview": {
        "enabled": True, "roles": [{"service_account": "ops/oncall", "roles": ["operator"]}]}}}})
    assert [d["rules"] for d in review if d["kind"] == "ClusterRole"] == [
        [{"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}]]
    review_binding = one(review, "ClusterRoleBinding", "ty-tokenyard-llm-token-review")
    assert review_binding["roleRef"]["name"] == "ty-tokenyard-llm-token-review"
    assert review_binding["subjects"] == [{"kind": "ServiceAccount", "name": "ty-tokenyard-router", "namespace": "llm"}]
    parsed = parse_router_config(router_config(review), "router.yaml").control_auth
    assert parsed.tokens_dir == "/etc/tokenyard/control-tokens" and parsed.token_review is not None
    assert parsed.token_review.cache_ttl_s == 30 and parsed.token_review.roles[0].service_account == "ops/oncall"
    pods_role = one(render(chart, {"discovery": {"kind": "pods"}}), "Role", "ty-tokenyard-router")
    assert pods_role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    # Off by default: no control-plane identity or permissions at all.
    defaults = render(chart)
    assert not [d for d in defaults if "controlplane" in d["metadata"]["name"]]


def test_values_reach_the_config_the_router_parses(chart: Any) -> None:
    docs = render(chart, FULL)
    doc = router_config(docs)
    cfg = parse_router_config(doc, "router.yaml")
    assert [t.name for t in cfg.tenants] == ["chat"] and cfg.tenants[0].api_keys == ["sk-chat-1"]
    assert cfg.tenants[0].slo_class == "interactive" and cfg.policy_by_slo_class == {"interactive": "headroom"}
    assert set(cfg.slo_classes) == {"interactive", "default", "batch"}
    assert cfg.anonymous_slo_class is None  # tenants have keys: a request without one is refused
    assert (cfg.host, cfg.port, cfg.control_port) == ("0.0.0.0", 8000, 50051)
    # The control plane never runs without tokens: a generated Secret mounted where the config says.
    assert cfg.control_auth.tokens_dir == "/etc/tokenyard/control-tokens" and cfg.control_auth.allow_plaintext
    assert set(one(docs, "Secret", "ty-tokenyard-control-tokens")["data"]) == {"admin"}
    mounts = container(one(docs, "Deployment", "ty-tokenyard-router"), "router")["volumeMounts"]
    assert {"name": "control-tokens", "mountPath": "/etc/tokenyard/control-tokens", "readOnly": True} in mounts
    assert doc["discovery"]["kubernetes"] == {"namespace": "llm", "kind": "endpointslices", "port_name": "http",
                                              "label_selector": "app.kubernetes.io/part-of=tokenyard-engines"}
    changed = render(chart, {"router": {"port": 9100}, "config": {"retries": {"max_attempts": 5}}})
    cfg2 = parse_router_config(router_config(changed), "router.yaml")
    assert (cfg2.port, cfg2.max_attempts, cfg2.control_port) == (9100, 5, None)
    # No tenant keys by default: the chart says on purpose that its 0.0.0.0 front door serves
    # keyless requests (behind its NetworkPolicy); with allowAnonymous false the router refuses.
    assert cfg2.tenants == [] and cfg2.anonymous_slo_class == "default" and cfg2.allow_anonymous_off_loopback
    closed = render(chart, {"router": {"allowAnonymous": False}})
    with pytest.raises(ConfigError, match="router.yaml: listen.host: 0.0.0.0 is not a loopback address"):
        parse_router_config(router_config(closed), "router.yaml")
    ports = container(one(changed, "Deployment", "ty-tokenyard-router"), "router")["ports"]
    assert ports == [{"name": "http", "containerPort": 9100, "protocol": "TCP"}]
    # The config's checksum rolls the pods when (and only when) the config changes.
    def checksum(d: list[dict[str, Any]]) -> str:
        return str(one(d, "Deployment", "ty-tokenyard-router")["spec"]["template"]["metadata"]["annotations"]
                   ["checksum/config"])
    assert checksum(changed) != checksum(render(chart)) == checksum(render(chart))


def test_router_args_are_the_router_commands_own(chart: Any) -> None:
    for values in ({}, FULL, {"redis": {"bundled": {"enabled": False}, "external": {"existingSecret": "mine"}}}):
        deployment = one(render(chart, values), "Deployment", "ty-tokenyard-router")
        router = container(deployment, "router")
        assert router["command"] == ["tokenyard"]
        env = {e["name"]: e for e in router.get("env", [])}
        args = router["args"]
        for arg in args:  # every $(VAR) Kubernetes expands is defined in env
            for var in re.findall(r"\$\((\w+)\)", arg):
                assert var in env, f"{arg} refers to {var}, not in env {sorted(env)}"
        parsed = build_parser().parse_args(args)
        assert parsed.config == "/etc/tokenyard/router.yaml" and parsed.store.startswith(("redis://", "$("))
        if values is FULL:
            assert (parsed.extproc_port, parsed.extproc_shed_priority) == (9002, 2)
        else:
            assert parsed.extproc_port is None


def test_redis_password_is_a_secret_the_router_and_redis_share(chart: Any) -> None:
    docs = render(chart)
    secret = one(docs, "Secret", "ty-tokenyard-redis")
    assert len(secret["data"]["redis-password"]) >= 40  # base64 of 32 generated characters
    redis_env = container(one(docs, "Deployment", "ty-tokenyard-redis"), "redis")["env"]
    router = container(one(docs, "Deployment", "ty-tokenyard-router"), "router")
    ref = {"secretKeyRef": {"name": "ty-tokenyard-redis", "key": "redis-password"}}
    assert redis_env[0]["valueFrom"] == ref and router["env"][0]["valueFrom"] == ref
    store = router["args"][router["args"].index("--store") + 1]
    assert store == "redis://:$(TOKENYARD_REDIS_PASSWORD)@ty-tokenyard-redis.llm.svc:6379/0?prefix=tokenyard"
    assert "password" not in json.dumps(router_config(docs))  # the config never holds it
    external = render(chart, {"redis": {"bundled": {"enabled": False}, "external": {"url": "rediss://:pw@r:6380/1"}}})
    assert one(external, "Secret", "ty-tokenyard-store")["stringData"]["redis-url"] == "rediss://:pw@r:6380/1"
    assert not [d for d in external if "redis" in d["metadata"]["name"] and d["kind"] == "Deployment"]


async def test_probes_and_hpa_metric_are_served_by_a_router_started_from_the_rendered_config(chart: Any) -> None:
    docs = render(chart, {"router": {"autoscaling": {"enabled": True}}})
    router_c = container(one(docs, "Deployment", "ty-tokenyard-router"), "router")
    named = {p["name"]: p["containerPort"] for p in router_c["ports"]}
    hpa = one(docs, "HorizontalPodAutoscaler", "ty-tokenyard-router")
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    api = LoopbackKubeAPI().start()
    try:
        api.apply("endpointslices", make_endpoint_slice(
            "qwen-x1", "qwen", [{"ip": "127.0.0.1", "pod": "qwen-0"}],
            {"app.kubernetes.io/part-of": "tokenyard-engines", "tokenyard.io/model": "qwen2.5-1.5b"},
            namespace="llm", port=1))
        doc = router_config(docs)
        doc["discovery"]["kubernetes"]["api_url"] = api.host  # the in-cluster API, here on loopback
        router = Router(parse_router_config(doc, "router.yaml"))
        await router.start(background=False)
        server = RouterServer(router, "127.0.0.1", 0)
        await server.start()
        try:
            async with httpx.AsyncClient(base_url=server.url, timeout=5) as client:
                for probe in ("livenessProbe", "readinessProbe"):
                    get = router_c[probe]["httpGet"]
                    assert named[get["port"]] == 8000
                    response = await client.get(get["path"])
                    assert response.status_code == 200 and response.json()["instances"] == 1, response.text
                metrics = (await client.get("/metrics")).text
                assert re.search(rf"^{metric} ", metrics, re.M), f"{metric} not in the router's /metrics"
        finally:
            await server.stop()
    finally:
        api.stop()


def test_endpoint_picker_mode(chart: Any) -> None:
    from router.extproc import READINESS_SERVICE

    docs = render(chart, FULL)
    router_c = container(one(docs, "Deployment", "ty-tokenyard-router"), "router")
    assert router_c["readinessProbe"]["grpc"] == {"port": 9002, "service": READINESS_SERVICE}
    pool = one(docs, "InferencePool", "ty-tokenyard")
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["spec"]["endpointPickerRef"] == {"kind": "Service", "name": "ty-tokenyard-router",
                                                 "port": {"number": 9002}, "failureMode": "FailClose"}
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]
    # The pool selects exactly the engine pods the chart runs.
    pod_labels = one(docs, "Deployment", "ty-tokenyard-pool-l4")["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service_ports = one(docs, "Service", "ty-tokenyard-router")["spec"]["ports"]
    assert {"name": "grpc-extproc", "port": 9002, "targetPort": "grpc-extproc", "protocol": "TCP",
            "appProtocol": "kubernetes.io/h2c"} in service_ports
    objectives = [d for d in docs if d["kind"] == "InferenceObjective"]
    assert [(o["metadata"]["name"], o["spec"]["priority"], o["spec"]["poolRef"]["name"]) for o in objectives] == [
        ("chat", 10, "ty-tokenyard"), ("evals", -1, "ty-tokenyard")]
    assert objectives[0]["apiVersion"] == "inference.networking.x-k8s.io/v1alpha2"
    assert not [d for d in render(chart) if d["kind"] in ("InferencePool", "InferenceObjective")]


def test_pools_one_deployment_per_gpu_type_labelled_for_discovery(chart: Any) -> None:
    docs = render(chart, {"pools": POOLS})
    l4 = one(docs, "Deployment", "ty-tokenyard-pool-l4")
    vllm = container(l4, "vllm")
    assert l4["spec"]["replicas"] == 2
    assert l4["spec"]["template"]["spec"]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert vllm["resources"] == {"limits": {"nvidia.com/gpu": 1}}
    assert vllm["args"] == ["--model", "Qwen/Qwen2.5-1.5B-Instruct", "--served-model-name", "qwen2.5-1.5b",
                            "--port", "8000", "--tensor-parallel-size", "1", "--max-model-len", "8192"]
    assert vllm["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    h100 = container(one(docs, "Deployment", "ty-tokenyard-pool-h100"), "vllm")
    assert h100["args"][h100["args"].index("--tensor-parallel-size") + 1] == "2"
    # The Service's labels are what EndpointSlices inherit and discovery reads.
    from router.discovery import KubernetesSettings, records_from_endpoint_slice

    svc = one(docs, "Service", "ty-tokenyard-pool-h100")
    eps = make_endpoint_slice("h100-abc", svc["metadata"]["name"], [{"ip": "10.0.0.7", "pod": "h100-0"}],
                              svc["metadata"]["labels"], namespace="llm", port=8000)
    records = records_from_endpoint_slice(eps, KubernetesSettings(namespace="llm"))
    record = records["llm/h100-0"]
    assert (record.model, record.gpu, record.pool, record.tp, record.url) == (
        "llama-3-8b", "H100-80GB", "h100", 2, "http://10.0.0.7:8000")
    selector = router_config(docs)["discovery"]["kubernetes"]["label_selector"]
    key, value = selector.split("=")
    assert svc["metadata"]["labels"][key] == value


def test_dashboard_uses_metric_names_that_exist(chart: Any) -> None:
    from router.metrics import RouterMetrics

    docs = render(chart, {"pools": POOLS})
    dashboard = json.loads(one(docs, "ConfigMap", "ty-tokenyard-dashboard")["data"]["tokenyard.json"])
    router_names = {m.name for m in RouterMetrics().registry.collect()}
    engine_source = "".join(p.read_text() for p in (CHART.parents[2] / "sim").glob("*.py"))
    titles, checked = [], set()
    for panel in dashboard["panels"]:
        titles.append(panel["title"])
        for target in panel["targets"]:
            names = set(re.findall(r"\b((?:tokenyard|vllm)[:_][a-z_:]+?)(?:_bucket|_total)?\b(?=[{\[( )]|$)",
                                   target["expr"]))
            checked.update(names)
            for name in {n for n in names if not n.startswith("tokenyard_io_")}:  # labels, not metrics
                exported = name.removeprefix("tokenyard_") in {n.removeprefix("tokenyard_") for n in router_names} \
                    or f'"{name}' in engine_source
                assert exported or "NOT EXPORTED YET" in panel["description"], (panel["title"], name)
    assert {"tokenyard_router_inflight", "vllm:num_requests_waiting", "tokenyard_migrations"} <= checked
    assert any("TTFT" in t for t in titles) and any("TPOT" in t for t in titles)
    assert any("Queue" in t for t in titles) and any("Migrations" in t for t in titles)
    cost = next(p for p in dashboard["panels"] if "cost" in p["title"].lower())["targets"][0]["expr"]
    assert 'tokenyard_io_pool="h100"}) or vector(0)) * 2 * 6.9' in cost


@pytest.mark.parametrize(("values", "message"), [
    ({"mode": "gateway"}, "at '/mode': value must be one of 'proxy', 'endpointPicker'"),
    ({"router": {"replicas": 0}}, "at '/router/replicas': minimum: got 0, want 1"),
    ({"routr": {}}, "additional properties 'routr' not allowed"),
    ({"pools": [{"name": "a", "gpu": "L4"}]}, "at '/pools/0': missing property 'model'"),
    ({"pools": [{"name": "A100", "gpu": "A100", "model": "m"}]}, "at '/pools/0/name'"),
    ({"redis": {"external": {"url": "http://x"}}}, "at '/redis/external/url'"),
    ({"pools": [{"name": "a", "gpu": "L4", "model": "org/model"}]},
     "pools[0].servedModelName: the model name \"org/model\" cannot be a Kubernetes label value"),
    ({"redis": {"bundled": {"enabled": False}}}, "redis: several router replicas share state through Redis"),
    ({"redis": {"external": {"url": "redis://r:6379"}}}, "redis: set either redis.bundled.enabled or redis.external"),
    ({"pools": [{"name": "a", "gpu": "L4", "model": "m"}, {"name": "a", "gpu": "T4", "model": "m"}]},
     "pools: the pool name \"a\" appears twice"),
    ({"mode": "endpointPicker", "router": {"workers": 2}}, "router.workers: the ext_proc endpoint picker"),
])
def test_a_wrong_value_fails_at_install_with_a_clear_message(chart: Any, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError) as caught:
        chart.render(values, name="ty", namespace="llm", is_install=True)
    assert message in str(caught.value)


def test_control_plane_env_is_what_leader_election_and_the_scaler_read(chart: Any) -> None:
    from router.k8s_scale import parse_deployments
    from router.leader import LeaderElectionSettings

    docs = render(chart, {"pools": POOLS, "controlPlane": CONTROL_PLANE})
    deployment = one(docs, "Deployment", "ty-tokenyard-controlplane")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "ty-tokenyard-controlplane"
    env: dict[str, str] = {}
    for item in container(deployment, "controlplane")["env"]:
        field = item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        env[item["name"]] = {"metadata.name": "cp-0", "metadata.namespace": "llm"}.get(field, item.get("value", ""))
    settings = LeaderElectionSettings.from_env(env)
    assert (settings.namespace, settings.identity, settings.lease_name) == ("llm", "cp-0", "ty-tokenyard-controlplane")
    assert (settings.lease_duration_s, settings.renew_deadline_s, settings.retry_period_s) == (15, 10, 2)
    scalable = parse_deployments(env["TOKENYARD_SCALABLE_DEPLOYMENTS"])
    assert scalable == {"l4": "ty-tokenyard-pool-l4", "h100": "ty-tokenyard-pool-h100"}
    rules = one(docs, "Role", "ty-tokenyard-controlplane")["rules"]
    assert rules[1]["resourceNames"] == [settings.lease_name]  # RBAC allows exactly that Lease
    assert rules[2]["resourceNames"] == list(scalable.values())  # and exactly those Deployments
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"} >= set(scalable.values())


def test_network_policies_admit_only_who_needs_each_port(chart: Any) -> None:
    selector = {"matchLabels": {"kubernetes.io/metadata.name": "gateway-system"}}
    docs = render(chart, {**FULL, "networkPolicy": {"gatewayNamespaceSelector": selector}})
    router_np = one(docs, "NetworkPolicy", "ty-tokenyard-router")
    by_port = {rule["ports"][0]["port"]: rule.get("from") for rule in router_np["spec"]["ingress"]}
    assert by_port["http"] is None  # clients: anyone, unless clientSelectors says otherwise
    assert by_port["grpc-control"] == [{"podSelector": {"matchLabels": {"tokenyard.io/control-client": "true"}},
                                        "namespaceSelector": {}}]
    assert by_port["grpc-extproc"] == [{"namespaceSelector": selector}]
    redis_from = one(docs, "NetworkPolicy", "ty-tokenyard-redis")["spec"]["ingress"][0]["from"]
    assert [f["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for f in redis_from] == [
        "router", "controlplane"]
    engines_from = one(docs, "NetworkPolicy", "ty-tokenyard-engines")["spec"]["ingress"][0]["from"]
    assert engines_from[0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "router"
    assert {"namespaceSelector": selector} in engines_from  # the gateway proxies to the engines
    assert not [d for d in render(chart, {"networkPolicy": {"enabled": False}}) if d["kind"] == "NetworkPolicy"]
