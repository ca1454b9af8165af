"""What the live benches share: a `tokenyard up` on a free loopback port, and a seeded
open-loop Poisson stream of requests against it.

bench/admission_up.py, bench/ranking_up.py and bench/planner_up.py each start `tokenyard up`
(with their own flags), wait until it lists its model, offer requests at Poisson arrival
times from one seeded generator (open loop: a request is sent at its time whether or not
earlier ones have finished), and stop it. The request itself (its body, what is timed)
stays in each bench.
"""

from __future__ import annotations

import asyncio
import random
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx

REPO = Path(__file__).resolve().parents[1]
Item = TypeVar("Item")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_up(up_args: list[str], log_path: Path, model: str, timeout_s: float = 120.0,
             log_tail_chars: int = 800) -> tuple[subprocess.Popen[bytes], str, IO[bytes]]:
    """`tokenyard up --port P *up_args` (output to `log_path`), once its /v1/models lists
    `model`; a process that exits or does not answer within `timeout_s` is killed and the
    log's tail raised."""
    port = free_port()
    log = log_path.open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "--log-level", "warning", "up", "--port", str(port),
                             *up_args], stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if model in httpx.get(url + "/v1/models", timeout=2).text:
                return proc, url, log
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            log.close()
            raise RuntimeError(f"tokenyard up did not start: {log_path.read_text()[-log_tail_chars:]}")
        time.sleep(0.5)


def stop_up(proc: subprocess.Popen[bytes], log: IO[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


async def offer_poisson(items: Iterable[Item], rate_rps: float, seed: int,
                        send: Callable[[httpx.AsyncClient, Item, list[dict[str, Any]]], Awaitable[None]],
                        timeout_s: float, max_connections: int = 2000,
                        duration_s: float | None = None) -> tuple[list[dict[str, Any]], float]:
    """Send `items` in order at Poisson arrival times (`rate_rps`, `random.Random(seed)`;
    the first at time 0), each as `send(client, item, rows)`; stop at the items' end or at
    `duration_s`. Returns every row the sends appended, once all have finished, and the
    seconds from the first send to the last answer."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    tasks = []
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:
        t0 = time.monotonic()
        next_s = 0.0
        for item in items:
            if duration_s is not None and next_s >= duration_s:
                break
            delay = t0 + next_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(send(client, item, out)))
            next_s += rng.expovariate(rate_rps)
        await asyncio.gather(*tasks)
        return out, time.monotonic() - t0
