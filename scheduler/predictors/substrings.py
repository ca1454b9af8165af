"""Where a fixed set of short ASCII strings occurs in a text, in one pass: the request
features' format cues, length phrases and brevity keys (`scheduler.predictors.features`).

The pass is `ahocorasick_rs.BytesAhoCorasick` (an Aho-Corasick automaton, Rust, PyPI
`ahocorasick-rs`): every occurrence of every string, overlapping, in one scan of the UTF-8
bytes; this module only turns them into `bytes.count`'s non-overlapping counts. It replaced
a hand-written scan (4-byte anchors hashed over numpy windows, each candidate confirmed with
`bytes.startswith`; a 42-alternative regex as the short texts' "any hit?" gate). Measured
(`bench/substring_scan.py`, issue 11 stop 24, docs/benchmarks.md: the 42 needles, the
2,384 lowercased instructions `request_features` scans from ../shared/data, one process,
thread CPU time; two runs) the library takes 0.16-0.22x of the hand-written scan's time
below 1,024 bytes and 0.32-0.39x above, and `request_features` as a whole 0.68-0.69x;
pyahocorasick (C) took 0.33-0.51x below 1,024 bytes and 0.80-1.14x above (its build
searches `str`, so the bytes are decoded first).

`scan(data)` gives exactly `data.count(s)` for each string (non-overlapping, leftmost first)
and every position `data.find(s, i)` finds for the strings whose positions are kept;
tests/test_rank_score_path.py checks both on any text."""

from __future__ import annotations

from collections.abc import Sequence

from ahocorasick_rs import BytesAhoCorasick


class SubstringScan:
    """Counts the occurrences of each of `needles` (lowercase ASCII, distinct) in a byte string.

    `scan(data)` gives each needle's `data.count(needle)` and the (needle, position) of every
    occurrence of the needles named in `keep_positions`, in ascending position."""

    __slots__ = ("needles", "_automaton", "_lengths", "_keep")

    def __init__(self, needles: Sequence[bytes], keep_positions: Sequence[int] = ()) -> None:
        if len(set(needles)) != len(needles) or not all(n.isascii() and n for n in needles):
            raise ValueError("SubstringScan: needles must be distinct, non-empty ASCII byte strings")
        self.needles = tuple(needles)
        self._keep = frozenset(keep_positions)
        self._lengths = tuple(len(n) for n in self.needles)
        self._automaton = BytesAhoCorasick(list(self.needles))

    def scan(self, data: bytes) -> tuple[list[int], list[tuple[int, int]]]:
        counts = [0] * len(self.needles)
        matches = self._automaton.find_matches_as_indexes(data, overlapping=True)
        if not matches:  # most texts hold none
            return counts, []
        kept: list[tuple[int, int]] = []
        free_from = [0] * len(self.needles)  # where a next non-overlapping occurrence may start
        keep, lengths = self._keep, self._lengths
        # ascending end position, so one needle's occurrences come in ascending start
        for i, start, _ in matches:
            if i in keep:
                kept.append((i, start))
            if start >= free_from[i]:
                counts[i] += 1
                free_from[i] = start + lengths[i]
        if len(kept) > 1:
            kept.sort(key=lambda hit: hit[1])
        return counts, kept
