"""Shared test fixtures: where the real public data lives, free loopback ports."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TOKENYARD_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"the shared data folder is missing: {SHARED_DATA} (set TOKENYARD_SHARED_DATA)")
    return SHARED_DATA


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port that binds now, for a server a test starts later.

    It is drawn below Linux's ephemeral range (32768-60999), so neither an outgoing
    connection nor a server that binds port 0 can take it between this call and the bind,
    and this process never hands out the same port twice. Servers that can bind port 0
    and report their port should do that instead.
    """
    rng = random.Random()
    for _ in range(200):
        candidate = rng.randrange(20000, 32000)
        if candidate in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
        _HANDED_OUT.add(candidate)
        return candidate
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # a crowded range: the old way
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def port() -> int:
    return free_port()
