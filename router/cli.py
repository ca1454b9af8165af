"""`tokenyard router --config router.yaml`: serve the router until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import os
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "router",
        help="serve the OpenAI-compatible router in front of an engine fleet",
        description="Serve the router: OpenAI-compatible HTTP front door, dispatch, retries, health checks, "
                    "load scraping, and (with `control:` in the config) the Admin and Picker gRPC services.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="router YAML file (see router/config.py for its keys)")
    parser.add_argument("--host", default=None, help="listen address (overrides listen.host)")
    parser.add_argument("--port", type=int, default=None, help="listen port (overrides listen.port)")
    parser.add_argument("--store", default=None,
                        help="state store URL (overrides store:), e.g. redis://127.0.0.1:6379/0; with "
                             "neither: file://$PWD/.tokenyard/state.json")
    parser.add_argument("--workers", type=int, default=1,
                        help="router processes sharing the port (SO_REUSEPORT); they count in-flight requests "
                             "per instance together (a mapped table, router/shared_inflight.py), each scrapes for "
                             "itself, and they share membership, affinity and policies through the store")
    parser.add_argument("--native", action=argparse.BooleanOptionalAction, default=None,
                        help="run the byte path (HTTP server, request path router/app.py, engine client, the router "
                             "modules the request path calls and the decision layer's default path) compiled with "
                             "mypyc: ~40%% fewer instructions per non-streaming request than plain Python "
                             "(docs/benchmarks.md); --native builds it once into ~/.cache/tokenyard/router-native "
                             "(needs a C compiler), --no-native runs plain Python; unset: compiled when a build for "
                             "these sources is already cached, else plain (env TOKENYARD_ROUTER_NATIVE=on|off|auto; "
                             "router/native.py)")
    parser.add_argument("--extproc-port", type=int, default=None,
                        help="also serve the Envoy ext_proc endpoint picker (Gateway API Inference Extension "
                             "protocol, router/extproc.py) and gRPC health on this port")
    parser.add_argument("--extproc-host", default="127.0.0.1",
                        help="listen address of the ext_proc picker (loopback unless set); off loopback the "
                             "gateway must send a bearer token (--extproc-tokens-file, or the control section's), "
                             "unless --extproc-allow-unauthenticated")
    parser.add_argument("--extproc-tokens-file", default=None,
                        help="bearer tokens the gateway must send to the picker (router/auth.py tokens_file "
                             "format; role picker); default: the control section's tokens when it has them")
    parser.add_argument("--extproc-allow-unauthenticated", action="store_true",
                        help="serve the picker on a non-loopback address without tokens (only behind a "
                             "NetworkPolicy that admits nothing but the gateway)")
    parser.add_argument("--extproc-shed-outstanding", type=int, default=0,
                        help="ext_proc: answer 429 to sheddable requests when every instance of the model has "
                             "this many requests outstanding (0: never shed)")
    parser.add_argument("--extproc-shed-priority", type=int, default=2,
                        help="ext_proc: requests whose SLO-class priority is at least this are sheddable")
    parser.set_defaults(handler=run_router)


async def serve_until_signal(config: Any, reuse_port: bool = False,
                             extproc: tuple[str, int, Any] | None = None,
                             shared_inflight: tuple[str, int] | None = None) -> None:
    import asyncio
    import contextlib
    import gc
    import os
    import signal

    from router.app import Router
    from router.http_server import RouterServer
    from router.state import open_store

    store = await _maybe_await(open_store(config.store_url))
    if hasattr(store, "ping"):  # Redis: fail at start with one line, not at the first request
        try:
            await store.ping()
        except BaseException:
            await store.close()
            raise
    router = Router(config, store=store)
    if shared_inflight is not None:  # worker i of `--workers N`: in-flight counts summed over the workers
        from router.shared_inflight import SharedInflight

        router.registry.share_inflight(SharedInflight(*shared_inflight))
    server = RouterServer(router, config.host, config.port, reuse_port=reuse_port)
    try:
        await server.start()
    except BaseException:
        # Whatever started before the failure (store, control server, discovery) stops.
        with contextlib.suppress(Exception):
            await router.stop()
        raise
    picker = None
    if extproc is not None:
        from router.extproc import start_extproc_server

        picker = await start_extproc_server(router, *extproc)
        print(f"tokenyard ext_proc endpoint picker on {extproc[0]}:{picker.port}", flush=True)
    # Everything loaded at startup (grpc, kubernetes, prometheus modules) moves out of the
    # collector's reach, so full collections stay short and stop showing in tail latency.
    gc.collect()
    gc.freeze()
    from router.native import active

    byte_path = "mypyc" if active() else "python"  # router/native.py: compiled when a build is cached
    print(f"tokenyard router listening on {server.url} (byte path: {byte_path}; pid {os.getpid()})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        if picker is not None:
            await picker.stop()
        await server.stop()


async def _maybe_await(value: Any) -> Any:
    import inspect

    return await value if inspect.isawaitable(value) else value


def run_router(args: argparse.Namespace) -> int:
    import asyncio
    import os
    import sys

    from router import native

    flag = getattr(args, "native", None)
    mode = native.mode_default() if flag is None else ("on" if flag else "off")
    argv = list(getattr(args, "argv", sys.argv[1:]))
    if mode == "on":
        if not os.environ.get(native.ROOT_ENV):
            try:
                native.exec_on_native(argv)  # returns only by raising
            except (native.NativeBuildError, OSError) as exc:
                print(f"tokenyard router: --native: {exc}", file=sys.stderr)
                return 1
        if not native.active():
            print(f"tokenyard router: --native: the compiled modules in {os.environ[native.ROOT_ENV]} were not "
                  "imported", file=sys.stderr)
            return 1
    elif mode == "auto" and not os.environ.get(native.ROOT_ENV):
        found = native.available()
        if found is not None:
            try:
                native.exec_on_native(argv, root=found)  # returns only by raising
            except OSError as exc:  # the plain modules are the fallback
                print(f"tokenyard router: the compiled byte path in {found} did not start ({exc}); "
                      "running plain Python", file=sys.stderr)
    from router.config import check_front_door, default_store_url, load_router_config
    from tokenyard.config import ConfigError

    try:
        config = load_router_config(args.config)
    except ConfigError as exc:
        print(f"tokenyard router: {exc}", file=sys.stderr)
        return 2
    if args.host is not None:
        config.host = args.host
        try:
            check_front_door(config)
        except ConfigError as exc:
            print(f"tokenyard router: --host {args.host}: {exc}", file=sys.stderr)
            return 2
    if args.port is not None:
        config.port = args.port
    if args.store is not None:
        config.store_url = args.store
    if config.store_url is None:
        config.store_url = default_store_url()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if args.workers < 1:
        print(f"tokenyard router: --workers: expected an integer >= 1, got {args.workers}", file=sys.stderr)
        return 2
    extproc = None
    if args.extproc_port is None:
        # The picker's flags without the picker: say so rather than ignore them.
        stray = [flag for flag, given in (
            ("--extproc-host", args.extproc_host != "127.0.0.1"),
            ("--extproc-tokens-file", args.extproc_tokens_file is not None),
            ("--extproc-allow-unauthenticated", args.extproc_allow_unauthenticated),
            ("--extproc-shed-outstanding", args.extproc_shed_outstanding != 0),
            ("--extproc-shed-priority", args.extproc_shed_priority != 2)) if given]
        if stray:
            print(f"tokenyard router: {', '.join(stray)}: only with --extproc-port PORT (they configure the "
                  "ext_proc endpoint picker)", file=sys.stderr)
            return 2
    else:
        from router.extproc import ExtProcSettings
        from scheduler.shedding import ShedPolicy

        if not 0 <= args.extproc_port <= 65535:
            print(f"tokenyard router: --extproc-port: expected a port 0-65535 (0: any free port), got "
                  f"{args.extproc_port}", file=sys.stderr)
            return 2
        if args.extproc_shed_outstanding < 0:
            print("tokenyard router: --extproc-shed-outstanding: expected a count >= 0 (0: never shed), got "
                  f"{args.extproc_shed_outstanding}", file=sys.stderr)
            return 2
        from router.auth import TokenTable

        tokens = None
        try:
            if args.extproc_tokens_file is not None:
                tokens = TokenTable.from_file(args.extproc_tokens_file)
            elif config.control_auth is not None and not args.extproc_allow_unauthenticated:
                tokens = config.control_auth.load_tokens()
        except ConfigError as exc:
            print(f"tokenyard router: --extproc: {exc}", file=sys.stderr)
            return 2
        extproc = (args.extproc_host, args.extproc_port, ExtProcSettings(
            shed=ShedPolicy(args.extproc_shed_outstanding, args.extproc_shed_priority), tokens=tokens,
            allow_unauthenticated=args.extproc_allow_unauthenticated))
    if args.workers > 1:
        if extproc is not None:
            print("tokenyard router: --extproc-port runs in one process; use --workers 1", file=sys.stderr)
            return 2
        if config.port == 0:
            print("tokenyard router: --workers > 1 needs a fixed port (listen.port or --port)", file=sys.stderr)
            return 2
        return _run_workers(config, args.workers)
    try:
        asyncio.run(serve_until_signal(config, extproc=extproc))
    except Exception as exc:
        print(f"tokenyard router: {startup_error(exc, config)}", file=sys.stderr)
        return 1
    return 0


def startup_error(exc: BaseException, config: Any) -> str:
    """One line saying what failed at start-up, where, and what was expected."""
    from router.state import StateStoreError
    from tokenyard.config import ConfigError

    module = type(exc).__module__
    if module.startswith("redis"):
        text = str(exc) or type(exc).__name__
        hint = "; expected a db index the server has (redis `databases` setting, default 16)" \
            if "DB index" in text else ""
        return f"state store {config.store_url}: {text}{hint}"
    if isinstance(exc, StateStoreError | ConfigError | OSError):
        return str(exc)
    if isinstance(exc, OverflowError | ValueError):
        return f"{config.source}: {exc}"
    # Anything else is a bug of ours; still one line for the operator, the type for the report.
    return f"could not start: {type(exc).__name__}: {exc}"


def _worker_main(config: Any, shared_inflight: tuple[str, int] | None = None) -> None:
    import asyncio
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent turns Ctrl-C into SIGTERM for each worker
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(serve_until_signal(config, reuse_port=True, shared_inflight=shared_inflight))
    except Exception as exc:
        import sys

        print(f"tokenyard router: {startup_error(exc, config)}", file=sys.stderr)
        raise SystemExit(1) from None


def _run_workers(config: Any, workers: int) -> int:
    """Several router processes on one port; the kernel spreads connections over them. Their
    in-flight counts per instance are shared through one mapped table (router/shared_inflight.py),
    so least-outstanding dispatch and admission see every worker's requests; a worker that
    exits has its counts zeroed."""
    import multiprocessing
    import signal
    import sys
    from multiprocessing.connection import wait

    from router.records import per_worker
    from router.shared_inflight import SharedInflight, SharedInflightError, create_table

    try:
        table = create_table(workers)
    except SharedInflightError as exc:
        print(f"tokenyard router: {exc}", file=sys.stderr)
        return 1
    keeper = SharedInflight(table, 0)
    context = multiprocessing.get_context("spawn")
    # Each worker appends to (and rotates) a records file of its own; each reads all of them.
    procs = [context.Process(target=_worker_main, args=(per_worker(config, i, workers), (str(table), i)),
                             name=f"router-{i}")
             for i in range(workers)]
    try:
        for proc in procs:
            proc.start()

        def forward(signum: int, frame: Any) -> None:
            for proc in procs:
                if proc.is_alive() and proc.pid is not None:
                    os.kill(proc.pid, signal.SIGTERM)

        signal.signal(signal.SIGINT, forward)
        signal.signal(signal.SIGTERM, forward)
        running = {proc.sentinel: (index, proc) for index, proc in enumerate(procs)}
        while running:
            for sentinel in wait(list(running)):
                index, proc = running.pop(sentinel if isinstance(sentinel, int) else -1)
                proc.join()
                keeper.clear_worker(index)  # its requests ended with it
    finally:
        keeper.close()
        table.unlink(missing_ok=True)
    return 0 if all(proc.exitcode == 0 for proc in procs) else 1
