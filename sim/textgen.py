"""Text without a model: prompt token counts, prefix-block hashes, and generated output.

The emulated engine has no tokenizer and no weights. This module gives it what it needs
to look like one from the outside, deterministically:

- `count_tokens` / `tokenize`: a pseudo-tokenizer. Pieces are GPT-2-style regex pieces (a
  word with its leading space, a run of up to 3 digits, a run of punctuation, whitespace),
  and a letter run longer than 10 characters is split into 5-character pieces, the way BPE
  splits rare long words. Chat special markers like `<|eot_id|>` are one token each.
  On the alpaca_eval model outputs in ../shared/data this gives 4.2 characters and 1.46
  words per token, close to what BPE tokenizers with large vocabularies (Llama-3, GPT-4)
  give on English (about 4 characters per token). Expect larger differences on code,
  non-Latin scripts and long numbers. It is an approximation for load modelling, never
  for billing.
- `render_chat`: chat messages rendered with a Llama-3-like template, so that the same
  system prompt and history give the same leading tokens (and prefix-cache hits).
- `prefix_block_hashes`: chained 64-bit hashes of each full block of tokens (vLLM's
  prefix-cache keys are chained the same way: a block's key covers everything before it).
  blake2b, not Python's `hash`, so that every process (router, engine, simulator) gets the
  same numbers.
- `OutputText`: output tokens drawn from a fixed English vocabulary by a PRNG seeded with
  the engine seed and the request, so the same request gives the same text; an engine
  that continues a request elsewhere (`OutputText.resumed`) goes on with the same tokens,
  as greedy decoding of the same model would.
- `OutputLengthDist`: `fixed:N`, `uniform:A:B`, `lognormal:MEDIAN:SIGMA`.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# A piece: a special marker, a word with optional leading space, up to 3 digits, a run of
# other non-space characters, or whitespace.
_PIECE = re.compile(r" ?<\|[a-z_]+\|>| ?[^\W\d_]+| ?\d{1,3}| ?(?:[^\s\w]|_)+|\s+", re.UNICODE)
_LONG_WORD_CHARS = 10
_SUBWORD_CHARS = 5


def tokenize(text: str) -> list[str]:
    """Split text into pseudo-tokens (see the module docstring for the approximation)."""
    pieces: list[str] = []
    append = pieces.append
    for piece in _PIECE.findall(text):
        if len(piece) > _LONG_WORD_CHARS and piece[-1].isalpha():
            for start in range(0, len(piece), _SUBWORD_CHARS):
                append(piece[start : start + _SUBWORD_CHARS])
        else:
            append(piece)
    return pieces


def count_tokens(text: str) -> int:
    """Number of pseudo-tokens in `text`."""
    count = 0
    for piece in _PIECE.findall(text):
        if len(piece) > _LONG_WORD_CHARS and piece[-1].isalpha():
            count += -(-len(piece) // _SUBWORD_CHARS)
        else:
            count += 1
    return count


class ChatFormatError(ValueError):
    """A chat message that cannot be rendered; the message says which one and why."""


def message_text(content: Any, where: str) -> str:
    """The text of a message's `content`: a string, or a list of `{"type": "text"}` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for index, part in enumerate(content):
            if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
                raise ChatFormatError(f"{where}.content[{index}]: expected an object with a 'type'")
            if part["type"] == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise ChatFormatError(f"{where}.content[{index}].text: expected a string")
                texts.append(text)
            # Images, audio and the like carry no text tokens here; vLLM would add their
            # placeholder tokens, which this engine does not model.
        return "\n".join(texts)
    raise ChatFormatError(f"{where}.content: expected a string or a list of content parts")


