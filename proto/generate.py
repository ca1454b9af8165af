"""Regenerate the Python gRPC stubs in tokenyard/v1 from proto/tokenyard/v1/*.proto.

    python proto/generate.py            # rewrite tokenyard/v1/*_pb2.py, *_pb2_grpc.py, *_pb2.pyi
    python proto/generate.py --check    # exit 1, listing the stale or missing stubs

The stubs are committed, so that installing Tokenyard needs no code generator. They are
byte-stable only for one grpcio-tools version: pyproject.toml pins it exactly in the
`dev` extra. `--root` points at another checkout (the tests use a temporary copy).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path("tokenyard") / "v1"  # the .proto package path, and where the stubs live
STUB_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


def proto_files(root: Path) -> list[Path]:
    """The .proto files under root/proto/tokenyard/v1, relative to root/proto."""
    proto_dir = root / "proto"
    found = sorted((proto_dir / PACKAGE).glob("*.proto"))
    if not found:
        raise SystemExit(f"generate.py: no .proto files in {proto_dir / PACKAGE}")
    return [path.relative_to(proto_dir) for path in found]


def stub_names(dir_path: Path) -> set[str]:
    return {p.name for p in dir_path.iterdir() if p.is_file() and p.name.endswith(STUB_SUFFIXES)}


def run_protoc(root: Path, out_dir: Path) -> None:
    """Generate the stubs for root's .proto files into out_dir/tokenyard/v1."""
    # Imported here: grpc_tools is a dev dependency, and `--help` should work without it.
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    protos = proto_files(root)
    args = [
        "grpc_tools.protoc",
        f"-I{root / 'proto'}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--pyi_out={out_dir}",
        *[str(p) for p in protos],
    ]
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"generate.py: protoc failed with exit code {code} (its message is above)")


def generate(root: Path) -> list[str]:
    """Regenerate root/tokenyard/v1 in place; return the stub files written."""
    target = root / PACKAGE
    with tempfile.TemporaryDirectory(prefix="tokenyard-stubs-") as tmp:
        out = Path(tmp)
        run_protoc(root, out)
        fresh = stub_names(out / PACKAGE)
        target.mkdir(parents=True, exist_ok=True)
        # Stubs of a .proto that was removed would otherwise linger and still import.
        for name in stub_names(target) - fresh:
            (target / name).unlink()
        for name in sorted(fresh):
            shutil.copyfile(out / PACKAGE / name, target / name)
    return sorted(fresh)


def check(root: Path) -> list[str]:
    """Problems of the committed stubs against freshly generated ones (empty: up to date)."""
    target = root / PACKAGE
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tokenyard-stubs-") as tmp:
        out = Path(tmp)
        run_protoc(root, out)
        fresh = stub_names(out / PACKAGE)
        committed = stub_names(target) if target.is_dir() else set()
        for name in sorted(fresh):
            path = target / name
            if name not in committed:
                problems.append(f"missing: {path}")
            elif not filecmp.cmp(out / PACKAGE / name, path, shallow=False):
                problems.append(f"stale: {path}")
        for name in sorted(committed - fresh):
            problems.append(f"no .proto generates it: {target / name}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--check",
        action="store_true",
        help="generate into a temporary folder and compare with the committed stubs; "
        "exit 1 listing the stale or missing files",
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=REPO_ROOT,
        help="repository root holding proto/ and tokenyard/v1/ (default: this checkout)",
    )
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if args.check:
        problems = check(root)
        if problems:
            print("gRPC stubs are out of date with proto/ (run: python proto/generate.py):", file=sys.stderr)
            for line in problems:
                print(f"  {line}", file=sys.stderr)
            return 1
        print(f"gRPC stubs in {root / PACKAGE} are up to date")
        return 0
    written = generate(root)
    print(f"wrote {len(written)} files to {root / PACKAGE}: {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
