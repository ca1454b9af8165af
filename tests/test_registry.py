"""InstanceRegistry: the O(1) hot-path view, and replicas converging over a real store."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from router.registry import InstanceRegistry
from router.state import InstanceRecord, RedisStateStore, open_store

REDIS_URL = "redis://127.0.0.1:6379/0"


def rec(iid: str, model: str = "m-7b", **kw: object) -> InstanceRecord:
    return InstanceRecord(instance_id=iid, url=f"http://127.0.0.1:{9000 + int(iid[1:])}", model=model, **kw)  # type: ignore[arg-type]


async def eventually(cond: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not reached within {timeout_s}s: {what}")
        await asyncio.sleep(0.02)


def test_snapshot_is_cached_and_load_mutates_in_place() -> None:
    reg = InstanceRegistry(clock=lambda: 42.0)
    events: list[tuple[str, str]] = []
    reg.add_listener(lambda event, r: events.append((event, r.instance_id)))
    reg.upsert(rec("i1", gpu="A100", pool="a100"))
    reg.upsert(rec("i2", gpu="L4", pool="l4"))
    snap = reg.instances()
    assert [s.instance_id for s in snap] == ["i1", "i2"]
    assert reg.instances() is snap  # no rebuild without a membership change

    assert reg.update_load("i1", running=3, waiting=2, kv_blocks_used=10, kv_blocks_total=100, now_s=7.0)
    assert reg.update_load("missing", running=1) is False
    reg.inflight_started("i1")
    reg.inflight_started("i1")
    reg.inflight_finished("i1")
    reg.inflight_finished("i2")  # never below zero
    reg.mark_health("i2", False)
    reg.set_draining("i2", True)
    assert reg.instances() is snap
    s1, s2 = snap
    assert (s1.running, s1.waiting, s1.kv_usage, s1.updated_s, s1.router_inflight) == (3, 2, 0.1, 7.0, 1)
    assert (s2.healthy, s2.draining, s2.router_inflight) == (False, True, 0)
    assert reg.get("i2")[0].draining is True

    # Updating a record keeps its load and health; only membership changes rebuild.
    reg.upsert(rec("i1", gpu="A100", pool="a100-spot"))
    assert reg.instances() is snap and s1.pool == "a100-spot" and s1.running == 3
    reg.upsert(rec("i1", gpu="A100", pool="a100-spot"))  # identical: no event
    assert reg.remove("i2") is True and reg.remove("i2") is False
    assert [s.instance_id for s in reg.instances()] == ["i1"]
    with pytest.raises(KeyError, match="i2"):
        reg.get("i2")
    assert events == [("added", "i1"), ("added", "i2"), ("draining", "i2"), ("updated", "i1"),
                      ("removed", "i2")]


def test_a_failing_listener_does_not_break_membership() -> None:
    reg = InstanceRegistry()

    def broken(event: str, record: InstanceRecord) -> None:
        raise RuntimeError("listener bug")

    reg.add_listener(broken)
    reg.upsert(rec("i1"))
    assert "i1" in reg and len(reg) == 1


@pytest.fixture(params=["file", "redis"])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "file":
        yield f"file://{tmp_path}/state.json"
        return
    prefix = f"tytest:{uuid.uuid4().hex[:10]}:"
    yield f"{REDIS_URL}?prefix={prefix}"
    cleaner = RedisStateStore(REDIS_URL, prefix=prefix)
    await cleaner.delete_all()
    await cleaner.close()


@pytest.fixture
async def replicas(store_url: str):
    """Two router replicas' registries over the same store."""
    stores = [open_store(store_url), open_store(store_url)]
    regs = [InstanceRegistry(s, resync_s=1.0) for s in stores]
    for reg in regs:
        await reg.start()
    yield regs
    for reg in regs:
        await reg.close()
    for s in stores:
        await s.close()


async def test_replicas_see_each_others_membership_and_draining(replicas: list[InstanceRegistry]) -> None:
    a, b = replicas
    a.upsert(rec("i1", gpu="H100", pool="h100", tp=4, source="admin"))
    b.upsert(rec("i2", gpu="L4", pool="l4"))
    await asyncio.gather(a.flush(), b.flush())
    await eventually(lambda: "i2" in a and "i1" in b, "both replicas know both instances")
    record, state = b.get("i1")
    assert (record.gpu, record.pool, record.tp, record.source) == ("H100", "h100", 4, "admin")
    assert (state.gpu, state.pool, state.tp) == ("H100", "h100", 4)

    # Load is local to each replica and survives a remote draining flip.
    a.update_load("i2", running=5)
    b.set_draining("i2", True)
    await b.flush()
    await eventually(lambda: a.get("i2")[1].draining, "replica a sees i2 draining")
    assert a.get("i2")[1].running == 5

    a.remove("i1")
    await a.flush()
    await eventually(lambda: "i1" not in b, "replica b drops i1")
    assert [s.instance_id for s in b.instances()] == ["i2"]


