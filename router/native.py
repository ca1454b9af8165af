"""The router's byte path compiled with mypyc: the HTTP server, the engine client, the request path and the router modules it calls per request.

`tokenyard/asgi_server.py` (the front door's HTTP/1.1 server), `router/proxy.py` (the
keep-alive engine client) and `router/app.py` (the request path: authentication,
validation, dispatch, forwarding, relaying) are fully typed Python; mypyc compiles them to
C extension modules, and with them the router modules the request path calls per request
(tenants, validation, dispatcher, registry, health, metrics, loop metrics, workload
recorder), so those calls are native calls. Measured in instructions per request
(bench/router_instructions.py, docs/benchmarks.md "Router data path"): 11-14% fewer per
non-streaming request with the first two; router/app.py added in issue #17's s11 round;
the eight others in stop 24, 0.885 of the three-module build's instructions at c=32.
The decision layer the request path calls is compiled too (scheduler/layer.py, dispatch.py,
dispatch_parts.py and the default profile's parts, policies/basic.py and policies/load.py;
docs/benchmarks.md "The decision layer compiled"): the same source the simulator runs plain,
so the copy of `scheduler` in the build is what the compiled router imports. Their classes
are open to interpreted subclasses (`mypyc_attr(allow_interpreted_subclasses=True)`):
plugins subclass Filter, Scorer and Picker, tests and the simulator DispatchPolicy. A
compiled part's `__init__` has no signature to read, so one that takes parameters must
declare its `Params` (the compiled ones take none; tests/test_router_native.py compares
every part's parameter class with plain Python's).
Everything else (the other policies, discovery, the state store) stays plain Python, and
modules outside these are taken as untyped by the build (`follow_imports = skip`), except
prometheus_client, whose `Collector` two compiled classes subclass (see
tokenyard/native_build.py `followed`: over an unanalysed base mypyc builds a class that
crashes on attribute lookup).

`build()` (tokenyard/native_build.py) copies the `router` and `tokenyard` packages into a cache folder keyed by the
SHA-256 of their sources, the Python and the mypy version, compiles the modules there,
and returns that folder; `tokenyard router --native` then replaces its own process
(`os.execve`, same pid, so signals and supervisors see one process) with one that has the
folder first on the import path. The plain modules remain the reference and the fallback:
nothing in the source tree changes, and an edit changes the key, so a stale build can
never shadow edited code.

    python -m router.native build        # build (or find) it; prints the folder
    tokenyard router --config r.yaml --native      # build if needed, then run compiled
    tokenyard router --config r.yaml               # compiled if a build for these sources is cached
    tokenyard router --config r.yaml --no-native   # plain Python (also TOKENYARD_ROUTER_NATIVE=off)

Needs a C compiler and the Python headers (what building any C extension needs).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tokenyard.native_build import NativeBuild
from tokenyard.native_build import NativeBuildError as NativeBuildError  # raised by build()

COMPILED = ("tokenyard/asgi_server.py", "router/proxy.py", "router/app.py",
            # What the request path calls per request (issue #17, stop 24):
            "router/tenants.py", "router/validation.py", "router/dispatcher.py", "router/registry.py",
            "router/health.py", "router/metrics.py", "tokenyard/loop_metrics.py", "router/workload_recorder.py",
            # The decision layer the request path calls (issue #17, stop 24, s13-dp2):
            "scheduler/layer.py", "scheduler/dispatch.py", "scheduler/dispatch_parts.py",
            "scheduler/policies/basic.py", "scheduler/policies/load.py")
ROOT_ENV = "TOKENYARD_ROUTER_NATIVE_ROOT"  # set in the process re-run on the compiled modules
MODE_ENV = "TOKENYARD_ROUTER_NATIVE"  # on | off | auto (the default): what `--native` defaults to
BUILD = NativeBuild(packages=("router", "tokenyard", "scheduler"), compiled=COMPILED, cache_name="router-native",
                    follow_imports="skip", followed=("prometheus_client",))


# The module's interface is the build's: `build(cache_dir=None, *, quiet=True)` returns the
# folder holding the compiled modules for the current sources, built now if not there
# (NativeBuildError says why it could not be).
default_cache_dir = BUILD.default_cache_dir
build_key = BUILD.key
compiled_in = BUILD.compiled_in
build = BUILD.build

def active() -> bool:
    """Whether this process runs the compiled byte path."""
    import router.proxy
    import tokenyard.asgi_server

    return not any(str(module.__file__).endswith(".py") for module in (router.proxy, tokenyard.asgi_server))


def available(cache_dir: Path | None = None) -> Path | None:
    """The folder of a build for the current sources if one is already in the cache (what
    `tokenyard router` runs by default), else None; never builds, needs no compiler."""
    try:
        root = (cache_dir or default_cache_dir()) / build_key()
    except (ImportError, OSError):  # no mypy installed, or an unreadable source: plain Python
        return None
    return root if compiled_in(root) else None


def mode_default() -> str:
    """`--native` when the flag is not given: TOKENYARD_ROUTER_NATIVE=on|off|auto (auto: the
    compiled byte path when a build for these sources is cached, else plain Python)."""
    value = os.environ.get(MODE_ENV, "auto").strip().lower()
    return {"on": "on", "1": "on", "off": "off", "0": "off"}.get(value, "auto")


def exec_on_native(argv: list[str], cache_dir: Path | None = None, root: Path | None = None) -> None:
    """Replace this process with `tokenyard <argv>` importing the compiled packages first
    (same pid, so signals and supervisors see one process; returns only by raising
    NativeBuildError or OSError). `root`: a build already found (else built now if needed)."""
    command, env = BUILD.child_command(root or build(cache_dir, quiet=False), ROOT_ENV, argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, env)


def main(argv: list[str] | None = None) -> int:
    return BUILD.main("router.native", argv)


if __name__ == "__main__":
    sys.exit(main())
