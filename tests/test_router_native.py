"""`tokenyard router --native` (router/native.py): the byte path compiled with mypyc serves
the same answers, in the same process (execve), and never from a stale build.

The build is real: mypyc compiles the modules of `router.native.COMPILED` (the server, the
engine client, the request path and the router modules it calls per request) with the
machine's C compiler into a temporary cache folder (about a minute), once for this module. The
engine is bench/peers/fake_engine.py on loopback, the router a real process."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from router import native
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("router-native")
    native.build(path)
    return path


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A fake engine on loopback and a router config in `tmp_path` serving it: (config, router port)."""
    engine_port, router_port = free_port(), free_port()
    engine = subprocess.Popen([sys.executable, str(REPO / "bench" / "peers" / "fake_engine.py"), "--port",
                               str(engine_port), "--model", "m"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump({
        "listen": {"host": "127.0.0.1", "port": router_port},
        "store": f"file://{tmp_path / 'state.db'}",
        "discovery": {"static": [{"url": f"http://127.0.0.1:{engine_port}", "model": "m", "gpu": "A100-80GB"}]},
    }))
    try:
        yield config, router_port
    finally:
        engine.terminate()
        engine.wait(10)


def _xdg_holding(cache_dir: Path, xdg: Path) -> Path:
    """`xdg` set up as an XDG_CACHE_HOME whose router build cache is `cache_dir` (the
    prebuilt folder is found through the default cache dir)."""
    (xdg / "tokenyard").mkdir(parents=True, exist_ok=True)
    link = xdg / "tokenyard" / "router-native"
    if not link.exists():
        link.symlink_to(cache_dir)
    return xdg


def _wait_answer(url: str, proc: subprocess.Popen[str], body: dict[str, object]) -> httpx.Response:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"router exited: {proc.stdout.read() if proc.stdout else ''}"
        try:
            return httpx.post(url, json=body, timeout=5)
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError("the router did not answer within 60 s")


def test_the_build_is_keyed_by_the_sources_and_compiles_its_modules(cache_dir: Path) -> None:
    root = cache_dir / native.build_key()
    assert native.compiled_in(root)
    assert native.build(cache_dir) == root  # found, not rebuilt
    for module in native.COMPILED:
        folder, _, name = module[:-3].rpartition("/")
        built = [p.name for p in (root / folder).glob(f"{name}.*") if not p.name.endswith(".py")]
        assert built and built[0].endswith(".so"), (module, built)


def test_native_router_answers_like_the_plain_one_in_the_same_process(cache_dir: Path, tmp_path: Path,
                                                                      fleet: tuple[Path, int]) -> None:
    config, router_port = fleet
    env = dict(os.environ, XDG_CACHE_HOME=str(_xdg_holding(cache_dir, cache_dir.parent / "xdg")))
    router = subprocess.Popen([sys.executable, "-m", "cli.main", "router", "--config", str(config), "--native"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        body = {"model": "m", "prompt": "hello", "max_tokens": 4}
        answer = _wait_answer(f"http://127.0.0.1:{router_port}/v1/completions", router, body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] >= 1
        streamed = httpx.post(f"http://127.0.0.1:{router_port}/v1/completions", json={**body, "stream": True},
                              timeout=5)
        assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
        events = [json.loads(line[6:]) for line in streamed.text.splitlines()
                  if line.startswith("data: {")]
        assert events, streamed.text
        # A request the parser refuses is a 400 in the compiled server too (it once raised
        # a TypeError there: mypyc checked the parser's error against a narrowed type).
        with socket.create_connection(("127.0.0.1", router_port), timeout=5) as raw:
            raw.sendall(b"N0T-A-METHOD / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert raw.recv(65536).startswith(b"HTTP/1.1 400 "), "no 400 for a malformed request"
        # The scrape walks the compiled collectors (tokenyard/loop_metrics.py, router/metrics.py):
        # a build that laid them out over an unanalysed base class failed here with a
        # SystemError from CPython's dict code (issue #17, stop 24).
        scraped = httpx.get(f"http://127.0.0.1:{router_port}/metrics", timeout=5)
        assert scraped.status_code == 200, scraped.text
        assert re.search(r'tokenyard_router_requests_total\{code="200",model="m",tenant="[^"]*"\} 2\.0',
                         scraped.text), scraped.text
        assert 'tokenyard_router_upstream_attempts_total{instance="' in scraped.text
        assert "tokenyard_router_decide_seconds_count 2.0" in scraped.text
    finally:
        router.terminate()
        output, _ = router.communicate(timeout=20)
    assert router.returncode == 0, output  # a clean exit on SIGTERM (that broken build also segfaulted at exit)
    # execve: the process that printed its pid is the one started (signals reach it).
    found = re.search(r"\(byte path: mypyc; pid (\d+)\)", output)
    assert found is not None and int(found.group(1)) == router.pid, output
    assert "compiled" not in output  # the prebuilt folder was used, not a new build


def _subclassing_package(root: Path) -> None:
    """A package whose compiled module subclasses a class of a module mypyc does not analyse
    (follow_imports = skip): the construct that crashed the first eight-module build."""
    (root / "pkg").mkdir()
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "base.py").write_text("from abc import ABC\n\n\nclass Base(ABC):\n    pass\n")
    (root / "pkg" / "child.py").write_text(
        "from pkg.base import Base\n\n\nclass Child(Base):\n    def __init__(self) -> None:\n"
        "        self.families: list[int] = [1, 2]\n\n    def describe(self) -> int:\n        return 3\n")


def test_a_compiled_class_over_an_unanalysed_base_fails_the_build_or_works(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenyard import native_build

    project = tmp_path / "project"
    project.mkdir()
    _subclassing_package(project)
    monkeypatch.setattr(native_build, "REPO_ROOT", project)
    skipped = native_build.NativeBuild(packages=("pkg",), compiled=("pkg/child.py",), cache_name="t",
                                       follow_imports="skip")
    with pytest.raises(native_build.NativeBuildError, match=r'child.py:4: error: Class cannot subclass "Base"'):
        skipped.build(tmp_path / "cache-skip")
    assert not any((tmp_path / "cache-skip").iterdir())  # no half-built folder left
    followed = native_build.NativeBuild(packages=("pkg",), compiled=("pkg/child.py",), cache_name="t",
                                        follow_imports="skip", followed=("pkg.base",))
    root = followed.build(tmp_path / "cache-followed")
    probe = ("import pkg.child; c = pkg.child.Child(); "
             "assert pkg.child.__file__.endswith('.so') and c.families == [1, 2]; "
             # Lookups through the generic path (what prometheus_client's registry does):
             # over the broken layout they read an attribute slot as the instance dict.
             "print(getattr(c, 'describe')(), hasattr(c, 'absent'), type(getattr(c, '__dict__', None)).__name__)")
    done = subprocess.run([sys.executable, "-P", "-c", probe], cwd=root, env=dict(os.environ, PYTHONPATH=str(root)),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.split()[:2] == ["3", "False"], done.stdout + done.stderr


def test_a_failed_build_says_why_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(native.NativeBuildError, match="C compiler"):
        native.build(tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither the keyed folder nor the work folder is left


def _byte_path_of(config: Path, cwd: Path, env: dict[str, str], *flags: str) -> str:
    """What the router says it runs ('mypyc' or 'python'), after it answered a request."""
    router = subprocess.Popen([sys.executable, "-m", "cli.main", "router", "--config", str(config), *flags],
                              cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert router.stdout is not None
        seen = []
        found = None
        while found is None and len(seen) < 200:
            line = router.stdout.readline()
            assert line, "".join(seen)  # exited before it listened
            seen.append(line)
            found = re.search(r"listening on .*\(byte path: (\w+); pid (\d+)\)", line)
        assert found is not None, "".join(seen)
        assert int(found.group(2)) == router.pid
        port = yaml.safe_load(config.read_text())["listen"]["port"]
        answer = _wait_answer(f"http://127.0.0.1:{port}/v1/completions", router,
                              {"model": "m", "prompt": "hello", "max_tokens": 4})
        assert answer.status_code == 200, answer.text
        return found.group(1)
    finally:
        router.terminate()
        router.communicate(timeout=20)


def test_the_router_runs_a_cached_build_by_default_and_plain_python_otherwise(cache_dir: Path, tmp_path: Path,
                                                                              fleet: tuple[Path, int]) -> None:
    config, _ = fleet
    env = {k: v for k, v in os.environ.items() if k not in (native.MODE_ENV, native.ROOT_ENV)}
    cached = dict(env, XDG_CACHE_HOME=str(_xdg_holding(cache_dir, tmp_path / "xdg")))
    assert _byte_path_of(config, tmp_path, cached) == "mypyc"  # found in the cache: used
    assert _byte_path_of(config, tmp_path, cached, "--no-native") == "python"
    assert _byte_path_of(config, tmp_path, dict(cached, **{native.MODE_ENV: "off"})) == "python"
    # No build for these sources in the cache: plain Python, and nothing is built.
    empty = tmp_path / "empty-xdg"
    empty.mkdir()
    assert _byte_path_of(config, tmp_path, dict(env, XDG_CACHE_HOME=str(empty))) == "python"
    assert not (empty / "tokenyard").exists()


# Run against the compiled decision layer (scheduler/layer.py, scheduler/dispatch.py in the
# build): what docs/plugins.md promises a plugin, and what tests and the simulator do with
# these classes (subclass DispatchPolicy, override decide with the older signature, give a
# subclass's instance attributes, subclass DecisionLayer).
_PLUGIN_PROBE = """
import json
import pydantic
import scheduler.dispatch as dispatch
import scheduler.layer as layer
from scheduler.dispatch import ClusterView, DispatchPolicy, Scorer, build_policy, register_scorer
from scheduler.layer import DecisionLayer
from scheduler.policy_document import load_policy_document
from scheduler.types import Decision, InstanceState, RequestInfo

class PreferPool(Scorer):  # the example plugin of docs/plugins.md, interpreted
    normalized = True
    reads_progress = False

    class Params(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        pool: str
        elsewhere: float = 0.0

    def __init__(self, pool: str, elsewhere: float = 0.0) -> None:
        self.pool, self.elsewhere = pool, elsewhere

    def score(self, request, instance, ctx):
        return 1.0 if instance.pool == self.pool else self.elsewhere

register_scorer("probe_prefer_pool")(PreferPool)

class Recording(DispatchPolicy):  # the older decide(view, request), as tests/test_simulator.py has
    def decide(self, view, request):
        self.seen.append(len(view.instances))
        return super().decide(view, request)

class PinnedLayer(DecisionLayer):
    def profile(self, request, pinned=None):
        self.asked += 1
        return super().profile(request, "gpu_pool")

group = [InstanceState(f"i{k}", "m", pool="h100" if k == 2 else "a100", running=k % 2) for k in range(4)]
request = RequestInfo("r1", "m", 10)
doc = load_policy_document({"profiles": {
    "default": {"scorers": ["least_outstanding"]},
    "gpu_pool": {"scorers": [{"probe_prefer_pool": {"pool": "h100", "weight": 1.0}},
                             {"least_outstanding": {"weight": 0.1}}]}}})
pinned = PinnedLayer(doc)
pinned.asked = 0
chosen = pinned.decide(pinned.profile(request), group, request, 0.0).instance_id
explained = pinned.decide(pinned.profile(request), group, request, 0.0, explain=True)
built = build_policy({"scorers": [{"probe_prefer_pool": {"pool": "h100"}}]})
recording = Recording(built.filters, built.scorers, built.picker, seed=3)
recording.seen = []
overridden = DecisionLayer(doc, override=recording)
via_override = overridden.decide(overridden.profile(request), group, request, 0.0).instance_id
try:
    build_policy({"scorers": [{"probe_prefer_pool": {"pool": 3}}]}, where="p")
    refused = ""
except dispatch.PolicyConfigError as exc:
    refused = str(exc)
import scheduler.dispatch_parts as parts
import scheduler.policies.basic as basic
import scheduler.policies.load as load
from scheduler.dispatch import FILTERS, PICKERS, SCORERS, params_model
params = {kind + "." + name: sorted(params_model(cls).model_fields)
          for kind, table in (("filter", FILTERS), ("scorer", SCORERS), ("picker", PICKERS))
          for name, cls in sorted(table.items())}
try:
    build_policy({"picker": {"max_score": {"x": 1}}}, where="p")
    refused_picker = ""
except dispatch.PolicyConfigError as exc:
    refused_picker = str(exc)
print(json.dumps({
    "compiled": [m.__file__.endswith(".so") for m in (dispatch, layer, parts, basic, load)],
    "params": params, "refused_picker": refused_picker,
    "chosen": chosen, "asked": pinned.asked, "explained": explained.explanation.candidates[0][0],
    "via_override": via_override, "seen": recording.seen,
    "reads_progress": [recording.reads_progress, built.reads_progress], "refused": refused,
    "subclass_of": isinstance(recording, DispatchPolicy),
}))
"""


def _probe(tmp_path: Path, *first: Path) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-P", "-c", _PLUGIN_PROBE], cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join([*map(str, first), str(REPO)])),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_plugins_and_subclasses_work_against_the_compiled_decision_layer(cache_dir: Path, tmp_path: Path) -> None:
    seen = _probe(tmp_path, cache_dir / native.build_key())
    plain = _probe(tmp_path)
    assert seen["compiled"] == [True] * 5 and plain["compiled"] == [False] * 5, (seen, plain)
    # Everything the probe saw is what plain Python sees: the decisions, and every registered
    # part's parameter class (derived from `__init__` for the parts without a `Params`:
    # a compiled `__init__` has no signature to read, and the compiled parts take none).
    assert seen == {**plain, "compiled": seen["compiled"]}
    assert seen["params"]["picker.max_score"] == [] and seen["params"]["scorer.slo_headroom"], seen["params"]
    assert seen["refused_picker"].startswith("p.picker.max_score.x: unknown key"), seen
    # The interpreted scorer decided (i2 is the one h100), through the interpreted layer subclass.
    assert seen["chosen"] == "i2" and seen["explained"] == "i2" and seen["asked"] == 2, seen
    # The interpreted DispatchPolicy subclass's decide(view, request) was called by the compiled layer.
    assert seen["via_override"] == "i2" and seen["seen"] == [4], seen
    # A subclass overriding decide may read anything; the built policy's parts say what they read.
    assert seen["reads_progress"] == [True, False] and seen["subclass_of"], seen
    assert seen["refused"].startswith("p.scorers[0].probe_prefer_pool.pool: Input should be a valid string"), seen
