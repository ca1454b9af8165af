"""`tokenyard config check|migrate FILE`: validate a router or cluster file, or convert one
in the older dialect (`policies:` + `dispatch:` for routers, `dispatch:` + `queue:` for
clusters) into the policy-document form (`policy:`), with the meaning it had.

    tokenyard config check router.yaml
    tokenyard config migrate router.yaml --out router.v2.yaml     # stdout without --out

A file with `pools:` is a cluster file (`tokenyard sim`), any other a router file. The
converted file is written only after it validated, through a temporary file renamed into
place; YAML comments of the original are not carried over.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

EXIT_BAD_INPUT = 2


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("config", help="check router/cluster files, or convert them to the policy document",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="config_command", metavar="COMMAND", required=True)
    check = sub.add_parser("check", help="validate a router or cluster YAML file")
    check.add_argument("file")
    check.set_defaults(handler=run_check)
    migrate = sub.add_parser("migrate", help="print (or write) the file with its decision settings as `policy:`")
    migrate.add_argument("file")
    migrate.add_argument("--out", default=None, help="write here instead of stdout (never over FILE itself)")
    migrate.set_defaults(handler=run_migrate)


def _load(path: str) -> tuple[str, dict[str, Any], Any]:
    """(kind, raw mapping, validated config) of a router or cluster file."""
    from tokenyard.config import load_yaml

    raw = load_yaml(path)
    if "pools" in raw:
        from sim.cluster import load_cluster

        return "cluster", raw, load_cluster(path)
    from router.config import load_router_config

    return "router", raw, load_router_config(path)


def migrated(kind: str, raw: dict[str, Any], config: Any) -> dict[str, Any]:
    """`raw` with the older dialect's keys replaced by the equivalent `policy:` document."""
    old_tiers = kind == "router" and raw.get("tiers") is not None  # the older top-level tier section
    if raw.get("policy") is not None and not old_tiers:
        return raw  # already in the policy-document form
    if kind == "cluster":
        document = config.document()
        dropped: tuple[str, ...] = ("dispatch", "queue", "slo_classes")
    else:
        document = config.policy  # the top-level `tiers:` already converted into it
        dropped = ("slo_classes", "policies", "dispatch", "tiers")
    out = {key: value for key, value in raw.items() if key not in dropped}
    out["policy"] = document.to_dict(minimal=True)
    return out


def run_check(args: argparse.Namespace) -> int:
    from tokenyard.config import ConfigError

    try:
        kind, raw, _ = _load(args.file)
    except ConfigError as exc:
        print(f"tokenyard config check: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    dialect = "policy document" if raw.get("policy") is not None else "older dialect (run `tokenyard config migrate`)"
    print(f"{args.file}: a valid {kind} file ({dialect})")
    return 0


def run_migrate(args: argparse.Namespace) -> int:
    import yaml

    from tokenyard.config import ConfigError

    try:
        kind, raw, config = _load(args.file)
        doc = migrated(kind, raw, config)
        text = yaml.safe_dump(doc, sort_keys=False)
        # The converted file must load to the same decisions: validate it before writing.
        base = Path(args.file).resolve().parent
        if kind == "cluster":
            from sim.cluster import parse_cluster

            parse_cluster(yaml.safe_load(text), f"{args.file} (migrated)", base_dir=base)
        else:
            from router.config import parse_router_config

            parse_router_config(yaml.safe_load(text), f"{args.file} (migrated)", base_dir=base)
    except ConfigError as exc:
        print(f"tokenyard config migrate: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.out is None:
        sys.stdout.write(text)
        return 0
    out = Path(args.out)
    if out.resolve() == Path(args.file).resolve():
        print("tokenyard config migrate: --out: refusing to overwrite the file being migrated", file=sys.stderr)
        return EXIT_BAD_INPUT
    if out.is_dir():
        print(f"tokenyard config migrate: --out {out}: is a folder; expected a file path", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        fd, tmp = tempfile.mkstemp(dir=out.resolve().parent, prefix=f".{out.name}.", suffix=".tmp")
    except OSError as exc:
        print(f"tokenyard config migrate: --out {out}: cannot write there ({exc.strerror or exc}); expected a "
              "file in an existing, writable folder", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    print(f"wrote {out} ({kind} file, decision settings under `policy:`)")
    return 0
