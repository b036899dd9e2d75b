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

    def chat(self, conversations: list[list[Message]], *, schema: dict | None = None,
             max_new_tokens: int | None = None) -> list[str]:
        """One reply per conversation (a list of ``{"role", "content"}`` messages).
        ``schema``: the JSON schema the replies should follow; a back-end that can
        constrain its output to it (``structured=True``) does, the others ignore it
        (the replies are parsed leniently either way). ``max_new_tokens``: this call's
        limit instead of the config's."""
        raise NotImplementedError


class LocalLLM(ChatLLM):
    """The policy model as the chat model: batched, KV-cached sampling with the model's
    chat template. With frozen weights this is the paper's setting in miniature: the same
    model acts and reflects (§8 uses one API model for both)."""

    def __init__(self, cfg, policy=None) -> None:
        if policy is None:
            raise GymError("llm=local answers with the policy model, but none was given")
        super().__init__(cfg, policy)

    def chat(self, conversations: list[list[Message]], *, schema: dict | None = None,
             max_new_tokens: int | None = None) -> list[str]:
        from gym_core.api import Sampling, sample

        greedy = self.cfg.temperature <= 0
        sampling = Sampling(do_sample=not greedy, temperature=1.0 if greedy
                            else self.cfg.temperature)
        structured = schema is not None and getattr(self.cfg, "structured", False)
        replies: list[str] = []
        size = max(1, self.cfg.batch_size)
        for start in range(0, len(conversations), size):
            chunk = conversations[start : start + size]
            # the conversations carry their own system message: no data.system_prompt
            kw = {}
            if structured:  # constrained decoding: every reply follows the schema
                from gym_core.api import json_masks

                kw["logits_mask"] = json_masks(self.policy.tokenizer, schema, len(chunk))
            out = sample(self.policy.model, self.policy.tokenizer, chunk, system_prompt=None,
                         max_new_tokens=max_new_tokens or self.cfg.max_new_tokens,
                         sampling=sampling, **kw)
            replies.extend(out.texts)
        self.calls += len(conversations)
        return replies


class SamePolicyLLM(ChatLLM):
    """``llm=policy``: the policy reflects too. With ``policy=api`` its endpoint answers
    (``backend``, sharing the policy's concurrency, prices and budget) with this
    option's ``max_new_tokens`` / ``temperature``; with ``policy=local`` the loaded model
    does, as ``llm=local``."""

    def __init__(self, cfg, policy=None, backend=None) -> None:
        super().__init__(cfg, policy)
        self.backend = backend
        self.local = None if backend is not None else LocalLLM(
            _LocalView(cfg), policy)

    def chat(self, conversations: list[list[Message]], *, schema: dict | None = None,
             max_new_tokens: int | None = None) -> list[str]:
        if self.local is not None:
            replies = self.local.chat(conversations, schema=schema,
                                      max_new_tokens=max_new_tokens)
        else:
            fmt = response_format(schema) if schema is not None and self.cfg.structured else None
            before = self.backend.retries
            replies = self.backend.chat(conversations,
                                        max_tokens=max_new_tokens or self.cfg.max_new_tokens,
                                        temperature=self.cfg.temperature, response_format=fmt)
            self.backend.calls -= len(conversations)  # counted here, as reflection calls
            self.retries += self.backend.retries - before
        self.calls += len(conversations)
        return replies


class _LocalView(dict):
    """llm=policy's settings as llm=local reads them."""

    def __init__(self, cfg) -> None:
        super().__init__(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                         batch_size=8, structured=cfg.structured)

    def __getattr__(self, name):
        return self[name]


def response_format(schema: dict) -> dict:
    """OpenAI's ``response_format`` asking for replies that follow ``schema``."""
    return {"type": "json_schema",
            "json_schema": {"name": schema.get("title", "reply"), "schema": schema,
                            "strict": True}}


def make_llm(cfg: Any, plugins, policy, *, ledger=None, api_policy=None) -> ChatLLM:
    """The chat model ``cfg.llm`` selects; ``ledger`` (the run's usage record and budget)
    goes to back-ends that call an API, ``api_policy`` to ``llm=policy``."""
    impl = plugins.component("llm", cfg.llm.name).load()
    if impl is SamePolicyLLM:
        return SamePolicyLLM(cfg.llm, policy, backend=api_policy)
    if getattr(impl, "charges_usage", False):
        return impl(cfg.llm, policy, ledger=ledger)
    return impl(cfg.llm, policy)
