"""KubernetesDiscovery with the official `kubernetes` client against the loopback API server.

The loopback server (router/k8s_loopback.py) is a real HTTP server speaking the API's wire
format: List objects, chunked watch streams, BOOKMARK, and 410 Gone as an ERROR event.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client

from router.discovery import (
    AdminRegistration,
    KubernetesDiscovery,
    KubernetesSettings,
    StaticDiscovery,
    build_discovery,
)
from router.k8s_loopback import (
    LoopbackKubeAPI,
    label_selector_matches,
    make_endpoint_slice,
    make_pod,
)
from router.registry import InstanceRegistry
from router.state import InstanceRecord
from tokenyard.config import ConfigError

LABELS = {"app": "vllm", "tokenyard.io/model": "llama-8b", "tokenyard.io/gpu": "L4"}


async def eventually(cond: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not reached within {timeout_s}s: {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
def api():
    server = LoopbackKubeAPI().start()
    yield server
    server.stop()


def discovery(api: LoopbackKubeAPI, kind: str, **kw: Any) -> KubernetesDiscovery:
    settings = KubernetesSettings(namespace="serving", label_selector="app=vllm", kind=kind,
                                  backoff_min_s=0.05, backoff_max_s=0.2, **kw)
    return KubernetesDiscovery(settings, configuration=client.Configuration(host=api.host))


def pod(name: str, ip: str, **kw: Any) -> dict[str, Any]:
    labels = kw.pop("labels", LABELS)
    return make_pod(name, ip, labels, namespace="serving", **kw)


def ids(reg: InstanceRegistry) -> set[str]:
    return {s.instance_id for s in reg.instances()}


async def test_pods_lifecycle(api: LoopbackKubeAPI) -> None:
    api.apply("pods", pod("p1", "10.1.0.1", labels={**LABELS, "tokenyard.io/pool": "l4-spot", "tokenyard.io/tp": "2"}))
    api.apply("pods", pod("p2", "10.1.0.2", ready=False))
    api.apply("pods", pod("p3", "10.1.0.3", labels={"app": "other", "tokenyard.io/model": "x"}))
    api.apply("pods", make_pod("p4", "10.1.0.4", LABELS, namespace="elsewhere"))
    reg = InstanceRegistry()
    reg.upsert(InstanceRecord("static-1", "http://127.0.0.1:1", "llama-8b"))  # not Kubernetes'
    disc = discovery(api, "pods", grpc_port=7000)
    await disc.start(reg)
    try:
        assert ids(reg) == {"static-1", "serving/p1"}
        record, state = reg.get("serving/p1")
        assert (record.url, record.model, record.gpu, record.pool, record.tp) == (
            "http://10.1.0.1:8000", "llama-8b", "L4", "l4-spot", 2)
        assert record.grpc_address == "10.1.0.1:7000" and record.source == "kubernetes"
        assert not state.draining

        api.apply("pods", pod("p2", "10.1.0.2", ready=True))  # becomes ready
        await eventually(lambda: "serving/p2" in reg, "p2 appears when ready")
        api.apply("pods", pod("p1", "10.1.0.1", ready=False))  # not ready -> removed
        await eventually(lambda: "serving/p1" not in reg, "p1 removed when not ready")
        api.apply("pods", pod("p2", "10.1.0.2", terminating=True))  # terminating -> draining
        await eventually(lambda: "serving/p2" in reg and reg.get("serving/p2")[1].draining,
                         "p2 draining while terminating")
        api.delete("pods", "p2", namespace="serving")
        await eventually(lambda: "serving/p2" not in reg, "p2 removed when deleted")
        api.apply("pods", pod("p5", "10.1.0.5"))
        await eventually(lambda: "serving/p5" in reg, "p5 appears")
        api.apply("pods", pod("p5", "10.1.0.5", labels={**LABELS, "app": "retired"}))  # leaves the selector
        await eventually(lambda: "serving/p5" not in reg, "p5 removed when it stops matching")
        assert ids(reg) == {"static-1"}
        assert disc.stats["lists"] == 1 and disc.stats["gone"] == 0
    finally:
        await disc.stop()


async def test_endpoint_slices_conditions(api: LoopbackKubeAPI) -> None:
    labels = {"tokenyard.io/model": "qwen-32b", "tokenyard.io/gpu": "H100", "app": "vllm"}
    endpoints = [
        {"ip": "10.2.0.1", "pod": "e1", "ready": True},
        {"ip": "10.2.0.2", "pod": "e2", "ready": False, "serving": True, "terminating": True},
        {"ip": "10.2.0.3", "pod": "e3", "ready": False, "serving": False},
        {"ip": "10.2.0.4", "ready": True},  # no targetRef: named by address
    ]
    api.apply("endpointslices", make_endpoint_slice("qwen-abcde", "qwen", endpoints, labels,
                                                    namespace="serving", port=8080, grpc_port=9090))
    reg = InstanceRegistry()
    disc = discovery(api, "endpointslices")
    await disc.start(reg)
    try:
        assert ids(reg) == {"serving/e1", "serving/e2", "serving/10.2.0.4:8080"}
        record, state = reg.get("serving/e1")
        assert (record.url, record.grpc_address, record.model, record.pool) == (
            "http://10.2.0.1:8080", "10.2.0.1:9090", "qwen-32b", "H100")
        assert reg.get("serving/e2")[1].draining and not state.draining

        # e1 starts terminating (still serving), e2 finishes, e3 becomes ready.
        endpoints = [
            {"ip": "10.2.0.1", "pod": "e1", "ready": False, "serving": True, "terminating": True},
            {"ip": "10.2.0.3", "pod": "e3", "ready": True},
        ]
        api.apply("endpointslices", make_endpoint_slice("qwen-abcde", "qwen", endpoints, labels,
                                                        namespace="serving", port=8080))
        await eventually(lambda: ids(reg) == {"serving/e1", "serving/e3"}, "slice update applied")
        assert reg.get("serving/e1")[1].draining and not reg.get("serving/e3")[1].draining

        # A second slice of the same service, then the first slice goes away.
        api.apply("endpointslices", make_endpoint_slice("qwen-fghij", "qwen", [{"ip": "10.2.0.9", "pod": "e9"}],
                                                        labels, namespace="serving", port=8080))
        await eventually(lambda: "serving/e9" in reg, "second slice applied")
        api.delete("endpointslices", "qwen-abcde", namespace="serving")
        await eventually(lambda: ids(reg) == {"serving/e9"}, "deleted slice's endpoints removed")
    finally:
        await disc.stop()


async def test_bookmark_advances_resource_version(api: LoopbackKubeAPI) -> None:
    api.apply("pods", pod("p1", "10.3.0.1"))
    reg = InstanceRegistry()
    disc = discovery(api, "pods")
    await disc.start(reg)
    try:
        await eventually(lambda: api.open_watches() == 1, "watch open")
        listed_rv = disc.resource_version
        # Changes nobody here watches advance the server's resourceVersion ...
        for i in range(3):
            api.apply("pods", make_pod(f"other-{i}", "10.9.0.1", {"app": "other"}, namespace="serving"))
        rv = api.bookmark()
        # ... and the bookmark carries it to the watcher without any object event.
        await eventually(lambda: disc.resource_version == str(rv), "bookmark's resourceVersion taken")
        assert int(disc.resource_version or 0) > int(listed_rv or 0)
        assert disc.stats["bookmarks"] == 1 and disc.stats["events"] == 0
        # Resuming after the bookmark asks for that resourceVersion, not the listed one.
        api.close_watches()
        await eventually(lambda: any(f"resourceVersion={rv}" in r and "watch=true" in r for r in api.requests),
                         "rewatch from the bookmark's resourceVersion")
        assert any("allowWatchBookmarks=true" in r for r in api.requests)
    finally:
        await disc.stop()


async def test_410_gone_relists_and_reconciles(api: LoopbackKubeAPI) -> None:
    for i in (1, 2, 3):
        api.apply("pods", pod(f"p{i}", f"10.4.0.{i}"))
    reg = InstanceRegistry()
    disc = discovery(api, "pods")
    await disc.start(reg)
    try:
        assert ids(reg) == {"serving/p1", "serving/p2", "serving/p3"}
        await eventually(lambda: api.open_watches() == 1, "watch open")
        # The watch breaks; while the client cannot get back in, p2 is deleted, p4 added,
        # and the history is compacted past the client's resourceVersion.
        api.hold_watches()
        held_before = api.watches_held
        api.close_watches(abrupt=True)
        await eventually(lambda: api.watches_held > held_before, "client tries to rewatch")
        api.delete("pods", "p2", namespace="serving")
        api.apply("pods", pod("p4", "10.4.0.4"))
        api.compact()
        api.hold_watches(False)
        await eventually(lambda: ids(reg) == {"serving/p1", "serving/p3", "serving/p4"},
                         "re-list after 410 removed p2 and added p4")
        assert disc.stats["gone"] >= 1 and disc.stats["lists"] >= 2 and disc.stats["errors"] >= 1
        # And the new watch works.
        api.apply("pods", pod("p5", "10.4.0.5"))
        await eventually(lambda: "serving/p5" in reg, "events flow after the re-list")
    finally:
        await disc.stop()


@pytest.mark.parametrize("abrupt", [False, True])
async def test_server_closing_the_watch_reconnects(api: LoopbackKubeAPI, abrupt: bool) -> None:
    api.apply("endpointslices", make_endpoint_slice("s1", "svc", [{"ip": "10.5.0.1", "pod": "a"}],
                                                    LABELS, namespace="serving"))
    reg = InstanceRegistry()
    disc = discovery(api, "endpointslices")
    await disc.start(reg)
    try:
        await eventually(lambda: api.open_watches() == 1, "watch open")
        watches = disc.stats["watches"]
        api.close_watches(abrupt=abrupt)
        await eventually(lambda: disc.stats["watches"] > watches and api.open_watches() == 1, "rewatched")
        api.apply("endpointslices", make_endpoint_slice("s1", "svc", [{"ip": "10.5.0.2", "pod": "b"}],
                                                        LABELS, namespace="serving"))
        await eventually(lambda: ids(reg) == {"serving/b"}, "events after reconnect")
        assert disc.stats["lists"] == 1  # resumed from its resourceVersion, no re-list needed
    finally:
        await disc.stop()


async def test_periodic_resync_and_unreachable_api_keeps_retrying(api: LoopbackKubeAPI) -> None:
    api.apply("pods", pod("p1", "10.6.0.1"))
    reg = InstanceRegistry()
    disc = discovery(api, "pods", resync_s=1.0)
    await disc.start(reg)
    try:
        await eventually(lambda: disc.stats["lists"] >= 2, "periodic re-list", timeout_s=15)
        assert ids(reg) == {"serving/p1"}
    finally:
        await disc.stop()

    # Nothing listens on this port: start() returns after its bounded wait, retrying.
    dead = KubernetesDiscovery(KubernetesSettings(namespace="serving", kind="pods", backoff_min_s=0.05),
                               configuration=client.Configuration(host="http://127.0.0.1:9"))
    await dead.start(InstanceRegistry(), initial_sync_timeout_s=0.5)
    await eventually(lambda: dead.stats["errors"] >= 2, "retries with backoff")
    await dead.stop()


def test_label_selector_semantics() -> None:
    labels = {"app": "vllm", "tier": "llm"}
    assert label_selector_matches("app=vllm,tier in (llm, slm)", labels)
    assert label_selector_matches("app==vllm,!gpu,tier", labels)
    assert not label_selector_matches("app!=vllm", labels)
    assert not label_selector_matches("tier notin (llm)", labels)


async def test_static_and_admin_sources(api: LoopbackKubeAPI) -> None:
    sources = build_discovery({
        "static": [{"url": "http://127.0.0.1:8001", "model": "m-1b", "gpu": "L4"},
                   {"url": "http://127.0.0.1:8002", "model": "m-8b", "gpu": "A100", "pool": "big",
                    "id": "big-0", "tp": 2, "grpc": "127.0.0.1:9002"}],
        "kubernetes": {"namespace": "serving", "label_selector": "app=vllm", "kind": "pods",
                       "api_url": api.host},
        "admin": {"lease_ttl_s": 5},
    }, "router.discovery")
    assert [type(s) for s in sources] == [StaticDiscovery, KubernetesDiscovery, AdminRegistration]
    api.apply("pods", pod("p1", "10.7.0.1"))
    reg = InstanceRegistry()
    for source in sources:
        await source.start(reg)
    try:
        assert ids(reg) == {"127.0.0.1:8001", "big-0", "serving/p1"}
        big = reg.get("big-0")[0]
        assert (big.pool, big.tp, big.grpc_address, big.source) == ("big", 2, "127.0.0.1:9002", "static")
        assert reg.get("127.0.0.1:8001")[0].pool == "L4"
    finally:
        for source in sources:
            await source.stop()


@pytest.mark.parametrize("section, where", [
    ({"static": [{"url": "127.0.0.1:8001", "model": "m"}]}, "d.static[0].url"),
    ({"static": [{"url": "http://127.0.0.1:8001"}]}, "d.static[0].model"),
    ({"static": [{"url": "http://a:1", "model": "m"}, {"url": "http://a:1", "model": "m"}]}, "d.static[1].id"),
    ({"kubernetes": {"kind": "services"}}, "d.kubernetes.kind"),
    ({"kubernetes": {"port": "http"}}, "d.kubernetes.port"),
    ({"admin": {"lease_ttl_s": 0}}, "d.admin.lease_ttl_s"),
    ({"consul": {}}, "d"),
])
def test_bad_discovery_config_names_the_key(section: dict[str, Any], where: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_discovery(section, "d")
    assert err.value.where == where


async def test_restart_over_a_store_removes_what_went_away_and_keeps_drains(api: LoopbackKubeAPI, tmp_path: Any) -> None:
    from router.state import open_store

    url = f"file://{tmp_path}/state.json"
    store = open_store(url)
    # What an earlier router run left in the store.
    for record in (
        InstanceRecord("serving/p1", "http://10.8.0.1:8000", "llama-8b", gpu="L4", pool="L4",
                       labels=LABELS, source="kubernetes", draining=True),  # an operator's drain
        InstanceRecord("serving/gone", "http://10.8.0.9:8000", "llama-8b", source="kubernetes"),
        InstanceRecord("elsewhere/x", "http://10.8.1.1:8000", "llama-8b", source="kubernetes"),
        InstanceRecord("old-static", "http://127.0.0.1:8001", "llama-8b", source="static"),
        InstanceRecord("kept-static", "http://127.0.0.1:8002", "llama-8b", source="static", draining=True),
    ):
        await store.put_instance(record)
    await store.close()

    api.apply("pods", pod("p1", "10.8.0.1"))
    reg = InstanceRegistry(open_store(url))
    await reg.start()
    static = StaticDiscovery([InstanceRecord("kept-static", "http://127.0.0.1:8002", "llama-8b")])
    disc = discovery(api, "pods")
    try:
        await static.start(reg)
        await disc.start(reg)
        # The pod deleted while no router watched is gone; other namespaces are not ours.
        assert ids(reg) == {"serving/p1", "elsewhere/x", "kept-static"}
        assert reg.get("kept-static")[1].draining  # the stored drain survives the config
        assert reg.get("serving/p1")[1].draining
        api.apply("pods", pod("p1", "10.8.0.1", labels={**LABELS, "rev": "2"}))  # a status/label update
        await eventually(lambda: reg.get("serving/p1")[0].labels.get("rev") == "2", "update applied")
        assert reg.get("serving/p1")[1].draining  # ... keeps the operator's drain
        await reg.flush()
    finally:
        await disc.stop()
        await reg.close()
    assert reg.store is not None
    stored = {r.instance_id for r in await reg.store.list_instances()}
    assert stored == {"serving/p1", "elsewhere/x", "kept-static"}
    await reg.store.close()


async def test_end_to_end_router_follows_kubernetes_events(api: LoopbackKubeAPI) -> None:
    """The router configured with Kubernetes discovery, real emulated engines, the openai
    client: pods appear, one terminates (drained: no new requests), one is replaced."""
    import openai

    from tests.test_router_support import emulated_engine, running_router

    def engine_pod(name: str, engine: Any, **kw: Any) -> dict[str, Any]:
        port = int(engine.base_url.rsplit(":", 1)[1])
        return pod(name, "127.0.0.1", port=port, labels={**LABELS, "tokenyard.io/model": "llama-3-8b",
                                                          "tokenyard.io/gpu": "A100-80GB"}, **kw)

    chat = {"model": "llama-3-8b", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}
    doc = {"discovery": {"kubernetes": {"api_url": api.host, "namespace": "serving",
                                        "label_selector": "app=vllm", "kind": "pods"}},
           # The emulated engines run FCFS, as vLLM does unless started with priority scheduling.
           "dispatch": {"forward_priority": False}}
    async with emulated_engine("llama-3-8b", "A100-80GB") as e1, emulated_engine("llama-3-8b", "A100-80GB") as e2:
        api.apply("pods", engine_pod("p1", e1))
        api.apply("pods", engine_pod("p2", e2))
        async with running_router([], doc, register=False) as server:
            reg = server.router.registry
            assert ids(reg) == {"serving/p1", "serving/p2"}
            client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
            reply = await client.chat.completions.create(**chat)
            assert reply.usage is not None and reply.usage.completion_tokens == 3

            # p1 terminates (draining) and p2 is deleted: nothing may take new requests.
            api.apply("pods", engine_pod("p1", e1, terminating=True))
            api.delete("pods", "p2", namespace="serving")
            await eventually(lambda: ids(reg) == {"serving/p1"} and reg.get("serving/p1")[1].draining,
                             "p1 draining, p2 gone")
            with pytest.raises(openai.APIStatusError) as err:
                await client.chat.completions.create(**chat)
            assert err.value.status_code == 503

            # A replacement pod comes up on the second engine: traffic flows again.
            api.apply("pods", engine_pod("p3", e2))
            await eventually(lambda: "serving/p3" in reg, "p3 discovered")
            stream = await client.chat.completions.create(**chat, stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            assert text
            assert reg.get("serving/p1")[1].router_inflight == 0


async def test_discovery_metrics_are_exported(api: LoopbackKubeAPI) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from router.discovery import DiscoveryCollector

    api.apply("pods", pod("p1", "10.9.0.1"))
    api.apply("pods", pod("p2", "10.9.0.2", terminating=True))
    reg = InstanceRegistry()
    reg.upsert(InstanceRecord("s1", "http://127.0.0.1:1", "llama-8b", pool="l4"))
    reg.mark_health("s1", False)
    disc = discovery(api, "pods")
    await disc.start(reg)
    try:
        metrics = CollectorRegistry()
        metrics.register(DiscoveryCollector(reg, [disc]))
        text = generate_latest(metrics).decode()
        assert 'tokenyard_discovery_instances{pool="L4",source="kubernetes",state="ready"} 1.0' in text
        assert 'tokenyard_discovery_instances{pool="L4",source="kubernetes",state="draining"} 1.0' in text
        assert 'tokenyard_discovery_instances{pool="l4",source="static",state="unhealthy"} 1.0' in text
        assert 'tokenyard_discovery_kubernetes_lists_total{kind="pods",namespace="serving"} 1.0' in text
    finally:
        await disc.stop()


async def test_an_object_the_client_models_reject_does_not_stall_the_watch(api: LoopbackKubeAPI) -> None:
    """A pod condition without `status` fails the client's pydantic model; discovery reads
    raw events, so the watch keeps going instead of retrying the same event forever."""
    reg = InstanceRegistry()
    disc = discovery(api, "pods")
    await disc.start(reg)
    try:
        odd = pod("p1", "10.10.0.1")
        odd["status"]["conditions"].append({"type": "example.com/Custom"})
        api.apply("pods", odd)
        api.apply("pods", pod("p2", "10.10.0.2"))
        await eventually(lambda: ids(reg) == {"serving/p1", "serving/p2"}, "both pods seen")
        assert disc.stats["errors"] == 0
    finally:
        await disc.stop()


def test_standalone_loopback_serves_objects_from_a_file(tmp_path: Any) -> None:
    import subprocess
    import sys

    import yaml

    from tests.conftest import free_port

    objects = tmp_path / "objects.yaml"
    objects.write_text(yaml.safe_dump([
        {"resource": "pods", "object": make_pod("p1", "10.11.0.1", LABELS, namespace="serving")},
        {"resource": "endpointslices", "object": make_endpoint_slice(
            "s1", "svc", [{"ip": "10.11.0.2", "pod": "a"}], LABELS, namespace="serving")},
    ]))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "router.k8s_loopback", "--port", str(port),
                             "--objects", str(objects)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert f"127.0.0.1:{port}" in proc.stdout.readline()
        api_client = client.ApiClient(client.Configuration(host=f"http://127.0.0.1:{port}"))
        pods = client.CoreV1Api(api_client).list_namespaced_pod("serving", label_selector="app=vllm")
        slices = client.DiscoveryV1Api(api_client).list_namespaced_endpoint_slice("serving")
        assert [p.metadata.name for p in pods.items] == ["p1"]
        assert [s.endpoints[0].addresses for s in slices.items] == [["10.11.0.2"]]
    finally:
        proc.terminate()
        proc.wait(5)

    bad = tmp_path / "bad.yaml"
    bad.write_text("- {resource: services, object: {metadata: {name: x}}}\n")
    out = subprocess.run([sys.executable, "-m", "router.k8s_loopback", "--objects", str(bad)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and f"{bad}: [0]" in out.stderr
