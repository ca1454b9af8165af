"""Stream splicing: one continuous client stream across a live migration or an engine death.

The forwarding path (router/app.py) hands every streamed engine response to
`Splicer.wrap` and relays what the returned `SplicedStream` yields, as it would relay the
engine's own stream. The wrapper reads the engine's SSE events and:

- planned move: the source engine ends a migrated request's stream with a
  `tokenyard.migrated` event naming the destination (docs/migration.md). The event is not
  forwarded; the wrapper re-sends the original request to the destination with
  `X-Tokenyard-Attach: <request id>`, and the destination streams the rest, from the
  exact token where the source stopped, with the same chunk ids and the right `usage`.
- unplanned death: when the engine's stream breaks (reset, timeout, closed without
  `[DONE]`), the wrapper re-submits the request to another instance of the same model as
  a continuation: the prompt plus the text already streamed (chat: a final assistant
  message with `continue_final_message`, as vLLM takes it; completions: the prompt with
  the text appended), `max_tokens` less what was streamed, and
  `X-Tokenyard-Continuation: tokens=N; chars=C`. The new engine's role chunk is dropped,
  its chunk ids are rewritten to the original's, and its `usage` is shifted back
  (prompt - N, completion + N), so the client sees no error and no repeated text.
  Exact for greedy decoding (the same model continues the same tokens); with sampling
  (temperature > 0) the continuation is a fresh sample of the rest, a valid but different
  completion. A failure at the attach step falls back to the same continuation.

Non-streamed requests move too: the source answers a request that migrated out with
`X-Tokenyard-Migrated: 1` and a JSON marker (where it went, the text it generated, how
many tokens), and the forwarding path hands that body to `Splicer.follow_body`, which
re-sends the request to the destination with `X-Tokenyard-Attach` (the destination
answers with the rest of the text and the whole `usage`), follows further moves, and
returns one answer: the text of every leg joined, the last leg's fields. When the attach
fails it continues elsewhere as a stream's failover does (prompt plus the text so far,
`usage` shifted back). Bounded like a stream: `max_splices` legs, each body at most
`max_body_bytes`, every leg within the caller's deadline.

Cost on the normal path: a chunk is scanned for the migration event and `[DONE]` and
forwarded as it came; only a failover parses what was forwarded (tokens are counted per
content event, one token per event as vLLM streams them) to build the continuation, and
only a continued stream has its events rewritten. Bounded: at most `max_splices` moves or
failovers per request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from router.proxy import PoolSet, UpstreamError
from scheduler.types import InstanceState

log = logging.getLogger(__name__)

MIGRATED_EVENT = b"event: tokenyard.migrated\n"
MIGRATED_HEADER = b"x-tokenyard-migrated"  # on a non-streamed answer: the body is a marker
DONE_EVENT = b"data: [DONE]"
ATTACH_HEADER = b"X-Tokenyard-Attach"
CONTINUATION_HEADER = b"X-Tokenyard-Continuation"
DEFAULT_MAX_SPLICES = 8
SPLICE_CONNECT_TIMEOUT_S = 10.0


class Upstream(Protocol):
    """What the relay reads (router.proxy.UpstreamResponse has it)."""

    status: int

    def header(self, name: bytes) -> bytes | None: ...

    async def next_chunk(self, timeout_s: float | None = None) -> bytes | None: ...

    @property
    def ended(self) -> bool:
        """True when the next `next_chunk` would return None without waiting."""
        ...

    def abort(self) -> None: ...


@dataclass(slots=True)
class SpliceStats:
    """Counters the router exports (and tests read)."""

    migrations_spliced: int = 0
    failovers: int = 0
    failover_errors: int = 0
    by_instance: dict[str, int] = field(default_factory=dict)


class Splicer:
    """Makes `SplicedStream`s; knows where instances are and how to reach them."""

    def __init__(self, pools: PoolSet, instances: Callable[[], Sequence[InstanceState]],
                 url_of: Callable[[str], str | None], *, on_failure: Callable[[str, str], None] | None = None,
                 max_splices: int = DEFAULT_MAX_SPLICES) -> None:
        self.pools = pools
        self.instances = instances
        self.url_of = url_of
        self.on_failure = on_failure
        self.max_splices = max_splices
        self.stats = SpliceStats()

    @classmethod
    def for_router(cls, router: Any) -> Splicer:
        """The splicer of a router.app.Router (its pools, registry and health monitor)."""
        def url_of(instance_id: str) -> str | None:
            found = router.registry.find(instance_id)
            return None if found is None else str(found[0].url)

        return cls(router.pools, router.registry.instances, url_of, on_failure=router.health.on_failure)

    async def wrap(self, response: Upstream, first: bytes | None, instance_id: str, model: str, path: str,
                   payload: bytes, headers: bytes) -> tuple[SplicedStream, bytes | None]:
        """The stream to relay instead of `response`, and its first chunk (for `first`)."""
        stream = SplicedStream(self, response, instance_id, model, path, payload, headers)
        return stream, await stream.take_first(first)

    async def follow_body(self, marker: bytes, instance_id: str, model: str, path: str, payload: bytes,
                          headers: bytes, until_s: float, max_body_bytes: int) -> bytes:
        """The whole non-streamed answer of a request whose source answered with the
        migration marker `marker` (see the module docstring); UpstreamError when no leg
        can finish it (nothing has gone to the client: the caller may retry elsewhere)."""
        chat = path.endswith("/chat/completions")
        text: list[str] = []
        tokens = 0
        shift = 0  # tokens a continuation's engine counted as prompt
        failed: set[str] = set()
        body, current, legs = marker, instance_id, 0
        while True:
            moved = _marker(body)
            if moved is None:
                return _joined(body, chat, "".join(text), shift)
            legs += 1
            if legs > self.max_splices:
                raise UpstreamError("reset", f"moved {legs - 1} times; gave up after {self.max_splices} splices")
            where, piece, count = moved
            text.append(piece)
            tokens += count
            destination = str(where.get("destination_instance_id", ""))
            request_id = str(where.get("destination_request_id", "")).encode("latin-1")
            url = self.url_of(destination)
            answer: bytes | None = None
            if url is not None:
                try:
                    answer = await self._post_body(url, path, payload, headers + ATTACH_HEADER + b": " + request_id
                                                   + b"\r\n", until_s, max_body_bytes)
                except UpstreamError as exc:
                    log.info("attach to a migration's destination failed", extra={"to": destination, "error": str(exc)})
            if answer is not None:
                self.stats.migrations_spliced += 1
                body, current = answer, destination
                continue
            # The destination is gone or refused: continue elsewhere from the text so far.
            failed.update((current, destination))
            body, current = await self._continue_body(model, path, payload, headers, chat, "".join(text), tokens,
                                                      failed, until_s, max_body_bytes)
            shift = tokens

    async def _continue_body(self, model: str, path: str, payload: bytes, headers: bytes, chat: bool, text: str,
                             tokens: int, failed: set[str], until_s: float, max_body_bytes: int) -> tuple[bytes, str]:
        body, extra = continuation(payload, chat, text, tokens)
        while True:
            target = self.pick(model, failed)
            url = None if target is None else (target.url or self.url_of(target.instance_id))
            if target is None or body is None or not url:
                self.stats.failover_errors += 1
                raise UpstreamError("reset", "a migrated request's destination failed and it cannot be continued "
                                             "elsewhere")
            failed.add(target.instance_id)
            try:
                answer = await self._post_body(url, path, body, headers + extra, until_s, max_body_bytes)
            except UpstreamError as exc:
                if self.on_failure is not None:
                    self.on_failure(target.instance_id, str(exc))
                continue
            if answer is not None:
                self.stats.failovers += 1
                return answer, target.instance_id

    async def _post_body(self, url: str, path: str, payload: bytes, headers: bytes, until_s: float,
                         max_body_bytes: int) -> bytes | None:
        """The body of a 200 answer (None for another status); UpstreamError on a
        transport failure, past `until_s` or over `max_body_bytes`."""
        remaining_s = until_s - time.monotonic()
        if remaining_s <= 0:
            raise UpstreamError("timeout", "the request's deadline passed while it migrated")
        response = await self.pools.get(url).request(
            "POST", path, payload, headers, headers_timeout_s=min(SPLICE_CONNECT_TIMEOUT_S, remaining_s))
        if response.status != 200:
            response.abort()
            return None
        parts: list[bytes] = []
        size = 0
        while (chunk := await response.next_chunk(max(0.001, until_s - time.monotonic()))) is not None:
            size += len(chunk)
            if size > max_body_bytes:
                response.abort()
                raise UpstreamError("protocol", f"a migrated request's answer is over {max_body_bytes} bytes")
            parts.append(chunk)
        return b"".join(parts)

    def pick(self, model: str, exclude: set[str]) -> InstanceState | None:
        """Where a failover goes: a healthy, not draining instance of the model, least loaded."""
        best: InstanceState | None = None
        for state in self.instances():
            if state.model != model or not state.healthy or state.draining or state.instance_id in exclude:
                continue
            if best is None or state.outstanding < best.outstanding:
                best = state
        return best


class SplicedStream:
    """An engine stream that goes on, across moves and failovers, until `[DONE]`."""

    def __init__(self, splicer: Splicer, response: Upstream, instance_id: str, model: str, path: str,
                 payload: bytes, headers: bytes) -> None:
        self.splicer = splicer
        self.current = response
        self.instance_id = instance_id
        self.model = model
        self.path = path
        self.payload = payload
        self.headers = headers
        self.status = response.status
        self.tokens = 0  # content events forwarded (counted when a failover needs them)
        self.text: list[str] = []  # their text, for a continuation
        self._forwarded: list[bytes] = []  # what the client got, parsed lazily by _streamed
        self._parsed = 0
        self.chat = path.endswith("/chat/completions")
        self.splices = 0
        # Instances that failed this stream: a failover never goes back to them. An instance
        # the stream only moved away from (a migration) stays eligible, so a stream that
        # moved across the whole pool can still continue when its current engine dies.
        self.failed: set[str] = set()
        self.done = False
        self._tail = b""
        self._shift = 0  # tokens the current engine did not count (continuation)
        self._drop_role = False
        self._chunk_id: bytes | None = None
        self._migrated: dict[str, Any] | None = None
        self._client_gone = False

    def header(self, name: bytes) -> bytes | None:
        return self.current.header(name)

    @property
    def ended(self) -> bool:
        return self.done  # `[DONE]` was relayed: next_chunk returns None from now on

    def abort(self) -> None:
        """The client left (the relay calls this): stop, and splice nothing more."""
        self._client_gone = True
        self.current.abort()

    async def take_first(self, first: bytes | None) -> bytes | None:
        if first is None:
            return await self.next_chunk(SPLICE_CONNECT_TIMEOUT_S)
        out = self._events(first)
        return out if out or self.done else await self.next_chunk(SPLICE_CONNECT_TIMEOUT_S)

    async def next_chunk(self, timeout_s: float | None = None) -> bytes | None:
        while True:
            if self.done:
                return None
            try:
                chunk = await self.current.next_chunk(timeout_s)
            except UpstreamError as exc:
                if self._client_gone:
                    raise
                await self._failover(str(exc))
                continue
            if chunk is None:
                if self._client_gone:
                    return None
                if self._migrated is not None:
                    await self._attach()
                    continue
                await self._failover("the stream ended without [DONE]")
                continue
            out = self._events(chunk)
            if out:
                return out

    # ------------------------------------------------------------ events
    def _events(self, chunk: bytes) -> bytes:
        """Forwardable bytes of `chunk` (whole events only; a partial one waits)."""
        data = self._tail + chunk if self._tail else chunk
        cut = data.rfind(b"\n\n")
        if cut < 0:
            self._tail = data
            return b""
        whole = data[: cut + 2]
        self._tail = data[cut + 2:]
        if not (self._shift or self._drop_role) and MIGRATED_EVENT not in whole:
            # Almost every chunk: forwarded as it came, parsed only if a failover needs it.
            self._forwarded.append(whole)
            if whole.endswith(DONE_EVENT + b"\n\n"):
                self.done = True
            return whole
        out: list[bytes] = []
        for event in data[:cut].split(b"\n\n"):
            kept = self._event(event)
            if kept is not None:
                out.append(kept + b"\n\n")
        joined = b"".join(out)
        self._forwarded.append(joined)
        return joined

    def _streamed(self) -> None:
        """Bring `tokens`, `text` and the chunk id up to date with what was forwarded."""
        while self._parsed < len(self._forwarded):
            chunk = self._forwarded[self._parsed]
            self._parsed += 1
            for event in chunk.split(b"\n\n"):
                if not event.startswith(b"data: ") or event.startswith(DONE_EVENT):
                    continue
                try:
                    doc = orjson.loads(event[6:])
                except orjson.JSONDecodeError:
                    continue
                if not isinstance(doc, dict):
                    continue
                if self._chunk_id is None and isinstance(doc.get("id"), str):
                    self._chunk_id = doc["id"].encode()
                choices = doc.get("choices") or []
                if not choices or not isinstance(choices[0], dict):
                    continue
                delta = choices[0].get("delta") if self.chat else None
                piece = delta.get("content") if isinstance(delta, dict) else choices[0].get("text")
                if isinstance(piece, str) and piece:
                    self.tokens += 1
                    self.text.append(piece)

    def _event(self, event: bytes) -> bytes | None:
        if event.startswith(MIGRATED_EVENT):
            _, _, data = event.partition(b"data: ")
            self._migrated = orjson.loads(data)
            return None
        if not event.startswith(b"data: "):
            return event
        if event.startswith(DONE_EVENT):
            self.done = True
            return event
        try:
            doc = orjson.loads(event[6:])
        except orjson.JSONDecodeError:
            return event
        if not isinstance(doc, dict):
            return event
        choices = doc.get("choices") or []
        rewrite = False
        if (self._shift or self._drop_role) and doc.get("id") is not None and self._chunk_id is not None:
            doc["id"] = self._chunk_id.decode()
            rewrite = True
        if choices and isinstance(choices[0], dict):
            delta = choices[0].get("delta") if self.chat else None
            piece = delta.get("content") if isinstance(delta, dict) else choices[0].get("text")
            if self._drop_role and isinstance(delta, dict) and "role" in delta and not piece:
                return None  # the continuation's own opening chunk
        usage = doc.get("usage")
        if self._shift and isinstance(usage, dict):
            usage["prompt_tokens"] = int(usage.get("prompt_tokens", 0)) - self._shift
            usage["completion_tokens"] = int(usage.get("completion_tokens", 0)) + self._shift
            rewrite = True
        return b"data: " + orjson.dumps(doc) if rewrite else event

    # ------------------------------------------------------------ moves
    def _count_splice(self, why: str) -> None:
        self.splices += 1
        if self.splices > self.splicer.max_splices:
            raise UpstreamError("reset", f"{why}; gave up after {self.splicer.max_splices} splices")

    async def _attach(self) -> None:
        moved = self._migrated or {}
        self._migrated = None
        destination = str(moved.get("destination_instance_id", ""))
        self._count_splice(f"migrated to {destination}")
        url = self.splicer.url_of(destination)
        if url is None:
            await self._failover(f"the destination {destination} of a migration is unknown")
            return
        request_id = str(moved.get("destination_request_id", "")).encode("latin-1")
        headers = self.headers + ATTACH_HEADER + b": " + request_id + b"\r\n"
        try:
            response = await self.splicer.pools.get(url).request(
                "POST", self.path, self.payload, headers, headers_timeout_s=SPLICE_CONNECT_TIMEOUT_S)
        except UpstreamError as exc:
            await self._failover(f"attach to {destination}: {exc}")
            return
        if response.status != 200:
            response.abort()
            await self._failover(f"attach to {destination}: HTTP {response.status}")
            return
        self.current.abort()
        self.current = response
        self.instance_id = destination
        self.splicer.stats.migrations_spliced += 1

    async def _failover(self, reason: str) -> None:
        """Re-submit what is left to another instance as a continuation."""
        failed = self.instance_id
        self.current.abort()
        if self.splicer.on_failure is not None:
            self.splicer.on_failure(failed, f"mid-stream: {reason}")
        self._count_splice(f"{failed}: {reason}")
        self._streamed()
        self.failed.add(failed)
        while True:
            target = self.splicer.pick(self.model, self.failed)
            if target is None:
                self.splicer.stats.failover_errors += 1
                raise UpstreamError("reset", f"{reason}; no other instance to continue on")
            self.failed.add(target.instance_id)  # until it answers; removed below when it does
            body, extra = continuation(self.payload, self.chat, "".join(self.text), self.tokens)
            url = target.url or self.splicer.url_of(target.instance_id)
            if body is None or not url:
                self.splicer.stats.failover_errors += 1
                raise UpstreamError("reset", f"{reason}; this request cannot be continued elsewhere")
            try:
                response = await self.splicer.pools.get(url).request(
                    "POST", self.path, body, self.headers + extra, headers_timeout_s=SPLICE_CONNECT_TIMEOUT_S)
            except UpstreamError as exc:
                if self.splicer.on_failure is not None:
                    self.splicer.on_failure(target.instance_id, str(exc))
                continue
            if response.status != 200:
                response.abort()
                continue
            self.failed.discard(target.instance_id)
            log.info("stream continued on another instance",
                     extra={"from": failed, "to": target.instance_id, "tokens": self.tokens})
            self.current = response
            self.instance_id = target.instance_id
            self._shift = self.tokens
            self._drop_role = True
            self._tail = b""
            self.splicer.stats.failovers += 1
            self.splicer.stats.by_instance[failed] = self.splicer.stats.by_instance.get(failed, 0) + 1
            return


def _marker(body: bytes) -> tuple[dict[str, Any], str, int] | None:
    """(where it went, the text generated before, its tokens) of a migration marker; None
    for a plain answer."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("tokenyard_migrated"), dict):
        return None
    text, tokens = doc.get("text"), doc.get("tokens")
    if not isinstance(text, str) or isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise UpstreamError("protocol", "a migration marker without its text and token count")
    return doc["tokenyard_migrated"], text, tokens


