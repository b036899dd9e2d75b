"""A format reward: does the completion answer with a bare number and nothing else?"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d+(\.\d+)?")


def number_only(prompts, completions, examples):
    """1.0 when the completion is a single number (surrounding spaces and one final
    period allowed), else 0.0. Pairs with ``accuracy``: that one checks the value, this
    one the format, so a small weight nudges the model toward terse answers."""
    out = []
    for text in completions:
        text = text.strip()
        text = text[:-1] if text.endswith(".") else text
        out.append(1.0 if _NUMBER.fullmatch(text) else 0.0)
    return out
