"""The router's byte path compiled with mypyc: the HTTP server and the engine client.

`tokenyard/asgi_server.py` (the front door's HTTP/1.1 server) and `router/proxy.py` (the
keep-alive engine client) are fully typed Python; mypyc compiles them to C extension
modules. Measured in instructions per request (bench/router_instructions.py, docs/benchmarks.md
"Router data path"): 11-14% fewer per non-streaming request through the router. Everything
else (the decision layer, the request path in router/app.py) stays plain Python.

`build()` copies the `router` and `tokenyard` packages into a cache folder keyed by the
SHA-256 of their sources, the Python and the mypy version, compiles the two modules there,
and returns that folder; `tokenyard router --native` then replaces its own process
(`os.execve`, same pid, so signals and supervisors see one process) with one that has the
folder first on the import path. The plain modules remain the reference and the fallback:
nothing in the source tree changes, and an edit changes the key, so a stale build can
never shadow edited code.

    python -m router.native build        # build (or find) it; prints the folder
    tokenyard router --config r.yaml --native

Needs a C compiler and the Python headers (what building any C extension needs).
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

COMPILED = ("tokenyard/asgi_server.py", "router/proxy.py")
PACKAGES = ("router", "tokenyard")
REPO_ROOT = Path(__file__).resolve().parents[1]
ROOT_ENV = "TOKENYARD_ROUTER_NATIVE_ROOT"  # set in the process re-run on the compiled modules


class NativeBuildError(RuntimeError):
    """The compiled modules could not be built; the message says why and what to do."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tokenyard" / "router-native"


def build_key() -> str:
    """SHA-256 over every module of the copied packages, the Python and the mypy version."""
    import mypy.version

    digest = hashlib.sha256()
    digest.update(f"{sys.version}|{mypy.version.__version__}".encode())
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            digest.update(str(path.relative_to(REPO_ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:20]


def compiled_in(root: Path) -> bool:
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    return all((root / (name[:-3] + suffix)).is_file() for name in COMPILED)


def build(cache_dir: Path | None = None, *, quiet: bool = True) -> Path:
    """The folder holding the compiled packages for the current sources (built now if not
    already there). Raises NativeBuildError if mypyc or the C compiler fails."""
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
        for package in PACKAGES:
            shutil.copytree(REPO_ROOT / package, work / package, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        config = work / "mypy.ini"
        config.write_text("[mypy]\nignore_missing_imports = True\nfollow_imports = silent\n")
        command = [sys.executable, "-m", "mypyc", "--config-file", str(config), *COMPILED]
        done = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=600)
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
    except subprocess.TimeoutExpired:
        raise NativeBuildError(f"mypyc did not finish compiling {', '.join(COMPILED)} within 600 s") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not quiet:
        print(f"compiled {', '.join(COMPILED)} into {root}", file=sys.stderr)
    return root


def active() -> bool:
    """Whether this process runs the compiled byte path."""
    import router.proxy
    import tokenyard.asgi_server

    return not any(str(module.__file__).endswith(".py") for module in (router.proxy, tokenyard.asgi_server))


def exec_on_native(argv: list[str], cache_dir: Path | None = None) -> None:
    """Replace this process with `tokenyard <argv>` importing the compiled packages first
    (returns only by raising NativeBuildError or OSError)."""
    root = build(cache_dir, quiet=False)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    env[ROOT_ENV] = str(root)
    code = "import sys; from cli.main import main; sys.exit(main(sys.argv[1:]))"
    sys.stdout.flush()
    sys.stderr.flush()
    # -P: no current directory on the path, so a `router` folder there cannot shadow the build.
    os.execve(sys.executable, [sys.executable, "-P", "-c", code, *argv], env)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args != ["build"]:
        print("usage: python -m router.native build", file=sys.stderr)
        return 2
    try:
        print(build(quiet=False))
    except NativeBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
