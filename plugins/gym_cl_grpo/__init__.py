"""Training-Free GRPO (Tencent Youtu, arXiv 2510.08191; ALGORITHMS.md §4) as a gym plugin:
``algorithm=cl_grpo``. The weights stay frozen; what is learned is a text experience
library kept in an ``experience_store`` and injected into the prompt.

Cheap to import: the config dataclass and the registration hook only.
"""

from __future__ import annotations

from dataclasses import dataclass

from gym_core import hookimpl
from gym_core.config import OnlineAlgorithmConfig


@dataclass
class CLGRPOConfig(OnlineAlgorithmConfig):
    """Training-Free GRPO (§4). lr, weight_decay and adam_betas are unused: nothing is
    optimised. One step = one batch of questions (trainer.batch_size); epochs over the
    data are trainer.max_steps * batch_size / number of questions."""

    name: str = "cl_grpo"
    num_generations: int = 5  # G rollouts per question (§4: 5)
    temperature: float = 0.7  # rollout temperature (§4: 0.7)
    max_completion_length: int = 64
    lessons_per_group: int = 2  # lessons extracted per question (main-branch default 2)
    # lessons are asked to be at most 32 words (§4 preview); longer ones are rejected
    max_experience_words: int = 64
    # where the library goes: "system" (main branch: appended to the system
    # instructions) or "user" (preview: after the problem in the user turn)
    inject_into: str = "system"


@hookimpl
def gym_add_algorithms(registry):
    registry.add("cl_grpo", CLGRPOConfig, "gym_cl_grpo.cl_grpo:TrainingFreeGRPO")
