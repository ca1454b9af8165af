"""The chart's control plane runs the real command with a config the command accepts.

Rendered with the real Helm engine (helm-python-sdk): the Deployment's command line parses
with `tokenyard`'s own argparse tree, the `controlplane.yaml` the ConfigMap carries parses
with `router.controlplane.parse_config` under the environment the Deployment sets (the
store URL with the Redis password expanded, the scalable Deployments, the namespace), and
wrong values fail at install with a message naming the value.
"""

from __future__ import annotations

import re
from typing import Any

import helm_python as helm
import pytest
import yaml

from cli.main import build_parser
from router.controlplane import parse_config
from tests.test_helm_chart import CONTROL_PLANE, POOLS, chart, container, one, render  # noqa: F401  (fixture)


def _env(deployment: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in container(deployment, "controlplane")["env"]:
        field = item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        secret = item.get("valueFrom", {}).get("secretKeyRef")
        value = {"metadata.name": "cp-0", "metadata.namespace": "llm"}.get(field, item.get("value", ""))
        if secret:
            value = "s3cret" if item["name"] == "TOKENYARD_REDIS_PASSWORD" else "redis://ext:6379/0"
        # Kubernetes expands $(VAR) of variables defined earlier in the list.
        env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)
    return env


def test_the_deployment_runs_controlplane_with_the_config_it_renders(chart: Any) -> None:  # noqa: F811
    docs = render(chart, {"pools": POOLS, "controlPlane": CONTROL_PLANE})
    deployment = one(docs, "Deployment", "ty-tokenyard-controlplane")
    box = container(deployment, "controlplane")
    argv = [*box["command"], *box["args"]][1:]
    args = build_parser().parse_args(argv)
    assert args.command == "controlplane" and args.config == "/etc/tokenyard/controlplane.yaml"
    assert {"name": "metrics", "containerPort": 9400, "protocol": "TCP"} in box["ports"]
    data = one(docs, "Secret", "ty-tokenyard-config")["stringData"]  # config.storage: secret (the default)
    env = _env(deployment)
    assert env["TOKENYARD_STORE_URL"] == "redis://:s3cret@ty-tokenyard-redis.llm.svc:6379/0?prefix=tokenyard"
    config = parse_config(yaml.safe_load(data["controlplane.yaml"]), "controlplane.yaml", env)
    assert config.store_url == env["TOKENYARD_STORE_URL"]
    assert config.actuator == "kubernetes" and config.namespace == "llm" and config.leader_election
    assert [(p.name, p.gpu, p.tp, p.deployment) for p in config.pools] == [
        ("l4", "L4", 1, "ty-tokenyard-pool-l4"), ("h100", "H100-80GB", 2, "ty-tokenyard-pool-h100")]
    assert (config.pools[0].max_replicas, config.pools[1].min_replicas) == (6, 1)
    assert config.input_edges == (0, 1024, 8192) and config.metrics_host == "0.0.0.0"
    # The engines admit the control plane (it reads their in-flight counts).
    engines_from = one(docs, "NetworkPolicy", "ty-tokenyard-engines")["spec"]["ingress"][0]["from"]
    assert any(f.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component") == "controlplane"
               for f in engines_from)
    # Its own pod admits only scrapes, on the metrics port (which has no authentication).
    own = one(docs, "NetworkPolicy", "ty-tokenyard-controlplane")["spec"]
    assert own["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "controlplane"
    assert own["policyTypes"] == ["Ingress"] and [rule["ports"] for rule in own["ingress"]] == [
        [{"port": "metrics", "protocol": "TCP"}]]
    external = render(chart, {"pools": POOLS, "controlPlane": CONTROL_PLANE,
                              "redis": {"bundled": {"enabled": False}, "external": {"url": "redis://ext:6379/0"}}})
    ext_env = _env(one(external, "Deployment", "ty-tokenyard-controlplane"))
    assert ext_env["TOKENYARD_STORE_URL"] == "redis://ext:6379/0"


@pytest.mark.parametrize(("values", "message"), [
    ({"pools": POOLS, "controlPlane": {"enabled": True}}, "controlPlane.pools.l4: expected usd_per_hour and "
                                                          "capacity_rps"),
    ({"pools": POOLS, "controlPlane": CONTROL_PLANE, "redis": {"bundled": {"enabled": False}}},
     "controlPlane.enabled needs Redis"),
    ({"pools": POOLS, "controlPlane": {**CONTROL_PLANE, "config": {"surprise": 1}}}, "surprise"),
])
def test_wrong_control_plane_values_fail_at_install(chart: Any, values: dict[str, Any],  # noqa: F811
                                                     message: str) -> None:
    with pytest.raises(helm.HelmError) as caught:
        chart.render(values, name="ty", namespace="llm", is_install=True)
    assert message in str(caught.value)


def test_the_chart_passes_planning_on_predictions_through(chart: Any) -> None:  # noqa: F811
    config_values = {**CONTROL_PLANE.get("config", {}), "route_by": "predicted", "rank_tau": 0.45}
    docs = render(chart, {"pools": POOLS, "controlPlane": {**CONTROL_PLANE, "config": config_values}})
    data = one(docs, "Secret", "ty-tokenyard-config")["stringData"]
    env = _env(one(docs, "Deployment", "ty-tokenyard-controlplane"))
    config = parse_config(yaml.safe_load(data["controlplane.yaml"]), "controlplane.yaml", env)
    assert (config.route_by, config.rank_tau, config.rank_noise_sd) == ("predicted", 0.45, None)
