"""Training examples for the output-length ranker: readers of the public data sets and of
the router's finished-request log, and the output-token counter.

Each example is (request features, output tokens, prompt key, model, source). Sources:

- `lengths/alpaca_eval/model_outputs/<model>/model_outputs.json`: 805 prompts answered by 11
  models; the answers are tokenised (`TokenCounter`).
- `lengths/alpaca_eval/derived_output_lengths_all_models.csv`: the same prompts' answer
  lengths in words for 227 models (those without texts above get tokens = words x the
  tokens-per-word ratio measured on the texts, and are marked `alpaca_words`).
- `routing/routellm/gsm8k/gsm8k_responses.csv`: 1,319 maths prompts, two models' answers.
- `routing/routellm/mt_bench/judgements.jsonl`: 80 two-turn conversations of two models; the
  second turn carries the first turn and its answer as chat history (multi-turn features).
- any `*.jsonl` file: the router's request records (router/records.py; the older rank log
  has the same keys), one `{"feature_spec", "dense", ["instruction_text"], "model",
  "output_tokens", ...}` per line, or plain request records `{"prompt"|"messages", "model",
  ..., "output_tokens"}`. Router records of requests that were not answered in full
  (`rejected`, or a `status` other than 200) are skipped, as are those that carry no
  features (the ranker was off and no prompt text was recorded); a file with records but
  none usable says so.

Output tokens are counted with Mistral's Tekken tokenizer (`tekken_240911.json`, a 131k
byte-level BPE vocabulary shipped inside the `mistral-common` PyPI package, loaded from the
installed package with no network). tiktoken was not used: it downloads its encodings on
first use.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scheduler.predictors.features import (
    DENSE_FEATURE_NAMES,
    FEATURE_SPEC_VERSION,
    RequestFeatures,
    model_key,
    request_features,
)

TOKENIZER_NAME = "mistral-common tekken_240911 (Tekken BPE, 131k vocabulary)"
MAX_LOG_LINE_BYTES = 1 << 20
_MODEL_FEATURES = frozenset(n for n in DENSE_FEATURE_NAMES if n.startswith("model_"))
_DATASET_JSONL = frozenset({"judgements.jsonl", "question.jsonl", "contaminated_prompts.jsonl"})


class RankDataError(ValueError):
    """A data file that cannot be read as training data; says which file and line."""


@dataclass(frozen=True, slots=True)
class Example:
    features: RequestFeatures
    output_tokens: int
    prompt_key: str  # examples with equal keys share a prompt: never split across train/test
    model: str
    source: str


class TokenCounter:
    """Counts output tokens with the Tekken vocabulary shipped in `mistral-common`."""

    def __init__(self) -> None:
        from pathlib import Path as _Path

        try:
            import mistral_common
            from mistral_common.tokens.tokenizers.tekken import Tekkenizer
        except ImportError as exc:  # pragma: no cover - a declared dependency
            raise RankDataError("counting output tokens needs the mistral-common package") from exc
        path = _Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
        self._tokenizer = Tekkenizer.from_file(path)
        self.name = TOKENIZER_NAME

    def count(self, text: str) -> int:
        return len(self._tokenizer.encode(text, bos=False, eos=False))


def _prompt_key(text: str) -> str:
    return " ".join(text.lower().split())[:2000]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RankDataError(f"{path}: cannot read JSON: {exc}") from exc


def alpaca_text_examples(root: Path, counter: TokenCounter) -> tuple[list[Example], float]:
    """The 11 models' answers, tokenised; also the measured tokens-per-word ratio."""
    examples: list[Example] = []
    tokens_total = words_total = 0
    for path in sorted((root / "model_outputs").glob("*/model_outputs.json")):
        rows = _read_json(path)
        model = path.parent.name
        for row in rows:
            text, output = str(row.get("instruction", "")), str(row.get("output", ""))
            tokens = counter.count(output)
            tokens_total += tokens
            words_total += len(output.split())
            record = {"messages": [{"role": "user", "content": text}], "model": model}
            examples.append(Example(request_features(record), tokens, _prompt_key(text), model, "alpaca"))
    ratio = tokens_total / words_total if words_total else 1.3
    return examples, ratio


