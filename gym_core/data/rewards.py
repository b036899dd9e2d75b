"""The built-in verifier reward: does the completion's answer equal the example's?"""

from __future__ import annotations

import re

_NUMBER = r"-?\d+(?:\.\d+)?"
_BOXED = re.compile(r"\\boxed\{\s*(" + _NUMBER + r")\s*\}")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*\**\s*(" + _NUMBER + ")", re.IGNORECASE)
_EQUALS = re.compile(r"=\s*\**\s*(" + _NUMBER + ")")
_ANY = re.compile(_NUMBER)


def extract_answer(text: str) -> str | None:
    """The number a completion gives as its answer, read as models write it.

    In order: ``\\boxed{N}``; "the answer is N"; the number after the last "=" ("12 + 7
    = 19"); the last number. Taking the first number instead would read "12" from
    "12 + 7 = 19" and score every completion 0.
    """
    text = text.replace(",", "")
    for pattern in (_BOXED, _ANSWER_IS, _EQUALS, _ANY):
        found = pattern.findall(text)
        if found:
            return found[-1]
    return None


def _same_number(a: str | None, b: str) -> bool:
    if a is None:
        return False
    try:
        return float(a) == float(b)
    except ValueError:
        return a.strip() == b.strip()


def accuracy(prompts, completions, examples) -> list[float]:
    """1.0 where the completion's answer equals ``example["answer"]``, else 0.0."""
    return [
        1.0 if _same_number(extract_answer(c), str(ex["answer"])) else 0.0
        for c, ex in zip(completions, examples)
    ]
