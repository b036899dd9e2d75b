"""TRL's dataset types, detected from a dataset's columns, and each row made into the
example dict every gym method reads (docs/guide.md "Your own data").

The types (TRL's "dataset formats" page), each standard (strings) or conversational
(lists of ``{"role", "content"}`` messages):

==========================  ===========================================================
``language_modeling``       ``text`` or ``messages``
``prompt_only``             ``prompt`` (a verifier reads ``answer`` when there is one)
``prompt_completion``       ``prompt`` + ``completion``
``preference``              ``prompt`` + ``chosen`` + ``rejected``; without ``prompt``
                            (implicit prompt) the leading messages chosen and rejected
                            share are the prompt
``unpaired_preference``     ``prompt`` + ``completion`` + ``label`` (bool)
==========================  ===========================================================

A ``system`` column becomes the conversation's first (system) message and a ``tools``
column is handed to the chat template (``apply_chat_template(tools=...)``, see
:func:`gym_core.data.tasks.template_kwargs`). Methods state the types they train on
(``Algorithm.data_types``); :func:`check_types` is the one-line error when a method is
given a type it cannot use.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from gym_core.base.errors import GymError

TYPES = ("language_modeling", "prompt_only", "prompt_completion", "preference",
         "unpaired_preference")

#: the columns each type is recognised by (docs/guide.md "Your own data")
TYPE_COLUMNS = {
    "language_modeling": "text or messages",
    "prompt_only": "prompt",
    "prompt_completion": "prompt, completion",
    "preference": "prompt, chosen, rejected (or chosen, rejected sharing a prompt)",
    "unpaired_preference": "prompt, completion, label",
}

KNOWN = ("prompt", "completion", "chosen", "rejected", "label", "messages", "text", "answer",
         "system", "tools")


def detect_type(columns: Iterable[str]) -> str | None:
    """The TRL type a dataset with these columns has (after renaming), or None."""
    c = set(columns)
    if "chosen" in c and "rejected" in c:
        return "preference"
    if "completion" in c and "label" in c:
        return "unpaired_preference"
    if "prompt" in c and "completion" in c:
        return "prompt_completion"
    if "messages" in c or "text" in c:
        return "language_modeling"
    if "prompt" in c:
        return "prompt_only"
    return None


def serves(columns: Iterable[str]) -> set[str]:
    """Every type a row with these columns can be read as: a preference row is also a
    prompt-only one (its prompt) and a prompt-completion one (its chosen answer); a
    verifiable row (prompt + answer) is a prompt-completion one (the answer written out),
    as gym's SFT reads them."""
    c = set(columns)
    out = set()
    if "messages" in c or "text" in c:
        out.add("language_modeling")
    if "prompt" in c:
        out.add("prompt_only")
        if "chosen" in c and "rejected" in c:
            out.add("preference")
        if "completion" in c and "label" in c:
            out.add("unpaired_preference")
        elif "completion" in c or "chosen" in c or "answer" in c:
            out.add("prompt_completion")
    return out


#: how the one-line error names each type's rows
TYPE_NAMES = {
    "language_modeling": "texts or conversations",
    "prompt_only": "prompts",
    "prompt_completion": "prompts with completions",
    "preference": "preference pairs",
    "unpaired_preference": "labelled completions",
}

#: rows of a lazily read dataset that a method's ``check_data`` sees (all of a list):
#: checking every row of a large dataset would be a full pass before the first step
CHECK_ROWS = 1000


def check_types(algorithm: str, accepted: Iterable[str], columns: Iterable[str],
                source: str) -> None:
    """One line when a method that trains on ``accepted`` types is given rows with
    ``columns`` (from ``source``, e.g. ``data=hf``) that serve none of them."""
    accepted = tuple(accepted)
    if not accepted:
        return
    columns = sorted(columns)
    if serves(columns) & set(accepted):
        return
    found = detect_type(columns)
    needs = " or ".join(TYPE_NAMES[t] for t in accepted)
    takes = "; ".join(f"{t}: {TYPE_COLUMNS[t]}" for t in accepted)
    raise GymError(
        f"algorithm={algorithm} needs {needs} ({takes}); {source} has rows with columns "
        f"{', '.join(columns) or 'none'} ({found or 'no known dataset type'})")


def columns_of(rows) -> list[str]:
    """The columns every row has: a lazily read dataset's own list, else the keys all
    rows of a list share."""
    if hasattr(rows, "columns"):
        return list(rows.columns)
    common: set[str] | None = None
    for row in rows:
        common = set(row) if common is None else common & set(row)
    return sorted(common or ())


