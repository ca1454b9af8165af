"""What `tokenyard rank score` and `tokenyard tier score` share: reading a JSONL file of
request records (`prompt` or OpenAI `messages` per line) with clear, located errors and a
bound on each line, and writing the scores atomically.

A line is read with `readline(limit)`, so a file with no newline costs at most
`MAX_LINE_CHARS` characters of memory before it is refused."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

MAX_LINE_CHARS = 4 * 1024 * 1024


def read_records(handle: TextIO, where: str, max_line_chars: int = MAX_LINE_CHARS) -> Iterator[dict[str, Any]]:
    """The records of `handle`, one JSON object per non-blank line, each with a `prompt`
    (a string or a list of strings) or `messages` (a list of objects). ValueError naming
    `where`, the line and what was expected for anything else (a line over
    `max_line_chars`, text that is not UTF-8, not JSON, a prompt of another type)."""
    import json

    lineno = 0
    while True:
        try:
            line = handle.readline(max_line_chars + 1)
        except UnicodeDecodeError as exc:
            after = f" after line {lineno}" if lineno else ""
            raise ValueError(f"{where}: not UTF-8 text{after} ({exc.reason}); expected JSON lines") from exc
        if not line:
            return
        lineno += 1
        if len(line) > max_line_chars:
            raise ValueError(f"{where}:{lineno}: line longer than {max_line_chars} characters")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{where}:{lineno}: not JSON ({getattr(exc, 'msg', exc)})") from exc
        if not isinstance(record, dict) or not ("prompt" in record or "messages" in record):
            raise ValueError(f"{where}:{lineno}: expected an object with 'prompt' or 'messages'")
        problem = prompt_problem(record)
        if problem:
            raise ValueError(f"{where}:{lineno}: {problem}")
        yield record


def prompt_problem(record: dict[str, Any]) -> str | None:
    """What is wrong with a record's prompt, or None: a number or an object as `prompt`
    would otherwise be scored as an empty prompt."""
    if "prompt" in record:
        prompt = record["prompt"]
        if isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt)):
            return None
        return f"prompt: expected a string or a list of strings, got {type(prompt).__name__}"
    messages = record["messages"]
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return "messages: expected a list of {role, content} objects"
    return None


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file beside it and a rename: readers see
    the old file or the whole new one. Readable by everyone the umask allows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; a model file is for every reader
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def unwritable(path: Path, folder: bool = False) -> str | None:
    """Why `path` (a file, or a folder with `folder`) cannot be written, in words, or None.
    Missing folders are fine: they are made when the output is written."""
    if path.exists() and path.is_dir() != folder:
        return "it is a file" if folder else "it is a folder"
    parent = (path if folder else path.parent).absolute()
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable"
    return None


def why_unwritable(path: Path, exc: OSError) -> str:
    """Why writing `path` failed with `exc`, in words (mkdir under a file says 'File
    exists'; name the file instead)."""
    return unwritable(path) or exc.strerror or str(exc)
