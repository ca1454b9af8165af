"""One request's progress as the emulated engine's HTTP layer sees it (`RequestHandle`).

The engine loop (sim/emulated_engine.py) emits tokens into it, the HTTP layer
(sim/engine_http.py) reads them, and a migration (sim/engine_migration.py) makes one for a
request it adopts; kept apart from the engine so that the migration steps name it without
importing the engine that mixes them in.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sim.textgen import OutputText


class RequestHandle:
    """One request's progress as the HTTP layer sees it: how many tokens are out, and the text.

    The engine loop calls `_emit` per token; the HTTP task awaits `next_tokens()`, which
    returns how many new tokens came since its last call (more than one when it fell
    behind), or 0 once the request finished or was aborted and everything was read.
    """

    __slots__ = (
        "request_id", "prompt_tokens", "output_tokens", "max_tokens", "priority",
        "arrival_s", "scheduled_s", "first_token_s", "last_token_s", "finish_s",
        "emitted", "consumed", "done", "finish_reason", "cached_prompt_tokens",
        "text", "wake_per_token", "_waiter", "_model_last_s", "text_seed", "text_offset", "migrated_to",
    )

    def __init__(
        self, request_id: str, prompt_tokens: int, output_tokens: int, max_tokens: int,
        priority: int, arrival_s: float, text: OutputText,
    ) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.max_tokens = max_tokens
        self.priority = priority
        self.arrival_s = arrival_s
        self.scheduled_s: float | None = None
        self.first_token_s: float | None = None
        self.last_token_s: float | None = None
        self.finish_s: float | None = None
        self.emitted = 0
        self.consumed = 0
        self.done = False
        self.finish_reason: str | None = None  # "length", "stop", "abort"
        self.cached_prompt_tokens = 0
        self.text = text
        self.text_seed = 0
        self.text_offset = 0  # tokens of its text generated elsewhere before (a continuation)
        # Where the request went when it migrated out (finish_reason "migrated").
        self.migrated_to: dict[str, Any] | None = None
        # A streaming reader wants every token; one waiting for the end only the finish.
        self.wake_per_token = True
        self._waiter: asyncio.Future[None] | None = None
        self._model_last_s = 0.0

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next_tokens(self) -> int:
        while self.emitted == self.consumed and not self.done:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        new = self.emitted - self.consumed
        self.consumed = self.emitted
        return new

    async def wait_finished(self) -> None:
        self.wake_per_token = False
        while not self.done:
            await self.next_tokens()
        self.consumed = self.emitted
