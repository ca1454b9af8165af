"""What the simulator keeps per engine instance and per request it serves.

`SimInstance` is one engine instance as `sim.simulator.Simulation` drives it: its
`EngineCore`, the `InstanceState` dispatch sees, its stats and the step or run in flight.
`SimRequest` is an engine request with what the driver needs to record it. Kept apart from
the event loop so that the loop's helpers (sim/migration.py) name them without importing
the loop that imports them. Compiled with the loop by mypyc (sim/native.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scheduler.dispatch import DispatchPolicy
from scheduler.engine_model import EngineModel
from scheduler.types import InstanceState, RequestInfo, SloClass
from sim.cluster import PoolSpec
from sim.engine_core import Batch, DecodeRun, EngineCore, EngineRequest
from sim.records import InstanceStats
from sim.workload import TraceRequest


@dataclass(slots=True, eq=False)
class SimRequest(EngineRequest):
    """An engine request with what the driver needs to record it and report its finish."""

    trace: TraceRequest | None = None
    info: RequestInfo | None = None
    slo: SloClass | None = None
    policy: DispatchPolicy | None = None
    instance: SimInstance | None = None
    dispatch_s: float = 0.0


class SimInstance:
    """One engine instance: its core, the load snapshot dispatch sees, and its stats."""

    __slots__ = (
        "index", "pool", "core", "state", "stats", "batch", "run", "iter_start_s", "version",
        "next_change_s", "kv_block_s",
    )

    def __init__(self, index: int, instance_id: str, pool: PoolSpec, model: EngineModel) -> None:
        self.index = index
        self.pool = pool
        self.core = EngineCore(model, pool.engine)
        self.state = InstanceState(
            instance_id=instance_id,
            model=pool.model.name,
            gpu=pool.gpu.name,
            pool=pool.name,
            tp=pool.tp,
            url=f"sim://{instance_id}",
            kv_blocks_total=self.core.num_kv_blocks,
            block_size_tokens=pool.engine.block_size,
        )
        self.stats = InstanceStats(
            instance_id=instance_id,
            pool=pool.name,
            gpu=pool.gpu.name,
            model=pool.model.name,
            tp=pool.tp,
            usd_per_hour=pool.usd_per_hour,
        )
        self.batch: Batch | None = None  # the iteration in flight (step mode)
        self.run: DecodeRun | None = None  # the run in flight (fast-forward)
        self.iter_start_s = 0.0
        self.version = 0  # bumps when the scheduled end event is replaced
        self.next_change_s = math.inf  # inside a run: when the observable load next changes
        self.kv_block_s = 0.0  # integral of KV blocks used over time

    @property
    def busy(self) -> bool:
        return self.batch is not None or self.run is not None
