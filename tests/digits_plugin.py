"""A test plugin: a reward with signal even on a random model (share of digit characters)."""

from gym_core import hookimpl


def digit_share(prompts, completions, examples):
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


@hookimpl
def gym_add_rewards(registry):
    registry.add("digit_share", None, digit_share)
