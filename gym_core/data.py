"""Tasks (train / test examples), chat rendering and a resumable, seeded sampler."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gym_core.errors import GymError


@dataclass
class Task:
    name: str
    train: list[dict[str, Any]]
    test: list[dict[str, Any]]
    metric: str = "accuracy"  # the reward that scores held-out answers


def arithmetic_task(cfg) -> Task:
    """Additions over all operand pairs in [min_value, max_value]; the test pairs are a
    seeded random subset and never appear in train."""
    if cfg.max_value < cfg.min_value:
        raise GymError(
            f"data.max_value={cfg.max_value} is below data.min_value={cfg.min_value}"
        )
    values = range(cfg.min_value, cfg.max_value + 1)
    pairs = [(a, b) for a in values for b in values]
    if not 0 < cfg.test_size < len(pairs):
        raise GymError(
            f"data.test_size={cfg.test_size} must be between 1 and {len(pairs) - 1}: "
            f"operands {cfg.min_value}..{cfg.max_value} give {len(pairs)} distinct pairs"
        )
    random.Random(cfg.seed).shuffle(pairs)

    def example(a: int, b: int) -> dict[str, Any]:
        return {"prompt": cfg.template.format(a=a, b=b), "answer": str(a + b)}

    test = [example(a, b) for a, b in pairs[: cfg.test_size]]
    train = [example(a, b) for a, b in pairs[cfg.test_size :]]
    return Task("arithmetic", train, test)


def read_jsonl(path: str | Path, required: list[str]) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a bad row is an error naming the file, line and field."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise GymError(f"data file {str(path)!r} does not exist (looked in {p.resolve()})")
    rows = []
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise GymError(f"{p}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise GymError(f"{p}:{lineno}: expected a JSON object, got {type(row).__name__}")
            for key in required:
                if key not in row:
                    raise GymError(
                        f"{p}:{lineno}: missing field '{key}' (the row has: "
                        f"{', '.join(sorted(row)) or 'nothing'})"
                    )
            rows.append(row)
    if not rows:
        raise GymError(f"data file {p} holds no rows")
    return rows


def jsonl_task(cfg) -> Task:
    """``{"prompt": ..., "answer": ...}`` per line; field names are configurable."""
    fields = [cfg.prompt_field, cfg.answer_field]

    def load(path):
        rows = read_jsonl(path, fields)
        return [
            {**r, "prompt": r[cfg.prompt_field], "answer": str(r[cfg.answer_field])} for r in rows
        ]

    train = load(cfg.train_file)
    if cfg.test_file:
        test = load(cfg.test_file)
    else:
        rows = list(train)
        random.Random(cfg.seed).shuffle(rows)
        n_test = max(1, int(len(rows) * cfg.test_fraction))
        if n_test >= len(rows):
            raise GymError(
                f"{cfg.train_file} has {len(rows)} rows: too few to hold out "
                f"data.test_fraction={cfg.test_fraction}; give data.test_file instead"
            )
        test, train = rows[:n_test], rows[n_test:]
    return Task("jsonl", train, test)


def chat_messages(prompt: Any, system_prompt: str | None) -> list[dict[str, str]]:
    """A prompt as chat messages: a plain string becomes one user turn; a list of
    ``{"role", "content"}`` dicts (conversational data) is used as it is."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        messages = list(prompt)
    else:
        raise GymError(f"a prompt must be a string or a list of messages, got {prompt!r:.80}")
    if system_prompt and messages[0].get("role") != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


def render_prompts(tokenizer, prompts: list[Any], system_prompt: str | None) -> list[str]:
    """Prompts rendered with the model's chat template, ready for generation."""
    return [
        tokenizer.apply_chat_template(
            chat_messages(p, system_prompt), tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]


class Sampler:
    """Seeded epochs over the training examples; its position is saved in checkpoints so a
    resumed run sees the same examples an uninterrupted one would."""

    def __init__(self, n: int, seed: int, position: int = 0):
        if n == 0:
            raise GymError("the training split is empty")
        self.n, self.seed, self.position = n, seed, position

    def _order(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            epoch, offset = divmod(self.position, self.n)
            order = self._order(epoch)
            chunk = order[offset : offset + k - len(out)]
            out.extend(chunk)
            self.position += len(chunk)
        return out
