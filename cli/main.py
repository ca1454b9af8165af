"""The `tokenyard` command: one argparse tree; each subcommand lives in its own module.

Every module listed in `SUBCOMMAND_MODULES` exposes `register(subparsers)`, which adds its
subcommand(s) with `set_defaults(handler=fn)`; `fn(args) -> int` is the exit code. Modules
keep heavy imports inside their handlers so that `tokenyard --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from tokenyard import __version__
from tokenyard.logs import configure_logging

SUBCOMMAND_MODULES: tuple[str, ...] = (
    "sim.cli_engine",  # tokenyard engine
    "sim.calibrate",  # tokenyard model predict, tokenyard calibrate
    "sim.cli",  # tokenyard sim run|compare|sweep
    "router.cli",  # tokenyard router
    "cli.up",  # tokenyard up
    "learn.cli",  # tokenyard train rank|tier
    "cli.config_cmd",  # tokenyard config check|migrate
    "sim.plan_cli",  # tokenyard plan [apply]
    "learn.tier_cli",  # tokenyard tier score
    "learn.rank_cli",  # tokenyard rank score
    "cli.admin",  # tokenyard policy|instances|keys|context
    "cli.completion",  # tokenyard completion bash|zsh
    "router.controlplane_cli",  # tokenyard controlplane
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's default-appending formatter, without its noise: no "(default: None)" or
    "(default: False)", and nothing appended to a help text that already names its
    default (it wrote "(default: --model) (default: None)")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text.lower() or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


def _use_help_formatter(parser: argparse.ArgumentParser) -> None:
    formatter = parser.formatter_class
    if isinstance(formatter, type) and issubclass(formatter, argparse.ArgumentDefaultsHelpFormatter):
        parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _use_help_formatter(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenyard",
        description="Control plane for LLM serving fleets: route, schedule, migrate, size, simulate.",
    )
    parser.add_argument("--version", action="version", version=f"tokenyard {__version__}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="text", choices=["json", "text"],
                        help="structured JSON lines, or plain text for a terminal (default: text)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    _use_help_formatter(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to re-run the same command (sim --native)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    configure_logging(args.log_level, args.log_format)
    try:
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
