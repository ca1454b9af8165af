"""`tokenyard up`: the embedded default fleet on one machine, in one command.

Starts a small heterogeneous fleet of emulated engines (`tokenyard engine`, one process
each): qwen2.5-1.5b on an L4 as the SLM tier, llama-3-8b on an A100-80GB and on an
H100-80GB as the LLM tier, each also serving the Worker gRPC service that the router
subscribes to for load. Then the router with its scheduler (SLO-headroom dispatch), the
file-backed state store under ./.tokenyard/, and the config it generated written to
./.tokenyard/router.yaml. Prints the URL with a curl and an openai-python example, sends
one request itself, and stays up until Ctrl-C, which stops everything. `--smoke` sends the
request and exits (0 when it was answered).

Engines run as subprocesses rather than in the router's process: each emulated engine
runs a continuous-batching loop that sleeps modelled iteration times, and sharing one
event loop with the router makes the engines' timing and the router's latency disturb
each other; as processes they also use the machine's other cores. Measured on the 2-core
box: `tokenyard up --smoke` (three engine processes started in parallel, router, first
request, clean stop) takes 6.9 s of wall time; the in-process variant was not built.

Ports: every listener binds port 0 itself and reports what it got (engines through
`--ready-file`, the control server through its `bound_port`), so no port is picked here
and then bound later by someone else: between a pick and a bind another process (or the
next pick, which may hand out the same port once the probe socket is closed) can take it.

`--plan PLAN.json` (a `tokenyard plan --out` file) starts the plan's fleet instead: each
pool's instances as emulated engines of its GPU type and TP degree, one model
(`--plan-model`), and the router dispatching through the plan's routing table (the
`length_bucket` filter, docs/planner.md), so a planned fleet can be measured live
(bench/planner_up.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenyard import arg_types


@dataclass(frozen=True)
class EngineSpec:
    instance_id: str
    model: str
    gpu: str
    tier: str
    tp: int = 1
    pool: str | None = None  # default: "<tier>-<gpu>"


DEFAULT_FLEET = (
    EngineSpec("slm-l4-0", "qwen2.5-1.5b", "L4", "slm"),
    EngineSpec("llm-a100-0", "llama-3-8b", "A100-80GB", "llm"),
    EngineSpec("llm-h100-0", "llama-3-8b", "H100-80GB", "llm"),
)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "up",
        help="start the embedded default fleet: emulated engines, router, scheduler, file store",
        description="Start emulated engines of three GPU types and two model tiers behind the router, with the "
                    "file-backed store under --state-dir; print how to call it, send one request, and stay up "
                    "until Ctrl-C (or exit after the request with --smoke).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="router listen address")
    parser.add_argument("--port", type=arg_types.port, default=8000, help="router port (0: any free port)")
    parser.add_argument("--state-dir", default=".tokenyard", help="where the store and generated config live")
    parser.add_argument("--time-scale", type=arg_types.non_negative_float, default=1.0,
                        help="engine speed: 1 = the modelled GPU speed, 0 = no latency")
    parser.add_argument("--admission", choices=["on", "off"], default="on",
                        help="the router's admission queue (flow control) in the generated policy document")
    parser.add_argument("--queue-sort", choices=["slo_priority", "fcfs", "learned_rank"], default="slo_priority",
                        help="the order the admission queue releases held requests in; learned_rank scores each "
                             "request with the output-length ranker (shortest predicted first, within SLO class, "
                             "with a starvation guard of --rank-max-wait-s) (docs/ranking.md)")
    parser.add_argument("--rank-max-wait-s", type=arg_types.positive_float, default=30.0,
                        help="learned_rank: a request held this long is released before any shorter one")
    parser.add_argument("--rank-model", default=None,
                        help="learned_rank: rank model file (default: the ranker shipped in the package)")
    parser.add_argument("--smoke", action="store_true", help="send one request, then stop everything and exit")
    parser.add_argument("--ready-timeout-s", type=arg_types.positive_float, default=60.0,
                        help="how long engines may take to start")
    parser.add_argument("--plan", default=None, metavar="PLAN.json",
                        help="start this plan's fleet (a `tokenyard plan --out` file: its pools' instances as "
                             "emulated engines) and route by its routing table, instead of the default fleet")
    parser.add_argument("--plan-model", default="llama-3-8b", help="--plan: the model every engine serves")
    parser.add_argument("--plan-class", default=None,
                        help="--plan: the SLO class whose routing table to use (default: the plan's only one, "
                             "or 'default')")
    parser.set_defaults(handler=run_up)


MAX_PLAN_INSTANCES = 16  # engine processes on one machine
MAX_PLAN_BYTES = 4 << 20


@dataclass(frozen=True)
class PlanFleet:
    specs: tuple[EngineSpec, ...]
    table: dict[str, Any]  # the routing table (RoutingTable.as_dict())
    usd_per_hour: float


def plan_fleet(path: str, model: str, slo_class: str | None) -> PlanFleet:
    """The engines and routing table of a `tokenyard plan --out` file; a ValueError that
    names the file and the field for anything this cannot start."""
    import json

    from scheduler.catalog import CatalogError, default_catalog, tensor_parallel_problem
    from scheduler.planner.problem import PlanError
    from scheduler.planner.routing import RoutingTable

    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_PLAN_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the plan ({exc.strerror or exc})") from exc
    if len(raw) > MAX_PLAN_BYTES:
        raise ValueError(f"{path}: larger than {MAX_PLAN_BYTES} bytes; expected a `tokenyard plan --out` file")
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not JSON ({exc}); expected a `tokenyard plan --out` file") from exc
    pools = doc.get("pools") if isinstance(doc, dict) else None
    if not isinstance(pools, list) or not pools:
        raise ValueError(f"{path}: pools: expected a non-empty list of {{name, gpu, tp, instances}}")
    catalog = default_catalog()
    try:
        model_spec = catalog.model(model)
    except CatalogError as exc:
        raise ValueError(f"--plan-model: {exc}") from exc
    specs: list[EngineSpec] = []
    for k, pool in enumerate(pools):
        where = f"{path}: pools[{k}]"
        if not isinstance(pool, dict) or not isinstance(pool.get("name"), str) or not pool["name"] or \
                not isinstance(pool.get("gpu"), str):
            raise ValueError(f"{where}: expected {{name: str, gpu: str, tp: int, instances: int}}")
        tp, instances = pool.get("tp", 1), pool.get("instances")
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1 or \
                not isinstance(instances, int) or isinstance(instances, bool) or instances < 0:
            raise ValueError(f"{where}: expected tp >= 1 and instances >= 0 (integers), got tp={tp!r}, "
                             f"instances={instances!r}")
        try:
            catalog.gpu(pool["gpu"])
        except CatalogError as exc:
            raise ValueError(f"{where}.gpu: {exc}") from exc
        tp_problem = tensor_parallel_problem(model_spec, tp)
        if tp_problem:
            raise ValueError(f"{where}.tp: {tp_problem} (--plan-model)")
        for n in range(instances):
            specs.append(EngineSpec(f"{pool['name']}-{n}", model, pool["gpu"], "llm", tp, pool["name"]))
    if not specs:
        raise ValueError(f"{path}: pools: no instances to start")
    if len(specs) > MAX_PLAN_INSTANCES:
        raise ValueError(f"{path}: {len(specs)} instances; at most {MAX_PLAN_INSTANCES} engine processes start on "
                         "one machine (plan a smaller rate)")
    routing = doc.get("routing")
    if not isinstance(routing, dict) or not routing:
        raise ValueError(f"{path}: routing: expected {{slo_class: routing table}} (tokenyard plan --out)")
    name = slo_class or (next(iter(routing)) if len(routing) == 1 else "default")
    if name not in routing:
        raise ValueError(f"{path}: routing: no table for class {name!r}; the plan has {sorted(routing)} "
                         "(--plan-class)")
    try:
        parsed = RoutingTable.from_dict(routing[name], f"{path}: routing.{name}")
    except PlanError as exc:
        raise ValueError(str(exc)) from exc
    started = {spec.pool for spec in specs if spec.pool}
    routed = {pool for weights in [*parsed.cells.values(), *parsed.rows.values()] for pool, _ in weights}
    if routed - started:
        raise ValueError(f"{path}: routing.{name} routes to pool(s) {sorted(routed - started)} that have no "
                         f"instances in pools ({sorted(started)})")
    table = parsed.as_dict()
    usd = doc.get("usd_per_hour", doc.get("cost", 0.0))
    return PlanFleet(tuple(specs), table, float(usd) if isinstance(usd, (int, float)) else 0.0)


def read_ready_file(path: Path, instance_id: str) -> dict[str, Any] | None:
    """An engine's ready file (`tokenyard engine --ready-file`): its URL and gRPC port, or
    None while it is not written yet. A record for another instance, or without the ports,
    is refused (RuntimeError naming the file)."""
    import json

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    if len(text) > 4096:
        raise RuntimeError(f"{path}: ready file of {len(text)} characters; expected one short JSON object")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"{path}: not JSON ({exc})") from None
    if (not isinstance(record, dict) or record.get("instance_id") != instance_id
            or not isinstance(record.get("url"), str) or not isinstance(record.get("grpc_port"), int)
            or not 0 < record["grpc_port"] < 65536):
        raise RuntimeError(f"{path}: expected {{url, grpc_port, instance_id: {instance_id!r}}}, got {text[:200]!r}")
    return record


class Fleet:
    """The engine subprocesses; stopped with SIGTERM, then SIGKILL after a grace period."""

    def __init__(self, specs: tuple[EngineSpec, ...], state_dir: Path, time_scale: float) -> None:
        self.specs = specs
        self.state_dir = state_dir
        # The engines' Worker gRPC token (0600, fresh each run): engines and router share it.
        self.worker_token_file = state_dir / "worker-token"
        self.time_scale = time_scale
        self.procs: list[Any] = []
        self.entries: list[dict[str, Any]] = []

    async def start(self, ready_timeout_s: float) -> None:
        import asyncio
        import time

        import httpx

        from tokenyard.worker_auth import write_worker_token

        logs = self.state_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        write_worker_token(self.worker_token_file)
        ready_files = []
        for spec in self.specs:
            # Port 0 for both listeners: the engine binds what the OS gives it and writes the
            # ports to its ready file (sim/cli_engine.py), read below.
            ready_file = logs / f"{spec.instance_id}.ready.json"
            ready_file.unlink(missing_ok=True)  # a previous run's
            log_file = (logs / f"{spec.instance_id}.log").open("ab")
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "cli.main", "--log-format", "json", "engine", "--gpu", spec.gpu,
                "--model", spec.model, "--tp", str(spec.tp), "--host", "127.0.0.1", "--port", "0", "--grpc-port", "0",
                "--ready-file", str(ready_file),
                "--instance-id", spec.instance_id, "--time-scale", str(self.time_scale),
                "--scheduling-policy", "priority", "--worker-token-file", str(self.worker_token_file),
                stdout=log_file, stderr=log_file, start_new_session=True)
            log_file.close()
            self.procs.append((spec, proc))
            ready_files.append(ready_file)
        deadline = time.monotonic() + ready_timeout_s
        async with httpx.AsyncClient(timeout=1.0) as client:
            for (spec, proc), ready_file in zip(self.procs, ready_files, strict=True):
                bound: dict[str, Any] | None = None
                while True:
                    if proc.returncode is not None:
                        raise RuntimeError(f"engine {spec.instance_id} exited with {proc.returncode}; see "
                                           f"{logs / (spec.instance_id + '.log')}")
                    if bound is None:
                        bound = read_ready_file(ready_file, spec.instance_id)
                    if bound is not None:
                        try:
                            if (await client.get(bound["url"] + "/health")).status_code == 200:
                                break
                        except httpx.HTTPError:
                            pass
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"engine {spec.instance_id} not ready after {ready_timeout_s:.0f} s; see "
                                           f"{logs / (spec.instance_id + '.log')}")
                    await asyncio.sleep(0.1)
                self.entries.append({"id": spec.instance_id, "url": bound["url"], "model": spec.model,
                                     "gpu": spec.gpu, "pool": spec.pool or f"{spec.tier}-{spec.gpu}",
                                     "grpc": f"127.0.0.1:{bound['grpc_port']}", "labels": {"tier": spec.tier}})

    async def stop(self) -> None:
        import asyncio
        import contextlib
        import signal

        for _, proc in self.procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for _, proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


def router_document(entries: list[dict[str, Any]], host: str, port: int, store_url: str,
                    control: dict[str, Any] | None = None, admission: bool = True,
                    worker_token_file: str | None = None, records_path: str | None = None,
                    queue_sort: Any = "slo_priority", rank_model: str | None = None,
                    plan_table: dict[str, Any] | None = None) -> dict[str, Any]:
    """The router config `tokenyard up` runs (also written to <state-dir>/router.yaml).

    `control`: the Admin + Picker section (loopback, a tokens_file written for this run).
    `worker_token_file`: the engines' Worker gRPC token, sent on their Status streams.
    `records_path`: the request records (router/records.py; no prompt text), which
    `tokenyard calibrate --from`, `train rank --data` and `policy apply --dry-run=server` read.
    `queue_sort`: the admission queue's release order; a `learned_rank` sort also turns the
    ranker on (`rank_model`, None = the shipped one). `plan_table`: a plan's routing table; every
    request then goes through the `length_bucket` filter (a plan's fleet serves one model, so
    there are no tiers, and requests without an SLO class take `default`)."""
    doc: dict[str, Any] = {
        "listen": {"host": host, "port": port},
        "store": store_url,
        "policy": {  # the policy document (docs/policy.md)
            "slo_classes": {
                "interactive": {"ttft_ms": 1000, "tpot_ms": 100, "priority": 0, "queue_timeout_ms": 10000},
                "default": {"ttft_ms": 3000, "tpot_ms": 200, "priority": 1, "queue_timeout_ms": 20000},
                "batch": {"ttft_ms": 60000, "tpot_ms": 1000, "priority": 2, "sheddable": True,
                          "queue_timeout_ms": 30000},
            },
            "profiles": {
                "balanced": {"filters": ["model", "healthy", "not_draining", "not_cordoned", "kv_room"],
                             "scorers": ["least_outstanding"]},
                "headroom": {"filters": ["model", "healthy", "not_draining", "not_cordoned", "kv_room"],
                             "scorers": ["slo_headroom", {"least_outstanding": {"weight": 0.5}}]},
            },
            "selection": {"default": "headroom", "by_slo_class": {"batch": "balanced"}},
            "queue": {"sort": queue_sort, "engine_priority": "slo_priority"},
            # Flow control: with every engine saturated, requests wait in the router (in SLO
            # priority order) instead of in engine queues; batch is shed with 429 + Retry-After.
            # An engine holding 32 requests is saturated (its decode batch, so every stream's
            # TPOT, grows with each one more), as is one with 4 queued.
            "admission": {"enabled": admission, "max_queue_depth": 512, "retry_after_s": 1,
                          "saturation": {"max_queued_per_instance": 4, "max_outstanding_per_instance": 32}},
        },
        "anonymous": {"slo_class": "interactive"},
        "discovery": {"static": entries},
        # `model: auto` picks the tier per request (router/tiers.py, docs/tiers.md)
        "tiers": {"alias": "auto", "small_model": "qwen2.5-1.5b", "large_model": "llama-3-8b",
                  "policy": "load_aware", "default": {"quality_target": 0.9, "quality_floor": 0.5}},
    }
    if plan_table is not None:
        doc["policy"]["profiles"]["plan"] = {
            "filters": ["model", "healthy", "not_draining", "not_cordoned", {"length_bucket": {"table": plan_table}},
                        "kv_room"],
            "scorers": ["least_outstanding"]}
        doc["policy"]["selection"] = {"default": "plan"}
        doc["anonymous"] = {"slo_class": "default"}
        del doc["tiers"]
    sort_name = queue_sort if isinstance(queue_sort, str) else next(iter(queue_sort), "")
    if sort_name == "learned_rank":
        doc["rank"] = {"model": rank_model}
    if control is not None:
        doc["control"] = control
    if worker_token_file is not None:
        doc["load"] = {"worker_token_file": worker_token_file}
    if records_path is not None:
        doc["records"] = {"path": records_path}
    return doc


def _write_text_atomically(path: Path, text: str) -> None:
    """Beside it, then renamed: a reader (`tokenyard config check`, the operator) never sees
    half a router.yaml."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _queue_sort(args: argparse.Namespace) -> Any:
    if args.queue_sort == "learned_rank":
        return {"learned_rank": {"max_wait_s": args.rank_max_wait_s}}
    return args.queue_sort


