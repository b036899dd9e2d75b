"""The prompts of Training-Free GRPO (docs/algorithms.md §8), written after the youtu-agent
main branch's practice templates (utu/practice): a step-by-step trajectory summary
graded against the ground truth, a group comparison that extracts at most K
"When [condition], [strategy]" lessons, and a per-group update that labels each lesson
ADD / UPDATE / DELETE / NONE against the current library, answered as a ```json block.
"""

from __future__ import annotations

from typing import Any

from gym_cl_grpo.experience import Experience

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

<groundtruth>
{answer}
</groundtruth>

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

<groundtruth>
{answer}
</groundtruth>

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

Avoid duplicates: prefer UPDATE over ADD when an experience already says nearly the same.

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


def library_block(shown: dict[str, Experience]) -> str:
    """``[G0]. text`` lines, the form the library takes in every prompt."""
    return "\n".join(f"[{label}]. {e.text}" for label, e in shown.items())


def inject(prompt: Any, shown: dict[str, Experience], into: str,
           system_prompt: str | None) -> Any:
    """The prompt with the library appended to the system instructions ("system",
    main branch) or after the problem in the user turn ("user", preview). An empty
    library leaves the prompt exactly as it was."""
    if not shown:
        return prompt
    block = f"{INJECTION_HEADER}\n{library_block(shown)}"
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


def question_text(prompt: Any) -> str:
    """A data row's prompt as plain text for the reflection prompts."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in prompt)


def summary_messages(problem: str, trajectory: str, reward: float, answer: str):
    grade = f"reward {reward:g}: {_verdict(reward)}"
    return [{"role": "user", "content": SUMMARY.format(
        problem=problem, trajectory=trajectory, grade=grade, answer=answer)}]


def advantage_messages(problem: str, answer: str, attempts: list[tuple[float, str]],
                       max_lessons: int):
    text = "\n\n".join(
        f"Attempt {i} (reward {r:g}, {_verdict(r)}):\n{s}"
        for i, (r, s) in enumerate(attempts, start=1)
    )
    return [{"role": "user", "content": GROUP_ADVANTAGE.format(
        problem=problem, attempts=text, answer=answer, max_lessons=max_lessons)}]


def update_messages(shown: dict[str, Experience], lessons: list[str]):
    library = library_block(shown) or "(empty)"
    new = "\n".join(f"- {lesson}" for lesson in lessons)
    return [{"role": "user", "content": GROUP_UPDATE.format(library=library, lessons=new)}]


def _verdict(reward: float) -> str:
    return "correct" if reward >= 1 else "wrong" if reward <= 0 else "partly correct"
