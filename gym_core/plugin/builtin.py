"""What the core itself registers, through the same hooks as any plugin: the built-in
tasks, the answer-checking reward, ``quant=none`` (the full-precision delta format) and
the built-in environments (docs/agents.md) and ``logger=tensorboard``."""

from __future__ import annotations

from gym_core.config.loggers import TensorBoardConfig
from gym_core.config.schema import (
    ArithmeticConfig,
    ArithmeticLabelsConfig,
    HfConfig,
    JsonlConfig,
    QuantConfig,
)
from gym_core.env.config import (
    CalculatorConfig,
    CountdownDataConfig,
    PythonEnvConfig,
    WordleConfig,
    WordleDataConfig,
)
from gym_core.plugin.hookspecs import hookimpl


@hookimpl
def gym_add_environments(registry):
    registry.add("calculator", CalculatorConfig, "gym_core.env.builtin:Calculator")
    registry.add("python", PythonEnvConfig, "gym_core.env.builtin:PythonCountdown")
    registry.add("wordle", WordleConfig, "gym_core.env.builtin:Wordle")


@hookimpl
def gym_add_datasets(registry):
    registry.add("arithmetic", ArithmeticConfig, "gym_core.data.tasks:arithmetic_task")
    registry.add("arithmetic_labels", ArithmeticLabelsConfig, "gym_core.data.tasks:arithmetic_labels_task")
    registry.add("jsonl", JsonlConfig, "gym_core.data.tasks:jsonl_task")
    registry.add("countdown", CountdownDataConfig, "gym_core.env.builtin:countdown_task")
    registry.add("wordle", WordleDataConfig, "gym_core.env.builtin:wordle_task")
    registry.add("hf", HfConfig, "gym_core.data.hf:hf_task")


@hookimpl
def gym_add_rewards(registry):
    registry.add("accuracy", None, "gym_core.data.rewards:accuracy")
    registry.add("boxed", None, "gym_core.data.verify:boxed")
    registry.add("math_verify", None, "gym_core.data.verify:math_verify")


@hookimpl
def gym_add_quantizers(registry):
    registry.add("none", QuantConfig, "gym_core.deltas.delta:FullPrecision")


@hookimpl
def gym_add_loggers(registry):
    registry.add("tensorboard", TensorBoardConfig, "gym_core.train.trackers:TensorBoardTracker")
