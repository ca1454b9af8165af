"""Where a fixed set of short ASCII strings occurs in a text, in one pass: the request
features' format cues, length phrases and brevity keys (`scheduler.predictors.features`).

Hand-written because the plain way, one `str.count` or `in` per string, scans the text once
per string: 54 scans cost ~21 us for the 31 format cues alone and the brevity regex up to
~64 us on a 1,600-character answer (wall p50, shared 2-core box, issue 11 stop 23), while this
finds every candidate of all strings with ~6 numpy calls (~10 us) and confirms each with
`bytes.startswith`. Python's `re` has no multi-string (Aho-Corasick) search, and an
alternation of the strings tries each one at every position whose character starts one of
them, which is most positions (the ~64 us above). No installed library does it.

How: every string of 4 bytes or more is anchored on one of its 4-byte windows; the 4 bytes at
each position of the text, read as one little-endian uint32, are hashed to 14 bits and looked
up in a table of the anchors' hashes; a hit is a candidate start that `startswith` confirms
or rejects. Shorter strings are counted with `bytes.count`. The positions found are exactly
those of `data.find(s, i)` for every i, so the counts equal `bytes.count` / `str.count`
(non-overlapping, leftmost first); tests/test_rank_score_path.py checks that on any text."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

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


class SubstringScan:
    """Counts the occurrences of each of `needles` (lowercase ASCII, distinct) in a byte string.

    `scan(data)` gives each needle's `data.count(needle)` and the (needle, position) of every
    occurrence of the needles named in `keep_positions`, in ascending position."""

    __slots__ = ("needles", "_table", "_slots", "_short", "_keep", "_any")

    def __init__(self, needles: Sequence[bytes], keep_positions: Sequence[int] = ()) -> None:
        if len(set(needles)) != len(needles) or not all(n.isascii() and n for n in needles):
            raise ValueError("SubstringScan: needles must be distinct, non-empty ASCII byte strings")
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
