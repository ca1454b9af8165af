"""Helpers for the router tests (no tests here): engines and routers on loopback.

- `FakeEngine`: bench/peers/fake_engine.py as a subprocess, so a test can kill it.
- `emulated_engine(...)`: the real emulated engine (sim/), served in process.
- `running_router(...)`: a Router served by uvicorn on a free port in this event loop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx

from router.app import Router
from router.config import parse_router_config
from router.http_server import RouterServer
from router.state import InstanceRecord, StateStore
from tests.conftest import REPO_ROOT, free_port

FAKE_ENGINE = REPO_ROOT / "bench" / "peers" / "fake_engine.py"


class FakeEngine:
    """A zero-latency vLLM-shaped engine in its own process (flags: see fake_engine.py)."""

    def __init__(self, *flags: str, model: str = "llama-3-8b") -> None:
        self.port = free_port()
        self.model = model
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, str(FAKE_ENGINE), "--port", str(self.port), "--model", model,
                                      *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fake engine on port {self.port} did not start")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def record(self, instance_id: str, gpu: str = "A100-80GB") -> InstanceRecord:
        return InstanceRecord(instance_id, self.url, self.model, gpu=gpu)

    async def stats(self) -> dict[str, Any]:
        async with httpx.AsyncClient() as client:
            return (await client.post(self.url + "/fake/stats")).json()  # type: ignore[no-any-return]


@contextlib.contextmanager
def fake_engines(*specs: tuple[str, ...]) -> Iterator[list[FakeEngine]]:
    engines = []
    try:
        for flags in specs:
            engines.append(FakeEngine(*flags))
        yield engines
    finally:
        for engine in engines:
            engine.kill()


@contextlib.asynccontextmanager
async def emulated_engine(model: str, gpu: str, time_scale: float = 0.0, **engine: Any) -> AsyncIterator[Any]:
    from sim.emulated_engine import EmulatedEngine, EmulatedEngineConfig
    from sim.engine_core import EngineConfig
    from sim.engine_http import EngineServer

    config = EmulatedEngineConfig(gpu=gpu, model=model, time_scale=time_scale, engine=EngineConfig(**engine),
                                  output_len_dist="fixed:8")
    server = EngineServer(EmulatedEngine(config), "127.0.0.1", 0)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def running_router(records: list[InstanceRecord], doc: dict[str, Any] | None = None,
                         store: StateStore | None = None, background: bool = False,
                         register: bool = True) -> AsyncIterator[RouterServer]:
    """A router on a free port; `background` also runs health checks and load scrapes."""
    router = Router(parse_router_config(doc or {}, "test.yaml"), store=store)
    await router.start(background=background)
    if register:
        for record in records:
            router.registry.upsert(record)
    server = RouterServer(router, "127.0.0.1", 0)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
