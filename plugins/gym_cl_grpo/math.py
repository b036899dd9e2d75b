"""The paper's math domain (docs/algorithms.md §8.5): answers in ``\\boxed{}`` verified
with Hugging Face's ``math-verify`` (reward ``math_verify``), and AIME-format problems
read from local files (``data=aime``).

This lives in the plugin until the core's verifier (gym_core/data/verify.py) lands; the
reward and the loader are registered like any other (``algorithm.rewards=[math_verify]``).
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


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (nested braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = depth = start + len("\\boxed{")
    depth = 1
    while i < len(text):
        c = text[i]
        depth += (c == "{") - (c == "}")
        if depth == 0:
            return text[start + len("\\boxed{"): i]
        i += 1
    return None


def verify_boxed(completion: str, answer: str) -> bool:
    """Whether the completion's last ``\\boxed{}`` equals ``answer`` mathematically
    (math-verify: ``1/2`` = ``0.5`` = ``\\frac{1}{2}``)."""
    from math_verify import parse, verify

    boxed = last_boxed(completion)
    if boxed is None:
        return False
    gold = parse(f"${answer}$")
    got = parse(f"${boxed}$")
    if not gold or not got:
        return boxed.strip() == str(answer).strip()
    try:
        return bool(verify(gold, got))
    except Exception:  # math-verify gives up on some expressions: not equal
        return False


def math_verify_reward(prompts, completions, examples) -> list[float]:
    """1.0 where the last ``\\boxed{}`` of the completion equals ``example["answer"]``
    (math-verify), else 0.0."""
    return [1.0 if verify_boxed(c, str(ex["answer"])) else 0.0
            for c, ex in zip(completions, examples)]


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
