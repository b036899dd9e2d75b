"""Verifiers beyond integers, as rewards (and held-out metrics) over an ``answer`` column:

- ``boxed``: the completion's last ``\\boxed{...}`` (nested braces kept) equals the
  answer (itself boxed or not) once both are normalised: spaces, ``$``, ``\\left`` /
  ``\\right``, ``\\!``, ``\\,`` and a trailing period dropped, ``\\dfrac`` read as
  ``\\frac``.
- ``math_verify``: the answer and the completion are parsed by ``math-verify`` (the
  library TRL's ``accuracy_reward`` and open-r1 use: LaTeX and plain expressions, sets,
  intervals, equations) and compared symbolically, so ``\\frac{1}{2}``, ``0.5`` and
  ``1/2`` agree. An answer math-verify cannot parse is skipped (None), as TRL does.

Select them with ``algorithm.rewards=[math_verify]`` and, for held-out scoring of
``data=hf``, ``data.verifier=math_verify``; a reward plugin of one's own overrides both.
"""

from __future__ import annotations

import re

from gym_core.base.errors import GymError

_SPACES = re.compile(r"\s+")


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``."""
    at = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if at < 0:
        return None
    i = text.index("{", at) + 1
    depth, start = 1, i
    while i < len(text):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
        i += 1
    return None


def normalize_latex(s: str) -> str:
    s = s.strip().strip("$").strip()
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""),
                     ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\displaystyle", "")):
        s = s.replace(old, new)
    s = _SPACES.sub("", s).rstrip(".")
    return s


def boxed(prompts, completions, examples) -> list[float]:
    """1.0 where the completion's last ``\\boxed{}`` equals the example's answer."""
    out = []
    for c, ex in zip(completions, examples):
        gold = str(ex["answer"])
        gold = last_boxed(gold) or gold
        got = last_boxed(c)
        out.append(1.0 if got is not None and normalize_latex(got) == normalize_latex(gold)
                   else 0.0)
    return out


def _math_verify():
    try:
        import math_verify
    except ImportError:
        raise GymError("the math_verify reward needs the math-verify package: "
                       "pip install 'gym-core[math]'") from None
    return math_verify


def math_verify(prompts, completions, examples) -> list[float | None]:
    """1.0 where math-verify finds the completion's answer equal to the example's."""
    mv = _math_verify()
    out: list[float | None] = []
    for c, ex in zip(completions, examples):
        gold_text = str(ex["answer"])
        if "$" not in gold_text and "\\boxed" not in gold_text:
            gold_text = f"${gold_text}$"
        gold = mv.parse(gold_text, parsing_timeout=None)
        if not gold:
            out.append(None)  # an answer math-verify cannot read: the reward does not apply
            continue
        pred = mv.parse(c, parsing_timeout=None)
        out.append(1.0 if pred and mv.verify(gold, pred, timeout_seconds=None) else 0.0)
    return out
