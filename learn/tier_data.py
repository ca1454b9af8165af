"""Readers of tier-routing training data: prompts with the small and the large tier's
score on each, from whatever benchmark and model pair a folder or file holds.

Every reader yields `LabelledPrompt`s with scores in [0, 1] (correctness 0/1, a 1-10
grade mapped to [0, 1], a preference as a win rate against the large model). Layouts:

- a RouteLLM-style folder: `<benchmark>/**/*.csv` with a `prompt` column and per-model
  correctness columns (boolean, or a score in [0, 1]; `*_response` columns ignored); `mt_bench/question.jsonl` +
  `judgements.jsonl` (GPT-4 grades per model and turn); each benchmark's
  `contaminated_prompts.jsonl` lists prompts (`eval_prompt`) that are dropped;
- an AlpacaEval folder: `derived_preferences_vs_*.csv` + `derived_instructions.csv`
  (preference 1..2 of a model against the baseline, which is the large tier);
- a plain file, `.jsonl` or `.csv`: `prompt` (or `messages`), `small_score`, `large_score`
  (or `small_ok`), optional `benchmark`, `task`.

Which columns are the tiers: the ones named by `small_model` / `large_model`, else the
weakest and the strongest (mean score), so a folder with another model pair needs no option.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scheduler.predictors.text import prompt_text

DEFAULT_GRADE_MARGIN = 0.1  # graded tasks: small ok within 0.1 of the large score (~1 of 10 points)
DEFAULT_ALPACA_SMALL_MODEL = "Mixtral-8x7B-Instruct-v0.1_concise"  # RouteLLM's weak model
MAX_PROMPT_CHARS = 100_000
_BOOL = {"true": True, "false": False, "1": True, "0": False}


class TierDataError(ValueError):
    """Training data that cannot be read; the message says which file, where and what was expected."""


@dataclass(frozen=True, slots=True)
class LabelledPrompt:
    prompt: str
    benchmark: str
    task: str
    q_small: float
    q_large: float
    margin: float = 0.0

    @property
    def small_ok(self) -> bool:
        """The small tier's answer suffices: as good as the large one's, within the margin."""
        return self.q_small >= self.q_large - self.margin - 1e-9


def _normalise(text: str) -> str:
    return " ".join(text.replace("\u2019", "'").split()).lower()


def _contaminated(folder: Path) -> set[str]:
    found: set[str] = set()
    for path in folder.rglob("contaminated_prompts.jsonl"):
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TierDataError(f"{path}:{lineno}: not JSON ({exc.msg})") from exc
            prompt = doc.get("eval_prompt") if isinstance(doc, dict) else None
            if isinstance(prompt, str):
                found.add(_normalise(prompt))
    return found


def _pick_pair(columns: dict[str, list[float]], small_model: str | None, where: str,
               large_model: str | None = None) -> tuple[str, str]:
    """(small, large) columns: the named ones, else the weakest and the strongest by mean."""
    names = sorted(columns)
    if len(names) < 2:
        raise TierDataError(f"{where}: expected two per-model score columns, found {names}")
    for named in (small_model, large_model):
        if named is not None and named not in columns and len(names) > 2:
            raise TierDataError(f"{where}: no model column {named!r}; columns: {names}")
    ranked = sorted(names, key=lambda n: sum(columns[n]) / max(1, len(columns[n])))
    small = small_model if small_model in columns else None
    large = large_model if large_model in columns else None
    small = small or next(n for n in ranked if n != large)
    large = large or next(n for n in reversed(ranked) if n != small)
    return small, large


def _score(cell: Any) -> float | None:
    """A correctness cell: true/false/1/0, or a score in [0, 1]; None otherwise."""
    text = str(cell if cell is not None else "").strip().lower()
    if text in _BOOL:
        return float(_BOOL[text])
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0.0 <= value <= 1.0 else None


def read_correctness_csv(path: Path, benchmark: str, task: str, skip: set[str],
                         small_model: str | None = None, large_model: str | None = None) -> list[LabelledPrompt]:
    """A RouteLLM responses CSV: `prompt` plus per-model correctness (boolean, or a score in [0, 1])."""
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames or []
        if "prompt" not in fields:
            raise TierDataError(f"{path}: expected a 'prompt' column, found {fields[:8]}")
        rows = list(reader)
    model_columns = [f for f in fields if f != "prompt" and not f.endswith("_response")
                     and rows and all(_score(r.get(f)) is not None for r in rows[:50])]
    scores = {c: [_score(r.get(c)) or 0.0 for r in rows] for c in model_columns}
    small, large = _pick_pair(scores, small_model, str(path), large_model)
    out = []
    for i, row in enumerate(rows):
        prompt = row["prompt"] or ""
        if _normalise(prompt) in skip or not prompt.strip():
            continue
        out.append(LabelledPrompt(prompt[:MAX_PROMPT_CHARS], benchmark, task, scores[small][i], scores[large][i]))
    return out


def _jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TierDataError(f"{path}:{lineno}: not JSON ({exc.msg})") from exc
            if not isinstance(doc, dict):
                raise TierDataError(f"{path}:{lineno}: expected a JSON object")
            yield doc


def read_mt_bench(folder: Path, skip: set[str], small_model: str | None = None,
                  margin: float = DEFAULT_GRADE_MARGIN, large_model: str | None = None) -> list[LabelledPrompt]:
    """MT-Bench: one prompt per question and turn (turn 2 carries turn 1 before it), scored
    by the judge's 1-10 grade mapped to [0, 1]."""
    questions = {d["question_id"]: d for d in _jsonl(folder / "question.jsonl") if "question_id" in d}
    grades: dict[str, dict[tuple[Any, int], float]] = {}
    for doc in _jsonl(folder / "judgements.jsonl"):
        score = doc.get("score")
        if not isinstance(score, int | float) or score < 1:
            continue  # the judge gave no grade
        grades.setdefault(str(doc.get("model")), {})[(doc.get("question_id"), int(doc.get("turn", 1)))] = (
            (float(score) - 1.0) / 9.0
        )
    keys = set.intersection(*(set(g) for g in grades.values())) if grades else set()
    means = {m: [g[k] for k in keys] for m, g in grades.items()}
    small, large = _pick_pair(means, small_model, str(folder / "judgements.jsonl"), large_model)
    out = []
    for qid, turn in sorted(keys, key=lambda k: (str(k[0]), k[1])):
        question = questions.get(qid)
        if question is None:
            continue
        turns = [t for t in question.get("turns", []) if isinstance(t, str)]
        prompt = "\n".join(turns[:turn])
        if not prompt or _normalise(prompt) in skip:
            continue
        task = f"mt_bench/{question.get('category', 'unknown')}"
        out.append(LabelledPrompt(prompt, "mt_bench", task, grades[small][(qid, turn)], grades[large][(qid, turn)], margin))
    return out


