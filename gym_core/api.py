"""gym's public plugin API: everything a plugin implements or calls, in one module.

A plugin's entry module (read at every start-up, ``--help`` included) imports the hook
markers and config bases from here; they are cheap. The implementation classes and
helpers (``Algorithm``, ``Quantizer``, ``group_advantages``, ...) import torch: they are
loaded when first used, so ``from gym_core.api import OnlineAlgorithmConfig, hookimpl``
stays cheap while ``from gym_core.api import Algorithm`` in the implementation module
brings in torch. docs/plugins.md explains each name.

Families declared by plugins have their own API modules (training-free GRPO's experience
stores and chat models: ``gym_cl_grpo.api``). The contract test suites are pytest
classes in ``gym_core.contracts``.
"""

# A re-export module: its imports are its public names (__all__ below).
# ruff: noqa: F401
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gym_core import API_VERSION
from gym_core.base.errors import GymError
from gym_core.base.files import atomic_path, write_json, write_text
from gym_core.config.fields import bounded, check_values, one_of
from gym_core.config.loggers import LoggerConfig
from gym_core.config.schema import (
    AlgorithmConfig,
    DataConfig,
    GroupPolicyConfig,
    MatrixQuantConfig,
    OfflineAlgorithmConfig,
    OnlineAlgorithmConfig,
    QuantConfig,
    SoupConfig,
    TokenLoss,
)
from gym_core.env.config import EnvConfig
from gym_core.plugin.hookspecs import hookimpl, hookspec
from gym_core.plugin.manager import Families, Plugins
from gym_core.plugin.registry import Registry

#: A reward function: ``reward(prompts, completions, examples) -> list[float | None]``
#: (``None``: the function does not apply to that completion).
Reward = Callable[[list[str], list[str], list[dict[str, Any]]], list]

# name -> module; loaded on first access (these import torch)
_LAZY = {
    # algorithms
    "Algorithm": "gym_core.train.algorithm",
    "Updater": "gym_core.train.algorithm",
    "GroupPolicyGradient": "gym_core.train.policy_gradient",
    "group_advantages": "gym_core.train.policy_gradient",
    "SCALE_REWARDS": "gym_core.train.policy_gradient",
    "Policy": "gym_core.model.policy",
    "Rollout": "gym_core.sampling.rollout",
    "CompletionBatch": "gym_core.data.batching",
    "SequenceBatch": "gym_core.data.batching",
    "StepTotals": "gym_core.train.losses",
    "LOSS_TYPES": "gym_core.train.losses",
    "aggregate_token_loss": "gym_core.train.losses",
    "k3_kl": "gym_core.train.losses",
    "mean_over_ranks": "gym_core.train.distributed",
    "sum_over_ranks": "gym_core.train.distributed",
    # sampling (the sampler a policy's ``sample`` uses, for other renderings of the prompts)
    "Sampling": "gym_core.sampling.generation",
    "sample": "gym_core.sampling.generation",
    "json_masks": "gym_core.sampling.structured",
    # data
    "Task": "gym_core.data.tasks",
    "read_jsonl": "gym_core.data.tasks",
    "unpair": "gym_core.data.tasks",
    "chat_messages": "gym_core.data.tasks",
    "render_turns": "gym_core.data.tasks",
    "extract_answer": "gym_core.data.rewards",
    # experiment trackers (gym_add_loggers)
    "Tracker": "gym_core.train.trackers",
    "flat_config": "gym_core.train.trackers",
    "flat_numbers": "gym_core.train.trackers",
    # quantizers
    "Quantizer": "gym_core.deltas.delta",
    "MatrixQuantizer": "gym_core.deltas.delta",
    "PackedDelta": "gym_core.deltas.delta",
    "CalibrationContext": "gym_core.deltas.delta",
    "map_tensors": "gym_core.deltas.delta",
    "DeltaOperator": "gym_core.deltas.delta",
    "DenseOperator": "gym_core.deltas.delta",
    "RowGroups": "gym_core.deltas.delta",
    "save_packed": "gym_core.deltas.delta",
    "load_packed": "gym_core.deltas.delta",
    "pack_signs": "gym_core.deltas.bits",
    "unpack_signs": "gym_core.deltas.bits",
    # C++ kernels compiled on first use (a quantizer's serving operators)
    "load_ops": "gym_core.base.native",
    # aggregators
    "Aggregator": "gym_core.deltas.aggregate",
    "Aggregate": "gym_core.deltas.aggregate",
    # environments (docs/agents.md)
    "Environment": "gym_core.env.base",
    "Observation": "gym_core.env.base",
    "Action": "gym_core.env.tools",
    "ToolCall": "gym_core.env.tools",
    "tool_schema": "gym_core.env.tools",
    "parse_tool_calls": "gym_core.env.tools",
    "discounted_returns": "gym_core.env.returns",
    "PythonSandbox": "gym_core.env.sandbox",
    "trace_segments": "gym_core.env.chat",
    "SYSTEM_ADDITION": "gym_core.env.episode",
    # running gym from a test or a notebook
    "compose": "gym_core.plugin.startup",
    "bootstrap": "gym_core.plugin.startup",
    "run_job": "gym_core.train.job",
}

