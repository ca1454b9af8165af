"""Front-door HTTP server: Tokenyard's own (tokenyard/asgi_server.py) against uvicorn
(httptools, uvloop), side by side in one run, serving the same router app.

Both run the router in its own process in front of the zero-latency fake engine
(bench/peers/fake_engine.py): `tokenyard router` as shipped, and the same `Router` app on
`uvicorn.Server` (this file's `serve-uvicorn` mode, the way the router served it before
the choice). Measured per server:
- throughput: requests/s and p50/p99 latency at concurrency 1, 32 and 128, non-streaming
  and 64-token streams (bench/peers/loadgen.py, closed loop, kept-alive connections);
- hostile cases: one connection streaming a single header value as fast as it can for
  `--flood-s` (how long /health then takes, RSS growth of the router), 200 slowloris
  sockets and 20 bodies shorter than their Content-Length held for `--hold-s` (how many
  the server closed), JSON nested 500 deep (status, error shape), `Expect: 100-continue`
  with an oversize Content-Length (does 100 come before the 413?), HTTP/1.0 streaming
  (chunked framing or not).

    python bench/http_server.py                      # ~3 minutes
    python bench/http_server.py --duration-s 1 --hold-s 12 --flood-s 3   # quick look
Prints a Markdown table for docs/benchmarks.md and writes JSON with --json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from router_overhead import API_KEY, MODEL, MODES, Proc, load, wait_ready  # noqa: E402

from tests.conftest import free_port  # noqa: E402

SERVERS = ("tokenyard", "uvicorn")


# -- the uvicorn variant ---------------------------------------------------------------------
def serve_uvicorn(config_path: str) -> None:
    """The router app on uvicorn with httptools and uvloop (TCP_NODELAY as the router had it)."""
    import uvicorn
    import uvloop

    from router.app import Router
    from router.config import load_router_config
    from router.state import open_store

    config = load_router_config(config_path)

    async def main() -> None:
        assert config.store_url is not None
        router = Router(config, store=open_store(config.store_url))
        await router.start()
        server = uvicorn.Server(uvicorn.Config(
            router, host=config.host, port=config.port, loop="none", http="httptools", ws="none", lifespan="off",
            access_log=False, log_config=None, server_header=False, date_header=False, backlog=4096,
            timeout_keep_alive=30))
        try:
            await server.serve()
        finally:
            await router.stop()

    uvloop.run(main())


def start_server(kind: str, engine_url: str, workdir: Path) -> tuple[str, Proc]:
    port = free_port()
    config = workdir / f"router-{kind}.yaml"
    config.write_text(yaml.safe_dump({
        "listen": {"host": "127.0.0.1", "port": port},
        "store": f"file://{workdir / f'state-{kind}.json'}",
        "discovery": {"static": [{"url": engine_url, "model": MODEL, "gpu": "A100-80GB", "id": "engine-0"}]},
    }))
    if kind == "tokenyard":
        cmd = [sys.executable, "-m", "cli.main", "--log-level", "warning", "router", "--config", str(config)]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "serve-uvicorn", "--config", str(config)]
    return f"http://127.0.0.1:{port}", Proc(cmd, workdir / f"{kind}.log")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# -- hostile clients ---------------------------------------------------------------------------
async def _exchange(port: int, data: bytes, timeout_s: float = 10.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        return await asyncio.wait_for(reader.read(1 << 16), timeout_s)
    finally:
        writer.close()


async def _health_latency_ms(port: int) -> float:
    t0 = time.perf_counter()
    try:
        await _exchange(port, b"GET /health HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n", 30.0)
    except (OSError, TimeoutError):
        return float("inf")
    return (time.perf_counter() - t0) * 1000


async def header_flood(port: int, pid: int, flood_s: float) -> dict[str, Any]:
    """One connection sends a header value without end; /health is timed meanwhile."""
    rss_before = rss_mb(pid)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: r\r\nX-Flood: ")
    closed_after_s = None
    latencies = []
    t0 = time.monotonic()
    chunk = b"a" * 65536
    next_probe = t0
    while time.monotonic() - t0 < flood_s:
        try:
            writer.write(chunk)
            await asyncio.wait_for(writer.drain(), 1.0)
        except (OSError, TimeoutError):
            pass
        if writer.is_closing() or reader.at_eof():
            closed_after_s = closed_after_s or time.monotonic() - t0
            break
        if time.monotonic() >= next_probe:
            latencies.append(await _health_latency_ms(port))
            next_probe = time.monotonic() + 0.5
    rss_peak = rss_mb(pid)
    writer.close()
    return {"flood_closed_after_s": closed_after_s, "health_p50_ms": statistics.median(latencies) if latencies else None,
            "health_max_ms": max(latencies) if latencies else None, "rss_growth_mb": rss_peak - rss_before}


async def hold_open(port: int, hold_s: float, slowloris: int = 200, short_bodies: int = 20) -> dict[str, Any]:
    """Slowloris heads (a header line every second) and bodies shorter than announced."""
    async def one(head: bytes, drip: bool) -> bool:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return True  # refused counts as not held open
        writer.write(head)
        deadline = time.monotonic() + hold_s
        try:
            while time.monotonic() < deadline:
                if drip:
                    writer.write(b"X-Drip: 1\r\n")
                try:
                    data = await asyncio.wait_for(reader.read(4096), 1.0)
                    if data == b"" or reader.at_eof():
                        return True  # the server closed it
                except TimeoutError:
                    pass
            return False
        except OSError:
            return True
        finally:
            writer.close()

    heads = [one(b"GET /health HTTP/1.1\r\nHost: r\r\n", True) for _ in range(slowloris)]
    bodies = [one(b"POST /v1/completions HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"model\":", False) for _ in range(short_bodies)]
    results = await asyncio.gather(*heads, *bodies)
    return {"slowloris_closed": sum(results[:slowloris]), "slowloris": slowloris,
            "short_body_closed": sum(results[slowloris:]), "short_bodies": short_bodies}


async def edge_cases(port: int) -> dict[str, Any]:
    deep = b'{"model": "' + MODEL.encode() + b'", "prompt": "p", "x": ' + b"[" * 500 + b"]" * 500 + b"}"
    reply = await _exchange(port, b"POST /v1/completions HTTP/1.1\r\nHost: r\r\nAuthorization: Bearer %s\r\n"
                            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                            % (API_KEY.encode(), len(deep), deep))
    head, _, body = reply.partition(b"\r\n\r\n")
    deep_status = int(head.split()[1]) if head.startswith(b"HTTP/") else 0
    openai_shape = body.lstrip().startswith(b'{"error"')
    reply = await _exchange(port, b"POST /v1/completions HTTP/1.1\r\nHost: r\r\nExpect: 100-continue\r\n"
                            b"Content-Length: 999999999\r\n\r\n", 5.0)
    continue_first = reply.startswith(b"HTTP/1.1 100")
    stream = json.dumps({**MODES["stream-64"], "max_tokens": 4}).encode()
    reply = b""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.0\r\nHost: r\r\nAuthorization: Bearer %s\r\nContent-Type: "
                 b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (API_KEY.encode(), len(stream), stream))
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), 10):
            reply += chunk
    except TimeoutError:
        pass
    writer.close()
    return {"deep_json_status": deep_status, "deep_json_openai_shape": openai_shape,
            "continue_before_413": continue_first,
            "http10_chunked": b"transfer-encoding: chunked" in reply.split(b"\r\n\r\n")[0].lower()}


# -- report -------------------------------------------------------------------------------------
def markdown(results: dict[str, Any]) -> str:
    lines = ["| server | mode | concurrency | req/s | p50 µs | p99 µs | errors |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for server, data in results.items():
        for mode, points in data["load"].items():
            for conc, r in points.items():
                lines.append(f"| {server} | {mode} | {conc} | {r.get('rps', 0):.0f} | {r.get('p50_us', 0):.0f} | "
                             f"{r.get('p99_us', 0):.0f} | {r.get('errors', r.get('error', ''))} |")
    lines += ["", "| hostile case | " + " | ".join(results) + " |", "| --- |" + " --- |" * len(results)]
    keys = [("header flood: connection closed after s", "flood_closed_after_s"),
            ("header flood: /health p50 ms", "health_p50_ms"), ("header flood: /health max ms", "health_max_ms"),
            ("header flood: router RSS growth MB", "rss_growth_mb"),
            ("slowloris sockets closed by the server", "slowloris_closed"),
            ("short bodies closed by the server", "short_body_closed"),
            ("JSON nested 500 deep: status", "deep_json_status"),
            ("JSON nested 500 deep: OpenAI error shape", "deep_json_openai_shape"),
            ("100 Continue sent before the 413", "continue_before_413"),
            ("HTTP/1.0 client gets chunked framing", "http10_chunked")]
    for label, key in keys:
        cells = []
        for data in results.values():
            value = data["hostile"].get(key)
            cells.append(f"{value:.1f}" if isinstance(value, float) else str(value))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="bench", choices=["bench", "serve-uvicorn"])
    parser.add_argument("--config", help="serve-uvicorn: the router config")
    parser.add_argument("--duration-s", type=float, default=2.5)
    parser.add_argument("--warmup-s", type=float, default=0.5)
    parser.add_argument("--concurrency", default="1,32,128")
    parser.add_argument("--flood-s", type=float, default=8.0)
    parser.add_argument("--hold-s", type=float, default=40.0, help="> the server's 30 s body timeout")
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.mode == "serve-uvicorn":
        serve_uvicorn(args.config)
        return 0
    from tqdm import tqdm

    concurrency = [int(c) for c in args.concurrency.split(",") if c]
    workdir = Path(tempfile.mkdtemp(prefix="tokenyard-http-bench-"))
    engine_port = free_port()
    engine_url = f"http://127.0.0.1:{engine_port}"
    engine = Proc([sys.executable, str(REPO / "bench" / "peers" / "fake_engine.py"), "--port", str(engine_port),
                   "--model", MODEL], workdir / "engine.log")
    results: dict[str, Any] = {}
    servers = [s for s in args.servers.split(",") if s]
    try:
        started = {kind: start_server(kind, engine_url, workdir) for kind in servers}
        for kind, (url, proc) in started.items():
            problem = wait_ready(url, proc, 60)
            if problem:
                print(f"{kind}: {problem}", file=sys.stderr)
                return 1
        steps = tqdm(total=len(servers) * (len(MODES) * len(concurrency) + 3), desc="http servers", unit="step")
        for kind, (url, proc) in started.items():
            port = int(url.rsplit(":", 1)[1])
            data: dict[str, Any] = {"load": {}, "hostile": {}}
            for mode, body in MODES.items():
                data["load"][mode] = {}
                for conc in concurrency:
                    data["load"][mode][conc] = load(url, body, conc, args.duration_s, args.warmup_s)
                    steps.update()
            data["hostile"].update(asyncio.run(edge_cases(port)))
            steps.update()
            data["hostile"].update(asyncio.run(header_flood(port, proc.proc.pid, args.flood_s)))
            steps.update()
            data["hostile"].update(asyncio.run(hold_open(port, args.hold_s)))
            steps.update()
            results[kind] = data
        steps.close()
    finally:
        for _, proc in locals().get("started", {}).values():
            proc.stop()
        engine.stop()
    print(markdown(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    socket.setdefaulttimeout(30)
    raise SystemExit(main())
