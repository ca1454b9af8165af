"""Router overhead: what the Tokenyard router adds over calling the engine directly, next to peers.

In one run, against two zero-latency engines on loopback (bench/peers/fake_engine.py, each
its own process; the direct baseline calls the first), with the load generator in its own process (bench/peers/loadgen.py, closed loop,
kept-alive connections): requests/s and p50/p99 latency at concurrency 1, 32 and 128, for
non-streaming requests and for streams of 64 tokens, through
- nothing (direct calls: the baseline),
- `tokenyard router` (its own process, static discovery, file store, health checks and load
  scrapes running as in production), on its built-in HTTP server and, as `tokenyard-uvicorn`,
  on uvicorn (served by bench/http_server.py; see there for the choice of the former),
- LiteLLM's proxy and the Rust `vllm-router`, each installed from PyPI into its own
  virtualenv under the cache dir (default ~/.cache/tokenyard-bench/peers). A peer that
  fails to install or to start is reported as such; the run goes on without it.
Added latency = router p50/p99 minus direct p50/p99 at the same concurrency. With `--pin`
(the default on a machine with 2+ cores) every router runs on core 0 (taskset) and the
engines and the load generator on the other cores, so a router's req/s is what one core
gives it; CPU per request is that router process's own utime+stime (its workers included)
over the measured window, read by the load generator from /proc. Also: the
dispatch decision time per request with 1,000 instances registered (in process).

    python bench/router_overhead.py                 # everything, ~8 minutes once peers are cached
    python bench/router_overhead.py --no-peers --duration-s 2
    python bench/router_overhead.py --no-peers --baseline-rev main   # also the router of `main`, side by side
    python bench/router_overhead.py --peers vllm-router --no-uvicorn --workers 1   # the issue #17 table
Writes a JSON report and a PNG (default: docs/img/router_overhead.png) and prints a
Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import free_port  # noqa: E402

MODEL = "llama-3-8b"
API_KEY = "sk-tokenyard-bench"  # LiteLLM refuses to start without a master key; the others ignore it
CONCURRENCY = (1, 32, 128)
MODES = {
    "non-stream": {"model": MODEL, "prompt": "Say hello to the benchmark.", "max_tokens": 16},
    "stream-64": {"model": MODEL, "prompt": "Say hello to the benchmark.", "max_tokens": 64, "stream": True},
}
PEERS = {
    "litellm": "litellm[proxy]",
    "vllm-router": "vllm-router",
}


# -- peers ---------------------------------------------------------------------------------
def install_peer(name: str, requirement: str, cache: Path, timeout_s: float) -> tuple[Path | None, str]:
    """A virtualenv with the peer installed (reused when already there), or why not."""
    venv = cache / name
    marker = venv / ".installed"
    if marker.exists():
        return venv, "cached"
    if venv.exists():
        shutil.rmtree(venv)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
        result = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", requirement], capture_output=True,
                                text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None, f"pip install {requirement} timed out after {timeout_s:.0f} s"
    except (OSError, subprocess.CalledProcessError) as exc:
        return None, f"cannot create a virtualenv: {exc}"
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if "ERROR" in line] or result.stderr.splitlines()[-3:]
        return None, f"pip install {requirement} failed: {' '.join(lines)[:300]}"
    marker.write_text(requirement + "\n")
    return venv, "installed"


def peer_command(name: str, venv: Path, engine_urls: list[str], port: int, workdir: Path) -> list[str]:
    engine_url = engine_urls[0]
    if name == "litellm":
        config = workdir / "litellm.yaml"
        config.write_text(yaml.safe_dump({
            "model_list": [{"model_name": MODEL, "litellm_params": {
                "model": f"openai/{MODEL}", "api_base": engine_url + "/v1", "api_key": "none"}}],
            "litellm_settings": {"drop_params": True, "telemetry": False},
            "general_settings": {"master_key": API_KEY},
        }))
        return [str(venv / "bin" / "litellm"), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
                "--num_workers", "1"]
    if name == "vllm-router":
        binary = venv / "bin" / "vllm-router"
        base = [str(binary)] if binary.exists() else [str(venv / "bin" / "python"), "-m", "vllm_router.launch_router"]
        return [*base, "--worker-urls", *engine_urls, "--host", "127.0.0.1", "--port", str(port),
                "--policy", "round_robin", "--prometheus-port", str(free_port()), "--log-level", "warning"]
    raise ValueError(name)


# -- processes -----------------------------------------------------------------------------
class Proc:
    def __init__(self, cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.cmd = cmd
        self.log_path = log_path
        self.log = log_path.open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=log_path.parent,
                                     start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()

    def tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-600:]
        return ""


def router_config(port: int, store: Path, engine_urls: list[str]) -> dict[str, Any]:
    """The benchmarked router's config: on loopback, a file store, the engines static."""
    return {
        "listen": {"host": "127.0.0.1", "port": port},
        "store": f"file://{store}",
        "discovery": {"static": [{"url": url, "model": MODEL, "gpu": "A100-80GB", "id": f"engine-{k}"}
                                 for k, url in enumerate(engine_urls)]},
    }


