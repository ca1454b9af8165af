"""`tokenyard router --config router.yaml`: serve the router until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
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
                        help="state store URL (overrides store:), e.g. redis://127.0.0.1:6379/0 "
                             "(default: file://$PWD/.tokenyard/state.json)")
    parser.add_argument("--http-server", choices=["builtin", "uvicorn"], default="builtin",
                        help="HTTP/1.1 server of the front door (see router/app.py FrontDoorProtocol)")
    parser.set_defaults(handler=run_router)


async def serve_until_signal(config: Any, http_server: str = "builtin") -> None:
    import asyncio
    import signal

    from router.app import Router, RouterServer
    from router.state import open_store

    store = await _maybe_await(open_store(config.store_url))
    router = Router(config, store=store)
    server = RouterServer(router, config.host, config.port, http_server=http_server)
    await server.start()
    print(f"tokenyard router listening on {server.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop()


async def _maybe_await(value: Any) -> Any:
    import inspect

    return await value if inspect.isawaitable(value) else value


def run_router(args: argparse.Namespace) -> int:
    import asyncio
    import sys

    from router.config import default_store_url, load_router_config
    from tokenyard.config import ConfigError

    try:
        config = load_router_config(args.config)
    except ConfigError as exc:
        print(f"tokenyard router: {exc}", file=sys.stderr)
        return 2
    if args.host is not None:
        config.host = args.host
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
    from router.state import StateStoreError

    try:
        asyncio.run(serve_until_signal(config, args.http_server))
    except (OSError, ValueError, StateStoreError) as exc:
        print(f"tokenyard router: {exc}", file=sys.stderr)
        return 1
    return 0
