"""The ranker's multi-string scan: the hand-written one (`scheduler.predictors.substrings`
up to issue 11 stop 23, kept below) against Aho-Corasick libraries from PyPI, on the real
call: the same needles (`features._NEEDLES`, brevity keys' positions kept), the lowercased
UTF-8 instructions that `request_features` passes to `_SCAN.scan`, built from the prompts
in ../shared/data, in one process, thread CPU time, as ratios.

    nice -n 10 python bench/substring_scan.py --data ../shared/data [--rounds 15] [--repeat 10]

Implementations (each gives `scan(data) -> (counts, kept)` with the same results, checked
on every text before timing):

- `handwritten`: the hand-written scan shipped up to stop 23 (the baseline of the ratios);
- `pyahocorasick`: `ahocorasick.Automaton` (C; this build searches `str`, so the UTF-8 bytes
  are decoded as latin-1, one character per byte, to keep byte offsets), then the same
  per-needle non-overlapping count as `bytes.count`;
- `pyahocorasick-str`: the same automaton on the lowercased `str` itself (no decode; offsets
  are then characters, so it is not a drop-in for a non-ASCII text: shown as the library's
  lower bound);
- `ahocorasick_rs (shipped)`: `BytesAhoCorasick` (Rust), overlapping matches as indexes, the
  same count: `scheduler.predictors.substrings.SubstringScan` since stop 24.

Two measurements: the scan alone (each text `--repeat` times in a row per round, rounds
interleaved across implementations in rotating order), and `request_features` itself with
`features._SCAN` replaced by each implementation (the whole per-request feature cost, which
is what a router worker pays). Texts are grouped by UTF-8 length: < 256 bytes (the scan's
short path), 256-1,023, and >= 1,024 (the real prompts are short; the long group wraps real
AlpacaEval answers in a "Summarise the following answer" prompt, as bench/ranking.py does).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scheduler.predictors import features  # noqa: E402
from scheduler.predictors.substrings import SubstringScan  # noqa: E402

# ---------------------------------------------------------------- the hand-written scan
# `scheduler.predictors.substrings.SubstringScan` up to issue 11 stop 23 (main 165d134),
# kept here as the baseline: each needle anchored on a 4-byte window, the text's 4-byte
# windows hashed with numpy, candidates confirmed with `bytes.startswith`.
# below this many bytes one `bytes.count` per needle costs less than the numpy pass's fixed
# cost (~48 needles x ~0.1 us against ~6 numpy calls; issue 11, stop 23)
SHORT_BYTES = 256
_HASH_MULTIPLIER = 0x9E3779B1  # Knuth's multiplicative hash; its high bits index the table
_SLOT_MASK = 0xFFFFFFFF
# 2^14 slots: a 16 KiB table stays in L1 (a 64 KiB one did not, and each position reads a
# random slot); ~50 anchors leave ~0.3% of positions as false candidates
_SLOT_BITS = 14
# English letters, most frequent first, and the space: an anchor avoids them where it can
# (a rare anchor makes few candidates; any anchor finds every occurrence)
_COMMON = " etaoinshrdlcumwfgypbvkjxqz"


def _slot(window: int) -> int:
    return ((window * _HASH_MULTIPLIER) & _SLOT_MASK) >> (32 - _SLOT_BITS)


def _anchor(needle: bytes) -> int:
    """The offset of the needle's 4-byte window with the rarest characters."""
    def commonness(k: int) -> int:
        return sum(len(_COMMON) - _COMMON.find(chr(b)) if chr(b) in _COMMON else 0 for b in needle[k:k + 4])

    return min(range(len(needle) - 3), key=commonness)


