"""The simulator's hot modules compiled with mypyc: same source, about 1.5x faster.

`sim/kv_cache.py`, `sim/engine_types.py`, `sim/engine_fast.py`, `sim/engine_core.py`,
`sim/sim_instance.py` and `sim/simulator.py` are fully typed Python;
mypyc (part of mypy) compiles them to C extension modules. `build()` (tokenyard/native_build.py) copies the `sim` package into a
cache folder keyed by the sources' SHA-256, the Python version and the mypy version,
compiles the modules there and returns that folder; putting it first on the import path makes
`import sim` load the compiled package (the other `sim` modules stay plain Python, and
`scheduler/` is imported from the installed project as always). Nothing in the source
tree changes, so a stale build can never shadow an edited file: an edit changes the key.

    python -m sim.native build          # build (or find) it; prints the folder
    tokenyard sim run ... --native      # the same command, run on the compiled modules

Needs a C compiler and the Python headers (what building any C extension needs). Used by
`tokenyard sim --native` and `bench/sim_speed.py --native`; tests/test_sim_native.py
checks that it gives the records the plain modules give. The plain modules remain the
reference: the emulated engine, the router and the test suite import them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tokenyard.native_build import NativeBuild
from tokenyard.native_build import NativeBuildError as NativeBuildError  # raised by build()

COMPILED = (
    "kv_cache.py", "engine_types.py", "engine_fast.py", "engine_core.py", "sim_instance.py", "simulator.py",
)
ROOT_ENV = "TOKENYARD_NATIVE_ROOT"  # set in a process re-run on the compiled modules
BUILD = NativeBuild(packages=("sim",), compiled=tuple(f"sim/{name}" for name in COMPILED), cache_name="native")


# The module's interface is the build's: `build(cache_dir=None, *, quiet=True)` returns the
# folder holding the compiled modules for the current sources, built now if not there
# (NativeBuildError says why it could not be).
default_cache_dir = BUILD.default_cache_dir
build_key = BUILD.key
compiled_in = BUILD.compiled_in
build = BUILD.build

def active() -> bool:
    """Whether this process runs the compiled modules."""
    import sim.engine_core

    return not str(sim.engine_core.__file__).endswith(".py")


def reexec_on_native(argv: list[str], cache_dir: Path | None = None) -> int:
    """Run `tokenyard <argv>` in a child process that imports the compiled `sim` first;
    returns its exit status."""
    command, env = BUILD.child_command(build(cache_dir, quiet=False), ROOT_ENV, argv)
    return subprocess.run(command, env=env).returncode


def main(argv: list[str] | None = None) -> int:
    return BUILD.main("sim.native", argv)


if __name__ == "__main__":
    sys.exit(main())
