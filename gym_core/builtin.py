"""What the core itself registers, through the same hooks as any plugin: the built-in
tasks, the answer-checking reward, the ``none`` options of quant and experience_store,
and ``llm=local`` (the policy model as a chat model)."""

from __future__ import annotations

from gym_core.config import (
    ArithmeticConfig,
    ArithmeticLabelsConfig,
    ExperienceStoreConfig,
    JsonlConfig,
    LocalLLMConfig,
    QuantConfig,
)
from gym_core.hookspecs import hookimpl


@hookimpl
def gym_add_datasets(registry):
    registry.add("arithmetic", ArithmeticConfig, "gym_core.data:arithmetic_task")
    registry.add("arithmetic_labels", ArithmeticLabelsConfig, "gym_core.data:arithmetic_labels_task")
    registry.add("jsonl", JsonlConfig, "gym_core.data:jsonl_task")


@hookimpl
def gym_add_rewards(registry):
    registry.add("accuracy", None, "gym_core.rewards:accuracy")


@hookimpl
def gym_add_quantizers(registry):
    registry.add("none", QuantConfig, "gym_core.delta:FullPrecision")


@hookimpl
def gym_add_experience_stores(registry):
    registry.add("none", ExperienceStoreConfig, None)


@hookimpl
def gym_add_llms(registry):
    registry.add("local", LocalLLMConfig, "gym_core.llm:LocalLLM")
