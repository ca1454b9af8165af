"""The features the output-length ranker reads from one request, and their versioned spec.

Everything comes from the request alone (what the router holds before forwarding): the
prompt text or chat `messages`, their structure (turns, earlier assistant answers, system
prompt), the input length, the target model's name, `max_tokens` and sampling parameters.
Two parts:

- dense features (`DENSE_FEATURE_NAMES`): cheap text statistics, chat structure, explicit
  length requests ("in 500 words", "list 10"), model-name cues (parameter count, family);
- task-type and requested-format cues (`task_*`, `format_*`): counts of words that mark code,
  lists, essays, translation, yes/no, maths, rewriting, extraction, explanation; JSON, table,
  bullets, one word/sentence. Word-set lookups, so they cost little and generalise beyond
  the wording of one data set;
- the instruction text (`instruction_text`): the last user turn, hashed into word 1-2 grams
  by scikit-learn's `HashingVectorizer` (`hashing_vectorizer`, raw counts), weighted by
  sublinear TF-IDF; a trained linear layer turns it into one more dense feature (see
  `scheduler.predictors.rank`);
- the target model's name (`RequestFeatures.model`, normalised by `model_key`), which the
  ranker looks up in its per-model verbosity prior.

`FEATURE_SPEC` names the version of all of this; a model file records the spec it was
built for, and loading it under another spec fails (`rank.RankModelError`). Change any
feature, its order, or the hashing parameters => bump `FEATURE_SPEC_VERSION`.

Text read is bounded (`MAX_TEXT_CHARS` per part), so the cost per request is bounded
whatever the prompt's size.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from scheduler.predictors.substrings import SubstringScan

FEATURE_SPEC_VERSION = 3
HASH_N_FEATURES = 2**18
HASH_NGRAM_RANGE = (1, 2)
MAX_TEXT_CHARS = 2000  # of the instruction read; a longer one is cut to its head and tail

_MODEL_FAMILIES = ("gpt", "llama", "qwen", "mistral", "mixtral", "gemma", "phi", "claude", "deepseek", "yi")
# Task-type cues: how many of the instruction's words name each kind of task. The kinds are
# those whose answers differ most in length (code and essays long; yes/no, classification and
# extraction short); the words are generic English, not any data set's wording.
_TASK_WORDS: dict[str, frozenset[str]] = {
    "code": frozenset(("code", "python", "javascript", "java", "sql", "function", "script", "program", "class",
                       "regex", "bash", "html", "css", "json", "api", "algorithm", "implement", "debug", "compile",
                       "snippet", "typescript", "rust", "golang", "cpp")),
    "list": frozenset(("list", "examples", "ideas", "tips", "ways", "suggestions", "options", "names", "steps",
                       "reasons", "items", "brainstorm", "recommendations", "alternatives")),
    "essay": frozenset(("essay", "story", "article", "blog", "poem", "letter", "speech", "report", "novel",
                        "chapter", "narrative", "lyrics", "song", "screenplay", "dialogue", "proposal", "email")),
    "translate": frozenset(("translate", "translation", "french", "spanish", "german", "chinese", "japanese",
                            "italian", "portuguese", "russian", "korean", "arabic", "english")),
    "yes_no": frozenset(("yes", "no", "true", "false", "correct", "whether")),
    "math": frozenset(("calculate", "solve", "equation", "sum", "total", "percent", "probability", "integral",
                       "derivative", "multiply", "divide", "average", "compute", "math", "arithmetic")),
    "rewrite": frozenset(("rewrite", "paraphrase", "rephrase", "edit", "proofread", "correct", "improve",
                          "shorten", "simplify", "grammar", "polish", "revise")),
    "extract": frozenset(("classify", "categorize", "categorise", "extract", "identify", "label", "sentiment",
                          "detect", "tag", "select", "pick", "rate", "score")),
    "explain": frozenset(("explain", "why", "how", "describe", "compare", "difference", "differences",
                          "analyze", "analyse", "discuss", "evaluate", "pros", "cons")),
}
_WORD_TASKS: dict[str, tuple[int, ...]] = {
    word: tuple(k for k, vocab in enumerate(_TASK_WORDS.values()) if word in vocab)
    for word in frozenset().union(*_TASK_WORDS.values())
}
# Requested-format cues: substrings of the lowercased instruction.
_FORMAT_CUES: dict[str, tuple[str, ...]] = {
    "structured": ("json", "table", "csv", "yaml", "markdown", "bullet", "numbered", "headings", "outline"),
    "one_unit": ("one word", "single word", "one sentence", "one line", "a number", "only the", "just the",
                 "no explanation", "without explanation", "short answer"),
    "long_form": ("in detail", "step by step", "step-by-step", "comprehensive", "thorough", "at least",
                  "long", "full", "complete"),
}
# Instruction length buckets (characters): answers to a one-liner, a paragraph and a pasted
# document behave differently (a pasted text often asks for a summary or an edit).
_LENGTH_BUCKETS_CHARS = (40, 120, 400, 1500)

DENSE_FEATURE_NAMES: tuple[str, ...] = (
    "log_input_tokens",
    "log_instruction_chars",
    "log_context_chars",
    "log_system_chars",
    "instruction_words_log",
    "instruction_lines_log",
    "question_marks",
    "digit_fraction",
    "code_symbol_fraction",
    "has_code_fence",
    "upper_fraction",
    "n_user_turns",
    "n_assistant_turns",
    "log_prior_assistant_chars",
    "log_requested_count",
    "requested_unit_words",
    "requested_unit_items",
    "brevity_cue",
    "length_cue",
    "starts_with_question",
    "starts_with_task_verb",
    "log_max_tokens",
    "has_max_tokens",
    "temperature",
    "top_p",
    "model_log_params_b",
    "model_is_chat",
    *(f"model_family_{name}" for name in _MODEL_FAMILIES),
    *(f"task_{name}" for name in _TASK_WORDS),
    *(f"format_{name}" for name in _FORMAT_CUES),
    "prompt_length_bucket",
)

FEATURE_SPEC: dict[str, Any] = {
    "version": FEATURE_SPEC_VERSION,
    "dense": list(DENSE_FEATURE_NAMES),
    "hash": {"n_features": HASH_N_FEATURES, "ngram_range": list(HASH_NGRAM_RANGE),
             "analyzer": "word", "lowercase": True, "alternate_sign": False,
             "weighting": "sublinear tf x idf, then l2 norm"},
    "task_words": {name: sorted(vocab) for name, vocab in _TASK_WORDS.items()},
    "format_cues": {name: list(cues) for name, cues in _FORMAT_CUES.items()},
    "length_buckets_chars": list(_LENGTH_BUCKETS_CHARS),
    "model_key": "lowercased, org prefix dropped",
    "max_text_chars": MAX_TEXT_CHARS,
}

# `\b\d{1,5}` written so that re can scan for its first digit in C (a pattern opening with
# \b is tried at every position), and kept only where a unit could follow (a space, a
# hyphen or a unit's first letter): the same numbers `_REQUEST_UNIT` can match after.
_DIGITS = re.compile(r"\d(?<!\w\d)\d{0,4}(?i:(?=[\s\-bceilnpqrstvw]))")
# the unit after a number (matched at the number's end: scanning the whole text for
# "number + unit" with one pattern cost ~50 us on a 1,500-character prompt)
_REQUEST_UNIT = re.compile(
    r"[\s-]*(words?|sentences?|paragraphs?|lines?|items?|examples?|ideas?|tips?|points?|"
    r"steps?|questions?|names?|reasons?|ways?|bullet\w*|pages?|characters?|tweets?|verses?|stanzas?)\b",
    re.IGNORECASE,
)
_WORD_UNITS = ("word", "sentence", "paragraph", "line", "page", "character", "verse", "stanza")
# the lookahead (an alternative's first letter) rejects most positions before the alternation
_BREVITY = re.compile(
    r"\b(?=[bcijostwy])(brief(ly)?|short|concise(ly)?|one word|single word|one sentence|yes or no|just (the|a)|only (the|answer)|"
    r"in a word|summari[sz]e|tl;?dr|classify|choose|which one|true or false)\b", re.IGNORECASE,
)
# Words asking for a long answer, counted over the lowercased words (a set lookup per word:
# a regex alternation of them cost 130 us on a 1,500-character prompt).
_LENGTH_WORDS = frozenset((
    "essay", "story", "article", "detailed", "elaborate", "comprehensive", "explain", "blog", "poem",
    "letter", "code", "implement", "program", "function", "script", "outline", "plan", "guide",
    "describe", "write", "compose", "draft", "generate", "create", "design", "develop",
))
_CUE_WORDS = _LENGTH_WORDS | _WORD_TASKS.keys()
_LENGTH_PHRASES = ("in detail", "step by step", "step-by-step")
_QUESTION_WORDS = frozenset(("what", "who", "whom", "when", "where", "which", "why", "is", "are", "was", "were",
                             "can", "could", "does", "do", "did", "will", "would", "should", "has", "have"))
_TASK_VERBS = frozenset(("write", "create", "generate", "compose", "draft", "give", "list", "explain",
                         "describe", "design", "develop", "make", "provide", "suggest", "plan", "implement",
                         "rewrite", "translate", "summarize", "summarise", "tell", "help", "how"))
# the word sets as bytes (the words are read from the text's UTF-8 bytes)
_CUE_WORDS_B = frozenset(w.encode() for w in _CUE_WORDS)
_LENGTH_WORDS_B = frozenset(w.encode() for w in _LENGTH_WORDS)
_QUESTION_WORDS_B = frozenset(w.encode() for w in _QUESTION_WORDS)
_TASK_VERBS_B = frozenset(w.encode() for w in _TASK_VERBS)
_WORD_TASKS_B = {w.encode(): tasks for w, tasks in _WORD_TASKS.items()}
# Every alternative of `_BREVITY` starts with one of these (lowercase): in an ASCII text the
# regex can only match where one of them starts, so it is tried there alone.
_BREVITY_KEYS = ("brief", "short", "concise", "one word", "single word", "one sentence", "yes or no", "just the",
                 "just a", "only the", "only answer", "in a word", "summari", "tl;dr", "tldr", "classify",
                 "choose", "which one", "true or false")
# All the fixed strings counted or looked for, found in one pass (`substrings.SubstringScan`)
_NEEDLES = tuple(dict.fromkeys((*(c for cues in _FORMAT_CUES.values() for c in cues), *_LENGTH_PHRASES,
                                *_BREVITY_KEYS)))
_FORMAT_NEEDLES = tuple(tuple(_NEEDLES.index(c) for c in cues) for cues in _FORMAT_CUES.values())
_LENGTH_PHRASE_NEEDLES = tuple(_NEEDLES.index(p) for p in _LENGTH_PHRASES)
_SCAN = SubstringScan([n.encode() for n in _NEEDLES], keep_positions=[_NEEDLES.index(k) for k in _BREVITY_KEYS])
# The characters other than ASCII letters that `re.IGNORECASE` matches to one (İ ı ſ K): a text
# without them matches `_BREVITY` only in ASCII characters
_FOLDS_TO_ASCII = ("\u0130", "\u0131", "\u017f", "\u212a")
_WORD = re.compile(r"[a-z]+")
_PARAMS_B = re.compile(r"(\d+(?:\.\d+)?)\s*[bB](?![a-zA-Z])")
_CODE_SYMBOLS = "{}();=<>[]_#/\\*&|$"

# The scoring path reads the text's UTF-8 bytes (issue 11: a bytes.translate or bytes.split
# costs a third to a half of the str one, and the counts stay exact: in UTF-8 an ASCII byte
# only ever encodes that ASCII character, every byte of any other character is >= 0x80).
# `encode` with surrogatepass: a lone surrogate (JSON allows "\ud800") is just bytes >= 0x80.
# `_WORD.findall(lower)`: [a-z] bytes kept, every other byte to a space, then split
_LETTERS_ONLY = bytes(c if 97 <= c <= 122 else 32 for c in range(256))


def _character_class(c: int) -> int:
    ch = chr(c)
    if c >= 128:
        return ord(".")
    if ch.isdigit():
        return ord("d")
    if ch.isalpha():  # `_DIGITS`' lookahead accepts these letters (either case) after a number
        follows = ch.lower() in "bceilnpqrstvw"
        return ord(("A" if follows else "U") if ch.isupper() else ("a" if follows else "w"))
    if ch == "_":
        return ord("_")
    if ch == "\n":
        return ord("n")
    if ch.isspace():
        return ord(" ")
    if ch == "-":
        return ord("h")
    if ch == "?":
        return ord("q")
    return ord("c") if ch in _CODE_SYMBOLS else ord(".")


# One translation of the text's bytes to a class per character (bytes >= 0x80 to "."), then
# single-byte counts: digits "d", uppercase "A" + "U", code symbols "c" + "_", newlines "n",
# question marks "q" (ASCII characters only, so these are exact for any text); and for an
# ASCII text whitespace-separated words (str whitespace to b" ", the rest to b"x", count
# b" x") and `_DIGITS`' numbers: the same pattern over the classes matches the same spans,
# and its search for a literal "d" runs in C (~2.5 us against ~14 us for `_DIGITS` on a
# 1,600-character text, which scans for \d position by position). Seven translations and
# counts before (issue 11, stop 23).
_CLASSES = bytes(map(_character_class, range(256)))
_SPACE_OR_OTHER = bytes(32 if c in b" n" else 120 for c in range(256))
_DIGITS_OF_CLASSES = re.compile(rb"d(?<![daAwU_]d)d{0,4}(?=[aA nh])")


@dataclass(frozen=True, slots=True)
class RequestFeatures:
    """One request's features: the dense vector (in `DENSE_FEATURE_NAMES` order) and the
    instruction text the hashed n-gram layer reads."""

    dense: tuple[float, ...]
    instruction_text: str
    model: str = ""  # `model_key` of the target model: the key of the ranker's verbosity prior


def _clip(text: str) -> str:
    """Head and tail of a long text: instructions sit at either end of a long prompt."""
    if len(text) <= MAX_TEXT_CHARS:
        return text
    half = MAX_TEXT_CHARS // 2
    return text[:half] + "\n" + text[-half:]


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(part.get("text", "")) for part in content
            if isinstance(part, Mapping) and part.get("type") == "text"
        )
    return ""


@dataclass(slots=True)
class _Chat:
    instruction: str  # the last user turn (or the whole completion prompt)
    context_chars: int  # everything before it, system prompt included
    system_chars: int
    user_turns: int
    assistant_turns: int
    prior_assistant_chars: int


def _chat_structure(record: Mapping[str, Any]) -> _Chat:
    prompt = record.get("prompt")
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        prompt = "\n".join(prompt)
    if isinstance(prompt, str):
        return _Chat(prompt, 0, 0, 1, 0, 0)
    messages = record.get("messages")
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        return _Chat("", 0, 0, 0, 0, 0)
    texts: list[tuple[str, str]] = []
    for message in messages:
        if isinstance(message, Mapping):
            texts.append((str(message.get("role", "user")), _content_text(message.get("content"))))
    last_user = -1
    for i, (role, _) in enumerate(texts):
        if role == "user":
            last_user = i
    instruction = texts[last_user][1] if last_user >= 0 else (texts[-1][1] if texts else "")
    chat = _Chat(instruction, 0, 0, 0, 0, 0)
    n_before = last_user if last_user >= 0 else len(texts) - 1  # the turns before the instruction
    for i, (role, text) in enumerate(texts):
        if role == "user":
            chat.user_turns += 1
        elif role in ("system", "developer"):
            chat.system_chars += len(text)
        if i < n_before:
            chat.context_chars += len(text)
            if role == "assistant":
                chat.assistant_turns += 1
                chat.prior_assistant_chars += len(text)
    return chat


def _number(record: Mapping[str, Any], key: str, default: float) -> float:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return default
    return float(value)


def model_key(model: str) -> str:
    """A model name as the verbosity prior keys it: lowercased, without an org prefix
    ("meta-llama/Meta-Llama-3-8B-Instruct" -> "meta-llama-3-8b-instruct")."""
    return model.strip().lower().rsplit("/", 1)[-1][:200]


def _task_and_format(cue_words: Sequence[bytes], counts: list[int], lower_chars: int) -> list[float]:
    """`cue_words`: the instruction's words that are in `_CUE_WORDS_B`, in order; `counts`:
    `_SCAN`'s counts of the lowercased instruction."""
    tasks = [0.0] * len(_TASK_WORDS)
    for word in cue_words:
        for k in _WORD_TASKS_B.get(word, ()):
            tasks[k] += 1.0
    get = counts.__getitem__
    formats = [float(min(10, sum(map(get, ids)))) for ids in _FORMAT_NEEDLES]
    bucket = float(sum(1 for edge in _LENGTH_BUCKETS_CHARS if lower_chars > edge))
    return [*(min(10.0, c) for c in tasks), *formats, bucket]


