"""`tokenyard train MODEL ...`: one subcommand per learned model.

Each module in TRAINERS exposes `register_train(subparsers)`, which adds `tokenyard train
<name>` with `set_defaults(handler=fn)`. Heavy imports stay inside the handlers."""

from __future__ import annotations

import argparse
import importlib
from typing import Any

TRAINERS: tuple[str, ...] = (
    "learn.rank_cli",  # tokenyard train rank
    "learn.tier_cli",  # tokenyard train tier
)


def register(subparsers: Any) -> None:
    train = subparsers.add_parser(
        "train", help="train a learned model from data files",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    models = train.add_subparsers(dest="train_model", metavar="MODEL")
    for name in TRAINERS:
        importlib.import_module(name).register_train(models)
    train.set_defaults(handler=lambda args: (train.print_help(), 2)[1])