def _examples(url: str, plan_model: str | None = None) -> str:
    models = (f"model: {plan_model}, each request in the pool the plan's routing table gives its lengths"
              if plan_model else "models: qwen2.5-1.5b = SLM tier, llama-3-8b = LLM tier,\n"
              "  auto = either, chosen per request by the tier predictor and the tiers' load")
    return f"""
Tokenyard is up: {url}  (OpenAI-compatible; {models})

  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "llama-3-8b", "messages": [{{"role": "user", "content": "Hello!"}}], "max_tokens": 32}}'

  python - <<'EOF'
  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key="unused")
  for chunk in client.chat.completions.create(model="qwen2.5-1.5b", stream=True, max_tokens=32,
                                              messages=[{{"role": "user", "content": "Hello!"}}]):
      print(chunk.choices[0].delta.content or "", end="", flush=True)
  EOF

  metrics: {url}/metrics    models: {url}/v1/models    Ctrl-C stops everything
"""


async def up(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal

    import httpx
    import yaml

    from router.app import Router
    from router.auth import write_token_file
    from router.config import parse_router_config
    from router.http_server import RouterServer
    from router.state import open_store

    # The per-request lines of the HTTP client and server are noise on this console.
    for name in ("httpx", "uvicorn.error"):
        logging.getLogger(name).setLevel(logging.WARNING)
    state_dir = Path(args.state_dir).resolve()
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        probe = state_dir / f".write-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        print(f"tokenyard up: --state-dir {args.state_dir}: cannot create or write the folder "
              f"({exc.strerror or exc}); expected a writable folder for the store and the generated config",
              file=sys.stderr)
        return 2
    store_url = "file://" + str(state_dir / "state.db")
    plan = None
    if args.plan is not None:
        try:
            plan = plan_fleet(args.plan, args.plan_model, args.plan_class)
        except ValueError as exc:
            print(f"tokenyard up: --plan: {exc}", file=sys.stderr)
            return 2
    specs = plan.specs if plan is not None else DEFAULT_FLEET
    fleet = Fleet(specs, state_dir, args.time_scale)
    server: RouterServer | None = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        print(f"starting {len(specs)} emulated engines: "
              + ", ".join(f"{s.model} on {s.gpu}" + (f" TP{s.tp}" if s.tp > 1 else "") for s in specs), flush=True)
        if plan is not None:
            print(f"the plan's fleet ({args.plan}, ${plan.usd_per_hour:.2f}/h), routed by its routing table",
                  flush=True)
        await fleet.start(args.ready_timeout_s)
        # The control plane is on, on loopback, with a fresh admin token for this run only
        # (0600 file under the state dir): the operator's tools read it from there.
        tokens_file = state_dir / "control-tokens.yaml"
        write_token_file(tokens_file, "local-admin", ["admin"])
        # Port 0: the control server binds a free port itself; router.yaml gets the bound one below.
        control = {"host": "127.0.0.1", "port": 0, "tokens_file": str(tokens_file)}
        doc = router_document(fleet.entries, args.host, args.port, store_url, control,
                              admission=args.admission == "on", worker_token_file=str(fleet.worker_token_file),
                              records_path=str(state_dir / "records.jsonl"),
                              queue_sort=_queue_sort(args), rank_model=args.rank_model,
                              plan_table=plan.table if plan is not None else None)
        _write_text_atomically(state_dir / "router.yaml", yaml.safe_dump(doc, sort_keys=False))
        config = parse_router_config(doc, str(state_dir / "router.yaml"))
        store = open_store(store_url)
        # This fleet is the whole fleet: forget instances a previous run left in the store.
        wanted = {entry["id"] for entry in fleet.entries}
        for record in await store.list_instances():
            if record.instance_id not in wanted:
                await store.remove_instance(record.instance_id)
        router = Router(config, store=store)
        server = RouterServer(router, config.host, config.port)
        await server.start()
        control["port"] = int(router.control_server.bound_port)
        doc["listen"]["port"] = server.port  # the bound one, when --port 0
        _write_text_atomically(state_dir / "router.yaml", yaml.safe_dump(doc, sort_keys=False))
        print(_examples(server.url, specs[0].model if plan is not None else None), flush=True)
        print(f"  control (Admin + Picker gRPC): 127.0.0.1:{control['port']}, bearer token in {tokens_file}",
              flush=True)
        print(f"  point the CLI at it: tokenyard context set local --address 127.0.0.1:{control['port']} "
              f"--token-file {tokens_file} && tokenyard context use local\n"
              "  then: tokenyard policy list; tokenyard instances list (docs/admin.md)\n"
              f"  request records (one JSON line per request, no prompt text): {state_dir / 'records.jsonl'}\n",
              flush=True)

        body = {"model": specs[0].model if plan is not None else "llama-3-8b", "messages": [{"role": "user", "content": "Say hello to Tokenyard."}],
                "max_tokens": 16}
        async with httpx.AsyncClient(timeout=60.0) as client:
            response = await client.post(server.url + "/v1/chat/completions", json=body)
        if response.status_code != 200:
            print(f"the first request failed: HTTP {response.status_code}: {response.text}", file=sys.stderr)
            return 1
        answer = response.json()
        print(f"first request answered by {response.headers.get('x-tokenyard-instance')}: "
              f"{answer['choices'][0]['message']['content']!r} ({answer['usage']['completion_tokens']} tokens)",
              flush=True)
        if args.smoke:
            return 0
        await stop.wait()
        print("\nstopping ...", flush=True)
        return 0
    except (RuntimeError, OSError, ValueError) as exc:  # ConfigError and StateStoreError included
        print(f"tokenyard up: {exc}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            await server.stop()
        await fleet.stop()


def run_up(args: argparse.Namespace) -> int:
    import asyncio

    try:
        import uvloop

        return int(uvloop.run(up(args)))
    except ImportError:  # pragma: no cover
        return asyncio.run(up(args))