@functools.lru_cache(maxsize=1024)
def _model_features(model: str) -> tuple[float, ...]:
    name = model.lower()
    match = _PARAMS_B.search(name)
    params_b = float(match.group(1)) if match else 0.0
    is_chat = 1.0 if any(cue in name for cue in ("chat", "instruct", "-it", "gpt", "claude")) else 0.0
    families = [1.0 if family in name else 0.0 for family in _MODEL_FAMILIES]
    return (math.log1p(min(params_b, 10_000.0)), is_chat, *families)


def _requested_count(text: str, classes: bytes | None) -> tuple[float, float, float]:
    """(log of the largest explicit count asked for, unit is text length, unit is items).
    `classes`: the `_CLASSES` of an ASCII text, None for another."""
    best, words, items = 0, 0.0, 0.0
    if classes is not None:  # `_DIGITS` over the character classes, in C
        spans: Any = (m.span() for m in _DIGITS_OF_CLASSES.finditer(classes))
    else:
        spans = (m.span() for m in _DIGITS.finditer(text))
    for start, end in spans:
        unit = _REQUEST_UNIT.match(text, end)  # `_DIGITS` only filters: this decides
        if unit is None:
            continue
        count = int(text[start:end])
        if count > best:
            best = count
            is_words = unit.group(1).lower().startswith(_WORD_UNITS)
            words, items = (1.0, 0.0) if is_words else (0.0, 1.0)
    return math.log1p(best), words, items


