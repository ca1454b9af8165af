"""Router cost per request in instructions (valgrind callgrind): a figure the neighbours' load cannot move.

On a shared box, req/s and even CPU µs per request move with whatever else runs (cache,
frequency, the scheduler); the number of instructions the router process executes per
answered request does not. This runs `tokenyard router` (the working tree, and with
`--baseline-rev` the router of that git revision, side by side) under
`valgrind --tool=callgrind`, against two zero-latency fake engines (bench/peers/fake_engine.py)
with the closed-loop load generator (bench/peers/loadgen.py), and for each point:
warm up, zero the counters (`callgrind_control -z`), run the load, dump
(`callgrind_control -d`), and divide the instructions (Ir, user space only: the kernel's
loopback work is not counted) by the answers the load generator got. Background work
(health checks, load scrapes, store polls) runs as in production and is counted with the
requests, as it is in the CPU figure of bench/router_overhead.py; under callgrind the router
is ~50x slower, so it weighs more per request here than at full speed.

    python bench/router_instructions.py --baseline-rev main
    python bench/router_instructions.py --concurrency 1,32,128 --duration-s 6 --rounds 2

Prints a Markdown table (instructions per request, and now / baseline) for docs/benchmarks.md.
With ROUTER_INSTR_KEEP=1 the callgrind dumps are kept (the path is printed) for
`callgrind_annotate --inclusive=yes`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from router_overhead import MODEL, MODES, Proc, extract_baseline, router_config, wait_ready  # noqa: E402

from tests.conftest import free_port  # noqa: E402


def total_ir(dump_dir: Path, pid: int, before: set[Path]) -> int:
    """Instructions in the callgrind dumps of `pid` written since `before` was listed."""
    total = 0
    for path in sorted(set(dump_dir.glob(f"callgrind.out.{pid}*")) - before):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("summary:") or line.startswith("totals:"):
                total += int(line.split()[1])
                break
    return total


def control(args: list[str], timeout_s: float = 60.0) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=timeout_s)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,32,128")
    parser.add_argument("--modes", default="non-stream", help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--duration-s", type=float, default=5.0, help="load per point (under callgrind)")
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=1, help="rounds over all points (interleaved)")
    parser.add_argument("--baseline-rev", default=None, help="git revision whose router is measured side by side")
    parser.add_argument("--code-root", action="append", default=[], metavar="NAME=PATH",
                        help="also measure the router imported from PATH first (e.g. a copy of the tree with "
                             "mypyc-built modules), shown as NAME")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("needs valgrind (callgrind_control): apt-get install valgrind", file=sys.stderr)
        return 2
    levels = [int(c) for c in args.concurrency.split(",") if c]
    modes = [m for m in args.modes.split(",") if m]
    workdir = Path(tempfile.mkdtemp(prefix="tokenyard-instr-"))
    procs: list[Proc] = []
    results: dict[str, dict[str, list[float]]] = {}
    try:
        engine_urls = []
        for k in range(2):
            port = free_port()
            engine_urls.append(f"http://127.0.0.1:{port}")
            procs.append(Proc([sys.executable, str(REPO / "bench" / "peers" / "fake_engine.py"), "--port", str(port),
                               "--model", MODEL], workdir / f"engine-{k}.log"))
        for proc, url in zip(procs, engine_urls, strict=True):
            problem = wait_ready(url, proc, 30)
            if problem is not None:
                print(f"fake engine {url}: {problem}", file=sys.stderr)
                return 1
        roots: list[tuple[str, Path | None]] = [("tokenyard", None)]
        if args.baseline_rev:
            roots.append((f"tokenyard@{args.baseline_rev}", extract_baseline(args.baseline_rev)))
        for spec in args.code_root:
            name, _, path = spec.partition("=")
            if not name or not path or not Path(path).is_dir():
                print(f"--code-root {spec!r}: expected NAME=PATH of a directory", file=sys.stderr)
                return 2
            roots.append((name, Path(path).resolve()))
        routers: dict[str, tuple[str, Proc]] = {}
        for name, root in roots:
            port = free_port()
            tag = name.replace("@", "-")
            config = workdir / f"{tag}.yaml"
            config.write_text(yaml.safe_dump(router_config(port, workdir / f"state-{tag}.db", engine_urls)))
            out_dir = workdir / f"cg-{tag}"
            out_dir.mkdir()
            cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_dir}/callgrind.out.%p",
                   sys.executable, "-m", "cli.main", "--log-level", "warning", "router", "--config", str(config),
                   "--workers", "1"]
            # No re-exec onto a cached compiled build (router/native.py): valgrind would lose the
            # process. A compiled build is measured as a --code-root.
            env = dict(os.environ, TOKENYARD_ROUTER_NATIVE="off")
            if root is not None:
                env["PYTHONPATH"] = str(root)
            proc = Proc(cmd, workdir / f"{tag}.log", env=env)
            procs.append(proc)
            url = f"http://127.0.0.1:{port}"
            problem = wait_ready(url, proc, 300)
            if problem is not None:
                print(f"{name} did not start: {problem}", file=sys.stderr)
                return 1
            routers[name] = (url, proc)
            results[name] = {}
        idle_per_s: dict[str, float] = {}
        for name, (_url, proc) in routers.items():
            out_dir = workdir / f"cg-{name.replace('@', '-')}"
            before = set(out_dir.glob("callgrind.out.*"))
            control(["-z", str(proc.proc.pid)])
            start = time.monotonic()
            time.sleep(args.duration_s)
            control(["-d", str(proc.proc.pid)])
            idle_per_s[name] = total_ir(out_dir, proc.proc.pid, before) / (time.monotonic() - start)
            print(f"{name} idle: {idle_per_s[name]:,.0f} instructions per second", flush=True)
        for _ in range(args.rounds):
            for mode in modes:
                for c in levels:
                    for name, (url, proc) in routers.items():
                        body = json.dumps(MODES[mode])
                        base = [sys.executable, str(REPO / "bench" / "peers" / "loadgen.py"), "--url", url,
                                "--path", "/v1/completions", "--body", body, "--concurrency", str(c),
                                "--api-key", "sk-tokenyard-bench"]
                        subprocess.run([*base, "--duration-s", str(args.warmup_s), "--warmup-s", "0"],
                                       check=True, capture_output=True, timeout=args.warmup_s + 300)
                        out_dir = workdir / f"cg-{name.replace('@', '-')}"
                        before = set(out_dir.glob("callgrind.out.*"))
                        control(["-z", str(proc.proc.pid)])
                        start = time.monotonic()
                        run = subprocess.run([*base, "--duration-s", str(args.duration_s), "--warmup-s", "0"],
                                             check=True, capture_output=True, text=True,
                                             timeout=args.duration_s + 300)
                        control(["-d", str(proc.proc.pid)])
                        window_s = time.monotonic() - start
                        row = json.loads(run.stdout.strip().splitlines()[-1])
                        answers = row["completed"]
                        ir = total_ir(out_dir, proc.proc.pid, before)
                        per = ir / answers if answers else float("nan")
                        # Less the idle work of the same window: what the requests themselves cost.
                        own = (ir - idle_per_s[name] * window_s) / answers if answers else float("nan")
                        results[name].setdefault(f"{mode} c={c}", []).append(per)
                        results[name].setdefault(f"{mode} c={c}, less idle work", []).append(own)
                        print(f"{name} {mode} c={c}: {answers} answers, {per:,.0f} instructions per request, "
                              f"{own:,.0f} less idle work", flush=True)
    finally:
        for proc in procs:
            proc.stop()
        if os.environ.get("ROUTER_INSTR_KEEP"):
            print(f"dumps kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    names = list(results)
    points = list(results[names[0]]) if names else []
    print()
    print("| point | " + " | ".join(f"{n} instr/req" for n in names)
          + (f" | {names[0]} / {names[1]} |" if len(names) > 1 else " |"))
    print("|---" * (len(names) + 1 + (len(names) > 1)) + "|")
    for point in points:
        values = [min(results[n][point]) for n in names]
        cells = " | ".join(f"{v:,.0f}" for v in values)
        ratio = f" | {values[0] / values[1]:.3f} |" if len(values) > 1 else " |"
        print(f"| {point} | {cells}{ratio}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