class HandWrittenScan:
    """Counts the occurrences of each of `needles` (lowercase ASCII, distinct) in a byte string.

    `scan(data)` gives each needle's `data.count(needle)` and the (needle, position) of every
    occurrence of the needles named in `keep_positions`, in ascending position."""

    __slots__ = ("needles", "_table", "_slots", "_short", "_keep", "_any")

    def __init__(self, needles: Sequence[bytes], keep_positions: Sequence[int] = ()) -> None:
        if len(set(needles)) != len(needles) or not all(n.isascii() and n for n in needles):
            raise ValueError("HandWrittenScan: needles must be distinct, non-empty ASCII byte strings")
        self.needles = tuple(needles)
        self._keep = frozenset(keep_positions)
        self._any = re.compile(b"|".join(map(re.escape, self.needles)))
        self._table = np.zeros(1 << _SLOT_BITS, dtype=np.bool_)
        # slot -> (needle number, anchor offset, needle, keep its positions)
        self._slots: dict[int, list[tuple[int, int, bytes, bool]]] = {}
        self._short: list[int] = []
        for i, needle in enumerate(self.needles):
            if len(needle) < 4:
                self._short.append(i)
                continue
            k = _anchor(needle)
            slot = _slot(int.from_bytes(needle[k:k + 4], "little"))
            self._table[slot] = True
            self._slots.setdefault(slot, []).append((i, k, needle, i in self._keep))

    def scan(self, data: bytes) -> tuple[list[int], list[tuple[int, int]]]:
        if len(data) < SHORT_BYTES:
            if self._any.search(data) is None:  # one C call; most short texts hold none
                return [0] * len(self.needles), []
            return self._scan_each(data, range(len(self.needles)))
        counts, kept = self._scan_each(data, self._short)
        windows = np.ndarray((len(data) - 3,), dtype="<u4", buffer=data, strides=(1,))
        slots = windows * np.uint32(_HASH_MULTIPLIER)
        slots >>= 32 - _SLOT_BITS
        candidates = np.flatnonzero(self._table.take(slots))
        if len(candidates):
            free_from = [0] * len(self.needles)  # where a next non-overlapping occurrence may start
            table = self._slots
            for at, slot in zip(candidates.tolist(), slots.take(candidates).tolist(), strict=True):
                for i, k, needle, keep in table[slot]:
                    start = at - k
                    if start >= 0 and data.startswith(needle, start):
                        if keep:
                            kept.append((i, start))
                        if start >= free_from[i]:
                            counts[i] += 1
                            free_from[i] = start + len(needle)
        if self._short and kept:
            kept.sort(key=lambda hit: hit[1])
        return counts, kept

    def _scan_each(self, data: bytes, which: Sequence[int]) -> tuple[list[int], list[tuple[int, int]]]:
        """The plain way for the needles in `which`: `bytes.count` each, `bytes.find` the kept."""
        counts = [0] * len(self.needles)
        kept: list[tuple[int, int]] = []
        needles = self.needles
        for i in which:
            needle = needles[i]
            at = data.find(needle)  # not `in`: bytes' `in` tries the needle as an int first,
            if at < 0:  # and formats (then drops) a TypeError each time (~600 instructions)
                continue
            counts[i] = data.count(needle, at)
            if i in self._keep:
                while at >= 0:
                    kept.append((i, at))
                    at = data.find(needle, at + 1)
        if len(kept) > 1:
            kept.sort(key=lambda hit: hit[1])
        return counts, kept


# ---------------------------------------------------------------- the libraries

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA_DEFAULT = Path(os.environ.get("TOKENYARD_SHARED_DATA", ROOT.parent / "shared" / "data"))
BUCKETS = ((0, 256, "< 256 B"), (256, 1024, "256-1,023 B"), (1024, 1 << 30, ">= 1,024 B"))
Result = tuple[list[int], list[tuple[int, int]]]


class _CountMatches:
    """bytes.count semantics (non-overlapping, leftmost first, per needle) from a stream of
    every (needle, start) occurrence in ascending end position."""

    __slots__ = ("lengths", "keep", "n")

    def __init__(self, needles: Sequence[bytes], keep: frozenset[int]) -> None:
        self.lengths = [len(n) for n in needles]
        self.keep = keep
        self.n = len(needles)

    def counts(self, matches: Any) -> Result:
        counts = [0] * self.n
        free_from = [0] * self.n
        kept: list[tuple[int, int]] = []
        keep, lengths = self.keep, self.lengths
        for i, start in matches:
            if i in keep:
                kept.append((i, start))
            if start >= free_from[i]:
                counts[i] += 1
                free_from[i] = start + lengths[i]
        if len(kept) > 1:
            kept.sort(key=lambda hit: hit[1])
        return counts, kept