def _brevity(text: str, lower: str, lower_raw: bytes, hits: list[tuple[int, int]]) -> float:
    """1.0 where `_BREVITY.search(text)` matches. Every match starts where one of
    `_BREVITY_KEYS` does in the lowercased text (`hits`: byte offsets in its UTF-8), unless the
    text holds a character that IGNORECASE folds to an ASCII letter; so the regex is tried at
    those offsets only (as character offsets: the same in an ASCII text, and in any text that
    lowercasing keeps one character per character). The search itself cost up to ~64 us
    (ASCII) and ~75 us (not ASCII) on a 1,600-character answer (issue 11, stop 23)."""
    if not text.isascii() and any(c in text for c in _FOLDS_TO_ASCII):
        return 1.0 if _BREVITY.search(text) else 0.0
    if not hits:
        return 0.0
    if len(lower_raw) == len(text):  # ASCII: byte offsets are character offsets
        return 1.0 if any(_BREVITY.match(text, at) for _, at in hits) else 0.0
    if len(lower) != len(text):
        return 1.0 if _BREVITY.search(text) else 0.0
    return 1.0 if any(_BREVITY.match(text, len(lower_raw[:at].decode("utf-8", "surrogatepass"))) for _, at in hits) else 0.0


def request_features(record: Mapping[str, Any]) -> RequestFeatures:
    """The features of one request record (`prompt` or `messages`, optional `model`,
    `max_tokens`, `temperature`, `top_p`, `input_tokens`)."""
    chat = _chat_structure(record)
    text = _clip(chat.instruction)
    n = max(1, len(text))
    raw = text.encode("utf-8", "surrogatepass")
    is_ascii = len(raw) == len(text)
    classes = raw.translate(_CLASSES)
    digits = classes.count(b"d")
    uppers = classes.count(b"A") + classes.count(b"U")
    code = classes.count(b"c") + classes.count(b"_")
    n_words = (b" " + classes.translate(_SPACE_OR_OTHER)).count(b" x") if is_ascii else len(text.split())
    input_tokens = _number(record, "input_tokens", -1.0)
    if input_tokens < 0:  # ~4 characters per token for English BPE vocabularies
        input_tokens = (len(chat.instruction) + chat.context_chars) / 4.0
    max_tokens = _number(record, "max_tokens", _number(record, "max_completion_tokens", 0.0))
    # no number without a digit (\d is wider than 0-9 outside ASCII)
    count, unit_words, unit_items = (
        _requested_count(text, classes if is_ascii else None) if digits or not is_ascii else (0.0, 0.0, 0.0))
    lower = text.lower()
    lower_raw = lower.encode("utf-8", "surrogatepass")
    words = lower_raw.translate(_LETTERS_ONLY).split()
    first = words[0] if words else b""
    # one set lookup per word, in C, for both the length and the task cues; then the few hits
    cue_words = list(filter(_CUE_WORDS_B.__contains__, words))
    counts, hits = _SCAN.scan(lower_raw)
    length_cues = sum(1 for w in cue_words if w in _LENGTH_WORDS_B) + sum(map(counts.__getitem__, _LENGTH_PHRASE_NEEDLES))
    dense = [
        math.log1p(max(0.0, input_tokens)),
        math.log1p(len(chat.instruction)),
        math.log1p(chat.context_chars),
        math.log1p(chat.system_chars),
        math.log1p(n_words),
        math.log1p(classes.count(b"n")),
        float(min(classes.count(b"q"), 20)),
        digits / n,
        code / n,
        1.0 if "```" in text else 0.0,
        uppers / n,
        float(min(chat.user_turns, 50)),
        float(min(chat.assistant_turns, 50)),
        math.log1p(chat.prior_assistant_chars),
        count,
        unit_words,
        unit_items,
        _brevity(text, lower, lower_raw, hits),
        float(min(length_cues, 10)),
        1.0 if first in _QUESTION_WORDS_B else 0.0,
        1.0 if first in _TASK_VERBS_B else 0.0,
        math.log1p(max(0.0, max_tokens)),
        1.0 if max_tokens > 0 else 0.0,
        _number(record, "temperature", 1.0),
        _number(record, "top_p", 1.0),
        *_model_features(str(record.get("model") or "")),
        *_task_and_format(cue_words, counts, len(lower)),
    ]
    return RequestFeatures(dense=tuple(dense), instruction_text=text, model=model_key(str(record.get("model") or "")))


def hashing_vectorizer() -> Any:
    """The scikit-learn `HashingVectorizer` of `FEATURE_SPEC`: raw word 1-2 gram counts
    (stateless; the TF-IDF weighting is applied by `tfidf`)."""
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(
        n_features=HASH_N_FEATURES, ngram_range=HASH_NGRAM_RANGE, analyzer="word",
        lowercase=True, norm=None, alternate_sign=False, dtype="float64",
    )


def tfidf(counts: Any, idf: Any) -> Any:
    """Sublinear TF-IDF of hashed counts (a scipy CSR matrix): 1 + ln(count), times the
    bucket's idf, each row l2-normalised (scikit-learn's `TfidfTransformer(sublinear_tf=True)`)."""
    from sklearn.preprocessing import normalize

    weighted = counts.tocsr(copy=True)
    weighted.data = (1.0 + np.log(weighted.data)) * np.asarray(idf)[weighted.indices]
    return normalize(weighted, norm="l2", copy=False)