def _joined(body: bytes, chat: bool, before: str, shift: int) -> bytes:
    """The last leg's answer with the text of the legs before it in front and, after a
    continuation, its `usage` shifted back to the original prompt."""
    if not before and not shift:
        return body
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise UpstreamError("protocol", "the last leg of a migrated request answered no JSON") from None
    choices = doc.get("choices") if isinstance(doc, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise UpstreamError("protocol", "the last leg of a migrated request answered no choices")
    first = choices[0]
    holder = first.get("message") if chat else first
    key = "content" if chat else "text"
    if not isinstance(holder, dict) or not isinstance(holder.get(key, ""), str):
        raise UpstreamError("protocol", f"the last leg of a migrated request answered no {key}")
    holder[key] = before + (holder.get(key) or "")
    usage = doc.get("usage")
    if shift and isinstance(usage, dict):
        usage["prompt_tokens"] = int(usage.get("prompt_tokens", 0)) - shift
        usage["completion_tokens"] = int(usage.get("completion_tokens", 0)) + shift
    return orjson.dumps(doc)


def continuation(payload: bytes, chat: bool, text: str, tokens: int) -> tuple[bytes | None, bytes]:
    """The body and extra headers that ask an engine for the rest of a request whose first
    `tokens` tokens (`text`) were streamed; (None, b"") if it cannot be expressed."""
    doc = orjson.loads(bytes(payload))
    if not isinstance(doc, dict):
        return None, b""
    if tokens == 0:
        return bytes(payload), b""
    for name in ("max_tokens", "max_completion_tokens"):
        if isinstance(doc.get(name), int):
            doc[name] = max(1, doc[name] - tokens)
    if isinstance(doc.get("min_tokens"), int):
        doc["min_tokens"] = max(0, doc["min_tokens"] - tokens)
    if chat:
        messages = doc.get("messages")
        if not isinstance(messages, list):
            return None, b""
        doc["messages"] = [*messages, {"role": "assistant", "content": text}]
        doc["continue_final_message"] = True
        doc["add_generation_prompt"] = False
    else:
        if not isinstance(doc.get("prompt"), str):
            return None, b""  # token-id prompts: the streamed text has no ids to append
        doc["prompt"] = doc["prompt"] + text
    header = CONTINUATION_HEADER + f": tokens={tokens}; chars={len(text)}\r\n".encode()
    return orjson.dumps(doc), header
