"""`tokenyard engine`: serve one emulated engine (vLLM's HTTP API, optionally the Worker gRPC service).

    tokenyard engine --gpu A100-80GB --model llama-3-8b --port 8001 [--grpc-port 9001]
        [--worker-token-file worker-token]   # required for --grpc-port off loopback

Runs on uvloop until SIGINT or SIGTERM, then closes the listeners and aborts what is in
flight. With `--port 0` the OS picks a port; the "engine listening" log line says which,
and `--ready-file PATH` writes it (and the gRPC port) as JSON once both listen, so a
parent that starts engines (`tokenyard up`) never has to pick a port and hope it is still
free when the engine binds it.
"""

from __future__ import annotations

import argparse
from typing import Any

from sim.textgen import DEFAULT_OUTPUT_LEN_DIST, OutputLengthDist, OutputLengthError
from tokenyard import arg_types


def _time_scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _length_dist(text: str) -> str:
    try:
        return str(OutputLengthDist.parse(text))
    except OutputLengthError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "engine",
        help="serve an emulated vLLM engine (OpenAI-compatible HTTP API, /metrics, Worker gRPC)",
        description=(
            "Serve one emulated engine: a real HTTP server with vLLM's OpenAI-compatible API and "
            "metrics, whose iterations take the time the engine performance model gives for the "
            "GPU and model."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--gpu", default="A100-80GB", help="GPU type from the catalog, e.g. A100-80GB, H100-80GB, L4")
    parser.add_argument("--model", default="llama-3-8b", help="model from the catalog, e.g. llama-3-8b, qwen2.5-7b")
    parser.add_argument("--tp", type=arg_types.at_least_one, default=1, help="tensor-parallel degree")
    parser.add_argument("--served-model-name", default=None,
                        help="the model name clients send and /v1/models lists (default: --model)")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP listen address")
    parser.add_argument("--port", type=arg_types.port, default=8000, help="HTTP port (0: any free port)")
    parser.add_argument("--grpc-port", type=arg_types.port, default=None,
                        help="also serve the Worker gRPC service on this port (0: any free port)")
    parser.add_argument("--ready-file", default=None, metavar="PATH",
                        help="once listening, write {\"url\", \"port\", \"grpc_port\", \"instance_id\", \"pid\"} "
                             "as JSON to PATH (atomically: written beside it, then renamed); with --port 0 "
                             "this is how a parent learns the ports the engine bound")
    parser.add_argument("--worker-token-file", default=None, metavar="PATH",
                        help="bearer token (a 0600 file) every Worker gRPC call must carry, and this engine "
                             "sends to a migration's destination (default: env TOKENYARD_WORKER_TOKEN_FILE); "
                             "without one the gRPC port binds only to loopback")
    parser.add_argument("--instance-id", default=None, help="instance id (default: model@gpu-<random>)")
    parser.add_argument("--factors", metavar="JSON", default=None,
                        help="engine-model factors written by `tokenyard calibrate --write` "
                             "(default: the packaged scheduler/perf_factors.json)")
    parser.add_argument("--max-num-seqs", type=arg_types.at_least_one, default=256, help="most sequences in one batch")
    parser.add_argument("--max-num-batched-tokens", type=arg_types.at_least_one, default=8192,
                        help="most tokens (prefill + decode) in one iteration")
    parser.add_argument("--num-kv-blocks", type=arg_types.at_least_one, default=None,
                        help="KV-cache blocks (default: what fits in GPU memory after the weights)")
    parser.add_argument("--block-size", type=arg_types.at_least_one, default=16, help="tokens per KV block")
    parser.add_argument("--max-model-len", type=arg_types.at_least_one, default=None,
                        help="longest prompt + output (default: the model's context length)")
    parser.add_argument("--no-prefix-caching", action="store_true", help="disable the prefix cache")
    parser.add_argument("--scheduling-policy", choices=["fcfs", "priority"], default="fcfs",
                        help="queue order; 'priority' honours the request field priority (lower runs earlier)")
    parser.add_argument("--admit-preemption", action="store_true",
                        help="with --scheduling-policy priority: preempt a lower-priority running request to "
                             "admit a waiting one when KV blocks run out (vLLM V0's priority scheduler; "
                             "default: vLLM V1, which preempts only to let running requests grow)")
    parser.add_argument("--output-len-dist", type=_length_dist, default=DEFAULT_OUTPUT_LEN_DIST,
                        help="output length when max_tokens does not bind: fixed:N, uniform:A:B, lognormal:MEDIAN:SIGMA")
    parser.add_argument("--seed", type=int, default=0, help="seed of generated text and output lengths")
    parser.add_argument("--time-scale", type=_time_scale, default=1.0,
                        help="multiplies modelled iteration times; 0 runs iterations back to back")
    parser.add_argument("--max-request-body-bytes", type=arg_types.at_least_one, default=16 << 20,
                        help="larger request bodies get 413")
    parser.set_defaults(handler=run_engine)


def build_config(args: argparse.Namespace) -> Any:
    from sim.emulated_engine import EmulatedEngineConfig
    from sim.engine_core import EngineConfig, EngineConfigError

    if args.admit_preemption and args.scheduling_policy != "priority":
        raise EngineConfigError("--admit-preemption preempts by request priority: it needs --scheduling-policy priority")
    return EmulatedEngineConfig(
        gpu=args.gpu,
        model=args.model,
        tp=args.tp,
        served_model_name=args.served_model_name,
        instance_id=args.instance_id,
        engine=EngineConfig(
            block_size=args.block_size,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            enable_prefix_caching=not args.no_prefix_caching,
            scheduling_policy=args.scheduling_policy,
            admit_preemption=args.admit_preemption,
            max_model_len=args.max_model_len,
            num_kv_blocks=args.num_kv_blocks,
        ),
        output_len_dist=args.output_len_dist,
        seed=args.seed,
        time_scale=args.time_scale,
        max_request_body_bytes=args.max_request_body_bytes,
        factors_file=args.factors,
    )


def write_ready_file(path: str, server: Any) -> None:
    """The ports `server` (a started EngineServer) bound, as JSON at `path`: written to a
    temporary file beside it and renamed, so a reader sees the whole record or none."""
    import json
    import os

    record = {"url": server.base_url, "port": server.port,
              "grpc_port": server.grpc_port if server.grpc_address is not None else None,
              "instance_id": server.engine.instance_id, "pid": os.getpid()}
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        json.dump(record, out)
    os.replace(tmp, path)


def run_engine(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal
    import sys

    from scheduler.catalog import CatalogError
    from sim.emulated_engine import EmulatedEngine
    from sim.engine_core import EngineConfigError
    from sim.engine_http import EngineServer
    from tokenyard.config import ConfigError
    from tokenyard.worker_auth import check_bind, read_worker_token, token_file_from_env

    log = logging.getLogger("sim.cli_engine")
    # uvicorn's own start/stop lines repeat ours without the instance id.
    logging.getLogger("uvicorn.error").setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        engine = EmulatedEngine(build_config(args))
    except (CatalogError, EngineConfigError, ValueError) as exc:
        print(f"tokenyard engine: {exc}", file=sys.stderr)
        return 2
    token_file = token_file_from_env(args.worker_token_file)
    try:
        token = read_worker_token(token_file, "--worker-token-file") if token_file else None
        if args.grpc_port is not None:
            check_bind(args.host, token)  # refused before anything listens
    except ConfigError as exc:
        print(f"tokenyard engine: {exc}", file=sys.stderr)
        return 2

    async def serve() -> int:
        server = EngineServer(engine, args.host, args.port, grpc_port=args.grpc_port, worker_token=token)
        try:
            await server.start()
        except OSError as exc:
            print(f"tokenyard engine: {exc}", file=sys.stderr)
            return 1
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if args.ready_file:
            try:
                write_ready_file(args.ready_file, server)
            except OSError as exc:
                print(f"tokenyard engine: --ready-file {args.ready_file}: {exc}", file=sys.stderr)
                await server.stop()
                return 1
        log.info("engine ready", extra={"instance_id": engine.instance_id, "url": server.base_url,
                                        "grpc": server.grpc_address})
        await stop.wait()
        log.info("engine stopping", extra={"instance_id": engine.instance_id})
        await server.stop()
        return 0

    try:
        import uvloop

        return uvloop.run(serve())
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.run(serve())
