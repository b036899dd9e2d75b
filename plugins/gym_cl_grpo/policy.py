"""Where training-free GRPO's answers come from (``policy=<name>``, docs/algorithms.md
§8.4): ``local`` is the model gym loaded, sampled by the core's rollout engine; ``api``
is any OpenAI-compatible endpoint (OpenAI, DeepSeek, vLLM, ``python -m gym_core.serve``),
the paper's setting: the weights are out of reach and only the library learns.

An API policy answers each question ``num_generations`` times (one request each, seeded
``seed``, ``seed + 1``, ...; endpoints that ignore seeds still sample independently) and
its replies become a :class:`~gym_core.api.Rollout` of texts: the rewards and groups are
the core's, token ids are not known (the rollout's id tensors are zeros; its completion
mask is as long as the endpoint's reported completion tokens, so the logged completion
length and truncated fraction are the endpoint's)."""

from __future__ import annotations

from typing import Any

from gym_cl_grpo.budget import Ledger
from gym_cl_grpo.openai_client import OpenAIChat, Reply


class LocalPolicy:
    local = True

    def __init__(self, cfg: Any, ledger: Ledger | None = None) -> None:
        self.cfg = cfg


class ApiPolicy(OpenAIChat):
    local = False

    def __init__(self, cfg: Any, ledger: Ledger | None = None) -> None:
        super().__init__(cfg, None, ledger=ledger, label="policy", option="policy")

    def answer(self, conversations: list[list[dict[str, str]]], *, max_tokens: int,
               temperature: float, seeds: list[int] | None = None) -> list[Reply]:
        return self.replies(conversations, max_tokens=max_tokens, temperature=temperature,
                            seeds=seeds)


def as_messages(prompt: Any, system_prompt: str | None) -> list[dict[str, str]]:
    """A data row's prompt as chat messages, with the data's system prompt first when the
    prompt has none (what the local model's chat template is given)."""
    messages = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
                else [{"role": m["role"], "content": m["content"]} for m in prompt])
    if system_prompt and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages
