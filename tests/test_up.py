"""`tokenyard up`: one command starts engines, router and store, answers, and stops cleanly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from tests.conftest import REPO_ROOT


def _command(state_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", "up", "--port", "0", "--state-dir", str(state_dir),
            "--time-scale", "0", *extra]


def _start(tmp_path: Path, *extra: str) -> subprocess.Popen[str]:
    """`tokenyard up` in the background, its stdout piped, its log in up.stderr (so that
    a failed start can say why)."""
    with (tmp_path / "up.stderr").open("w") as log:
        return subprocess.Popen(_command(tmp_path / "state", *extra), stdout=subprocess.PIPE, stderr=log,
                                text=True, cwd=REPO_ROOT)


def _why_not_up(out: str, tmp_path: Path) -> str:
    """The start-up output, the router's log tail and every engine log's tail."""
    parts = [out, "-- up stderr --", (tmp_path / "up.stderr").read_text()[-3000:]]
    for log in sorted((tmp_path / "state" / "logs").glob("*.log")):
        parts += [f"-- {log.name} --", log.read_text(errors="replace")[-1500:]]
    return "\n".join(parts)


def _read_until_up(proc: subprocess.Popen[str], tmp_path: Path) -> tuple[str, re.Match[str]]:
    """`up`'s output until its first request is answered (90 s at most), and the match of
    its front-door URL; fails with why it did not come up."""
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("first request answered"):
            break
    out = "".join(lines)
    url = re.search(r"Tokenyard is up: (http://127\.0\.0\.1:\d+)", out)
    assert url is not None, _why_not_up(out, tmp_path)
    return out, url


def test_up_smoke_starts_the_fleet_answers_and_exits(tmp_path: Path) -> None:
    result = subprocess.run(_command(tmp_path / "state", "--smoke"), capture_output=True, text=True, timeout=120,
                            cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    url = re.search(r"Tokenyard is up: (http://127\.0\.0\.1:\d+)", out)
    assert url is not None, out
    assert f"curl {url.group(1)}/v1/chat/completions" in out
    assert f'OpenAI(base_url="{url.group(1)}/v1"' in out
    assert re.search(r"first request answered by llm-(a100|h100)-0: '.+' \(16 tokens\)", out), out
    config = yaml.safe_load((tmp_path / "state" / "router.yaml").read_text())
    gpus = {entry["gpu"] for entry in config["discovery"]["static"]}
    assert gpus == {"L4", "A100-80GB", "H100-80GB"}
    assert (tmp_path / "state" / "state.db").exists()
    # The engines' Worker gRPC token: one 0600 file, given to the router; engines refused no call.
    token_file = Path(config["load"]["worker_token_file"])
    assert token_file == tmp_path / "state" / "worker-token" and token_file.stat().st_mode & 0o777 == 0o600
    for engine_log in (tmp_path / "state" / "logs").glob("*.log"):
        assert "worker call denied" not in engine_log.read_text(), engine_log


def test_up_stays_up_until_ctrl_c_and_stops_everything(tmp_path: Path) -> None:
    proc = _start(tmp_path)
    try:
        out, url = _read_until_up(proc, tmp_path)
        models = httpx.get(url.group(1) + "/v1/models", timeout=10).json()
        assert sorted(m["id"] for m in models["data"]) == ["auto", "llama-3-8b", "qwen2.5-1.5b"]  # + the tier alias
        engines = [entry["url"] for entry in
                   yaml.safe_load((tmp_path / "state" / "router.yaml").read_text())["discovery"]["static"]]
        stream = httpx.post(url.group(1) + "/v1/chat/completions", timeout=30, json={
            "model": "qwen2.5-1.5b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "stream": True})
        assert stream.text.endswith("data: [DONE]\n\n")
        _check_control_plane(tmp_path / "state")
        _check_engines_are_the_fleets(tmp_path / "state")
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(30) == 0
        for engine_url in engines:  # the engine processes are gone too
            try:
                httpx.get(engine_url + "/health", timeout=1)
                raise AssertionError(f"engine {engine_url} still answers after Ctrl-C")
            except httpx.ConnectError:
                pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _check_control_plane(state_dir: Path) -> None:
    """`tokenyard up` serves Admin on loopback with the token it wrote; nothing without it."""
    import asyncio

    import grpc

    from router.auth import control_channel
    from tokenyard.v1 import admin_pb2, admin_pb2_grpc

    config = yaml.safe_load((state_dir / "router.yaml").read_text())
    control = config["control"]
    assert control["host"] == "127.0.0.1"
    assert os.stat(control["tokens_file"]).st_mode & 0o077 == 0  # readable by its owner only
    token = yaml.safe_load(Path(control["tokens_file"]).read_text())["tokens"][0]["token"]
    address = f"127.0.0.1:{control['port']}"

    async def calls() -> tuple[int, grpc.StatusCode]:
        async with control_channel(address, token) as channel:
            listed = await admin_pb2_grpc.AdminStub(channel).ListInstances(admin_pb2.ListInstancesRequest(), timeout=10)
        async with grpc.aio.insecure_channel(address) as channel:
            try:
                await admin_pb2_grpc.AdminStub(channel).ListInstances(admin_pb2.ListInstancesRequest(), timeout=10)
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as err:
                code = err.code()
        return len(listed.instances), code

    count, code = asyncio.run(calls())
    assert (count, code) == (3, grpc.StatusCode.UNAUTHENTICATED)


def test_up_with_learned_rank_scores_requests_and_passes_known_lengths(tmp_path: Path) -> None:
    """`--queue-sort learned_rank` turns the ranker on (the router scores each request, the
    admission queue releases by rank) and the emulated engines' known-length header passes
    through the router, as bench/ranking_up.py replays prompts with known answer lengths."""
    proc = _start(tmp_path, "--queue-sort", "learned_rank", "--rank-max-wait-s", "12")
    try:
        out, url = _read_until_up(proc, tmp_path)
        config = yaml.safe_load((tmp_path / "state" / "router.yaml").read_text())
        assert config["policy"]["queue"]["sort"] == {"learned_rank": {"max_wait_s": 12.0}}
        assert config["rank"] == {"model": None}
        for tokens in ("7", "23"):
            reply = httpx.post(url.group(1) + "/v1/chat/completions", timeout=30, headers={
                "x-tokenyard-output-tokens": tokens}, json={
                "model": "llama-3-8b", "messages": [{"role": "user", "content": "Tell me a story."}],
                "max_tokens": 500})
            assert reply.status_code == 200, reply.text
            assert reply.json()["usage"]["completion_tokens"] == int(tokens)
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _describe(grpc_address: str, token: str) -> str:
    """The instance id the Worker service at grpc_address gives for itself."""
    import asyncio

    import grpc

    from tokenyard.v1 import worker_pb2, worker_pb2_grpc

    async def call() -> str:
        async with grpc.aio.insecure_channel(grpc_address) as channel:
            description = await worker_pb2_grpc.WorkerStub(channel).Describe(
                worker_pb2.DescribeRequest(), timeout=10, metadata=(("authorization", f"Bearer {token}"),))
        return str(description.instance_id)

    return asyncio.run(call())


def _check_engines_are_the_fleets(state_dir: Path) -> None:
    """Every address in router.yaml is served by the engine it names (HTTP and Worker gRPC):
    the ports are the ones each engine bound, read back from its ready file."""
    config = yaml.safe_load((state_dir / "router.yaml").read_text())
    token = Path(config["load"]["worker_token_file"]).read_text().strip()
    assert config["listen"]["port"] != 0 and config["control"]["port"] != 0  # the bound ports
    ports = set()
    for entry in config["discovery"]["static"]:
        models = httpx.get(entry["url"] + "/v1/models", timeout=10).json()
        assert models["data"][0]["permission"][0]["id"] == f"modelperm-{entry['id']}", (entry, models)
        assert _describe(entry["grpc"], token) == entry["id"], entry
        ports |= {entry["url"].rsplit(":", 1)[1], entry["grpc"].rsplit(":", 1)[1]}
    assert len(ports) == 2 * len(config["discovery"]["static"])  # no two listeners share a port


def _engine(ready_file: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "cli.main", "engine", "--gpu", "L4", "--model", "qwen2.5-1.5b", "--time-scale", "0",
         "--grpc-port", "0", "--ready-file", str(ready_file), *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO_ROOT)


def _wait_ready(proc: subprocess.Popen[bytes], ready_file: Path) -> dict[str, object]:
    import json

    deadline = time.monotonic() + 30
    while not ready_file.exists():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "no ready file in 30 s"
        time.sleep(0.05)
    record = json.loads(ready_file.read_text())
    assert isinstance(record, dict)
    return record


def test_engine_binds_port_0_and_reports_the_ports_in_its_ready_file(tmp_path: Path) -> None:
    """What `tokenyard up` relies on instead of picking ports for its engines: each engine
    binds port 0 itself and writes what it got; two such engines never collide."""
    procs = [_engine(tmp_path / f"e{i}.json", "--port", "0", "--instance-id", f"e{i}") for i in range(2)]
    try:
        records = [_wait_ready(proc, tmp_path / f"e{i}.json") for i, proc in enumerate(procs)]
        for i, record in enumerate(records):
            assert record["instance_id"] == f"e{i}" and record["pid"] == procs[i].pid
            assert record["url"] == f"http://127.0.0.1:{record['port']}"
            assert httpx.get(f"{record['url']}/health", timeout=5).status_code == 200
            assert _describe(f"127.0.0.1:{record['grpc_port']}", "") == f"e{i}"  # loopback: no token needed
        assert len({r["port"] for r in records} | {r["grpc_port"] for r in records}) == 4
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            assert proc.wait(timeout=15) == 0


def test_engine_on_a_taken_port_fails_clearly_and_writes_no_ready_file(tmp_path: Path) -> None:
    """The failure `_free_port` left to chance (a picked port taken before the engine bound
    it) is now only possible with an explicit port, and then it is an exit, never a ready file
    pointing at the other process's listener."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _engine(tmp_path / "ready.json", "--port", str(port))
        code = proc.wait(timeout=30)
        err = proc.stderr.read().decode() if proc.stderr else ""
    assert code == 1, err
    assert "tokenyard engine:" in err and str(port) in err, err
    assert not (tmp_path / "ready.json").exists()

