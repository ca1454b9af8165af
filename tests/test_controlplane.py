"""`tokenyard controlplane` end to end: the loopback Kubernetes API server with the real
`kubernetes` client (Lease, Deployment scale subresource), the embedded state store the
routers share, and vLLM-shaped engines in their own processes whose /metrics report what
is really in flight.

- Two control planes run at once; only the Lease holder acts. When it stops, the other
  takes over and finishes the job; their actions never interleave.
- A synthetic workload histogram in the store scales the pool up; once the traffic stops
  (idle), the pool is drained and then scaled to its minimum (0) one instance at a time:
  an instance with streams in flight is removed only after they finished, and every
  stream ends complete.
- Flapping input (busy, quiet, busy, ... every round) does not flap the fleet.
- Bad configs give one-line errors naming the key; `--once` with the print actuator.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes import client

from router.controlplane import (
    DELETION_COST,
    DRAINED_COST,
    ControlPlane,
    KubernetesActuator,
    PrintActuator,
    parse_config,
)
from router.controlplane_cli import ControlPlaneMetrics, build, run_plane
from router.k8s_loopback import LoopbackKubeAPI, make_deployment, make_pod
from router.leader import LeaderElectionSettings
from router.state import FileStateStore, InstanceRecord, StateStore
from router.workload_recorder import STORE_KEY_PREFIX
from scheduler.planner.histogram import LengthHistogram
from tests.test_router_support import FakeEngine, fake_engines
from tokenyard.config import ConfigError

MODEL = "llama-3-8b"
EDGES = ([0, 1_000_000], [0, 1_000_000])  # one bucket: the test is about the loop, not the grid


def doc(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "store": "file:///unused", "input_edges": EDGES[0], "output_edges": EDGES[1], "actuator": "kubernetes",
        "pools": [{"name": "a10g", "gpu": "A10G", "usd_per_hour": 1.01, "capacity_rps": [[2.0]],
                   "min_replicas": 0, "max_replicas": 8, "deployment": "ty-a10g"}],
        "resolve_interval_s": 0.5, "drain_grace_s": 0.3, "headroom": 0.1,
        "autoscaler": {"interval_s": 0.2, "window_s": 2.0, "headroom": 0.2, "scale_down_headroom": 0.4,
                       "dwell_s": 1.0, "idle_s": 1.0, "max_step": 4},
        "metrics": {"port": None},
    }
    base.update(over)
    return base


async def put_histogram(store: StateStore, now_s: float, rate_rps: float, slots: range, key: str = "synthetic",
                        slot_s: float = 1.0) -> None:
    """A replica's document as router/workload_recorder.py writes it."""
    hist = LengthHistogram(tuple(EDGES[0]), tuple(EDGES[1]), slot_s, 60)
    current = int(now_s // slot_s)
    for back in slots:
        hist.counts[(current - back, "default", 0, 0)] = round(rate_rps * slot_s)
    await store.put_load(STORE_KEY_PREFIX + key, {"replica": key, "models": {MODEL: hist.as_dict()}}, ttl_s=600)


@pytest.fixture
def kube() -> Iterator[LoopbackKubeAPI]:
    server = LoopbackKubeAPI().start()
    yield server
    server.stop()


def replicas(kube: LoopbackKubeAPI) -> int:
    found = kube.get("deployments", "ty-a10g", "llm")
    assert found is not None
    return int(found["spec"]["replicas"])


async def stream(engine: FakeEngine, tokens: int) -> tuple[int, int, float]:
    """(status, content chunks, finish time) of one streamed completion sent to the engine."""
    async with httpx.AsyncClient(timeout=30) as http, http.stream(
            "POST", engine.url + "/v1/completions",
            json={"model": MODEL, "prompt": "hi", "max_tokens": tokens, "stream": True}) as response:
        body = b"".join([part async for part in response.aiter_bytes()])
    return response.status_code, body.count(b'"text"'), time.time()


def test_leader_only_acts_scale_up_then_drain_before_scale_down_and_handover(kube: LoopbackKubeAPI,
                                                                            tmp_path: Path) -> None:
    kube.apply("deployments", make_deployment("ty-a10g", 2, {"app": "a10g"}, namespace="llm"))
    for pod in ("e0", "e1"):
        kube.apply("pods", make_pod(pod, "127.0.0.1", {"app": "a10g"}, namespace="llm"))
    config = parse_config(doc(kubernetes={"namespace": "llm"}), "cp.yaml")

    async def main() -> None:
        store = FileStateStore(tmp_path / "state.db")
        with fake_engines(("--token-delay-s", "0.05"), ("--token-delay-s", "0.05")) as (e0, e1):
            for iid, engine in (("llm/e0", e0), ("llm/e1", e1)):  # as Kubernetes discovery names pods
                await store.put_instance(InstanceRecord(iid, engine.url, MODEL, gpu="A10G", pool="a10g",
                                                        source="kubernetes"))
            traffic_stops = asyncio.Event()

            async def feed() -> None:  # a router recording 6 req/s (3 instance-equivalents) until stopped
                while not traffic_stops.is_set():
                    await put_histogram(store, time.time(), 6.0, range(0, 3))
                    await asyncio.sleep(0.2)

            feeder = asyncio.create_task(feed())
            stops = {n: asyncio.Event() for n in ("cp-a", "cp-b")}
            metrics = {n: ControlPlaneMetrics() for n in stops}
            planes: dict[str, ControlPlane] = {}

            async def run(name: str) -> None:
                settings = LeaderElectionSettings("llm", "ty-controlplane", name, lease_duration_s=1.5,
                                                  renew_deadline_s=1.0, retry_period_s=0.2)
                api = client.ApiClient(client.Configuration(host=kube.host))
                own_store = FileStateStore(tmp_path / "state.db")
                planes[name], elector = await build(config, own_store, api_client=api, election=settings, env={},
                                                    metrics=metrics[name])
                await run_plane(planes[name], elector, stops[name])
                await own_store.close()

            tasks = [asyncio.create_task(run(n)) for n in stops]
            deadline = time.monotonic() + 15
            while replicas(kube) != 4 and time.monotonic() < deadline:  # ceil(3 / 0.8) = 4
                await asyncio.sleep(0.05)
            assert replicas(kube) == 4, {n: p.actions for n, p in planes.items()}
            traffic_stops.set()
            await feeder
            holder = kube.get("leases", "ty-controlplane", "llm")["spec"]["holderIdentity"]  # type: ignore[index]
            follower = "cp-b" if holder == "cp-a" else "cp-a"
            assert metrics[holder].leader._value.get() == 1 and metrics[follower].leader._value.get() == 0
            # Streams in flight on e0 (100 tokens x 50 ms = 5 s) while the traffic stops.
            busy = [asyncio.create_task(stream(e0, 100)) for _ in range(2)]
            await asyncio.sleep(0.3)
            stops[holder].set()  # the leader leaves: it releases the Lease, the other takes over
            await asyncio.wait_for(tasks[list(stops).index(holder)], 10)
            seen_replicas = []
            deadline = time.monotonic() + 15
            while replicas(kube) != 0 and time.monotonic() < deadline:
                seen_replicas.append(replicas(kube))
                # Kubernetes discovery's part: a removed pod's instance leaves the store.
                for _t, _pool, action, detail in list(planes[follower].actions):
                    if action == "scale_down":
                        for iid in detail["removed"]:  # type: ignore[index]
                            await store.remove_instance(iid)
                await asyncio.sleep(0.05)
            final = replicas(kube)
            results = await asyncio.gather(*busy)
            stops[follower].set()
            await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert final == 0, seen_replicas
        assert all(status == 200 and chunks == 100 for status, chunks, _ in results), results  # none aborted
        first, second = planes[holder], planes[follower]
        assert first.actions and second.actions
        assert max(t for t, *_ in first.actions) < min(t for t, *_ in second.actions)  # never both acting
        assert [a for _, _, a, _ in first.actions].count("scale_up") == 1
        downs = [(t, d) for t, _, a, d in second.actions if a == "scale_down"]
        removed_at = {iid: t for t, d in downs for iid in d["removed"]}  # type: ignore[index]
        assert set(removed_at) == {"llm/e0", "llm/e1"}
        assert removed_at["llm/e0"] >= max(done for _, _, done in results) - 0.05  # e0 went only once empty
        assert removed_at["llm/e1"] < removed_at["llm/e0"]  # the empty one went first
        drained_at = {d: t for t, _, a, d in second.actions if a == "drain"}
        assert all(drained_at[iid] < removed_at[iid] for iid in removed_at)  # drained before removed
        assert drained_at["llm/e0"] < min(done for _, _, done in results)  # drained while its streams ran
        for pod in ("e0", "e1"):  # marked so that the ReplicaSet deletes exactly these pods
            annotations = kube.get("pods", pod, "llm")["metadata"]["annotations"]  # type: ignore[index]
            assert annotations == {DELETION_COST: DRAINED_COST}
        await store.close()

    asyncio.run(main())


def test_flapping_input_does_not_flap_the_fleet(tmp_path: Path) -> None:
    """The rate alternates between 6.4 and 2.4 req/s every 10 s slot for 40 rounds: the
    fleet ramps up once and then holds (the window smooths, the hysteresis band and the
    dwell absorb the rest); no scale direction ever reverses."""
    config = parse_config(doc(actuator="print", autoscaler={"interval_s": 10.0, "window_s": 60.0, "dwell_s": 60.0,
                                                           "idle_s": 120.0}), "cp.yaml")
    now = [1_800_000_000.0]

    async def main() -> None:
        store = FileStateStore(tmp_path / "s.db")
        await store.put_instance(InstanceRecord("e0", "http://127.0.0.1:9", MODEL, gpu="A10G", pool="a10g"))
        plane = ControlPlane(config, store, PrintActuator({"a10g": 1}, emit=lambda _: None), clock=lambda: now[0])
        hist = LengthHistogram(tuple(EDGES[0]), tuple(EDGES[1]), 10.0, 60)
        history = []
        for k in range(40):
            hist.counts[(int(now[0] // 10.0) - 1, "default", 0, 0)] = 64 if k % 2 == 0 else 24
            await store.put_load(STORE_KEY_PREFIX + "r", {"models": {MODEL: hist.as_dict()}}, ttl_s=600)
            history.append((await plane.tick())["a10g"])
            now[0] += 10.0
        steps = [b - a for a, b in zip(history, history[1:], strict=False) if b != a]
        assert all(step > 0 for step in steps), history  # only up while the window fills
        assert len(set(history[10:])) == 1 and history[-1] == 3, history  # 4.4 req/s = 2.2 instances -> 3
        await store.close()

    asyncio.run(main())


@pytest.mark.parametrize(("over", "needle"), [
    ({"pools": [{"name": "a", "gpu": "A10G", "usd_per_hour": 1.0, "capacity_rps": [[1.0, 2.0]]}]},
     "cp.yaml: pools[0].capacity_rps[0]: expected 1 req/s values"),
    ({"autoscaler": {"headroom": 0.5, "scale_down_headroom": 0.2}}, "cp.yaml: autoscaler: expected 0 <= headroom"),
    ({"autoscaler": {"switch_margin": 1.0}}, "cp.yaml: autoscaler: switch_margin: expected a fraction in [0, 1)"),
    ({"autoscaler": {"switch_margin": -0.1}}, "cp.yaml: autoscaler: switch_margin: expected a fraction in [0, 1)"),
    ({"autoscaler": {"switch_margin": "high"}}, "cp.yaml: autoscaler.switch_margin: expected a number, got 'high'"),
    ({"autoscaler": {"switch_dwell_s": -5}}, "cp.yaml: autoscaler: switch_dwell_s: expected seconds >= 0"),
    ({"actuator": "helm"}, "cp.yaml: actuator: expected one of kubernetes, print"),
    ({"pools": [{"name": "a", "gpu": "A10G", "usd_per_hour": 1.0, "capacity_rps": [[1.0]]}]},
     "no Deployment for pool(s) a"),
    ({"input_edges": [0, 0]}, "cp.yaml: input_edges: expected increasing edges"),
    ({"surprise": 1}, "unknown key(s) surprise"),
    # was accepted, then an OverflowError traceback when the metrics server bound it
    ({"metrics": {"port": 99999}}, "cp.yaml: metrics.port: expected a TCP port 0-65535"),
])
def test_bad_config_is_one_clear_line(over: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(doc(**over), "cp.yaml", env={})
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_cli_once_prints_the_plan_outside_kubernetes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from cli.main import main

    db = tmp_path / "state.db"

    async def seed() -> None:
        store = FileStateStore(db)
        for iid in ("e0", "e1"):
            await store.put_instance(InstanceRecord(iid, "http://127.0.0.1:9", MODEL, gpu="A10G", pool="a10g"))
        await put_histogram(store, time.time(), 14.0, range(0, 4))
        await store.close()

    asyncio.run(seed())
    path = tmp_path / "cp.yaml"
    path.write_text(yaml.safe_dump(doc(store=f"file://{db}", actuator="print")))
    assert main(["controlplane", "--config", str(path), "--once"]) == 0
    out = capsys.readouterr().out
    assert "# pool a10g: 2 -> 6 replica(s); start instance(s)" in out  # 14 / 2 = 7 -> min(ceil(7/.8), 2 + 4)
    assert "targets: {'a10g': 6}" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("store: 3\n")
    assert main(["controlplane", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tokenyard controlplane: ") and "bad.yaml: pools: required key is missing" in err


def test_coarser_buckets_than_the_routers_are_summed() -> None:
    from router.controlplane import _coarsen

    assert _coarsen((0, 256, 1024, 2048, 4096, 8192), (0, 1024, 8192)) == [0, 0, 1, 1, 1]
    assert _coarsen((0, 64, 256, 1024), (0, 1_000_000)) == [0, 0, 0]
    assert _coarsen((0, 256, 1024), (0, 500, 1024)) is None  # 500 splits a router bucket: refused


def test_deletion_cost_marks_a_drained_pod_and_an_undrain_clears_it(kube: LoopbackKubeAPI) -> None:
    from router.k8s_scale import ScaleActuator

    kube.apply("deployments", make_deployment("ty-a10g", 2, {"app": "a10g"}, namespace="llm"))
    kube.apply("pods", make_pod("e0", "127.0.0.1", {"app": "a10g"}, namespace="llm"))
    api = client.ApiClient(client.Configuration(host=kube.host))
    actuator = KubernetesActuator(ScaleActuator(client.AppsV1Api(api), "llm", {"a10g": "ty-a10g"}),
                                  client.CoreV1Api(api))
    record = InstanceRecord("llm/e0", "http://127.0.0.1:9", MODEL, pool="a10g", source="kubernetes")
    gone = InstanceRecord("llm/gone", "http://127.0.0.1:9", MODEL, pool="a10g", source="kubernetes")
    assert actuator.set_replicas("a10g", 1, [gone]) is False and replicas(kube) == 2  # unmarkable: no shrink
    assert actuator.set_replicas("a10g", 1, [record]) is True and replicas(kube) == 1
    assert kube.get("pods", "e0", "llm")["metadata"]["annotations"] == {DELETION_COST: DRAINED_COST}  # type: ignore[index]
    actuator.undrained(record)
    assert not kube.get("pods", "e0", "llm")["metadata"].get("annotations")  # type: ignore[index]


def test_dry_run_records_the_drain_but_writes_nothing(tmp_path: Path) -> None:
    config = parse_config(doc(actuator="print", autoscaler={"interval_s": 1.0, "window_s": 2.0, "dwell_s": 0.0,
                                                           "idle_s": 0.0}), "cp.yaml")

    async def main() -> None:
        store = FileStateStore(tmp_path / "s.db")
        await store.put_instance(InstanceRecord("e0", "http://127.0.0.1:9", MODEL, gpu="A10G", pool="a10g"))
        printed: list[str] = []
        plane = ControlPlane(config, store, PrintActuator({"a10g": 1}, emit=printed.append), dry_run=True)
        for _ in range(3):  # idle: target 0 at once (dwell 0), drain e0
            assert (await plane.tick())["a10g"] == 0
        assert [a for _, _, a, _ in plane.actions] == ["target", "drain", "drain", "drain"]
        assert [r.draining for r in await store.list_instances()] == [False]  # nothing written
        assert printed == []  # and never removed: a dry run never sees its drain complete
        await store.close()

    asyncio.run(main())


def test_a_new_leader_finishes_the_drains_of_the_old_one(tmp_path: Path) -> None:
    config = parse_config(doc(actuator="print", drain_grace_s=100.0,
                              autoscaler={"interval_s": 1.0, "window_s": 2.0, "dwell_s": 0.0, "idle_s": 0.0}),
                          "cp.yaml")
    now = [time.time()]
    lead = {"a": True, "b": False}

    async def main() -> None:
        with fake_engines(()) as (engine,):
            store = FileStateStore(tmp_path / "s.db")
            await store.put_instance(InstanceRecord("e0", engine.url, MODEL, gpu="A10G", pool="a10g"))
            a = ControlPlane(config, store, PrintActuator({"a10g": 1}, emit=lambda _: None),
                             leading=lambda: lead["a"], clock=lambda: now[0])
            b_actuator = PrintActuator({"a10g": 1}, emit=lambda _: None)
            b = ControlPlane(config, store, b_actuator, leading=lambda: lead["b"], clock=lambda: now[0])
            await a.tick()  # idle: a drains e0; within the grace it is not removed yet
            assert [act for _, _, act, _ in a.actions] == ["target", "drain"]
            assert [r.draining for r in await store.list_instances()] == [True]
            lead.update(a=False, b=True)
            now[0] += 150.0  # past the grace: e0 is empty (the engine's /metrics says 0 running)
            await b.tick()
            assert [act for _, _, act, _ in b.actions] == ["target", "scale_down"], b.actions  # no new drain
            assert b_actuator.replicas == {"a10g": 0} and await store.list_instances() == []
            a.close()
            b.close()
            await store.close()

    asyncio.run(main())


def test_traffic_after_an_idle_start_scales_up_without_waiting_for_the_resolve(tmp_path: Path) -> None:
    config = parse_config(doc(actuator="print", resolve_interval_s=3600.0,
                              autoscaler={"interval_s": 10.0, "window_s": 20.0}), "cp.yaml")
    now = [1_800_000_000.0]

    async def main() -> None:
        store = FileStateStore(tmp_path / "s.db")
        plane = ControlPlane(config, store, PrintActuator({"a10g": 0}, emit=lambda _: None), clock=lambda: now[0])
        assert (await plane.tick())["a10g"] == 0 and plane.plan is None  # nothing observed yet
        now[0] += 10.0
        await put_histogram(store, now[0], 3.0, range(1, 3), slot_s=10.0)  # 3 req/s: 1.5 instances
        assert (await plane.tick())["a10g"] == 2 and plane.plan is not None  # at once, from zero
        await store.close()

    asyncio.run(main())


def _near_tie_doc(margin: float) -> dict[str, Any]:
    """Short requests only: 1 L4 per 0.5 req/s ($0.70/h) or 1 A100 per 6 req/s ($3.67/h)."""
    return doc(actuator="print", resolve_interval_s=60.0, headroom=0.1,
               pools=[{"name": "l4", "gpu": "L4", "usd_per_hour": 0.7, "capacity_rps": [[0.5]], "max_replicas": 12},
                      {"name": "a100", "gpu": "A100-80GB", "usd_per_hour": 3.67, "capacity_rps": [[6.0]],
                       "max_replicas": 3}],
               # the loop's headroom (and band) as the planner's: the re-solve plans at the larger
               autoscaler={"interval_s": 60.0, "window_s": 60.0, "dwell_s": 120.0, "idle_s": 120.0,
                           "headroom": 0.1, "scale_down_headroom": 0.1, "switch_margin": margin})


def test_a_re_solve_keeps_the_pools_unless_the_new_plan_is_cheaper_by_the_margin(tmp_path: Path) -> None:
    """0.4 req/s plans one L4; at 2.6 req/s the re-solve prefers one A100 ($3.67/h) to the six
    L4s ($4.20/h) the best plan on the current pool needs: 12.6% cheaper. With switch_margin
    0.2 the control plane stays on the L4 pool (its routing tables name only L4; the target
    decision sizes the pool), with 0.1 it switches and publishes the A100 routing; past the L4
    pool's maximum (12) it switches whatever the margin."""
    async def run(margin: float, rates: list[float], name: str, dwell_s: float = 0.0) -> ControlPlane:
        raw = _near_tie_doc(margin)
        raw["autoscaler"]["switch_dwell_s"] = dwell_s
        config = parse_config(raw, "cp.yaml")
        assert config.autoscaler.switch_margin == margin
        store = FileStateStore(tmp_path / f"{name}.db")
        now = [1_800_000_000.0]
        metrics = ControlPlaneMetrics()
        plane = ControlPlane(config, store, PrintActuator({"l4": 1, "a100": 0}, emit=lambda _: None),
                             clock=lambda: now[0], metrics=metrics)
        for rate in rates:
            await put_histogram(store, now[0], rate, range(1, 7), slot_s=10.0)
            await plane.tick()
            now[0] += 60.0
        await store.close()
        plane.close()
        return plane

    async def main() -> None:
        kept = await run(0.2, [0.4, 2.6, 2.6], "kept")
        assert [c.reason for _, c in kept.plan_choices] == ["first", "kept", "kept"]
        assert kept.plan is not None and kept.plan.instances() == {"l4": 6}  # the L4 pool at this load
        assert kept.plan_choices[1][1].keep_usd_per_hour == pytest.approx(4.2)
        assert kept.plan_choices[1][1].candidate_usd_per_hour == pytest.approx(3.67)
        routed = [d for _, _, a, d in kept.actions if a == "routing"]
        assert len(routed) == 3 and all(d["instances"].keys() == {"l4"} for d in routed)  # type: ignore[index]
        targets = [d for _, pool, a, d in kept.actions if a == "target" and pool == "l4"]
        assert targets and all(t["to"] > t["from"] for t in targets)  # type: ignore[index]  # the L4 pool grows
        assert not [d for _, pool, a, d in kept.actions if a == "target" and pool == "a100"]
        assert kept.metrics.plan_decisions.labels("kept")._value.get() == 2
        switched = await run(0.1, [0.4, 2.6], "switched")
        assert [c.reason for _, c in switched.plan_choices] == ["first", "cheaper"]
        assert switched.plan is not None and switched.plan.instances() == {"a100": 1}
        assert [a for _, _, a, _ in switched.actions].count("routing") == 2
        # With a dwell on the pool set, the way back to L4 a round after the swap waits.
        held = await run(0.1, [0.4, 2.6, 0.4], "held", dwell_s=3600.0)
        assert [c.reason for _, c in held.plan_choices] == ["first", "cheaper", "held"]
        assert held.plan is not None and held.plan.instances() == {"a100": 1}  # its shares still carry 0.4 req/s
        assert held.solved_s == 1_800_000_060.0  # when the A100 plan was solved, not the held round
        assert [a for _, _, a, _ in held.actions].count("routing") == 2  # nothing published for the held one
        forced = await run(0.9, [0.4, 6.0], "forced")  # 6 req/s: 12 L4 at most carry 5.4 at headroom 0.1
        assert [c.reason for _, c in forced.plan_choices] == ["first", "uncovered"]
        assert forced.plan is not None and "a100" in forced.plan.instances()

    asyncio.run(main())
