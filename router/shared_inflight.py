"""In-flight counts shared by the processes of `tokenyard router --workers N`.

Each worker process counts the requests it has sent to each engine and not seen finish
(`InstanceState.router_inflight`, what least-outstanding scoring and admission read). With
several workers on one port each would see only its own share of the load; this table lets
every worker see the sum.

The table is one file mapped into every worker (under /dev/shm where there is one), made by
the parent before the workers start and removed after they stop:

- a slot per instance: the first 16 bytes of the BLAKE2b digest of its id, claimed once under
  an exclusive `flock` on the file (membership changes, never per request), so every worker
  finds the same slot for the same id;
- a column of counts per worker: worker w writes only column w (one writer per cell, no lock
  on the request path), plus a generation number it bumps on every change;
- a reader sums the other columns for the slots it uses, at most once per `sync_interval_s`
  and only when another worker's generation moved, and writes `own + others` into its
  states. A worker's own starts and ends are applied at once; the others' are at most
  `sync_interval_s` old when a decision reads them (1 ms up to 100 instances, then 10 µs
  more per instance: 10 ms at 1,000, so that a sync's cost, which reads every slot, stays
  a small share of a busy worker's time).

A worker that exits has its column zeroed by the parent (`clear_worker`), so a crash does not
leave phantom load. Bounded: `capacity` slots (16,384 by default); instances beyond it are
counted by their own worker only, with one warning.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import mmap
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from scheduler.types import InstanceState

log = logging.getLogger(__name__)

MAGIC = 0x544F4B59494E464C  # "TOKYINFL"
HEADER_WORDS = 8
GEN_STRIDE = 8  # one generation word per 64-byte line, so workers do not write one line
DEFAULT_CAPACITY = 16_384
MAX_WORKERS = 256
SYNC_INTERVAL_S = 0.001
FULL_SYNC_S = 0.1
VECTOR_SLOTS = 64  # above this many instances a sync sums in numpy, below in plain Python


class SharedInflightError(RuntimeError):
    """The shared table could not be made or opened; the message says which file and why."""


def _layout(workers: int, capacity: int) -> tuple[int, int, int]:
    """(first key word, first generation word, first count word) and the total in words."""
    keys = HEADER_WORDS
    gens = keys + 2 * capacity
    counts = gens + GEN_STRIDE * workers
    return gens, counts, counts + workers * capacity


def _digest(instance_id: str) -> tuple[int, int]:
    raw = hashlib.blake2b(instance_id.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    high = int.from_bytes(raw[:8], "little", signed=True)
    low = int.from_bytes(raw[8:], "little", signed=True)
    return (high or 1, low)  # (0, x) marks an empty slot


def create_table(workers: int, capacity: int = DEFAULT_CAPACITY, directory: str | None = None) -> Path:
    """A zeroed table for `workers` processes; the caller removes the file when they are gone."""
    if not 1 <= workers <= MAX_WORKERS:
        raise SharedInflightError(f"shared in-flight table: workers: expected 1-{MAX_WORKERS}, got {workers}")
    if not 1 <= capacity <= 1 << 20:
        raise SharedInflightError(f"shared in-flight table: capacity: expected 1-{1 << 20}, got {capacity}")
    if directory is None and os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        directory = "/dev/shm"
    _, _, words = _layout(workers, capacity)
    try:
        fd, name = tempfile.mkstemp(prefix="tokenyard-inflight-", dir=directory)
    except OSError as exc:
        raise SharedInflightError(f"shared in-flight table: cannot create a file in "
                                  f"{directory or tempfile.gettempdir()}: {exc.strerror or exc}") from None
    try:
        os.ftruncate(fd, words * 8)
        header = np.array([MAGIC, workers, capacity], dtype=np.int64).tobytes()
        os.pwrite(fd, header, 0)
    except OSError as exc:
        os.close(fd)
        os.unlink(name)
        raise SharedInflightError(f"shared in-flight table {name}: {exc.strerror or exc}") from None
    os.close(fd)
    return Path(name)


class SharedInflight:
    """One worker's handle on the table: its own column to write, the others to read."""

    def __init__(self, path: Path | str, worker: int, *, sync_interval_s: float = SYNC_INTERVAL_S) -> None:
        self.path = Path(path)
        self.worker = worker
        self.sync_interval_s = sync_interval_s
        try:
            self._fd = os.open(self.path, os.O_RDWR)
        except OSError as exc:
            raise SharedInflightError(f"shared in-flight table {self.path}: {exc.strerror or exc}") from None
        try:
            size = os.fstat(self._fd).st_size
            if size < HEADER_WORDS * 8:
                raise SharedInflightError(f"shared in-flight table {self.path}: {size} bytes, expected a header")
            self._map = mmap.mmap(self._fd, size)
        except (OSError, SharedInflightError):
            os.close(self._fd)
            raise
        self._words = np.frombuffer(self._map, dtype=np.int64)
        magic, workers, capacity = (int(v) for v in self._words[:3])
        gens, counts, total = _layout(workers, capacity)
        if magic != MAGIC or total * 8 > size or not 0 <= worker < workers:
            self.close()
            raise SharedInflightError(f"shared in-flight table {self.path}: not a table for worker {worker} "
                                      f"(magic {magic:#x}, {workers} workers, {size} bytes)")
        self.workers = workers
        self.capacity = capacity
        self._keys = self._words[HEADER_WORDS:gens].reshape(capacity, 2)
        self._gens = self._words[gens:counts:GEN_STRIDE]
        self._counts = self._words[counts:total].reshape(workers, capacity)
        self._cells = memoryview(self._map).cast("q")  # plain-int access for the request path
        self._gen_word = gens + GEN_STRIDE * worker
        self._own_base = counts + worker * capacity
        self._others = [w for w in range(workers) if w != worker]
        self._slots: dict[str, int] = {}
        self._ids_by_slot: dict[int, str] = {}
        self._positions: dict[str, int] = {}  # instance id -> its place in _used / _seen
        self._used: list[int] = []  # slots this worker reads, in claim order
        self._used_array = np.zeros(0, dtype=np.intp)  # _used and _seen as arrays, for large fleets
        self._seen_array = np.zeros(0, dtype=np.int64)
        self._seen: list[int] = []  # the others' sum per used slot at the last sync
        self._other_gen_words = [gens + GEN_STRIDE * w for w in self._others]
        self._other_bases = [counts + w * capacity for w in self._others]
        self._seen_gens = -1
        self._next_sync_s = 0.0
        self._full_sync_s = 0.0
        self._full_warned = False

    # -- slots (membership changes) ------------------------------------------------------
    def slot(self, instance_id: str) -> int | None:
        """The instance's slot, claimed now if no worker has; None when the table is full."""
        found = self._slots.get(instance_id)
        if found is not None:
            return found
        high, low = _digest(instance_id)
        start = (high ^ low) % self.capacity
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            for step in range(self.capacity):
                index = (start + step) % self.capacity
                key = self._keys[index]
                if key[0] == high and key[1] == low:
                    break
                if key[0] == 0:
                    key[1] = low
                    key[0] = high  # written last: a reader under the lock sees whole keys anyway
                    break
            else:
                index = -1
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        if index < 0:
            if not self._full_warned:
                self._full_warned = True
                log.warning("shared in-flight table full; further instances are counted per worker",
                            extra={"capacity": self.capacity, "instance": instance_id})
            return None
        self._slots[instance_id] = index
        self._positions[instance_id] = len(self._used)
        self._ids_by_slot[index] = instance_id
        others_now = int(self._counts[self._others, index].sum()) if self._others else 0
        # The new slot joins with its current value (the caller sets its state from the
        # table); the pending changes of the other slots stay pending for the next sync.
        self._used.append(index)
        self._seen.append(others_now)
        if len(self._used) > VECTOR_SLOTS:
            self._used_array = np.array(self._used, dtype=np.intp)
            self._seen_array = np.array(self._seen, dtype=np.int64)
        return index

    def total(self, instance_id: str) -> int:
        """Requests in flight to the instance through every worker, read now."""
        index = self.slot(instance_id)
        return 0 if index is None else int(self._counts[:, index].sum())

    def others(self, instance_id: str) -> int:
        """Requests in flight to the instance through the other workers, as last synced."""
        if instance_id not in self._positions:
            return 0
        return self._seen[self._positions[instance_id]]

    # -- the request path ------------------------------------------------------------------
    def add(self, instance_id: str, delta: int) -> None:
        """This worker's count for the instance moves by `delta` (never below 0)."""
        index = self._slots.get(instance_id)
        if index is None:
            if delta <= 0:
                return  # never counted here: nothing to take back
            index = self.slot(instance_id)
            if index is None:
                return
        cells = self._cells
        cell = self._own_base + index
        value = cells[cell] + delta
        cells[cell] = value if value > 0 else 0
        cells[self._gen_word] += 1

    def sync(self, states: Mapping[str, InstanceState]) -> None:
        """Write own + others into the states whose other-worker count moved (rate-limited)."""
        now = time.monotonic()
        if now < self._next_sync_s:
            return
        # A sync reads every used slot: a large fleet syncs less often (10 µs of interval per
        # instance: 1 ms up to 100 instances, 10 ms at 1,000), so its cost stays bounded.
        interval = self.sync_interval_s
        if len(self._used) > 100:
            interval *= len(self._used) / 100
        self._next_sync_s = now + interval
        if not self._others:
            return
        cells = self._cells
        gens = 0
        for word in self._other_gen_words:
            gens += cells[word]
        # Unchanged generations: nothing to read, except every FULL_SYNC_S regardless (a
        # reader on a weakly ordered CPU may see a new generation before its count).
        if gens == self._seen_gens and now < self._full_sync_s:
            return
        self._seen_gens = gens
        self._full_sync_s = now + FULL_SYNC_S
        used = self._used
        own_base = self._own_base
        ids = self._ids_by_slot
        if len(used) > VECTOR_SLOTS:  # a large fleet: sum and compare the columns in numpy
            columns = self._counts[:, self._used_array]  # workers x used slots (a copy of just those)
            summed = columns.sum(axis=0) - columns[self.worker]
            changed: list[int] = np.flatnonzero(summed != self._seen_array).tolist()
            if changed:
                self._seen_array = summed
                for position in changed:
                    index = used[position]
                    value = int(summed[position])
                    self._seen[position] = value
                    state = states.get(ids[index])
                    if state is not None:
                        state.router_inflight = cells[own_base + index] + value
            return
        others: list[int] = []
        for index in used:
            total = 0
            for base in self._other_bases:
                total += cells[base + index]
            others.append(total)
        seen = self._seen
        if others == seen:
            return
        for position, value in enumerate(others):
            if value != seen[position]:
                index = used[position]
                seen[position] = value
                state = states.get(ids[index])
                if state is not None:
                    state.router_inflight = cells[own_base + index] + value

    def refresh(self, instance_id: str, state: InstanceState) -> None:
        """Set a (new) state's count from the table at once: own + the others' now."""
        index = self.slot(instance_id)
        if index is not None:
            state.router_inflight = int(self._counts[:, index].sum())

    # -- lifecycle ---------------------------------------------------------------------------
    def clear_worker(self, worker: int) -> None:
        """Zero a worker's column (it exited: its requests are gone) and bump its generation."""
        if not 0 <= worker < self.workers:
            raise ValueError(f"worker {worker}: expected 0-{self.workers - 1}")
        self._counts[worker, :] = 0
        self._gens[worker] += 1

    def close(self) -> None:
        for table in ("_slots", "_ids_by_slot", "_positions"):
            if hasattr(self, table):
                getattr(self, table).clear()
        for name in ("_cells", "_keys", "_gens", "_counts", "_words", "_used_array", "_seen_array"):
            value = getattr(self, name, None)
            if isinstance(value, memoryview):
                value.release()
            if hasattr(self, name):
                delattr(self, name)
        mapping = getattr(self, "_map", None)
        if mapping is not None:
            with contextlib.suppress(BufferError):  # a view still alive elsewhere: it goes with the process
                mapping.close()
        os.close(self._fd)