def read_routellm(root: Path, small_model: str | None = None, margin: float = DEFAULT_GRADE_MARGIN,
                  large_model: str | None = None) -> tuple[list[LabelledPrompt], int]:
    """Every benchmark folder under `root`; returns the prompts and how many were dropped as contaminated."""
    out: list[LabelledPrompt] = []
    dropped = 0
    for bench_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        skip = _contaminated(bench_dir)
        before = len(out)
        total = 0
        if (bench_dir / "question.jsonl").exists() and (bench_dir / "judgements.jsonl").exists():
            out.extend(read_mt_bench(bench_dir, skip, small_model, margin, large_model))
            skip_none = read_mt_bench(bench_dir, set(), small_model, margin, large_model)
            total = len(skip_none)
        csvs = sorted(bench_dir.rglob("*.csv"))
        for path in csvs:
            subject = re.sub(rf"^{re.escape(bench_dir.name)}_", "", path.stem)
            task = bench_dir.name if len(csvs) == 1 else f"{bench_dir.name}/{subject}"
            rows = read_correctness_csv(path, bench_dir.name, task, skip, small_model, large_model)
            out.extend(rows)
            total += (len(read_correctness_csv(path, bench_dir.name, task, set(), small_model, large_model))
                      if skip else len(rows))
        dropped += total - (len(out) - before)
    return out, dropped