def render_chat(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
    """Render chat messages with a Llama-3-like template (each marker is one token)."""
    parts = ["<|begin_of_text|>"]
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ChatFormatError(f"{where}.role: expected a non-empty string")
        text = message_text(message.get("content"), where)
        parts.append(f"<|start_header_id|>{role}<|end_header_id|>\n\n{text}<|eot_id|>")
    if add_generation_prompt:
        parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(parts)


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def prefix_block_hashes(tokens: Sequence[str] | Sequence[int], block_tokens: int = 16) -> tuple[int, ...]:
    """Chained hashes of each full block of `block_tokens` tokens (a partial tail has none)."""
    if block_tokens < 1:
        raise ValueError(f"block_tokens: expected a positive integer, got {block_tokens}")
    hashes: list[int] = []
    parent = 0
    for start in range(0, len(tokens) - block_tokens + 1, block_tokens):
        block = tokens[start : start + block_tokens]
        payload = parent.to_bytes(8, "little") + "\x1f".join(map(str, block)).encode("utf-8", "surrogatepass")
        parent = _digest(payload)
        hashes.append(parent)
    return tuple(hashes)


def request_seed(engine_seed: int, *keys: str | int) -> int:
    """A 64-bit seed for one request, from the engine seed and what identifies the request."""
    text = "\x1e".join(str(k) for k in (engine_seed, *keys))
    return _digest(text.encode("utf-8", "surrogatepass"))


# A small English vocabulary; common function words repeat so the text reads like prose.
_WORDS = (  # noqa: SIM905  (a paragraph reads better than 150 quoted words)
    "the of and to in a is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there one all we their been has when who will "
    "more no if out so said what up its about into than them can only other new some could "
    "time these two may then do first any my now such like our over man me even most made "
    "after also did many before must through back years where much your way well down "
    "should because each just those people how too little state good very make world still "
    "own see men work long get here between both life being under never day same another "
    "know while last might us great old year off come since against go came right used take "
    "three engine token batch cache request model latency queue memory block prefix stream"
).split()
_VOCAB: tuple[str, ...] = tuple(" " + w for w in _WORDS) + (",", ".", ".", " and", " the")


class OutputText:
    """Deterministic output tokens for one request: `take(n)` returns the next n tokens.

    Tokens are drawn in blocks (one PRNG call per block, not per token, since streaming
    asks for one token at a time); each draw consumes the PRNG identically however the
    calls are split, so the text depends only on the seed.
    """

    __slots__ = ("_rng", "_buffer", "_pos", "_started")

    _BLOCK = 64

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._buffer: list[str] = []
        self._pos = 0
        self._started = False

    @classmethod
    def resumed(cls, seed: int, position: int) -> OutputText:
        """The text of `seed` from token `position` on: what an engine that continues a
        request (a migration's destination, a failover's continuation) generates next."""
        text = cls(seed)
        text.take(position)
        return text

    def take(self, n: int) -> list[str]:
        if n <= 0:
            return []
        available = len(self._buffer) - self._pos
        if available < n:
            self._buffer = self._buffer[self._pos :] + self._rng.choices(_VOCAB, k=max(self._BLOCK, n - available))
            self._pos = 0
        tokens = self._buffer[self._pos : self._pos + n]
        self._pos += n
        if not self._started:
            self._started = True
            tokens[0] = tokens[0].lstrip().capitalize() or tokens[0]
        return tokens


# What a chat answer's length looks like without max_tokens binding: median 200 tokens,
# a long right tail (ShareGPT-like conversations have a median of about 200-250).
DEFAULT_OUTPUT_LEN_DIST = "lognormal:200:0.8"


class OutputLengthError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class OutputLengthDist:
    """How many tokens a request generates when neither max_tokens nor a header fixes it."""

    kind: str  # "fixed", "uniform", "lognormal"
    a: float
    b: float = 0.0

    @staticmethod
    def parse(spec: str) -> OutputLengthDist:
        expected = "expected fixed:N, uniform:A:B or lognormal:MEDIAN:SIGMA"
        parts = spec.strip().split(":")
        kind = parts[0].lower()
        try:
            numbers = [float(p) for p in parts[1:]]
        except ValueError:
            raise OutputLengthError(f"output length distribution {spec!r}: {expected}") from None
        if kind == "fixed" and len(numbers) == 1 and numbers[0] >= 1 and numbers[0].is_integer():
            return OutputLengthDist("fixed", numbers[0])
        if kind == "uniform" and len(numbers) == 2 and 1 <= numbers[0] <= numbers[1]:
            return OutputLengthDist("uniform", math.ceil(numbers[0]), math.floor(numbers[1]))
        if kind == "lognormal" and len(numbers) == 2 and numbers[0] >= 1 and numbers[1] >= 0:
            return OutputLengthDist("lognormal", numbers[0], numbers[1])
        raise OutputLengthError(
            f"output length distribution {spec!r}: {expected} "
            "(N, A, MEDIAN >= 1, A <= B, SIGMA >= 0, N an integer)"
        )

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        return max(1, round(rng.lognormvariate(math.log(self.a), self.b)))

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"fixed:{int(self.a)}"
        if self.kind == "uniform":
            return f"uniform:{int(self.a)}:{int(self.b)}"
        return f"lognormal:{self.a:g}:{self.b:g}"


def join_tokens(tokens: Iterable[str]) -> str:
    return "".join(tokens)