__all__ = [
    "API_VERSION", "AlgorithmConfig", "DataConfig", "EnvConfig", "Families", "GroupPolicyConfig",
    "GymError", "LoggerConfig", "MatrixQuantConfig", "OfflineAlgorithmConfig", "OnlineAlgorithmConfig",
    "Plugins", "QuantConfig", "Registry", "Reward", "SoupConfig", "atomic_path", "hookimpl",
    "hookspec", "write_json", "write_text", "bounded", "one_of", "TokenLoss",
    "check_values",
    *_LAZY,
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gym_core.api' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)


# What type checkers see of the lazy names: the same objects, imported from the modules
# that define them (``X``: re-exported on purpose). Never run.


if TYPE_CHECKING:
    from gym_core.base.native import load_ops
    from gym_core.data.batching import (
        CompletionBatch,
        SequenceBatch,
    )
    from gym_core.data.rewards import extract_answer
    from gym_core.data.tasks import (
        Task,
        chat_messages,
        read_jsonl,
        render_turns,
        unpair,
    )
    from gym_core.deltas.aggregate import Aggregate, Aggregator
    from gym_core.deltas.bits import pack_signs, unpack_signs
    from gym_core.deltas.delta import (
        CalibrationContext,
        DeltaOperator,
        DenseOperator,
        MatrixQuantizer,
        PackedDelta,
        Quantizer,
        RowGroups,
        load_packed,
        map_tensors,
        save_packed,
    )
    from gym_core.env.base import Environment, Observation
    from gym_core.env.chat import trace_segments
    from gym_core.env.episode import SYSTEM_ADDITION
    from gym_core.env.returns import discounted_returns
    from gym_core.env.sandbox import PythonSandbox
    from gym_core.env.tools import Action, ToolCall, parse_tool_calls, tool_schema
    from gym_core.model.policy import Policy
    from gym_core.plugin.startup import bootstrap, compose
    from gym_core.sampling.generation import Sampling, sample
    from gym_core.sampling.rollout import Rollout
    from gym_core.sampling.structured import json_masks
    from gym_core.train.algorithm import Algorithm, Updater
    from gym_core.train.distributed import (
        mean_over_ranks,
        sum_over_ranks,
    )
    from gym_core.train.job import run_job
    from gym_core.train.losses import (
        LOSS_TYPES,
        StepTotals,
        aggregate_token_loss,
        k3_kl,
    )
    from gym_core.train.policy_gradient import (
        SCALE_REWARDS,
        GroupPolicyGradient,
        group_advantages,
    )
    from gym_core.train.trackers import Tracker, flat_config, flat_numbers
