"""An out-of-tree dispatch plugin: the `prefer_pool` scorer (1 on instances of the named
pool, `elsewhere` on the others).

Tokenyard finds it through the `tokenyard.policies` entry point declared in this
package's pyproject.toml and calls `register()` once, when a policy document is loaded.
"""

from __future__ import annotations

import pydantic

from scheduler.dispatch_parts import DispatchContext, Scorer, register_scorer
from scheduler.types import InstanceState, RequestInfo


class PreferPool(Scorer):
    """Scores 1 on instances of `pool`, `elsewhere` (in [0, 1]) on the others."""

    normalized = True  # every score is in [0, 1]: no clamping needed
    reads_progress = False  # reads only the pool name, which never changes mid-run

    class Params(pydantic.BaseModel):
        """The typed parameters; the policy document is validated against them."""

        model_config = pydantic.ConfigDict(extra="forbid")
        pool: str
        elsewhere: float = pydantic.Field(default=0.0, ge=0.0, le=1.0)

    def __init__(self, pool: str, elsewhere: float = 0.0) -> None:
        self.pool = pool
        self.elsewhere = elsewhere

    def score(self, request: RequestInfo, instance: InstanceState, ctx: DispatchContext) -> float:
        return 1.0 if instance.pool == self.pool else self.elsewhere


def register() -> None:
    register_scorer("prefer_pool")(PreferPool)
