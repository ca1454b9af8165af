"""In-flight counts shared by `tokenyard router --workers N` (router/shared_inflight.py):
every worker's dispatch sees every worker's requests, the counts go back to zero, and a
worker that dies takes its counts with it. The table is a real mapped file; the last test
runs the real command with two worker processes in front of a real (fake) engine."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest

from router.registry import InstanceRegistry
from router.shared_inflight import SharedInflight, SharedInflightError, create_table
from router.state import InstanceRecord
from tests.conftest import free_port
from tests.test_router_support import REPO_ROOT, fake_engines


@pytest.fixture()
def table(tmp_path: Path) -> Path:
    return create_table(3, capacity=64, directory=str(tmp_path))


def _registry(shared: SharedInflight, *ids: str) -> InstanceRegistry:
    registry = InstanceRegistry()
    for iid in ids:
        registry.upsert(InstanceRecord(iid, f"http://{iid}:8000", "m"))
    registry.share_inflight(shared)
    return registry


def _synced(registry: InstanceRegistry) -> dict[str, int]:
    time.sleep(0.003)  # past the sync interval (1 ms)
    return {state.instance_id: state.router_inflight for state in registry.instances()}


def test_each_worker_sees_the_sum_of_every_workers_requests(table: Path) -> None:
    workers = [SharedInflight(table, w) for w in range(3)]
    registries = [_registry(shared, "a", "b") for shared in workers]
    assert workers[0].slot("a") == workers[2].slot("a") != workers[1].slot("b")
    for _ in range(3):
        registries[0].inflight_started("a")
    for _ in range(2):
        registries[1].inflight_started("a")
    registries[2].inflight_started("b")
    # Own starts count at once, the others' after a sync.
    assert registries[0].get("a")[1].router_inflight == 3
    for registry in registries:
        assert _synced(registry) == {"a": 5, "b": 1}
    registries[1].inflight_finished("a")
    registries[0].inflight_finished("a")
    registries[2].inflight_finished("b")
    for registry in registries:
        assert _synced(registry) == {"a": 3, "b": 0}
    for registry, count in ((registries[0], 2), (registries[1], 1)):
        for _ in range(count):
            registry.inflight_finished("a")
    registries[1].inflight_finished("a")  # one end too many: never below zero
    for registry in registries:
        assert _synced(registry) == {"a": 0, "b": 0}
    for shared in workers:
        shared.close()


def test_a_large_fleet_is_summed_the_same_way(table: Path, tmp_path: Path) -> None:
    from router.shared_inflight import VECTOR_SLOTS

    big = create_table(2, capacity=4 * VECTOR_SLOTS, directory=str(tmp_path))
    ids = [f"i{k}" for k in range(2 * VECTOR_SLOTS)]  # above the plain-Python limit: numpy sums
    mine, theirs = SharedInflight(big, 0), SharedInflight(big, 1)
    registry = _registry(mine, *ids)
    other = _registry(theirs, *ids)
    for k, iid in enumerate(ids):
        for _ in range(k % 3):
            other.inflight_started(iid)
        if k % 5 == 0:
            registry.inflight_started(iid)
    expected = {iid: k % 3 + (k % 5 == 0) for k, iid in enumerate(ids)}
    assert _synced(registry) == expected and _synced(other) == expected
    for k, iid in enumerate(ids):
        if k % 2 == 0:  # the other worker's requests to every second instance end
            for _ in range(k % 3):
                other.inflight_finished(iid)
            expected[iid] = int(k % 5 == 0)
    assert _synced(registry) == expected and _synced(other) == expected
    mine.close()
    theirs.close()


def test_a_worker_in_another_process_counts_and_a_dead_worker_is_cleared(table: Path) -> None:
    here = SharedInflight(table, 0)
    registry = _registry(here, "engine-1")
    registry.inflight_started("engine-1")
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from router.shared_inflight import SharedInflight
        shared = SharedInflight({str(table)!r}, 2)
        for _ in range(4):
            shared.add("engine-1", 1)
        print("held", flush=True)
        sys.stdin.readline()
        shared.add("engine-1", -1)
        print("one done", flush=True)
        time.sleep(60)
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "held"
        assert _synced(registry) == {"engine-1": 5}
        assert here.total("engine-1") == 5 and here.others("engine-1") == 4
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "one done"
        assert _synced(registry) == {"engine-1": 4}
        child.kill()
        child.wait(10)
        here.clear_worker(2)  # what the parent of the workers does when one exits
        assert _synced(registry) == {"engine-1": 1}
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        here.close()


def test_an_instance_added_later_starts_from_the_table_and_a_full_table_counts_locally(tmp_path: Path) -> None:
    table = create_table(2, capacity=2, directory=str(tmp_path))
    first, second = SharedInflight(table, 0), SharedInflight(table, 1)
    for _ in range(2):
        first.add("late", 1)
    registry = _registry(second, "x")
    registry.upsert(InstanceRecord("late", "http://late:8000", "m"))
    assert registry.get("late")[1].router_inflight == 2  # read at once, not at the next change
    registry.upsert(InstanceRecord("third", "http://third:8000", "m"))  # no slot left: local only
    registry.inflight_started("third")
    assert second.slot("third") is None
    assert _synced(registry)["third"] == 1
    first.close()
    second.close()


def test_a_file_that_is_no_table_is_refused_with_its_name(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus"
    bogus.write_bytes(b"\x01" * 4096)
    with pytest.raises(SharedInflightError, match=re.escape(str(bogus))):
        SharedInflight(bogus, 0)
    table = create_table(2, capacity=8, directory=str(tmp_path))
    with pytest.raises(SharedInflightError, match="worker 5"):
        SharedInflight(table, 5)
    with pytest.raises(SharedInflightError, match="workers: expected"):
        create_table(0, directory=str(tmp_path))


def _instance_inflight(port: int) -> tuple[int, int]:
    """(this worker's own in-flight gauge, the instance's count dispatch reads), from one
    scrape over a new connection (SO_REUSEPORT spreads those over the workers)."""
    with httpx.Client() as http:
        text = http.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    own = re.search(r"^tokenyard_router_inflight (\S+)$", text, re.M)
    total = re.search(r'^tokenyard_router_instance_inflight\{instance="e0"\} (\S+)$', text, re.M)
    assert own is not None and total is not None, text[-2000:]
    return int(float(own.group(1))), int(float(total.group(1)))


def test_two_router_workers_share_in_flight_counts(tmp_path: Path) -> None:
    held = 8
    with fake_engines(("--token-delay-s", "0.5")) as (engine,):
        port = free_port()
        config = tmp_path / "router.yaml"
        config.write_text(f"listen: {{port: {port}}}\nstore: file://{tmp_path / 'state.json'}\n"
                          f"discovery: {{static: [{{url: '{engine.url}', model: llama-3-8b, id: e0}}]}}\n")
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", "router", "--config", str(config),
                                 "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                cwd=REPO_ROOT)
        try:
            assert proc.stdout is not None
            pids: list[int] = []
            lines: list[str] = []
            while len(pids) < 2:  # one listening line per worker (log lines may come first)
                line = proc.stdout.readline()
                assert line, f"the router exited before both workers listened: {''.join(lines)}"
                lines.append(line)
                found = re.search(r"listening on .*pid (\d+)\)", line)
                if found is not None:
                    pids.append(int(found.group(1)))
            answers: list[int] = []

            def one() -> None:  # each on its own connection: spread over the workers
                try:
                    with httpx.Client() as http:
                        answers.append(http.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                                                 json={"model": "llama-3-8b", "prompt": "p", "max_tokens": 8}
                                                 ).status_code)
                except httpx.HTTPError:
                    answers.append(-1)  # its worker was killed

            threads = [threading.Thread(target=one) for _ in range(held)]
            for thread in threads:
                thread.start()
            # While all 8 are held at the engine (8 tokens x 0.5 s), every worker's
            # dispatch counts all 8, whichever worker each one came through.
            deadline = time.monotonic() + 3.0
            while _instance_inflight(port)[1] != held:
                assert time.monotonic() < deadline, "the 8 requests never showed as in flight"
                time.sleep(0.02)
            scrapes = [_instance_inflight(port) for _ in range(12)]
            assert all(total == held for _, total in scrapes), scrapes
            # Some scrape came from a worker holding fewer than all 8, and it counted all 8.
            assert any(own < held for own, _ in scrapes), scrapes
            for thread in threads:
                thread.join(60)
            assert answers == [200] * held
            for _ in range(10):
                assert _instance_inflight(port)[1] == 0
            # A worker that dies holding requests leaves no phantom load behind.
            victims = [threading.Thread(target=one) for _ in range(held)]
            answers.clear()
            for thread in victims:
                thread.start()
            time.sleep(1.0)
            os.kill(pids[0], signal.SIGKILL)
            time.sleep(0.5)
            counts = {_instance_inflight(port) for _ in range(6)}
            assert all(total == own for own, total in counts), counts  # only the survivor's own
            for thread in victims:
                thread.join(60)
            assert _instance_inflight(port)[1] == 0
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
