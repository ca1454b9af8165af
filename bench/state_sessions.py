"""Embedded state store: the cost of a session-affinity claim as the number of stored
sessions grows (1k -> 100k), for the SQLite file store, with Redis beside it.

Each point: fill the store to N live sessions, then time `--claims` claims of new
sessions (the request path's store call for a request with a new session id) and
`--claims` re-claims of existing ones (a returning session). Reported as claims/s and as
the ratio to the 1k point of the same backend in the same run: O(1) means a flat ratio.

    python bench/state_sessions.py                      # ~1 minute
    python bench/state_sessions.py --sessions 1000,10000,100000 --claims 2000 --no-redis
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from router.state import FileStateStore, RedisStateStore, StateStore, open_store  # noqa: E402


async def fill(store: StateStore, have: int, want: int) -> None:
    if isinstance(store, FileStateStore):  # bulk insert: the fill is not what is measured
        db = store._db
        db.execute("BEGIN")
        db.executemany("INSERT OR IGNORE INTO affinity (key, owner, expires_s) VALUES (?, 'i1', ?)",
                       ((f"m:fill-{i}", time.time() + 3600) for i in range(have, want)))
        db.execute("COMMIT")
        return
    assert isinstance(store, RedisStateStore)
    pipe = store._redis.pipeline(transaction=False)
    for i in range(have, want):
        pipe.set(f"{store.prefix}aff:m:fill-{i}", "i1", px=3_600_000)
        if i % 5000 == 0:
            await pipe.execute()
    await pipe.execute()


async def measure(store: StateStore, sizes: list[int], claims: int) -> list[dict[str, float]]:
    from tqdm import tqdm

    rows = []
    have = 0
    for size in tqdm(sizes, desc=type(store).__name__, unit="point"):
        await fill(store, have, size)
        have = size
        t0 = time.perf_counter()
        for i in range(claims):
            await store.claim_affinity(f"m:new-{size}-{i}", "i2", ttl_s=3600)
        new_per_s = claims / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(claims):
            await store.claim_affinity(f"m:fill-{i * 7 % size}", "i2", ttl_s=3600)
        again_per_s = claims / (time.perf_counter() - t0)
        rows.append({"sessions": size, "new_per_s": new_per_s, "again_per_s": again_per_s})
    return rows


async def main_async(args: argparse.Namespace) -> int:
    sizes = [int(s) for s in args.sessions.split(",") if s]
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(f"file://{tmp}/state.db")
        results["file (SQLite WAL)"] = await measure(store, sizes, args.claims)
        await store.close()
    if not args.no_redis:
        prefix = f"tybench:{uuid.uuid4().hex[:8]}:"
        redis = RedisStateStore(args.redis, prefix=prefix)
        try:
            await redis.ping()
            results["redis"] = await measure(redis, sizes, args.claims)
        except Exception as exc:
            print(f"redis not measured: {exc}", file=sys.stderr)
        finally:
            await redis.delete_all()
            await redis.close()
    print("| backend | sessions stored | new-session claims/s | returning claims/s | new vs first point |")
    print("| --- | --- | --- | --- | --- |")
    for name, rows in results.items():
        base = rows[0]["new_per_s"]
        for row in rows:
            print(f"| {name} | {row['sessions']:,} | {row['new_per_s']:.0f} | {row['again_per_s']:.0f} | "
                  f"{row['new_per_s'] / base:.2f} |")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", default="1000,10000,100000")
    parser.add_argument("--claims", type=int, default=2000)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--no-redis", action="store_true")
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
