"""The text of a request as predictors see it: a completion `prompt` or chat `messages`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def prompt_text(record: Mapping[str, Any]) -> str:
    """The prompt's text: `prompt` (a string or a list of strings), or the contents of
    `messages` joined by newlines (string contents and OpenAI's text parts)."""
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return "\n".join(prompt)
    parts: list[str] = []
    for message in record.get("messages") or ():
        if not isinstance(message, Mapping):
            continue
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(
                str(part.get("text", "")) for part in content
                if isinstance(part, Mapping) and part.get("type") == "text"
            )
    return "\n".join(parts)