def wait_ready(url: str, proc: Proc, timeout_s: float) -> str | None:
    """Poll with a real completion until it answers 200; None when ready, else why not."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            return f"exited with {proc.proc.returncode}: {proc.tail()}"
        try:
            response = httpx.post(url + "/v1/completions", json=MODES["non-stream"], timeout=5.0,
                                  headers={"Authorization": f"Bearer {API_KEY}"})
            if response.status_code == 200:
                return None
            last = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as exc:
            last = str(exc) or type(exc).__name__
        time.sleep(0.3)
    return f"not ready after {timeout_s:.0f} s ({last})"


def load(url: str, body: dict, concurrency: int, duration_s: float, warmup_s: float,
         cpu_pid: int | None = None, pin: list[str] | None = None) -> dict:
    cmd = [*(pin or []), sys.executable, str(REPO / "bench" / "peers" / "loadgen.py"), "--url", url, "--path", "/v1/completions",
           "--body", json.dumps(body), "--concurrency", str(concurrency), "--duration-s", str(duration_s),
           "--warmup-s", str(warmup_s), "--api-key", API_KEY,
           *(["--cpu-pid", str(cpu_pid)] if cpu_pid else [])]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + warmup_s + 120)
    if result.returncode != 0:
        return {"error": result.stderr[-400:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def median_row(rows: list[dict]) -> dict:
    """One point's rounds as one row: the median of each figure, errors summed."""
    good = [row for row in rows if "error" not in row]
    if not good:
        return rows[-1]
    merged: dict = {"rounds": len(good)}
    for key in ("rps", "p50_us", "p99_us", "first_chunk_p50_us", "first_chunk_p99_us", "cpu_us_per_request",
                "cpu_share"):
        values = [row[key] for row in good if key in row]
        if values:
            merged[key] = statistics.median(values)
    errors: dict[str, int] = {}
    for row in good:
        for kind, count in row.get("errors", {}).items():
            errors[kind] = errors.get(kind, 0) + count
    merged["errors"] = errors
    return merged


def extract_baseline(rev: str) -> Path:
    """The router of git revision `rev` in a temp dir (the packages `tokenyard router` imports)."""
    root = Path(tempfile.mkdtemp(prefix="router_overhead_baseline_"))
    archive = subprocess.run(["git", "archive", rev, "router", "scheduler", "tokenyard", "sim", "learn"],
                             check=True, capture_output=True, cwd=REPO).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    return root