class PyAhoCorasick:
    """`ahocorasick.Automaton` (pyahocorasick, C). `str_input`: scan the `str` directly."""

    def __init__(self, needles: Sequence[bytes], keep: Sequence[int]) -> None:
        import ahocorasick

        self.automaton = ahocorasick.Automaton()
        for i, needle in enumerate(needles):
            self.automaton.add_word(needle.decode("ascii"), (i, len(needle) - 1))
        self.automaton.make_automaton()
        self.count = _CountMatches(needles, frozenset(keep))

    def scan(self, data: bytes) -> Result:
        return self.scan_str(data.decode("latin-1"))

    def scan_str(self, text: str) -> Result:
        return self.count.counts((i, end - back) for end, (i, back) in self.automaton.iter(text))


def prompts(data: Path, long_texts: int) -> list[dict[str, Any]]:
    """Request records: AlpacaEval's 805 instructions, GSM8K's 1,319 questions, MT-Bench's 80
    conversations (both turns), and `long_texts` real answers to summarise."""
    alpaca = data / "lengths" / "alpaca_eval"
    records: list[dict[str, Any]] = []
    with (alpaca / "derived_instructions.csv").open(encoding="utf-8", newline="") as fh:
        records += [{"prompt": row["instruction"]} for row in csv.DictReader(fh)]
    with (data / "routing" / "routellm" / "gsm8k" / "gsm8k_responses.csv").open(encoding="utf-8", newline="") as fh:
        records += [{"prompt": row["prompt"]} for row in csv.DictReader(fh)]
    for line in (data / "routing" / "routellm" / "mt_bench" / "question.jsonl").read_text(encoding="utf-8").splitlines():
        turns = json.loads(line)["turns"]
        records.append({"prompt": turns[0]})
        records.append({"messages": [{"role": "user", "content": turns[0]}, {"role": "assistant", "content": "..."},
                                     {"role": "user", "content": turns[1]}]})
    answers = json.loads((alpaca / "model_outputs" / "gpt4_1106_preview" / "model_outputs.json").read_text(encoding="utf-8"))
    longest = sorted((a["output"] for a in answers), key=len, reverse=True)[::3][:long_texts]
    records += [{"prompt": "Summarise the following answer in three bullets.\n\n" + a} for a in longest]
    for record in records:
        record["model"] = "llama-3-8b"
    return records


def scan_inputs(records: Sequence[dict[str, Any]]) -> list[bytes]:
    """What `request_features` passes to `_SCAN.scan` for each record."""
    seen: list[bytes] = []
    real = features._SCAN

    class Recorder:
        def scan(self, data: bytes) -> Result:
            seen.append(data)
            return real.scan(data)

    features._SCAN = Recorder()  # type: ignore[assignment]
    try:
        for record in records:
            features.request_features(record)
    finally:
        features._SCAN = real
    return seen


def _block_cpu_us(fn: Callable[[Any], Any], arg: Any, repeat: int) -> float:
    c0 = time.thread_time_ns()
    for _ in range(repeat):
        fn(arg)
    return (time.thread_time_ns() - c0) / repeat / 1000


def measure(impls: dict[str, Callable[[Any], Any]], args_of: dict[str, list[Any]], rounds: int, repeat: int) -> dict[str, np.ndarray]:
    """Per text, the median over rounds of the CPU time per call (us) of each implementation;
    within a round each text is run by every implementation in turn, in rotating order."""
    names = list(impls)
    n = len(next(iter(args_of.values())))
    times = {name: np.zeros((rounds, n)) for name in names}
    for r in range(rounds):
        for t in range(n):
            for k in range(len(names)):
                name = names[(r + t + k) % len(names)]
                times[name][r, t] = _block_cpu_us(impls[name], args_of[name][t], repeat)
    return {name: np.median(v, axis=0) for name, v in times.items()}