def read_alpaca_eval(folder: Path, small_model: str = DEFAULT_ALPACA_SMALL_MODEL,
                     margin: float = DEFAULT_GRADE_MARGIN) -> list[LabelledPrompt]:
    """AlpacaEval preferences: q_small = P(small beats the baseline), q_large = 0.5 (a tie
    with itself); the baseline of the preferences file is the large tier."""
    prefs = sorted(folder.glob("derived_preferences_vs_*.csv"))
    instructions_path = folder / "derived_instructions.csv"
    if not prefs or not instructions_path.exists():
        raise TierDataError(f"{folder}: expected derived_preferences_vs_*.csv and derived_instructions.csv")
    with instructions_path.open(encoding="utf-8", newline="") as handle:
        instructions = {r["instruction_id"]: r for r in csv.DictReader(handle)}
    out = []
    models: set[str] = set()
    with prefs[0].open(encoding="utf-8", newline="") as handle:
        for lineno, row in enumerate(csv.DictReader(handle), 2):
            models.add(row.get("model", ""))
            if row.get("model") != small_model:
                continue
            inst = instructions.get(row.get("instruction_id", ""))
            if inst is None:
                continue
            try:
                win = min(1.0, max(0.0, float(row["preference"]) - 1.0))
            except (KeyError, ValueError) as exc:
                raise TierDataError(f"{prefs[0]}:{lineno}: preference: expected a number in [1, 2]") from exc
            out.append(LabelledPrompt(inst["instruction"], "alpaca_eval", f"alpaca_eval/{inst.get('dataset', '')}",
                                      win, 0.5, margin))
    if not out:
        raise TierDataError(f"{prefs[0]}: no rows for small model {small_model!r}; models: {sorted(models)[:10]}...")
    return out


def read_plain(path: Path, margin: float = DEFAULT_GRADE_MARGIN) -> list[LabelledPrompt]:
    """A `.jsonl` or `.csv` of prompt, small_score, large_score (or small_ok), benchmark?, task?"""
    if path.suffix == ".jsonl":
        records: list[tuple[int, dict[str, Any]]] = list(enumerate(_jsonl(path), 1))
    else:
        csv.field_size_limit(sys.maxsize)
        with path.open(encoding="utf-8", newline="") as handle:
            records = [(i, dict(r)) for i, r in enumerate(csv.DictReader(handle), 2)]
    out = []
    for lineno, doc in records:
        text = prompt_text(doc)
        try:
            if "small_score" in doc:
                q_small, q_large = float(doc["small_score"]), float(doc["large_score"])
            else:
                ok = doc["small_ok"]
                ok = _BOOL[str(ok).strip().lower()] if not isinstance(ok, bool) else ok
                q_small, q_large = float(ok), 1.0
        except (KeyError, TypeError, ValueError) as exc:
            raise TierDataError(
                f"{path}:{lineno}: expected small_score and large_score in [0, 1], or small_ok (true/false) ({exc!r})"
            ) from exc
        if not text or not (0.0 <= q_small <= 1.0 and 0.0 <= q_large <= 1.0):
            raise TierDataError(f"{path}:{lineno}: expected a non-empty prompt and scores in [0, 1]")
        benchmark = str(doc.get("benchmark") or path.stem)
        out.append(LabelledPrompt(text[:MAX_PROMPT_CHARS], benchmark, str(doc.get("task") or benchmark),
                                  q_small, q_large, float(doc.get("margin", margin))))
    return out


def read_any(path: Path, small_model: str | None = None, alpaca_small_model: str = DEFAULT_ALPACA_SMALL_MODEL,
             margin: float = DEFAULT_GRADE_MARGIN, large_model: str | None = None) -> tuple[list[LabelledPrompt], int]:
    """Whatever `path` holds (see the module docstring): prompts and the contaminated count dropped."""
    if not path.exists():
        raise TierDataError(f"{path}: no such file or folder")
    try:
        if path.is_file():
            if path.suffix not in (".jsonl", ".csv"):
                raise TierDataError(f"{path}: expected a .jsonl or .csv file, or a data folder")
            return read_plain(path, margin), 0
        alpaca = path / "alpaca_eval" if (path / "alpaca_eval").is_dir() else path
        if list(alpaca.glob("derived_preferences_vs_*.csv")):
            return read_alpaca_eval(alpaca, alpaca_small_model, margin), 0
        routellm = path / "routellm" if (path / "routellm").is_dir() else path
        rows, dropped = read_routellm(routellm, small_model, margin, large_model)
        if not rows:
            raise TierDataError(f"{path}: no benchmark folders with responses CSVs or MT-Bench judgements found")
        return rows, dropped
    except (OSError, UnicodeDecodeError) as exc:
        raise TierDataError(f"{path}: cannot read ({exc})") from exc