def alpaca_word_examples(root: Path, tokens_per_word: float, skip_models: set[str]) -> list[Example]:
    """The 227 models' answer lengths in words (models with texts skipped)."""
    instructions: dict[str, str] = {}
    with (root / "derived_instructions.csv").open(encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            instructions[row["instruction_id"]] = row["instruction"]
    features = {
        key: request_features({"messages": [{"role": "user", "content": text}]})
        for key, text in instructions.items()
    }
    examples: list[Example] = []
    with (root / "derived_output_lengths_all_models.csv").open(encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            model = row["model"]
            if model in skip_models or row["instruction_id"] not in instructions:
                continue
            text = instructions[row["instruction_id"]]
            feats = _with_model(features[row["instruction_id"]], text, model)
            tokens = round(int(row["output_words"]) * tokens_per_word)
            examples.append(Example(feats, tokens, _prompt_key(text), model, "alpaca_words"))
    return examples


def _with_model(base: RequestFeatures, text: str, model: str) -> RequestFeatures:
    """The features of the same prompt sent to another model (only model features differ)."""
    other = request_features({"messages": [{"role": "user", "content": ""}], "model": model})
    dense = tuple(o if name in _MODEL_FEATURES else b for name, b, o in zip(DENSE_FEATURE_NAMES, base.dense, other.dense, strict=True))
    return RequestFeatures(dense=dense, instruction_text=base.instruction_text, model=other.model)


def gsm8k_examples(path: Path, counter: TokenCounter) -> list[Example]:
    examples: list[Example] = []
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        models = [c[: -len("_response")] for c in reader.fieldnames or () if c.endswith("_response")]
        for row in reader:
            prompt = row["prompt"]
            for model in models:
                answer = row.get(f"{model}_response") or ""
                record = {"messages": [{"role": "user", "content": prompt}], "model": model}
                examples.append(
                    Example(request_features(record), counter.count(answer), _prompt_key(prompt), model, "gsm8k")
                )
    return examples


_TURN = re.compile(r"### (User|Assistant A):\n(.*?)(?=\n\n### (?:User|Assistant A):\n|\n\n<\|The End of Assistant A)", re.S)


def mt_bench_examples(path: Path, counter: TokenCounter) -> list[Example]:
    """Both turns of each two-turn conversation; turn 2 sees turn 1 and its answer."""
    examples: list[Example] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if "multi-turn" not in str(row.get("judge", "")):
            continue
        text = str(row["user_prompt"])
        start = text.find("<|The Start of Assistant A's Conversation with User|>")
        turns = _TURN.findall(text[start:]) if start >= 0 else []
        messages: list[dict[str, str]] = []
        key = f"mt_bench:{row['question_id']}"
        for role, content in turns:
            if role == "User":
                messages.append({"role": "user", "content": content.strip()})
                continue
            record = {"messages": list(messages), "model": row["model"]}
            turn = sum(1 for m in messages if m["role"] == "user")
            examples.append(
                Example(request_features(record), counter.count(content), key, str(row["model"]), f"mt_bench_turn{turn}")
            )
            messages.append({"role": "assistant", "content": content.strip()})
    return examples


def log_examples(path: Path) -> Iterator[Example]:
    """Examples from a JSONL file: the router's request records or plain request records."""
    unanswered = featureless = found = 0
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            where = f"{path}:{number}"
            if len(line) > MAX_LOG_LINE_BYTES:
                raise RankDataError(f"{where}: line longer than {MAX_LOG_LINE_BYTES} bytes")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise RankDataError(f"{where}: not JSON: {exc}") from exc
            if isinstance(row, Mapping) and (row.get("rejected") is True or row.get("status", 200) != 200):
                unanswered += 1  # its output length is not the answer's (failed, cut, turned away)
                continue
            if isinstance(row, Mapping) and "status" in row and not {"dense", "prompt", "messages"} & set(row):
                featureless += 1
                continue
            found += 1
            yield _log_example(row, where)
    if not found and featureless:
        raise RankDataError(f"{path}: {featureless} router record(s) carry no ranker features: turn the ranker on "
                            "(`rank:` in the router config) or set records.include_prompt_text, then retrain")


def _log_example(row: Any, where: str) -> Example:
    if not isinstance(row, Mapping):
        raise RankDataError(f"{where}: expected a JSON object")
    tokens = row.get("output_tokens")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise RankDataError(f"{where}: output_tokens: expected a non-negative integer, got {tokens!r}")
    model = str(row.get("model") or "")
    if "dense" in row:
        if row.get("feature_spec") != FEATURE_SPEC_VERSION:
            raise RankDataError(
                f"{where}: logged with feature spec {row.get('feature_spec')!r}, this version computes "
                f"{FEATURE_SPEC_VERSION}; log request records instead, or retrain with the matching version"
            )
        dense = row["dense"]
        if not isinstance(dense, list) or len(dense) != len(DENSE_FEATURE_NAMES):
            raise RankDataError(f"{where}: dense: expected a list of {len(DENSE_FEATURE_NAMES)} numbers")
        text = str(row.get("instruction_text") or "")
        feats = RequestFeatures(dense=tuple(float(v) for v in dense), instruction_text=text, model=model_key(model))
    elif "prompt" in row or "messages" in row:
        feats = request_features(row)
        text = feats.instruction_text
    else:
        raise RankDataError(f"{where}: expected logged features (dense) or a request (prompt or messages)")
    # Records without the prompt text (the privacy default) are each their own "prompt" for
    # the held-out split: the request id keeps them apart instead of lumping them into one.
    key = _prompt_key(text) or f"request:{row.get('request_id') or where}"
    return Example(feats, tokens, key, model, "log")


def load_examples(
    paths: Sequence[Path], *, word_models: bool = True, progress: Callable[[str], None] | None = None
) -> tuple[list[Example], dict[str, Any]]:
    """All examples under the given paths (data roots, their subfolders, or JSONL logs)."""
    counter: TokenCounter | None = None
    examples: list[Example] = []
    info: dict[str, Any] = {"tokenizer": TOKENIZER_NAME, "sources": {}}

    def need_counter() -> TokenCounter:
        nonlocal counter
        if counter is None:
            counter = TokenCounter()
        return counter

    def add(name: str, found: Iterable[Example]) -> None:
        batch = list(found)
        examples.extend(batch)
        info["sources"][name] = info["sources"].get(name, 0) + len(batch)
        if progress:
            progress(f"{name}: {len(batch)} examples")

    for path in paths:
        if not path.exists():
            raise RankDataError(f"{path}: no such file or folder")
        if path.is_file():
            if path.suffix != ".jsonl":
                raise RankDataError(f"{path}: expected a .jsonl log or a data folder")
            add(str(path), log_examples(path))
            continue
        found_any = False
        for alpaca in _find(path, "model_outputs", "lengths/alpaca_eval", "alpaca_eval"):
            found_any = True
            texts, ratio = alpaca_text_examples(alpaca, need_counter())
            info["tokens_per_word"] = round(ratio, 4)
            add("alpaca_eval texts", texts)
            if word_models and (alpaca / "derived_output_lengths_all_models.csv").exists():
                add("alpaca_eval word lengths", alpaca_word_examples(alpaca, ratio, {e.model for e in texts}))
        for gsm in _find_file(path, "gsm8k_responses.csv"):
            found_any = True
            add("gsm8k", gsm8k_examples(gsm, need_counter()))
        for mt in _find_file(path, "judgements.jsonl"):
            found_any = True
            add("mt_bench", mt_bench_examples(mt, need_counter()))
        for log in sorted(path.glob("*.jsonl")):
            if log.name not in _DATASET_JSONL:
                found_any = True
                add(str(log), log_examples(log))
        if not found_any:
            raise RankDataError(
                f"{path}: no training data found (expected ../shared/data, lengths/alpaca_eval, "
                "routing/routellm, or .jsonl logs)"
            )
    return examples, info


def _find(root: Path, marker: str, *relatives: str) -> list[Path]:
    if (root / marker).is_dir():
        return [root]
    return [root / rel for rel in relatives if (root / rel / marker).is_dir()][:1]


def _find_file(root: Path, name: str) -> list[Path]:
    for rel in ("", "gsm8k", "mt_bench", "routellm/gsm8k", "routellm/mt_bench",
                "routing/routellm/gsm8k", "routing/routellm/mt_bench"):
        candidate = root / rel / name
        if candidate.is_file():
            return [candidate]
    return []