def rows_to_check(rows):
    """What a method's ``check_data`` gets: a list whole, a lazy dataset's first rows."""
    return rows if isinstance(rows, list) else rows[:CHECK_ROWS]


def check_task(cfg, algo_cls, train) -> None:
    """The method's stated types against the training rows (before any slow work)."""
    check_types(cfg.algorithm.name, getattr(algo_cls, "data_types", ()), columns_of(train),
                f"data={cfg.data.name}")


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) for m in value)


def normalize(row: dict[str, Any], kind: str, where: str) -> dict[str, Any]:
    """A row of a dataset of type ``kind`` as a gym example: ``prompt`` always present
    (a string or messages), ``system`` folded into the prompt (or ``messages``),
    ``tools`` kept for the chat template, ``label`` a bool, ``answer`` a string. A bad
    row is a one-line error naming ``where`` (the source and row)."""
    from gym_core.data.tasks import check_conversation

    row = dict(row)
    system = row.pop("system", None)
    tools = row.pop("tools", None)
    if isinstance(tools, str) and tools.strip():
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise GymError(f"{where}: column 'tools' is not JSON ({exc.msg})") from None
    if kind == "preference" and "prompt" not in row:
        row = _implicit_prompt(row, where)
    if kind == "language_modeling":
        if "messages" in row:
            messages = row["messages"]
            if system and _is_conversation(messages) and (
                    not messages or messages[0].get("role") != "system"):
                messages = [{"role": "system", "content": system}, *messages]
            check_conversation(messages, where, "messages")
            messages = _with_tools(messages, tools)
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            row.update(messages=messages, prompt=messages[:last])
        else:
            text = row.get("text")
            if not isinstance(text, str) or not text.strip():
                raise GymError(f"{where}: column 'text' is empty or not a string "
                               f"(got {type(text).__name__})")
            row["prompt"] = text
        return row
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise GymError(f"{where}: column 'prompt' is empty")
        if system or tools:
            prompt = [{"role": "user", "content": prompt}]
    elif not (_is_conversation(prompt) and prompt):
        raise GymError(f"{where}: column 'prompt' must be a string or a list of "
                       f"{{role, content}} messages, got {type(prompt).__name__}")
    if system and isinstance(prompt, list) and prompt[0].get("role") != "system":
        prompt = [{"role": "system", "content": str(system)}, *prompt]
    row["prompt"] = _with_tools(prompt, tools)
    for key in ("completion", "chosen", "rejected"):
        if key in row:
            value = row[key]
            if isinstance(value, str):
                if not value.strip() and key != "rejected":
                    raise GymError(f"{where}: column '{key}' is empty")
            elif _is_conversation(value) and value:
                if any(not isinstance(m.get("content"), str) for m in value):
                    raise GymError(f"{where}: column '{key}' holds a message without "
                                   "string content")
            else:
                raise GymError(f"{where}: column '{key}' must be a string or a list of "
                               f"messages, got {type(value).__name__}")
    if "label" in row:
        label = row["label"]
        if isinstance(label, str) and label.lower() in ("true", "false"):
            label = label.lower() == "true"
        if not isinstance(label, (bool, int)) or isinstance(label, int) and label not in (0, 1):
            raise GymError(f"{where}: column 'label' must be true or false, got {label!r}")
        row["label"] = bool(label)
    if "answer" in row and row["answer"] is not None:
        if isinstance(row["answer"], (dict, list)):
            raise GymError(f"{where}: column 'answer' must be a string or a number, got "
                           f"{type(row['answer']).__name__}")
        row["answer"] = str(row["answer"])
    return row


def _with_tools(messages: Any, tools: Any) -> Any:
    """Tools ride on the first message (key ``tools``), which the chat-template helpers
    hand to ``apply_chat_template(tools=...)`` and strip from the messages."""
    if not tools or not isinstance(messages, list):
        return messages
    if not isinstance(tools, list):
        tools = [tools]
    return [{**messages[0], "tools": tools}, *messages[1:]]


def _implicit_prompt(row: dict[str, Any], where: str) -> dict[str, Any]:
    chosen, rejected = row["chosen"], row["rejected"]
    if not (_is_conversation(chosen) and _is_conversation(rejected)):
        raise GymError(f"{where}: a preference row without 'prompt' needs conversational "
                       "chosen and rejected (lists of messages) that share their prompt")
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise GymError(f"{where}: no 'prompt' column, and chosen and rejected share no "
                       "leading messages to take it from")
    return {**row, "prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}
