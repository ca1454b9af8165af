"""The simulator's hot modules compiled with mypyc: same source, about 1.5x faster.

`sim/kv_cache.py`, `sim/engine_types.py`, `sim/engine_fast.py`, `sim/engine_core.py` and
`sim/simulator.py` are fully typed Python;
mypyc (part of mypy) compiles them to C extension modules. `build()` copies the `sim` package into a cache
folder keyed by the sources' SHA-256, the Python version and the mypy version, compiles
the modules there and returns that folder; putting it first on the import path makes
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

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

COMPILED = ("kv_cache.py", "engine_types.py", "engine_fast.py", "engine_core.py", "simulator.py")
SIM_DIR = Path(__file__).resolve().parent
ROOT_ENV = "TOKENYARD_NATIVE_ROOT"  # set in a process re-run on the compiled modules


class NativeBuildError(RuntimeError):
    """The compiled modules could not be built; the message says why and what to do."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tokenyard" / "native"


def build_key() -> str:
    """SHA-256 over every `sim` module's source, the Python and the mypy version."""
    import mypy.version

    digest = hashlib.sha256()
    digest.update(f"{sys.version}|{mypy.version.__version__}".encode())
    for path in sorted(SIM_DIR.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:20]


def compiled_in(root: Path) -> bool:
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    return all((root / "sim" / (name[:-3] + suffix)).is_file() for name in COMPILED)


def build(cache_dir: Path | None = None, *, quiet: bool = True) -> Path:
    """The folder holding the compiled `sim` package for the current sources (built now
    if not already there). Raises NativeBuildError if mypyc or the C compiler fails."""
    try:
        key = build_key()
    except ImportError as exc:
        raise NativeBuildError(f"mypyc is not installed ({exc}); pip install mypy") from None
    cache_dir = cache_dir or default_cache_dir()
    root = cache_dir / key
    if compiled_in(root):
        return root
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=cache_dir))
    except OSError as exc:
        raise NativeBuildError(f"cannot create the build folder in {cache_dir}: {exc.strerror or exc}; "
                               "set XDG_CACHE_HOME to a writable folder") from None
    try:
        shutil.copytree(SIM_DIR, work / "sim", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        config = work / "mypy.ini"
        config.write_text("[mypy]\nignore_missing_imports = True\nfollow_imports = silent\n")
        command = [sys.executable, "-m", "mypyc", "--config-file", str(config),
                   *(f"sim/{name}" for name in COMPILED)]
        done = subprocess.run(command, cwd=work, capture_output=True, text=True)
        if done.returncode != 0 or not compiled_in(work):
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise NativeBuildError(
                f"mypyc could not compile {', '.join(COMPILED)} (exit {done.returncode}); it needs a C "
                f"compiler and the Python headers. Its last output:\n{tail}"
            )
        shutil.rmtree(work / "build", ignore_errors=True)
        try:
            work.rename(root)  # atomic: a concurrent build of the same key may have won
        except OSError:
            if not compiled_in(root):
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not quiet:
        print(f"compiled {', '.join(COMPILED)} into {root}", file=sys.stderr)
    return root


def active() -> bool:
    """Whether this process runs the compiled modules."""
    import sim.engine_core

    return not str(sim.engine_core.__file__).endswith(".py")


def reexec_on_native(argv: list[str], cache_dir: Path | None = None) -> int:
    """Run `tokenyard <argv>` in a child process that imports the compiled `sim` first;
    returns its exit status."""
    root = build(cache_dir, quiet=False)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    env[ROOT_ENV] = str(root)
    code = "import sys; from cli.main import main; sys.exit(main(sys.argv[1:]))"
    # -P: no current directory on the path, so a `sim` folder there cannot shadow the build.
    return subprocess.run([sys.executable, "-P", "-c", code, *argv], env=env).returncode


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args != ["build"]:
        print("usage: python -m sim.native build", file=sys.stderr)
        return 2
    try:
        print(build(quiet=False))
    except NativeBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
