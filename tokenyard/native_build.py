"""Build a few fully typed modules with mypyc into a cache folder, for `sim/native.py` (the
simulator's hot modules) and `router/native.py` (the router's byte path).

A build copies the named packages into a folder of the cache keyed by the SHA-256 of their
sources, the Python and the mypy version, compiles the listed modules there and returns
that folder. Putting it first on the import path makes the packages load compiled; nothing
in the source tree changes, and an edit changes the key, so a stale build can never shadow
edited code. The folder appears by one rename, so a failed or concurrent build leaves no
half-built folder under the key.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


class NativeBuildError(RuntimeError):
    """The compiled modules could not be built; the message says why and what to do."""


@dataclass(frozen=True)
class NativeBuild:
    """What one compiled build holds: `packages` copied whole from the project, `compiled`
    the modules (paths relative to the project root) mypyc turns into C extensions."""

    packages: tuple[str, ...]
    compiled: tuple[str, ...]
    cache_name: str  # the folder under $XDG_CACHE_HOME/tokenyard
    timeout_s: float = 600.0
    # How mypyc treats modules outside `compiled`: "silent" analyses them (their types
    # check the calls into them); "skip" takes them as untyped. The router's request path
    # imports most of the project and its typed dependencies, whose analysis took mypyc
    # over 7 CPU minutes on the 2-core box, against about 40 s with "skip" (issue #17).
    follow_imports: str = "silent"
    # Packages analysed ("silent") even when `follow_imports` is "skip": those whose classes a
    # compiled module subclasses. mypyc lays a class over an unanalysed (Any) base out as a
    # native class with no room for the base's instance `__dict__`, yet the type inherits the
    # base's `__dictoffset__`: attribute lookups then read a slot of the object as the dict
    # (`SystemError: Objects/dictobject.c:1778: bad argument to internal function`, or a
    # segfault), mypyc/mypyc#1200. Found in issue #17, stop 24, with `LoopMetrics(Collector)`.
    followed: tuple[str, ...] = ()

    def default_cache_dir(self) -> Path:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(base) / "tokenyard" / self.cache_name

    def key(self) -> str:
        """SHA-256 over every module of the copied packages, the Python and the mypy version."""
        import mypy.version

        digest = hashlib.sha256()
        digest.update(f"{sys.version}|{mypy.version.__version__}".encode())
        for package in self.packages:
            for path in sorted((REPO_ROOT / package).rglob("*.py")):
                digest.update(str(path.relative_to(REPO_ROOT)).encode())
                digest.update(path.read_bytes())
        return digest.hexdigest()[:20]

    def compiled_in(self, root: Path) -> bool:
        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
        return all((root / (name[:-3] + suffix)).is_file() for name in self.compiled)

    def build(self, cache_dir: Path | None = None, *, quiet: bool = True) -> Path:
        """The folder holding the compiled packages for the current sources (built now if
        not already there). Raises NativeBuildError if mypyc or the C compiler fails."""
        try:
            key = self.key()
        except ImportError as exc:
            raise NativeBuildError(f"mypyc is not installed ({exc}); pip install mypy") from None
        cache_dir = cache_dir or self.default_cache_dir()
        root = cache_dir / key
        if self.compiled_in(root):
            return root
        names = ", ".join(self.compiled)
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=cache_dir))
        except OSError as exc:
            raise NativeBuildError(f"cannot create the build folder in {cache_dir}: {exc.strerror or exc}; "
                                   "set XDG_CACHE_HOME to a writable folder") from None
        try:
            for package in self.packages:
                shutil.copytree(REPO_ROOT / package, work / package,
                                ignore=shutil.ignore_patterns("__pycache__", "*.so"))
            config = work / "mypy.ini"
            # disallow_subclassing_any: a compiled class over an unanalysed base (above) fails
            # the build with mypy's "Class cannot subclass ... (has type Any)", naming the class,
            # instead of building a module that crashes when used.
            sections = "".join(f"[mypy-{name},{name}.*]\nfollow_imports = silent\n" for name in self.followed)
            config.write_text(f"[mypy]\nignore_missing_imports = True\nfollow_imports = {self.follow_imports}\n"
                              f"disallow_subclassing_any = True\n{sections}")
            command = [sys.executable, "-m", "mypyc", "--config-file", str(config), *self.compiled]
            done = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=self.timeout_s)
            if done.returncode != 0 or not self.compiled_in(work):
                lines = (done.stdout + done.stderr).strip().splitlines()
                tail = "\n".join(lines[-15:])
                typed = [line for line in lines if ": error: " in line and line.split(":", 1)[0].endswith(".py")]
                why = ("mypy's analysis refused the sources (first error: " + typed[0] + ")" if typed else
                       "it needs a C compiler and the Python headers")
                raise NativeBuildError(
                    f"mypyc could not compile {names} (exit {done.returncode}); {why}. Its last output:\n{tail}"
                )
            shutil.rmtree(work / "build", ignore_errors=True)
            try:
                work.rename(root)  # atomic: a concurrent build of the same key may have won
            except OSError:
                if not self.compiled_in(root):
                    raise
        except subprocess.TimeoutExpired:
            raise NativeBuildError(f"mypyc did not finish compiling {names} within {self.timeout_s:g} s") from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if not quiet:
            print(f"compiled {names} into {root}", file=sys.stderr)
        return root

    def child_command(self, root: Path, root_env: str, argv: list[str]) -> tuple[list[str], dict[str, str]]:
        """The command line and environment of `tokenyard <argv>` importing the build at
        `root` first (`root_env` names it for the child)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
        env[root_env] = str(root)
        code = "import sys; from cli.main import main; sys.exit(main(sys.argv[1:]))"
        # -P: no current directory on the path, so a package folder there cannot shadow the build.
        return [sys.executable, "-P", "-c", code, *argv], env

    def main(self, module: str, argv: list[str] | None = None) -> int:
        """`python -m <module> build`: build (or find) it and print the folder."""
        args = list(sys.argv[1:] if argv is None else argv)
        if args != ["build"]:
            print(f"usage: python -m {module} build", file=sys.stderr)
            return 2
        try:
            print(self.build(quiet=False))
        except NativeBuildError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
