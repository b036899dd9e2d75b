"""The paper's math domain (docs/algorithms.md §8.5): AIME-format problems read from
local files (``data=aime``), their answers in ``\\boxed{}`` scored by the core's
``math_verify`` reward (gym_core/data/verify.py: Hugging Face's ``math-verify``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from gym_core.api import GymError, Task, read_jsonl

#: the instruction the paper's math prompts end with
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
PROBLEM_FIELDS = ("problem", "question", "Problem", "Question")
ANSWER_FIELDS = ("answer", "Answer", "final_answer")


def _rows(path: str) -> list[dict]:
    p = Path(path).expanduser()
    if p.suffix == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise GymError(f"data file {path!r} does not exist (looked in {p.resolve()})") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise GymError(f"{p}: not valid JSON ({exc})") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise GymError(f"{p}: expected a JSON list of objects (one per problem)")
        return data
    return read_jsonl(p, [])


def _example(row: dict, where: str) -> dict:
    problem = next((row[k] for k in PROBLEM_FIELDS if k in row), None)
    answer = next((row[k] for k in ANSWER_FIELDS if k in row), None)
    if not isinstance(problem, str) or answer is None:
        raise GymError(f"{where}: an AIME-format row needs a problem ({'/'.join(PROBLEM_FIELDS)}) "
                       f"and an answer ({'/'.join(ANSWER_FIELDS)}); it has {sorted(row)}")
    return {"prompt": f"{problem.strip()}\n\n{INSTRUCTION}", "answer": str(answer).strip()}


def aime_task(cfg) -> Task:
    """AIME-format problems from local JSONL or JSON files (the fields of the public AIME
    2024 / 2025 sets: ``problem`` or ``question``, ``answer``; upper-case variants too)."""
    train = [_example(r, f"{cfg.train_file}:{i + 1}") for i, r in enumerate(_rows(cfg.train_file))]
    if cfg.test_file:
        test = [_example(r, f"{cfg.test_file}:{i + 1}") for i, r in enumerate(_rows(cfg.test_file))]
    else:
        rng = random.Random(cfg.seed)
        order = list(range(len(train)))
        rng.shuffle(order)
        k = max(1, int(len(train) * cfg.test_fraction)) if len(train) > 1 else 0
        test = [train[i] for i in order[:k]]
        train = [train[i] for i in order[k:]]
    if not train:
        raise GymError(f"data.train_file={cfg.train_file} holds no problems")
    return Task("aime", train, test, metric="math_verify")
