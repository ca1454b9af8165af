"""The KV block manager: a pool of fixed-size KV blocks with an LRU prefix cache.

Kept apart from the engine core's scheduling loop (sim/engine_core.py), as vLLM v1 keeps
its KV cache manager apart from its scheduler: the core decides who runs and asks this
module for blocks; this module only counts blocks and cached prefixes. It knows nothing
about requests: callers pass the numbers and the prefix hashes a request holds.

Accounting: every block is either free, held privately by a request (the caller keeps
that count), or in the prefix cache under a chained prefix hash. A cached entry that no
request references is evictable (least recently used first) and counts as free for
admission; `used_blocks` is what requests hold.

Also the reservation a live migration's destination makes before any KV byte arrives
(`reserve` / `unreserve`): blocks taken from the pool that belong to no running request
yet (see docs/migration.md).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(slots=True)
class CacheEntry:
    """One cached prefix block group: how many blocks, how many requests reference it."""

    blocks: int
    refs: int = 0


class KVBlockManager:
    """Free blocks, the prefix cache (LRU, evictable when unreferenced) and reservations."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.free_blocks = num_blocks
        self.cache: OrderedDict[int, CacheEntry] = OrderedDict()  # LRU order, evictable if refs == 0
        self.evictable_blocks = 0
        self.reserved_blocks = 0  # held for incoming migrations

    @property
    def used_blocks(self) -> int:
        """Blocks held by requests and reservations (unreferenced cached blocks count as free)."""
        return self.num_blocks - self.free_blocks - self.evictable_blocks

    @property
    def available_blocks(self) -> int:
        """Blocks an allocation can get now: free ones and evictable cached ones."""
        return self.free_blocks + self.evictable_blocks

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def shared_blocks(self, keys: list[int]) -> int:
        """Blocks of the cached entries `keys` (a request's shared prefix)."""
        cache = self.cache
        return sum(cache[h].blocks for h in keys)

    # ------------------------------------------------------------ allocation
    def allocate(self, blocks: int) -> bool:
        """Take `blocks` from the pool, evicting cached prefixes if needed; False (and no
        change) if even eviction cannot make room."""
        if blocks <= 0:
            return True
        if self.free_blocks + self.evictable_blocks < blocks:
            return False
        while self.free_blocks < blocks:
            self.evict_one()
        self.free_blocks -= blocks
        return True

    def evict_one(self) -> None:
        """Evict the least recently used unreferenced cache entry."""
        for key, entry in self.cache.items():
            if entry.refs == 0:
                del self.cache[key]
                self.evictable_blocks -= entry.blocks
                self.free_blocks += entry.blocks
                return
        raise AssertionError("no evictable prefix-cache block although accounting says there is")

    def release(self, own_blocks: int, shared_keys: list[int]) -> None:
        """Give back a request's private blocks and drop its references to cached prefixes
        (`shared_keys` is cleared)."""
        self.free_blocks += own_blocks
        cache = self.cache
        for key in shared_keys:
            entry = cache[key]
            entry.refs -= 1
            if entry.refs == 0:
                self.evictable_blocks += entry.blocks
        shared_keys.clear()

    # ------------------------------------------------------------ prefix cache
    def lookup(self, prefix_hashes: tuple[int, ...], usable: int, block_tokens: int, prompt_tokens: int,
               shared_keys: list[int]) -> int:
        """Reference the cached leading entries of `prefix_hashes[:usable]` (appended to
        `shared_keys`, most recently used now); returns how many hit. Never all of the
        prompt: its last token is always computed, as vLLM does."""
        cache = self.cache
        hits = 0
        for key in prefix_hashes[:usable]:
            if key not in cache:
                break
            hits += 1
        while hits and hits * block_tokens >= prompt_tokens:
            hits -= 1
        for key in prefix_hashes[:hits]:
            entry = cache[key]
            if entry.refs == 0:
                self.evictable_blocks -= entry.blocks
            entry.refs += 1
            cache.move_to_end(key)
            shared_keys.append(key)
        return hits

    def promote(self, key: int, blocks: int) -> None:
        """A request's `blocks` private blocks under prefix hash `key` are now computed:
        they become the cached entry `key` (referenced once more), or, if someone cached
        the same prefix meanwhile, theirs is referenced and ours go back to the pool. The
        caller takes `blocks` off the request's private count and records `key`."""
        entry = self.cache.get(key)
        if entry is None:
            entry = CacheEntry(blocks=blocks)
            self.cache[key] = entry
        else:
            self.free_blocks += blocks
            if entry.refs == 0:
                self.evictable_blocks -= entry.blocks
        self.cache.move_to_end(key)
        entry.refs += 1

    # ------------------------------------------------------------ migration
    def reserve(self, blocks: int) -> bool:
        """Set aside `blocks` for an incoming migration (False if they are not there)."""
        if not self.allocate(blocks):
            return False
        self.reserved_blocks += blocks
        return True

    def unreserve(self, blocks: int, *, to_pool: bool = True) -> None:
        """End a reservation: its blocks go back to the pool, or (`to_pool=False`) they
        pass to the request that now runs here (the caller counts them as its own)."""
        if blocks > self.reserved_blocks:
            raise ValueError(f"unreserve {blocks} blocks: only {self.reserved_blocks} are reserved")
        self.reserved_blocks -= blocks
        if to_pool:
            self.free_blocks += blocks

    # ------------------------------------------------------------ checks
    def check(self, held_by_requests: int, refs: dict[int, int]) -> None:
        """Raise AssertionError if the counts disagree with what requests hold (tests)."""
        cached = sum(e.blocks for e in self.cache.values())
        evictable = sum(e.blocks for e in self.cache.values() if e.refs == 0)
        assert self.free_blocks >= 0, self.free_blocks
        assert evictable == self.evictable_blocks, (evictable, self.evictable_blocks)
        total = held_by_requests + self.reserved_blocks + cached + self.free_blocks
        assert total == self.num_blocks, (
            held_by_requests, self.reserved_blocks, cached, self.free_blocks, self.num_blocks,
        )
        for key, entry in self.cache.items():
            assert entry.refs == refs.get(key, 0), (key, entry.refs, refs.get(key, 0))
