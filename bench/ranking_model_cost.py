"""Two rank model files, the same scoring code: `score()`'s CPU time per request for each, in
one process pinned to one core, calls interleaved (the cost of a model change, apart from
the code's).

    git show 165d134:scheduler/predictors/default_rank.json.gz > /tmp/old_rank.json.gz
    nice -n 10 python bench/ranking_model_cost.py /tmp/old_rank.json.gz scheduler/predictors/default_rank.json.gz
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scheduler.predictors.rank import load_rank_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA_DEFAULT = Path(os.environ.get("TOKENYARD_SHARED_DATA", ROOT.parent / "shared" / "data"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--data", type=Path, default=SHARED_DATA_DEFAULT)
    parser.add_argument("--samples", type=int, default=600)
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    models = {"a": load_rank_model(args.a), "b": load_rank_model(args.b)}
    texts = ["What is the capital of France?",
             "Write a detailed, 800-word blog post about a trip to Japan, with headings and tips. " * 3]
    path = args.data / "lengths" / "alpaca_eval" / "model_outputs" / "gpt4_1106_preview" / "model_outputs.json"
    if path.is_file():
        answers = [a["output"] for a in json.loads(path.read_text(encoding="utf-8"))]
        texts.append("Summarise the following answer in three bullets.\n\n"
                     + next(a for a in answers if a.isascii() and 1400 < len(a) < 1800))
    print(f"box load average at start: {' / '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for text in texts:
        record: dict[str, Any] = {"messages": [{"role": "user", "content": text}], "model": "llama-3-8b", "max_tokens": 512}
        times: dict[str, list[float]] = {"a": [], "b": []}
        for i in range(args.samples):
            for name in ("ab" if i % 2 else "ba"):
                c0 = time.thread_time_ns()
                models[name].score(record)
                times[name].append((time.thread_time_ns() - c0) / 1000)
        (a50, a99), (b50, b99) = (np.percentile(times[n], [50, 99]) for n in "ab")
        print(f"{len(text):>5} chars: a p50 {a50:.0f} us p99 {a99:.0f} us; b p50 {b50:.0f} us p99 {b99:.0f} us; "
              f"b / a {b50 / a50:.2f}x / {b99 / a99:.2f}x")
    print(f"box load average at end: {' / '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
