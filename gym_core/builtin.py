"""What the core itself registers, through the same hooks as any plugin: the built-in
tasks, the answer-checking reward and ``quant=none`` (the full-precision delta format)."""

from __future__ import annotations

from gym_core.config import ArithmeticConfig, ArithmeticLabelsConfig, JsonlConfig, QuantConfig
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