async def test_a_late_replica_loads_the_fleet_from_the_store(store_url: str) -> None:
    first = InstanceRegistry(open_store(store_url))
    await first.start()
    for i in range(5):
        first.upsert(rec(f"i{i}"))
    first.set_draining("i3", True)
    first.remove("i4")
    await first.flush()
    late = InstanceRegistry(open_store(store_url))
    await late.start()
    assert sorted(s.instance_id for s in late.instances()) == ["i0", "i1", "i2", "i3"]
    assert late.get("i3")[1].draining and not late.get("i0")[1].draining
    for reg in (first, late):
        await reg.close()
        assert reg.store is not None
        await reg.store.close()


async def test_quick_local_add_then_remove_does_not_resurrect(replicas: list[InstanceRegistry]) -> None:
    a, b = replicas
    for _ in range(5):
        a.upsert(rec("i7"))
        a.remove("i7")
    b.upsert(rec("i8"))
    await asyncio.gather(a.flush(), b.flush())
    await eventually(lambda: "i8" in a, "replica a sees i8")
    # Replica b may have seen i7 in passing; both must end without it, as the store does.
    await eventually(lambda: "i7" not in a and "i7" not in b, "i7 gone from both replicas")
    assert a.store is not None
    assert "i7" not in {r.instance_id for r in await a.store.list_instances()}
    await a.reconcile()  # a stale view of the store would bring it back here
    assert "i7" not in a



@pytest.fixture
async def redis_url():
    prefix = f"tytest:{uuid.uuid4().hex[:10]}:"
    yield f"{REDIS_URL}?prefix={prefix}"
    cleaner = RedisStateStore(REDIS_URL, prefix=prefix)
    await cleaner.delete_all()
    await cleaner.close()


async def test_store_losing_its_data_is_repaired_from_replicas_own_discovery(redis_url: str) -> None:
    """Redis restarted without persistence: instances a replica found through its own
    static/Kubernetes discovery are written back; self-registered ones are gone (their
    engines must register again, as after any lease loss)."""
    stores = [open_store(redis_url), open_store(redis_url)]
    a, b = (InstanceRegistry(s, resync_s=0.3) for s in stores)
    await a.start()
    await b.start()
    try:
        a.upsert(rec("i1", source="static"))
        a.upsert(rec("i2", source="kubernetes"))
        a.upsert(rec("i3", source="admin"))
        await a.flush()
        await eventually(lambda: len(b) == 3, "replica b learns all three")
        assert isinstance(stores[0], RedisStateStore)
        await stores[0].delete_all()  # the data is lost; no change notice is sent
        await eventually(lambda: "i3" not in a and "i3" not in b, "the self-registered instance is dropped")
        await eventually(lambda: "i1" in b and "i2" in b, "replica b keeps the written-back instances")
        await a.flush()
        assert {r.instance_id for r in await stores[1].list_instances()} == {"i1", "i2"}
        assert {s.instance_id for s in a.instances()} == {"i1", "i2"}
    finally:
        await a.close()
        await b.close()
        for s in stores:
            await s.close()


async def test_replicas_recover_from_a_redis_restart() -> None:
    """Redis goes down and comes back empty (no persistence): writes made meanwhile are
    retried, pub/sub is resubscribed, and both replicas converge again."""
    import shutil
    import subprocess

    from tests.conftest import free_port

    binary = shutil.which("redis-server")
    assert binary is not None, "redis-server is required"
    port = free_port()

    def start_redis() -> subprocess.Popen[bytes]:
        return subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def wait_up(store: RedisStateStore) -> None:
        for _ in range(250):
            try:
                await store.ping()
                return
            except Exception:
                await asyncio.sleep(0.02)
        raise AssertionError(f"redis-server on port {port} did not start")

    proc = start_redis()
    url = f"redis://127.0.0.1:{port}/0?prefix=ty:"
    stores = [open_store(url), open_store(url)]
    a, b = (InstanceRegistry(s, resync_s=0.3) for s in stores)
    try:
        assert isinstance(stores[0], RedisStateStore)
        await wait_up(stores[0])
        await a.start()
        await b.start()
        a.upsert(rec("i1"))
        await a.flush()
        await eventually(lambda: "i1" in b, "replica b learns i1")

        proc.terminate()
        proc.wait(5)
        a.upsert(rec("i2"))  # the store is down: queued and retried
        b.set_draining("i1", True)
        await asyncio.sleep(0.3)
        assert "i2" in a and b.get("i1")[1].draining  # local views keep working meanwhile

        proc = start_redis()
        await wait_up(stores[0])
        await asyncio.wait_for(asyncio.gather(a.flush(), b.flush()), 20)
        await eventually(lambda: "i2" in b and "i1" in a and a.get("i1")[1].draining,
                         "both replicas converge after the restart", timeout_s=20)
        stored = {r.instance_id: r.draining for r in await stores[1].list_instances()}
        assert stored == {"i1": True, "i2": False}
    finally:
        await a.close()
        await b.close()
        for s in stores:
            await s.close()
        proc.terminate()
        proc.wait(5)
