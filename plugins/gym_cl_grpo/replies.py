"""Reading the reflecting model's replies: lessons and library operations from the last
```json block (docs/algorithms.md §8: "parsed from the last ```json block; failures
skipped"). Nothing here raises on model output: a reply that does not parse gives
``None`` (counted by the caller) and every item that is not a well-formed operation
against the library the model was shown is dropped and counted, so no reply can put
anything but clean one-line text into the library."""

from __future__ import annotations

import json
import re
from typing import Any

from gym_cl_grpo.experience import OPERATIONS, Experience, Operation, clean_text

#: replies are cut to their last characters before parsing (the answer comes last)
MAX_REPLY_CHARS = 50_000
_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n?(.*?)```", re.DOTALL)
_ID = re.compile(r"^\[?\s*G\s*(\d{1,9})\s*\]?\.?$", re.IGNORECASE)
_LABEL = re.compile(r"^\s*\[?\s*G\d+\s*\]?\s*[.:)\-]\s*", re.IGNORECASE)
# the prompts' own form of a lesson ("When ..., ...", "When [condition], [strategy]"):
# what is left of a lesson without it must hold a word
_FORM = re.compile(r"\bwhen\b|\[\s*(?:condition|strategy)\s*\]", re.IGNORECASE)
_WORD = re.compile(r"[^\W\d_]")  # a letter


def json_payload(reply: Any) -> Any | None:
    """The last ```json block of ``reply`` that parses, else the whole reply if it is
    JSON, else None."""
    if not isinstance(reply, str):
        return None
    text = reply[-MAX_REPLY_CHARS:]
    candidates = [m.group(1) for m in _FENCE.finditer(text)][::-1] + [text]
    for candidate in candidates:
        try:
            return json.loads(candidate.strip())
        except (ValueError, RecursionError):
            continue
    return None


def clean_experience(text: Any, max_words: int) -> str | None:
    """One line of text without a leading ``[G3].`` label, or None when it is empty,
    not a string, longer than ``max_words`` words, or nothing but the prompts' form of
    a lesson with no word of its own ("When ..., ...": a small model copies the
    example it is shown)."""
    if not isinstance(text, str):
        return None
    text = clean_text(text)
    while _LABEL.match(text):  # "[G3]. [G3]. x" would otherwise nest labels
        text = clean_text(_LABEL.sub("", text, count=1))
    if not text or len(text.split()) > max_words:
        return None
    if not _WORD.search(_FORM.sub("", text)):  # the prompt's example copied: says nothing
        return None
    return text


def parse_lessons(reply: Any, max_lessons: int, max_words: int
                  ) -> tuple[list[str], int] | None:
    """(lessons, rejected items) from a group-advantage reply, or None if it does not
    parse. Accepts a JSON list of strings, or an object with a "lessons" / "experiences"
    list."""
    payload = json_payload(reply)
    if isinstance(payload, dict):
        payload = payload.get("lessons", payload.get("experiences"))
    if not isinstance(payload, list):
        return None
    lessons, rejected = [], 0
    for item in payload:
        lesson = clean_experience(item, max_words)
        if lesson is None or lesson in lessons:
            rejected += 1
        else:
            lessons.append(lesson)
    rejected += max(0, len(lessons) - max_lessons)
    return lessons[:max_lessons], rejected


def resolve_id(raw: Any, shown: dict[str, Experience]) -> int | None:
    """The key of the experience a model calls "G3" (also "[G3]", "g3", 3)."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        raw = f"G{raw}"
    if not isinstance(raw, str):
        return None
    m = _ID.match(raw.strip())
    if not m:
        return None
    exp = shown.get(f"G{int(m.group(1))}")
    return exp.key if exp is not None else None


def parse_operations(reply: Any, shown: dict[str, Experience], max_words: int
                     ) -> tuple[list[Operation], int] | None:
    """(operations, invalid items) from a group-update reply, or None if it does not
    parse. ``shown`` maps the ids the model saw to experiences; an UPDATE / DELETE of
    an id it was not shown, an unknown operation, or bad content is invalid."""
    payload = json_payload(reply)
    if isinstance(payload, dict):
        payload = payload.get("operations", [payload] if "operation" in payload else None)
    if not isinstance(payload, list):
        return None
    ops, invalid = [], 0
    for item in payload:
        op = _operation(item, shown, max_words)
        if op is None:
            invalid += 1
        else:
            ops.append(op)
    return ops, invalid


def _operation(item: Any, shown: dict[str, Experience], max_words: int) -> Operation | None:
    if not isinstance(item, dict):
        return None
    kind = item.get("operation", item.get("option"))
    if not isinstance(kind, str) or kind.strip().upper() not in OPERATIONS:
        return None
    kind = kind.strip().upper()
    if kind == "NONE":
        return Operation("NONE")
    if kind == "ADD":
        text = clean_experience(item.get("content"), max_words)
        return Operation("ADD", text=text) if text else None
    key = resolve_id(item.get("id"), shown)
    if key is None:
        return None
    if kind == "DELETE":
        return Operation("DELETE", key)
    text = clean_experience(item.get("content"), max_words)
    return Operation("UPDATE", key, text) if text else None
