"""The prompts of Training-Free GRPO (docs/algorithms.md §8), written after the youtu-agent
main branch's practice templates (utu/practice): a step-by-step trajectory summary
graded against the ground truth, a group comparison that extracts at most K
"When [condition], [strategy]" lessons, and a per-group update that labels each lesson
ADD / UPDATE / DELETE / NONE against the current library, answered as a ```json block
(or, structured, as a JSON object following :func:`lessons_schema` /
:func:`operations_schema`).

The four stages are editable templates (:class:`Templates`): ``algorithm.prompts_dir``
holds ``solve.txt``, ``summary.txt``, ``group_comparison.txt`` and ``batch_update.txt``
with the placeholders :data:`PLACEHOLDERS` names; a missing file keeps the built-in one.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gym_cl_grpo.experience import Experience
from gym_core.api import GymError

# Injection (§8): one sentence asking the model to read the experiences first, then one
# "[G<i>]. <text>" line per experience.
INJECTION_HEADER = (
    "When solving problems, you MUST first carefully read and understand the helpful "
    "instructions and experiences below, and apply those that fit the problem:"
)

SUMMARY = """An agent may be given some experiences before it produces the following \
trajectory to solve the problem. Summarize the trajectory step by step:

1. For each step, state what action is taken and which experience (if any) it uses.
2. Given the grade of this attempt and the correct answer, identify every step that is \
a detour, an error or a backtrack; explain why it likely happened and how it affected \
the attempt.
3. Keep the core outcome of every step, even when it belongs to a flawed process.

<problem>
{problem}
</problem>

<trajectory>
{trajectory}
</trajectory>

<evaluation>
{grade}
</evaluation>
{groundtruth}
Return only the step-by-step summary, e.g.
1. what happened in the first step and its core outcome
2. what happened in the second step and its core outcome
3. ..."""

GROUP_ADVANTAGE = """An agent tried to solve the same problem several times; some attempts \
are correct and some are wrong. Below are summaries of the attempts with their grades.

Compare the correct attempts with the wrong ones:
1. Find the decisions and insights that made the correct attempts succeed.
2. Find where and why the wrong attempts went astray.
3. Turn the contrast into at most {max_lessons} general lessons that would help on \
similar problems. Each lesson is one sentence of at most 32 words, starts with a few \
words of background, and has the form "When [condition], [strategy]". Focus on \
strategy and decision points, not on this problem's specific numbers.

<problem>
{problem}
</problem>

<attempts>
{attempts}
</attempts>
{groundtruth}
Reason briefly, then finish with the lessons as a JSON list of strings:
```json
["When ..., ...", "When ..., ..."]
```"""

GROUP_UPDATE = """An agent keeps a library of experiences that is shown with every \
problem. New lessons were just learned. Decide, for each new lesson, how to change \
the library:

- ADD: the lesson is new; add it as a new experience.
- UPDATE: the lesson refines an existing experience; give that experience's id and \
the improved text (one sentence, at most 32 words).
- DELETE: an existing experience is wrong or misleading; give its id.
- NONE: the lesson is already covered; change nothing.

Give at most {max_operations} operations. Avoid duplicates: prefer UPDATE over ADD when an experience already says nearly the same.

<library>
{library}
</library>

<new_lessons>
{lessons}
</new_lessons>

