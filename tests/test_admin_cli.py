"""`tokenyard policy|instances|context|completion` end to end against a running control plane
(real gRPC on loopback, bearer tokens, both store backends: a SQLite file and Redis at
127.0.0.1:6379 under a unique prefix). The CLI runs in a thread with its own event loop,
as the installed command does; one test runs the installed `tokenyard` binary."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from cli.admin_errors import (
    EXIT_CONFLICT,
    EXIT_DECLINED,
    EXIT_DENIED,
    EXIT_DIFFERS,
    EXIT_INVALID,
    EXIT_NOT_FOUND,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
)
from cli.main import main
from router.admin_grpc import start_control_server
from router.auth import ControlAuth, Principal, TokenTable, token_digest, write_token_file
from router.registry import InstanceRegistry
from router.state import InstanceRecord, RedisStateStore, StateStore, open_store
from scheduler.types import Decision, RequestInfo

REDIS_URL = "redis://127.0.0.1:6379/0"
VIEWER_TOKEN = "cli-viewer-token-0123456789abcdef"


class Plane:
    def __init__(self, store: StateStore, tmp: Path) -> None:
        self.store, self.tmp = store, tmp
        self.registry = InstanceRegistry(store)
        self.token_file = tmp / "tokens.yaml"
        token = write_token_file(self.token_file, f"ops-{uuid.uuid4().hex[:6]}", ["admin"])
        self.viewer_file = tmp / "viewer.token"
        self.viewer_file.write_text(VIEWER_TOKEN + "\n")
        self.auth = ControlAuth.with_tokens(TokenTable([
            (token_digest(token), Principal("ops", frozenset({"admin"}))),
            (token_digest(VIEWER_TOKEN), Principal(f"viewer-{uuid.uuid4().hex[:6]}", frozenset({"viewer"})))]))

    async def start(self) -> None:
        async def decide(info: RequestInfo) -> Decision:
            raise AssertionError("no picks here")

        await self.registry.start()
        self.registry.upsert(InstanceRecord("e0", "http://127.0.0.1:9", "llama-3-8b", gpu="a100"))
        await self.registry.flush()
        self.server = await start_control_server(
            "127.0.0.1", 0, registry=self.registry, store=self.store, decide=decide,
            slo_classes=["interactive", "default", "batch"], dispatch_policies=["default", "headroom"],
            auth=self.auth)
        self.address = f"127.0.0.1:{self.server.bound_port}"

    async def stop(self) -> None:
        await self.server.stop(grace=None)
        await self.registry.close()


@pytest.fixture(params=["file", "redis"])
async def plane(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                ) -> AsyncIterator[Plane]:
    monkeypatch.setenv("TOKENYARD_CONTEXTS", str(tmp_path / "contexts.yaml"))
    prefix = f"tytest:{uuid.uuid4().hex[:10]}:"
    store = (open_store(f"file://{tmp_path}/state.db") if request.param == "file"
             else open_store(f"{REDIS_URL}?prefix={prefix}"))
    found = Plane(store, tmp_path)
    await found.start()
    yield found
    await found.stop()
    if isinstance(store, RedisStateStore):
        await store.delete_all()
    await store.close()


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def policy_file(tmp: Path, name: str, doc: object) -> str:
    path = tmp / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return str(path)


async def test_apply_diff_history_rollback(plane: Plane, capsys: pytest.CaptureFixture[str]) -> None:
    tmp = plane.tmp
    code, out, _ = await cli(capsys, "context", "set", "local", "--address", plane.address,
                             "--token-file", str(plane.token_file))
    assert code == 0 and "saved" in out
    assert (await cli(capsys, "context", "use", "local"))[0] == 0
    first = policy_file(tmp, "acme.yaml", {"name": "acme", "spec": {"slo_class": "interactive",
                                                                    "ttft": {"ms": 800}}})
    code, out, err = await cli(capsys, "policy", "apply", "-f", first, "--reason", "onboard", "--yes")
    assert code == 0, err
    assert "+slo_class: interactive" in out and "version 1 stored" in out
    code, out, _ = await cli(capsys, "policy", "apply", "-f", first, "--reason", "again", "--yes")
    assert code == 0 and "unchanged (version 1)" in out

    second = policy_file(tmp, "acme2.yaml", {"name": "acme", "spec": {"slo_class": "batch"}})
    code, out, _ = await cli(capsys, "policy", "diff", "-f", second)
    assert code == EXIT_DIFFERS and "-slo_class: interactive" in out and "+slo_class: batch" in out
    assert (await cli(capsys, "policy", "diff", "-f", first))[0] == 0
    code, out, err = await cli(capsys, "policy", "apply", "-f", second, "--dry-run=server")
    # This control plane keeps no request records: nothing to replay, and it says how to get some.
    assert code == EXIT_INVALID and "+slo_class: batch" in out
    assert "keeps no request records" in err and "--trace FILE" in err
    trace = Path(__file__).resolve().parents[1] / "sim" / "examples" / "traces" / "burstgpt_head.csv"
    code, out, _ = await cli(capsys, "policy", "apply", "-f", second, "--dry-run=server", "--trace", str(trace))
    assert code == 0 and "slo_attainment    current 1.0000" in out and "cost_usd" in out
    assert "every request is taken as theirs" in out and "nothing stored" in out
    # Without --yes and without a terminal the CLI refuses instead of guessing.
    code, _, err = await cli(capsys, "policy", "apply", "-f", second, "--reason", "move")
    assert code == EXIT_DECLINED and "--yes" in err
    assert (await cli(capsys, "policy", "apply", "-f", second, "--reason", "move to batch", "-y"))[0] == 0

    code, out, _ = await cli(capsys, "policy", "history", "acme", "-o", "json")
    history = json.loads(out)
    assert [(v["version"], v["author"], v["reason"]) for v in history] == [
        (1, "ops", "onboard"), (2, "ops", "move to batch")]
    assert "+slo_class: batch" in history[1]["diff"]
    code, out, _ = await cli(capsys, "policy", "rollback", "acme", "--to", "1", "--reason", "batch hurt", "--yes")
    assert code == 0 and "version 3 stored" in out
    code, out, _ = await cli(capsys, "policy", "get", "acme", "-o", "yaml")
    got = yaml.safe_load(out)
    assert got["spec"] == {"slo_class": "interactive", "ttft": {"ms": 800.0}} and got["metadata"]["version"] == 3
    # What `get -o yaml` prints applies back as it is (its metadata is ignored).
    code, out, _ = await cli(capsys, "policy", "apply", "-f", policy_file(tmp, "got.yaml", out), "--reason", "x",
                             "-y")
    assert code == 0 and "unchanged (version 3)" in out
    code, out, _ = await cli(capsys, "policy", "list")
    assert code == 0 and out.splitlines()[0].split()[:3] == ["NAME", "VERSION", "SLO_CLASS"]
    assert out.splitlines()[1].split()[:3] == ["acme", "3", "interactive"]
    code, out, _ = await cli(capsys, "policy", "delete", "acme", "--reason", "offboard", "--yes")
    assert code == 0 and "version 4 stored" in out
    code, _, err = await cli(capsys, "policy", "get", "acme", "--version", "9")
    assert code == EXIT_NOT_FOUND and "version 9" in err


async def test_concurrent_edit_gets_a_conflict(plane: Plane, capsys: pytest.CaptureFixture[str]) -> None:
    from router.policy_versions import PolicyVersions

    flags = ("--address", plane.address, "--token-file", str(plane.token_file))
    base = policy_file(plane.tmp, "a.yaml", {"name": "acme", "spec": {"priority": 1}})
    assert (await cli(capsys, "policy", "apply", "-f", base, "--reason", "start", "-y", *flags))[0] == 0
    # Someone else writes between this CLI's read and its write: the CLI reads version 1,
    # shows the diff, and the other writer lands version 2 before the confirmation.
    import cli.admin as admin_cli

    real_confirm = admin_cli.confirm

    def other_writer_first(args: object, question: str) -> None:
        asyncio.run_coroutine_threadsafe(PolicyVersions(plane.store).commit(
            "acme", {"priority": 7}, expected_version=1, author="other", reason="theirs"), loop).result(10)
        real_confirm(args, question)  # type: ignore[arg-type]

    loop = asyncio.get_running_loop()
    admin_cli.confirm = other_writer_first
    try:
        mine = policy_file(plane.tmp, "b.yaml", {"name": "acme", "spec": {"priority": 2}})
        code, _, err = await cli(capsys, "policy", "apply", "-f", mine, "--reason", "mine", "-y", *flags)
    finally:
        admin_cli.confirm = real_confirm
    assert code == EXIT_CONFLICT and "at version 2, not 1" in err
    history = await PolicyVersions(plane.store).history("acme")
    assert [(v.version, v.spec) for v in history] == [(1, {"priority": 1}), (2, {"priority": 7})]


async def test_bad_input_clear_errors_and_codes(plane: Plane, capsys: pytest.CaptureFixture[str]) -> None:
    flags = ("--address", plane.address, "--token-file", str(plane.token_file))
    tmp = plane.tmp
    cases = [
        (policy_file(tmp, "y.yaml", "name: acme\nspec: {slo_class: [\n"), "y.yaml:3:1: not valid YAML"),
        (policy_file(tmp, "k.yaml", {"name": "acme", "spec": {"ttft_ms": 5}}),
         "k.yaml: spec.ttft_ms: unknown key; allowed: slo_class, ttft, tpot, priority, profile, rate_limits"),
        (policy_file(tmp, "n.yaml", {"spec": {}}), "n.yaml: name: required"),
        (policy_file(tmp, "m.yaml", "name: a\n---\nname: b\n"), "expected one policy document"),
        (str(tmp / "absent.yaml"), "absent.yaml: cannot read: No such file or directory"),
        (policy_file(tmp, "big.yaml", "#" * (2 << 20)), "a policy file is at most 1048576"),
        # Valid shape, but names the router does not know: the server refuses with the path.
        (policy_file(tmp, "c.yaml", {"name": "acme", "spec": {"slo_class": "gold"}}),
         "c.yaml: spec.slo_class: unknown SLO class 'gold'; known: batch, default, interactive"),
        (policy_file(tmp, "p.yaml", {"name": "acme", "spec": {"profile": "fastest"}}),
         "p.yaml: spec.profile: unknown dispatch profile 'fastest'; known: default, headroom"),
    ]
    for path, message in cases:
        code, out, err = await cli(capsys, "policy", "apply", "-f", path, "--reason", "r", "-y", *flags)
        assert (code, err.count("\n")) == (EXIT_INVALID, 1), (path, err)
        assert message in err, err
    assert not (await PolicyVersions_current(plane.store))  # nothing was stored
    code, _, err = await cli(capsys, "policy", "apply", "-f", cases[1][0], "-y", *flags)
    assert code == EXIT_USAGE and "--reason is required" in err
    viewer = ("--address", plane.address, "--token-file", str(plane.viewer_file))
    good = policy_file(tmp, "g.yaml", {"name": "acme", "spec": {}})
    code, _, err = await cli(capsys, "policy", "apply", "-f", good, "--reason", "r", "-y", *viewer)
    assert code == EXIT_DENIED and "lacks role 'admin'" in err
    assert (await cli(capsys, "policy", "list", *viewer))[0] == 0
    code, _, err = await cli(capsys, "policy", "list", "--address", "127.0.0.1:1", "--token-file",
                             str(plane.token_file), "--timeout-s", "2")
    assert code == EXIT_UNAVAILABLE and "unavailable" in err
    code, _, err = await cli(capsys, "policy", "list", "--context", "nope")
    assert code == EXIT_NOT_FOUND and "context 'nope'" in err


async def PolicyVersions_current(store: StateStore) -> list[object]:
    from router.policy_versions import PolicyVersions

    return list(await PolicyVersions(store).list_current())


async def test_instances_list_drain_undrain(plane: Plane, capsys: pytest.CaptureFixture[str]) -> None:
    flags = ("--address", plane.address, "--token-file", str(plane.token_file))
    code, out, _ = await cli(capsys, "instances", "list", "-o", "json", *flags)
    listed = json.loads(out)
    assert code == 0 and [(i["id"], i["draining"]) for i in listed] == [("e0", False)]
    code, out, _ = await cli(capsys, "instances", "drain", "e0", "-o", "json", *flags)
    assert code == 0 and json.loads(out)["draining"] is True
    assert plane.registry.get("e0")[1].draining
    assert (await cli(capsys, "instances", "undrain", "e0", *flags))[0] == 0
    assert not plane.registry.get("e0")[1].draining
    code, _, err = await cli(capsys, "instances", "drain", "ghost", *flags)
    assert code == EXIT_NOT_FOUND and "ghost" in err
    viewer = ("--address", plane.address, "--token-file", str(plane.viewer_file))
    assert (await cli(capsys, "instances", "drain", "e0", *viewer))[0] == EXIT_DENIED


def test_installed_binary_exit_code_and_completion(tmp_path: Path) -> None:
    env = {**os.environ, "TOKENYARD_CONTEXTS": str(tmp_path / "contexts.yaml")}
    exe = Path(sys.executable).with_name("tokenyard")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: acme\nspec: {priority: high}\n")
    token = tmp_path / "t"
    token.write_text("x" * 20)
    done = subprocess.run([str(exe), "policy", "apply", "-f", str(bad), "--reason", "r", "--address", "127.0.0.1:1",
                           "--token-file", str(token)], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == EXIT_INVALID
    assert "bad.yaml: spec.priority: Input should be a valid integer" in done.stderr
    piped = subprocess.run([str(exe), "policy", "diff", "-f", "-", "--address", "127.0.0.1:1", "--token-file",
                            str(token)], input="name: acme\nspec: {slo_class: 3.5.x: y}\n", capture_output=True,
                           text=True, env=env, timeout=60)
    assert piped.returncode == EXIT_INVALID and "-:2:" in piped.stderr and "not valid YAML" in piped.stderr
    for shell, marker in (("bash", "complete -o"), ("zsh", "#compdef tokenyard")):
        script = subprocess.run([str(exe), "completion", shell], capture_output=True, text=True, env=env, timeout=60)
        assert script.returncode == 0 and marker in script.stdout and "rollback" in script.stdout