def _plan_doc(a10g_instances: int = 2, gpu: str = "A10G") -> dict[str, object]:
    """A `tokenyard plan --out` document: prompts under 64 tokens to the L4 pool, longer ones
    to the A10G pool."""
    return {"usd_per_hour": 0.70 + 1.01 * a10g_instances, "pools": [
        {"name": "l4-tp1", "gpu": "L4", "tp": 1, "instances": 1},
        {"name": "a10g-tp1", "gpu": gpu, "tp": 1, "instances": a10g_instances}],
        "routing": {"default": {"input_edges": [0, 64, 100000], "output_edges": [0, 100000], "cells": [],
                                "rows": [{"input": 0, "pools": {"l4-tp1": 1.0}},
                                         {"input": 1, "pools": {"a10g-tp1": 1.0}}],
                                "output_source": "max_output_tokens"}}}


def test_up_plan_starts_the_planned_fleet_and_routes_by_its_table(tmp_path: Path) -> None:
    """`--plan`: one engine per planned instance (its GPU type, pool and model), and the router
    sends each request to the pool the plan's routing table gives its prompt length."""
    import json

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(_plan_doc()))
    proc = _start(tmp_path, "--plan", str(plan), "--plan-model", "llama-2-7b")
    try:
        out, url = _read_until_up(proc, tmp_path)
        assert "the plan's fleet" in out and "$2.72/h" in out, out
        config = yaml.safe_load((tmp_path / "state" / "router.yaml").read_text())
        engines = {(e["id"], e["gpu"], e["pool"], e["model"]) for e in config["discovery"]["static"]}
        assert engines == {("l4-tp1-0", "L4", "l4-tp1", "llama-2-7b"), ("a10g-tp1-0", "A10G", "a10g-tp1", "llama-2-7b"),
                           ("a10g-tp1-1", "A10G", "a10g-tp1", "llama-2-7b")}
        assert "tiers" not in config and config["policy"]["selection"] == {"default": "plan"}
        served: dict[str, set[str]] = {"short": set(), "long": set()}
        for n in range(6):
            for kind, words in (("short", 10), ("long", 200)):
                reply = httpx.post(url.group(1) + "/v1/completions", timeout=30, json={
                    "model": "llama-2-7b", "prompt": " ".join(["tok"] * words) + f" {n}", "max_tokens": 3})
                assert reply.status_code == 200, reply.text
                served[kind].add(reply.headers["x-tokenyard-instance"])
        assert served["short"] == {"l4-tp1-0"}, served
        assert served["long"] <= {"a10g-tp1-0", "a10g-tp1-1"} and served["long"], served
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_up_plan_refuses_what_it_cannot_start(tmp_path: Path) -> None:
    import json

    import pytest

    from cli.up import MAX_PLAN_INSTANCES, plan_fleet

    def write(doc: object) -> str:
        path = tmp_path / "p.json"
        path.write_text(json.dumps(doc))
        return str(path)

    with pytest.raises(ValueError, match=r"pools\[1\]\.gpu: unknown GPU 'B300'"):
        plan_fleet(write(_plan_doc(gpu="B300")), "llama-2-7b", None)
    with pytest.raises(ValueError, match=f"at most {MAX_PLAN_INSTANCES} engine processes"):
        plan_fleet(write(_plan_doc(a10g_instances=MAX_PLAN_INSTANCES)), "llama-2-7b", None)
    with pytest.raises(ValueError, match=r"routes to pool\(s\) \['a10g-tp1'\] that have no instances"):
        plan_fleet(write(_plan_doc(a10g_instances=0)), "llama-2-7b", None)
    with pytest.raises(ValueError, match=r"no table for class 'batch'"):
        plan_fleet(write(_plan_doc()), "llama-2-7b", "batch")
    with pytest.raises(ValueError, match="--plan-model: unknown model"):
        plan_fleet(write(_plan_doc()), "no-such-model", None)
    with pytest.raises(ValueError, match="not JSON"):
        (tmp_path / "bad.json").write_text("{")
        plan_fleet(str(tmp_path / "bad.json"), "llama-2-7b", None)
    fleet = plan_fleet(write(_plan_doc()), "llama-2-7b", None)
    assert [(s.instance_id, s.gpu, s.pool) for s in fleet.specs] == [
        ("l4-tp1-0", "L4", "l4-tp1"), ("a10g-tp1-0", "A10G", "a10g-tp1"), ("a10g-tp1-1", "A10G", "a10g-tp1")]
    # The command says what is wrong and starts nothing.
    result = subprocess.run(_command(tmp_path / "state", "--plan", write({"pools": []}), "--smoke"),
                            capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert result.returncode == 2 and "--plan" in result.stderr and "pools: expected a non-empty list" in result.stderr
    assert not (tmp_path / "state" / "logs").exists()
