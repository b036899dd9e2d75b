"""Chat models that methods call for their own reasoning (``llm=<name>``).

Training-free GRPO (docs/algorithms.md §8) asks an LLM to summarise trajectories and extract
lessons. :class:`ChatLLM` is the interface: a batch of conversations in, one reply per
conversation out. ``llm=local`` (:class:`LocalLLM`) answers with the policy model itself
through the core's KV-cached generation, so a run works offline; other back-ends
(``llm=openai``) are plugins registered through ``gym_add_llms``.
"""

from __future__ import annotations

from typing import Any

from gym_core.api import GymError

Message = dict[str, str]


class LLMError(GymError):
    """The chat model could not answer (unreachable, refused, malformed reply); the
    message names the option to fix. Nothing the method was about to write is written."""


class ChatLLM:
    """``impl(cfg, policy)``; ``policy`` is the run's :class:`~gym_core.model.policy.Policy`
    (back-ends that call a remote model ignore it)."""

    def __init__(self, cfg: Any, policy=None) -> None:
        self.cfg, self.policy = cfg, policy
        self.calls = 0  # conversations answered, for the step's metrics
        self.retries = 0  # requests a remote back-end had to repeat, for the step's metrics

    def chat(self, conversations: list[list[Message]]) -> list[str]:
        """One reply per conversation (a list of ``{"role", "content"}`` messages)."""
        raise NotImplementedError


class LocalLLM(ChatLLM):
    """The policy model as the chat model: batched, KV-cached sampling with the model's
    chat template. With frozen weights this is the paper's setting in miniature: the same
    model acts and reflects (§8 uses one API model for both)."""

    def __init__(self, cfg, policy=None) -> None:
        if policy is None:
            raise GymError("llm=local answers with the policy model, but none was given")
        super().__init__(cfg, policy)

    def chat(self, conversations: list[list[Message]]) -> list[str]:
        from gym_core.api import Sampling, sample

        greedy = self.cfg.temperature <= 0
        sampling = Sampling(do_sample=not greedy, temperature=1.0 if greedy
                            else self.cfg.temperature)
        replies: list[str] = []
        size = max(1, self.cfg.batch_size)
        for start in range(0, len(conversations), size):
            # the conversations carry their own system message: no data.system_prompt
            out = sample(self.policy.model, self.policy.tokenizer,
                         conversations[start : start + size], system_prompt=None,
                         max_new_tokens=self.cfg.max_new_tokens, sampling=sampling)
            replies.extend(out.texts)
        self.calls += len(conversations)
        return replies


def make_llm(cfg: Any, plugins, policy) -> ChatLLM:
    """The chat model ``cfg.llm`` selects."""
    return plugins.component("llm", cfg.llm.name).load()(cfg.llm, policy)