def _table(title: str, per_text: dict[str, np.ndarray], sizes: np.ndarray, base: str) -> None:
    print(f"\n{title} (CPU us per call: mean over the texts of the median over rounds; ratio = impl / {base})")
    names = list(per_text)
    print(f"| texts | n | {' | '.join(names)} | {' | '.join(f'{x} / {base}' for x in names if x != base)} |")
    print("|---|---|" + "---|" * (2 * len(names) - 1))
    groups = [(lo, hi, label) for lo, hi, label in BUCKETS] + [(0, 1 << 30, "all")]
    for lo, hi, label in groups:
        inside = (sizes >= lo) & (sizes < hi)
        if not inside.any():
            continue
        means = {x: float(per_text[x][inside].mean()) for x in names}
        ratios = " | ".join(f"{means[x] / means[base]:.2f}x" for x in names if x != base)
        print(f"| {label} | {int(inside.sum())} | {' | '.join(f'{means[x]:.2f}' for x in names)} | {ratios} |")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED_DATA_DEFAULT)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeat", type=int, default=10, help="calls per timed block")
    parser.add_argument("--long-texts", type=int, default=100)
    parser.add_argument("--features-every", type=int, default=4,
                        help="request_features is timed on every k-th record (it costs ~20x the scan)")
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    from importlib.metadata import version

    import ahocorasick

    print(f"pyahocorasick {version('pyahocorasick')} (unicode build: {bool(ahocorasick.unicode)}), "
          f"ahocorasick_rs {version('ahocorasick_rs')}, numpy {np.__version__}")
    print(f"box load average at start: {' / '.join(f'{x:.2f}' for x in os.getloadavg())}")
    records = prompts(args.data, args.long_texts)
    inputs = scan_inputs(records)
    needles = [n.encode() for n in features._NEEDLES]
    keep = [features._NEEDLES.index(k) for k in features._BREVITY_KEYS]
    ours = HandWrittenScan(needles, keep_positions=keep)
    pyaho = PyAhoCorasick(needles, keep)
    rs = SubstringScan(needles, keep_positions=keep)  # the shipped scan: ahocorasick_rs
    lowered = [data.decode("utf-8", "surrogatepass") for data in inputs]
    for data, text in zip(inputs, lowered, strict=True):  # the same answer, or the ratio means nothing
        counts, kept = ours.scan(data)
        for other in (pyaho.scan(data), rs.scan(data)):
            assert other[0] == counts and sorted(other[1]) == sorted(kept), data[:80]
        if data.isascii():
            assert pyaho.scan_str(text)[0] == counts
    sizes = np.array([len(d) for d in inputs])
    found = sum(1 for d in inputs if any(ours.scan(d)[0]))
    print(f"{len(inputs)} texts ({', '.join(f'{int(((sizes >= lo) & (sizes < hi)).sum())} {label}' for lo, hi, label in BUCKETS)}), "
          f"{len(needles)} needles, {found} texts hold at least one; all implementations agree on every text")
    scans = measure(
        {"handwritten": ours.scan, "pyahocorasick": pyaho.scan, "pyahocorasick-str": pyaho.scan_str, "ahocorasick_rs (shipped)": rs.scan},
        {"handwritten": inputs, "pyahocorasick": inputs, "pyahocorasick-str": lowered, "ahocorasick_rs (shipped)": inputs},
        args.rounds, args.repeat)
    _table("The scan alone", scans, sizes, "handwritten")

    # the real call: request_features with `_SCAN` swapped
    picked = records[:: args.features_every]
    real = features._SCAN

    def with_scan(scan: Any) -> Callable[[dict[str, Any]], Any]:
        def call(record: dict[str, Any]) -> Any:
            features._SCAN = scan
            try:
                return features.request_features(record)
            finally:
                features._SCAN = real
        return call

    calls = {"handwritten": with_scan(ours), "pyahocorasick": with_scan(pyaho), "ahocorasick_rs (shipped)": with_scan(rs)}
    for record in picked:
        assert len({calls[name](record) for name in calls}) == 1
    whole = measure(calls, {name: list(picked) for name in calls}, max(3, args.rounds // 3), max(1, args.repeat // 2))
    _table("request_features, the whole call", whole, np.array(sizes[:: args.features_every]), "handwritten")
    print(f"\nbox load average at end: {' / '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
