"""What the core itself registers, through the same hooks as any plugin: the built-in
tasks, the answer-checking reward and ``quant=none`` (the full-precision delta format)."""

from __future__ import annotations

from gym_core.config.schema import (
    ArithmeticConfig,
    ArithmeticLabelsConfig,
    HfConfig,
    JsonlConfig,
    QuantConfig,
)
from gym_core.plugin.hookspecs import hookimpl


@hookimpl
def gym_add_datasets(registry):
    registry.add("arithmetic", ArithmeticConfig, "gym_core.data.tasks:arithmetic_task")
    registry.add("arithmetic_labels", ArithmeticLabelsConfig, "gym_core.data.tasks:arithmetic_labels_task")
    registry.add("jsonl", JsonlConfig, "gym_core.data.tasks:jsonl_task")
    registry.add("hf", HfConfig, "gym_core.data.hf:hf_task")


@hookimpl
def gym_add_rewards(registry):
    registry.add("accuracy", None, "gym_core.data.rewards:accuracy")
    registry.add("boxed", None, "gym_core.data.verify:boxed")
    registry.add("math_verify", None, "gym_core.data.verify:math_verify")


@hookimpl
def gym_add_quantizers(registry):
    registry.add("none", QuantConfig, "gym_core.deltas.delta:FullPrecision")