Reason briefly, then finish with the operations as JSON:
```json
[
  {{"operation": "ADD", "id": null, "content": "When ..., ..."}},
  {{"operation": "UPDATE", "id": "G0", "content": "When ..., ..."}},
  {{"operation": "DELETE", "id": "G1", "content": null}},
  {{"operation": "NONE", "id": null, "content": null}}
]
```"""


SOLVE = INJECTION_HEADER + "\n{experiences}"

#: each stage's template file and the placeholders it must contain
PLACEHOLDERS = {
    "solve": ("experiences",),
    "summary": ("problem", "trajectory", "grade", "groundtruth"),
    "group_comparison": ("problem", "attempts", "groundtruth", "max_lessons"),
    "batch_update": ("library", "lessons", "max_operations"),
}


@dataclass(frozen=True)
class Templates:
    """The four stages' prompts (docs/algorithms.md §8): solving with the experiences
    (the block injected into the policy's prompt), the trajectory summary, the group
    comparison and the batch update."""

    solve: str = SOLVE
    summary: str = SUMMARY
    group_comparison: str = GROUP_ADVANTAGE
    batch_update: str = GROUP_UPDATE

    @classmethod
    def load(cls, folder: str | None) -> Templates:
        """The built-in templates with those in ``folder`` (``<stage>.txt``) instead;
        a template without one of its placeholders, with an unknown one, or that does
        not format is refused naming the file."""
        templates = cls()
        if not folder:
            return templates
        root = Path(folder)
        if not root.is_dir():
            raise GymError(f"algorithm.prompts_dir={folder} is not a folder; it should hold "
                           f"any of {', '.join(f'{k}.txt' for k in PLACEHOLDERS)}")
        for stage, names in PLACEHOLDERS.items():
            path = root / f"{stage}.txt"
            if not path.is_file():
                continue
            text = path.read_text(encoding="utf-8")
            try:
                found = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
            except ValueError as exc:
                raise GymError(f"{path}: {exc} (write a literal brace as {{{{ or }}}})") from None
            missing, unknown = set(names) - found, found - set(names)
            if missing or unknown:
                raise GymError(
                    f"{path}: the {stage} template must use the placeholders "
                    f"{{{'}, {'.join(names)}}}" + (f"; missing {sorted(missing)}" if missing else "")
                    + (f"; unknown {sorted(unknown)}" if unknown else ""))
            templates = replace(templates, **{stage: text})
        return templates


def library_block(shown: dict[str, Experience]) -> str:
    """``[G0]. text`` lines, the form the library takes in every prompt."""
    return "\n".join(f"[{label}]. {e.text}" for label, e in shown.items())


def inject(prompt: Any, shown: dict[str, Experience], into: str,
           system_prompt: str | None, template: str = SOLVE) -> Any:
    """The prompt with the library appended to the system instructions ("system",
    main branch) or after the problem in the user turn ("user", preview). An empty
    library leaves the prompt exactly as it was."""
    if not shown:
        return prompt
    block = library_text(shown, template)
    messages = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
                else [dict(m) for m in prompt])
    if into == "user":
        last = max(i for i, m in enumerate(messages) if m.get("role") == "user") \
            if any(m.get("role") == "user" for m in messages) else len(messages) - 1
        messages[last]["content"] = f"{messages[last]['content']}\n\n{block}"
        return messages
    if messages and messages[0].get("role") == "system":
        messages[0]["content"] = f"{messages[0]['content']}\n\n{block}"
    else:
        head = f"{system_prompt}\n\n{block}" if system_prompt else block
        messages.insert(0, {"role": "system", "content": head})
    return messages


def library_text(shown: dict[str, Experience], template: str = SOLVE) -> str:
    """The library as the solve template shows it ("" for an empty one): what an
    episode's system turn gets (``env=...``)."""
    return template.format(experiences=library_block(shown)) if shown else ""


def episode_task(messages: list[dict[str, Any]]) -> str | None:
    """An episode's task as the model saw it: its first user turn (None: no user turn)."""
    return next((str(m.get("content", "")) for m in messages if m.get("role") == "user"), None)


ROLE_NAMES = {"assistant": "Agent", "tool": "Tool result", "user": "Environment"}


def transcript(messages: list[dict[str, Any]]) -> str:
    """A multi-turn episode after its first user turn, as the reflection prompts show a
    trajectory: each model turn as written (tool calls included), each tool result and
    environment reply, in order."""
    first = next((i for i, m in enumerate(messages) if m.get("role") == "user"), -1)
    return "\n\n".join(f"[{ROLE_NAMES.get(m.get('role'), m.get('role'))}] {m.get('content', '')}"
                       for m in messages[first + 1:])


def question_text(prompt: Any) -> str:
    """A data row's prompt as plain text for the reflection prompts."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in prompt)


def _groundtruth(answer: str | None) -> str:
    return f"\n<groundtruth>\n{answer}\n</groundtruth>\n" if answer is not None else ""


def summary_messages(problem: str, trajectory: str, reward: float, answer: str | None,
                     templates: Templates = Templates()):
    """``answer`` None: the reference answer is not shown (``use_groundtruth=false``)."""
    grade = f"reward {reward:g}: {_verdict(reward)}"
    return [{"role": "user", "content": templates.summary.format(
        problem=problem, trajectory=trajectory, grade=grade, groundtruth=_groundtruth(answer))}]


def advantage_messages(problem: str, answer: str | None, attempts: list[tuple[float, str]],
                       max_lessons: int, templates: Templates = Templates(),
                       structured: bool = False):
    text = "\n\n".join(
        f"Attempt {i} (reward {r:g}, {_verdict(r)}):\n{s}"
        for i, (r, s) in enumerate(attempts, start=1)
    )
    content = templates.group_comparison.format(
        problem=problem, attempts=text, groundtruth=_groundtruth(answer),
        max_lessons=max_lessons)
    if structured:
        content += '\n\nAnswer with one JSON object only: {"lessons": ["When ..., ..."]}'
    return [{"role": "user", "content": content}]


def update_messages(shown: dict[str, Experience], lessons: list[str], max_operations: int = 3,
                    templates: Templates = Templates(), structured: bool = False):
    library = library_block(shown) or "(empty)"
    new = "\n".join(f"- {lesson}" for lesson in lessons)
    content = templates.batch_update.format(library=library, lessons=new,
                                            max_operations=max_operations)
    if structured:
        content += ('\n\nAnswer with one JSON object only: {"operations": [{"operation": '
                    '"ADD", "id": null, "content": "When ..., ..."}]}')
    return [{"role": "user", "content": content}]


def _text(max_chars: int) -> dict:
    """A lesson or experience in a structured reply: at most ``max_chars``, no control
    characters (one line; a small model cannot spend its tokens on escapes)."""
    return {"type": "string", "minLength": 1, "maxLength": max_chars,
            "pattern": "^[^\\x00-\\x1f\\x7f]+$"}


def text_limit(max_words: int) -> int:
    """The characters a structured lesson may take: 8 per allowed word, at most 400."""
    return max(16, min(400, 8 * max_words))


def lessons_schema(max_lessons: int, max_chars: int = 400) -> dict:
    """The group comparison's structured reply: ``{"lessons": [...]}``."""
    return {"title": "lessons", "type": "object", "additionalProperties": False,
            "required": ["lessons"],
            "properties": {"lessons": {"type": "array", "items": _text(max_chars),
                                       "minItems": 1, "maxItems": max_lessons}}}


def operations_schema(shown: dict[str, Experience], max_operations: int,
                      max_chars: int = 400) -> dict:
    """The batch update's structured reply, the library-operations schema:
    ``{"operations": [...]}``, at most ``max_operations`` items, each one of ADD (``id``
    null, new ``content``), UPDATE (``id`` one of the ids shown, new ``content``), DELETE
    (an id shown, ``content`` null) or NONE (both null); with an empty library only ADD
    and NONE. A reply that follows it is a list of valid operations."""
    null = {"type": "null"}

    def op(kind, id_, content):
        return {"type": "object", "additionalProperties": False,
                "required": ["operation", "id", "content"],
                "properties": {"operation": {"const": kind}, "id": id_, "content": content}}

    kinds = [op("ADD", null, _text(max_chars))]
    if shown:
        ids = {"enum": list(shown)}
        kinds += [op("UPDATE", ids, _text(max_chars)), op("DELETE", ids, null)]
    kinds.append(op("NONE", null, null))
    return {"title": "library_operations", "type": "object", "additionalProperties": False,
            "required": ["operations"],
            "properties": {"operations": {"type": "array", "items": {"anyOf": kinds},
                                          "minItems": 1, "maxItems": max_operations}}}


def _verdict(reward: float) -> str:
    return "correct" if reward >= 1 else "wrong" if reward <= 0 else "partly correct"
