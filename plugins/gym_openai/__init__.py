"""``llm=openai``: any OpenAI-compatible chat-completions endpoint (OpenAI, DeepSeek,
vLLM, llama.cpp server, ...) as the chat model of training-free methods.

The API key is read from the environment variable *named* by ``api_key_env``; only that
name is in the config, so the key never lands in a config dump or a log.

Cheap to import: the config dataclass and the registration hook only.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from gym_core import hookimpl
from gym_core.config import LLMConfig


@dataclass
class OpenAIChatConfig(LLMConfig):
    name: str = "openai"
    base_url: str = "https://api.openai.com/v1"  # .../chat/completions is appended
    model: str = MISSING  # e.g. gpt-4o-mini, deepseek-chat
    api_key_env: str = "OPENAI_API_KEY"  # the NAME of the variable holding the key
    timeout_s: float = 120.0  # per request
    max_retries: int = 5  # on 429, 5xx and connection errors
    backoff_s: float = 1.0  # first wait; doubles each retry (Retry-After wins on 429)
    max_backoff_s: float = 60.0
    concurrency: int = 8  # requests in flight at once


@hookimpl
def gym_add_llms(registry):
    registry.add("openai", OpenAIChatConfig, "gym_openai.client:OpenAIChat")