# -- dispatch decision time ---------------------------------------------------------------------
def decision_times(instances: int = 1000, requests: int = 5000) -> dict[str, dict[str, float]]:
    from router.config import parse_router_config
    from router.dispatcher import Dispatcher
    from router.registry import InstanceRegistry
    from router.state import InstanceRecord
    from router.tenants import Tenant

    rng = random.Random(0)
    results = {}
    for label, max_candidates, policy in (
        ("least_outstanding, window 16 (default)", 16, {"scorers": ["least_outstanding"]}),
        ("slo_headroom, window 16", 16, {"scorers": ["slo_headroom"]}),
        ("least_outstanding, full scan of 1,000", 0, {"scorers": ["least_outstanding"]}),
    ):
        config = parse_router_config({"policies": {"p": policy}, "dispatch": {"max_candidates": max_candidates}})
        registry = InstanceRegistry()
        for i in range(instances):
            registry.upsert(InstanceRecord(f"i{i}", f"http://10.0.{i // 250}.{i % 250}:8000", MODEL,
                                           gpu=rng.choice(["A100-80GB", "H100-80GB", "L4"])))
            registry.update_load(f"i{i}", running=rng.randrange(64), waiting=rng.randrange(8),
                                 kv_blocks_used=rng.randrange(5000), kv_blocks_total=5000)
        dispatcher = Dispatcher(config, registry)
        policy_obj = dispatcher.policies["p"]
        tenant = Tenant("t", "interactive")
        body = {"model": MODEL, "prompt": "x" * 400, "max_tokens": 64}
        samples = []
        for n in range(requests):
            info = dispatcher.request_info(body, False, tenant, f"r{n}", None)
            start = time.perf_counter_ns()
            decision = dispatcher.decide_local(info, policy_obj)
            samples.append((time.perf_counter_ns() - start) / 1000.0)
            registry.inflight_started(decision.instance_id)
            if n % 4 == 0:
                registry.inflight_finished(decision.instance_id)
        samples.sort()
        results[label] = {"median_us": statistics.median(samples), "p99_us": samples[int(0.99 * len(samples))]}
    return results


# -- report --------------------------------------------------------------------------------
def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, mode in zip(axes, MODES, strict=True):
        names = [name for name in results if mode in results[name]]
        width = 0.8 / max(1, len(names))
        for k, name in enumerate(names):
            values = [results[name][mode].get(str(c), {}).get("rps", 0) for c in CONCURRENCY]
            ax.bar([i + k * width for i in range(len(CONCURRENCY))], values, width, label=name)
        ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(CONCURRENCY))])
        ax.set_xticklabels([f"c={c}" for c in CONCURRENCY])
        ax.set_ylabel("requests/s")
        ax.set_title(f"{mode} (zero-latency engine, loopback)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def markdown(results: dict, decisions: dict, notes: list[str]) -> str:
    lines = ["| target | mode | concurrency | req/s | p50 µs | p99 µs | added p50 µs | added p99 µs | CPU µs/req "
             "| errors |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    direct = results.get("direct", {})
    for name, modes in results.items():
        for mode, by_c in modes.items():
            for c in CONCURRENCY:
                row = by_c.get(str(c))
                if row is None or "error" in row:
                    lines.append(f"| {name} | {mode} | {c} | failed | | | | | | {row.get('error', '')[:80] if row else ''} |")
                    continue
                base = direct.get(mode, {}).get(str(c), {})
                added50 = row["p50_us"] - base.get("p50_us", float("nan")) if name != "direct" else 0.0
                added99 = row["p99_us"] - base.get("p99_us", float("nan")) if name != "direct" else 0.0
                errors = sum(row.get("errors", {}).values())
                lines.append(f"| {name} | {mode} | {c} | {row['rps']:.0f} | {row['p50_us']:.0f} | {row['p99_us']:.0f} "
                             f"| {added50:.0f} | {added99:.0f} | {row.get('cpu_us_per_request', float('nan')):.0f} "
                             f"| {errors} |")
    lines += ["", "| dispatch decision, 1,000 instances | median µs | p99 µs |", "| --- | --- | --- |"]
    for label, row in decisions.items():
        lines.append(f"| {label} | {row['median_us']:.1f} | {row['p99_us']:.1f} |")
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines)


def main() -> int:
    global CONCURRENCY
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=3.0, help="measured seconds per point")
    parser.add_argument("--warmup-s", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all points (interleaved)")
    parser.add_argument("--keep", choices=("best", "median"), default="best",
                        help="per point: the round with the most req/s, or the median of every figure over "
                             "the rounds (steadier on a shared machine)")
    parser.add_argument("--concurrency", default="1,32,128",
                        help="comma-separated concurrency levels")
    parser.add_argument("--no-peers", action="store_true", help="measure only direct calls and tokenyard")
    parser.add_argument("--workers", type=int, default=2,
                        help="also measure `tokenyard router --workers N` (1: skip)")
    parser.add_argument("--native", action="store_true",
                        help="also measure `tokenyard router --native` (byte path compiled with mypyc)")
    parser.add_argument("--no-uvicorn", action="store_true",
                        help="skip tokenyard on uvicorn (the alternative front-door HTTP server)")
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated peers to try")
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/tokenyard-bench/peers"))
    parser.add_argument("--install-timeout-s", type=float, default=900.0)
    parser.add_argument("--baseline-rev", default=None,
                        help="git revision whose router is also measured, side by side (e.g. main)")
    parser.add_argument("--out", default=str(REPO / "docs" / "img" / "router_overhead.png"))
    parser.add_argument("--json", default=None, help="also write the results as JSON here")
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=(os.cpu_count() or 1) >= 2,
                        help="routers on core 0, engines and load generator on the others (taskset)")
    args = parser.parse_args()
    CONCURRENCY = tuple(int(c) for c in args.concurrency.split(",") if c)
    cores = (os.cpu_count() or 1)
    pin_router = ["taskset", "-c", "0"] if args.pin and shutil.which("taskset") else []
    pin_rest = ["taskset", "-c", f"1-{cores - 1}"] if pin_router else []

    from tqdm import tqdm

    notes: list[str] = []
    peers: dict[str, Path] = {}
    if not args.no_peers:
        cache = Path(args.cache_dir)
        cache.mkdir(parents=True, exist_ok=True)
        for name in [p for p in args.peers.split(",") if p]:
            print(f"installing peer {name} ({PEERS[name]}) into {cache / name} ...", flush=True)
            venv, status = install_peer(name, PEERS[name], cache, args.install_timeout_s)
            if venv is None:
                notes.append(f"peer {name} not measured: {status}")
                print(f"  {status}", flush=True)
            else:
                peers[name] = venv

    workdir = Path(tempfile.mkdtemp(prefix="tokenyard-bench-"))
    procs: list[Proc] = []
    results: dict[str, dict[str, dict[str, dict]]] = {}
    every: dict[tuple[str, str, str], list[dict]] = {}
    try:
        engine_urls = []
        for k in range(2):
            engine_port = free_port()
            engine_urls.append(f"http://127.0.0.1:{engine_port}")
            procs.append(Proc([*pin_rest, sys.executable, str(REPO / "bench" / "peers" / "fake_engine.py"), "--port",
                               str(engine_port), "--model", MODEL], workdir / f"engine-{k}.log"))
        engine_url = engine_urls[0]
        targets: list[tuple[str, Callable[[], tuple[str, Proc | None]]]] = [("direct", lambda: (engine_url, None))]

        def start_tokenyard(http_server: str = "builtin", workers: int = 1,
                            code_root: Path | None = None, extra: tuple[str, ...] = ()) -> tuple[str, Proc | None]:
            port = free_port()
            tag = "baseline" if code_root is not None else http_server + "".join(extra)
            config = workdir / f"router-{tag}-{workers}.yaml"
            config.write_text(yaml.safe_dump(router_config(port, workdir / f"state-{tag}-{workers}.json",
                                                           engine_urls)))
            # uvicorn is no longer a router option; bench/http_server.py serves the router app on it.
            cmd = pin_router + ([sys.executable, "-m", "cli.main", "--log-level", "warning", "router", "--config",
                    str(config), "--workers", str(workers), *extra] if http_server == "builtin" else
                   [sys.executable, str(REPO / "bench" / "http_server.py"), "serve-uvicorn", "--config", str(config)])
            # A baseline revision's packages go first on the import path (ahead of the
            # editable install, whose finder comes after the path entries).
            # The baseline runs as its code does by default, but never on a compiled build
            # (`tokenyard router` runs one by default when one is cached: router/native.py).
            env = dict(os.environ, PYTHONPATH=str(code_root), TOKENYARD_ROUTER_NATIVE="off") \
                if code_root is not None else None
            proc = Proc(cmd, workdir / f"tokenyard-{tag}-{workers}.log", env=env)
            return f"http://127.0.0.1:{port}", proc

        # `tokenyard`: plain Python; `tokenyard-native`: the compiled byte path (what the router
        # runs by default once a build is cached).
        targets.append(("tokenyard", lambda: start_tokenyard(extra=("--no-native",))))
        if args.baseline_rev:
            base_root = extract_baseline(args.baseline_rev)
            targets.append((f"tokenyard@{args.baseline_rev}", lambda: start_tokenyard(code_root=base_root)))
        if args.native:
            targets.append(("tokenyard-native", lambda: start_tokenyard(extra=("--native",))))
        if not args.no_uvicorn:
            targets.append(("tokenyard-uvicorn", lambda: start_tokenyard("uvicorn")))
        if args.workers > 1:
            workers_mode = ("--native",) if args.native else ("--no-native",)
            targets.append((f"tokenyard-{args.workers}-workers{'-native' if args.native else ''}",
                            lambda: start_tokenyard("builtin", args.workers, extra=workers_mode)))
        for name, venv in peers.items():
            def start_peer(name: str = name, venv: Path = venv) -> tuple[str, Proc | None]:
                port = free_port()
                env = dict(os.environ, LITELLM_TELEMETRY="False", LITELLM_LOG="ERROR")
                return f"http://127.0.0.1:{port}", Proc(pin_router + peer_command(name, venv, engine_urls, port, workdir),
                                                         workdir / f"{name}.log", env=env)
            targets.append((name, start_peer))

        for engine_proc, url in zip(procs, engine_urls, strict=True):
            ready = wait_ready(url, engine_proc, 30)
            if ready is not None:
                print(f"the fake engine at {url} did not start: {ready}", file=sys.stderr)
                return 1
        # Every target runs at once and the points are measured target after target within
        # each (mode, concurrency), for `rounds` rounds, keeping each point's best round: on
        # a shared machine the load drifts, and this keeps the comparison within minutes.
        urls: dict[str, str] = {}
        pids: dict[str, int] = {}
        for name, start in targets:
            url, proc = start()
            if proc is not None:
                procs.append(proc)
                problem = wait_ready(url, proc, 120)
                if problem is not None:
                    notes.append(f"{name} not measured: did not start ({problem[:200]})")
                    proc.stop()
                    continue
                pids[name] = proc.proc.pid  # taskset execs the command: the same pid
            urls[name] = url
            results[name] = {mode: {} for mode in MODES}
        bar = tqdm(total=args.rounds * len(urls) * len(MODES) * len(CONCURRENCY), desc="router overhead",
                   unit="point")
        for round_index in range(args.rounds):
            for mode, body in MODES.items():
                for c in CONCURRENCY:
                    for name, url in urls.items():
                        bar.set_postfix_str(f"round {round_index + 1} {name} {mode} c={c}")
                        row = load(url, body, c, args.duration_s, args.warmup_s, pids.get(name), pin_rest)
                        every.setdefault((name, mode, str(c)), []).append(row)
                        best = results[name][mode].get(str(c))
                        if best is None or "error" in best or ("rps" in row and row["rps"] > best["rps"]):
                            results[name][mode][str(c)] = row
                        bar.update(1)
        bar.close()
        if args.keep == "median":
            for (name, mode, c), rows in every.items():
                results[name][mode][c] = median_row(rows)
    finally:
        for proc in procs:
            proc.stop()

    print("measuring dispatch decision time with 1,000 instances ...", flush=True)
    decisions = decision_times()
    plot(results, Path(args.out))
    # Every round's row too: the targets of one point run back to back within a round, so
    # a ratio per round (bench/router_ratios.py) pairs measurements minutes apart at most.
    per_round = {name: {mode: {c: every.get((name, mode, c), []) for c in by_c} for mode, by_c in modes.items()}
                 for name, modes in results.items()}
    report = {"results": results, "per_round": per_round, "decisions": decisions, "notes": notes,
              "rounds": args.rounds,
              "duration_s": args.duration_s, "cpus": os.cpu_count()}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print()
    print(markdown(results, decisions, notes))
    print(f"\nplot: {args.out}")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
