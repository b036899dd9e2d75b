"""Chat models that methods call for their own reasoning (``llm=<name>``).

Training-free GRPO (ALGORITHMS.md §4) asks an LLM to summarise trajectories and extract
lessons. :class:`ChatLLM` is the interface: a batch of conversations in, one reply per
conversation out. ``llm=local`` (:class:`LocalLLM`) answers with the policy model itself
through the core's KV-cached generation, so a run works offline; other back-ends
(``llm=openai``) are plugins registered through ``gym_add_llms``.
"""

from __future__ import annotations

from typing import Any

from gym_core.errors import GymError

Message = dict[str, str]


class LLMError(GymError):
    """The chat model could not answer (unreachable, refused, malformed reply); the
    message names the option to fix. Nothing the method was about to write is written."""


class ChatLLM:
    """``impl(cfg, policy)``; ``policy`` is the run's :class:`~gym_core.model.Policy`
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
    model acts and reflects (§4 uses one API model for both)."""

    def __init__(self, cfg, policy=None) -> None:
        if policy is None:
            raise GymError("llm=local answers with the policy model, but none was given")
        super().__init__(cfg, policy)

    def chat(self, conversations: list[list[Message]]) -> list[str]:
        import torch

        from gym_core.generation import Sampling, generate

        tok, model = self.policy.tokenizer, self.policy.model
        greedy = self.cfg.temperature <= 0
        sampling = Sampling(do_sample=not greedy, temperature=1.0 if greedy
                            else self.cfg.temperature)
        replies: list[str] = []
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(conversations), max(1, self.cfg.batch_size)):
                chunk = conversations[start : start + max(1, self.cfg.batch_size)]
                texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                         for c in chunk]
                enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
                device = self.policy.device
                with torch.no_grad():
                    ids = generate(
                        model, enc.input_ids.to(device), enc.attention_mask.to(device),
                        num_samples=1, max_new_tokens=self.cfg.max_new_tokens,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                        sampling=sampling,
                    )
                replies.extend(tok.batch_decode(ids, skip_special_tokens=True))
        finally:
            model.train(was_training)
        self.calls += len(conversations)
        return replies


def make_llm(cfg: Any, plugins, policy) -> ChatLLM:
    """The chat model ``cfg.llm`` selects."""
    return plugins.component("llm", cfg.llm.name).load()(cfg.llm, policy)
