"""`tokenyard completion bash|zsh`: a shell completion script generated from the whole
argparse tree (shtab), so it lists every subcommand and option there is."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    completion = subparsers.add_parser("completion", help="print a shell completion script (bash or zsh)")
    completion.add_argument("shell", choices=("bash", "zsh"))
    completion.set_defaults(handler=cmd_completion)


def cmd_completion(args: argparse.Namespace) -> int:
    import shtab

    from cli.main import build_parser

    print(shtab.complete(build_parser(), shell=args.shell))
    return 0
