"""What `tokenyard plan`'s command line (sim/plan_cli.py) and its trace/histogram pipeline
(sim/plan_run.py) share: the exit codes, the usage error, the flag-value parsers, the
document loader and the output writer. It sits below both so neither imports the other."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

EXIT_BAD_INPUT = 2
EXIT_NOT_VERIFIED = 3


class UsageError(ValueError):
    """A bad flag value: the message names the flag and what was expected."""


def parse_pairs(text: str | None, option: str, kind: Callable[[str], Any]) -> dict[str, Any]:
    """`NAME=VALUE,NAME=VALUE` as a dict."""
    out: dict[str, Any] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"{option}: expected NAME=VALUE[,NAME=VALUE], got {part!r}")
        try:
            out[name.strip()] = kind(value.strip())
        except ValueError:
            raise UsageError(f"{option}: bad value {value!r} for {name.strip()!r}") from None
    return out


def parse_numbers(text: str, option: str, kind: Callable[[str], Any] = float) -> list[Any]:
    """`N,N,...` as a list of `kind`."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{option}: expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise UsageError(f"{option}: expected at least one number")
    return values


def parse_slo_classes(specs: list[str] | None) -> dict[str, Any]:
    """Repeated `--slo CLASS=TTFT_MS:TPOT_MS` as SLO classes (none: the built-in ones)."""
    from scheduler.types import SloClass
    from tokenyard.config import DEFAULT_SLO_CLASSES

    if not specs:
        return dict(DEFAULT_SLO_CLASSES)
    out = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        ttft, sep2, tpot = rest.partition(":")
        try:
            ttft_ms, tpot_ms = float(ttft), float(tpot)
        except ValueError:
            raise UsageError(f"--slo: expected CLASS=TTFT_MS:TPOT_MS (e.g. default=1000:100), got {spec!r}") from None
        if not (sep and sep2 and name) or ttft_ms <= 0 or tpot_ms <= 0:
            raise UsageError(f"--slo: expected CLASS=TTFT_MS:TPOT_MS with positive numbers, got {spec!r}")
        out[name] = SloClass(name, ttft_ms, tpot_ms)
    return out


class NativeStdoutToStderr:
    """While solving, the C-level stdout goes to stderr: HiGHS 1.12 prints a stray debug line
    ("HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();") to stdout
    whatever its output options (ERGO-Code/HiGHS#2783), which would corrupt `--json`.
    `restore()` (called before printing the result) puts stdout back."""

    def __init__(self) -> None:
        self.saved: int | None = None

    def __enter__(self) -> NativeStdoutToStderr:
        try:
            sys.stdout.flush()
            self.saved = os.dup(1)
            os.dup2(2, 1)
        except OSError:  # no usable fds (embedded use): leave stdout alone
            self.saved = None
        return self

    def restore(self) -> None:
        if self.saved is not None:
            sys.stdout.flush()
            os.dup2(self.saved, 1)
            os.close(self.saved)
            self.saved = None

    def __exit__(self, *exc: object) -> None:
        self.restore()


def emit(args: argparse.Namespace, doc: Mapping[str, Any], text: str) -> None:
    """Print the result (JSON with --json, else `text`) on the real stdout; write --out too."""
    redirect = getattr(args, "stdout_redirect", None)
    if redirect is not None:
        redirect.restore()
    if args.out:
        from sim.report import write_json

        write_json(doc, args.out)
    print(json.dumps(doc, indent=2) if args.json else text)


def load_doc(path: str) -> Any:
    """A JSON or YAML file, with a usage error naming the file (and line) when it is bad."""
    from tokenyard.config import load_yaml

    if path.endswith(".json"):
        try:
            return json.loads(Path(path).read_text())
        except OSError as exc:
            raise UsageError(f"{path}: cannot read: {exc.strerror or exc}") from None
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    return load_yaml(path)  # YAML is a superset of JSON
