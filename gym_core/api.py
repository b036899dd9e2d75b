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

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gym_core import API_VERSION
from gym_core.config import (
    AlgorithmConfig,
    DataConfig,
    GroupPolicyConfig,
    MatrixQuantConfig,
    OfflineAlgorithmConfig,
    OnlineAlgorithmConfig,
    QuantConfig,
    SoupConfig,
)
from gym_core.errors import GymError
from gym_core.files import atomic_path, write_json, write_text
from gym_core.hookspecs import hookimpl, hookspec
from gym_core.plugins import Families, Plugins
from gym_core.registry import Registry

#: A reward function: ``reward(prompts, completions, examples) -> list[float | None]``
#: (``None``: the function does not apply to that completion).
Reward = Callable[[list[str], list[str], list[dict[str, Any]]], list]

# name -> module; loaded on first access (these import torch)
_LAZY = {
    # algorithms
    "Algorithm": "gym_core.algorithm",
    "Updater": "gym_core.algorithm",
    "GroupPolicyGradient": "gym_core.policy_gradient",
    "group_advantages": "gym_core.policy_gradient",
    "SCALE_REWARDS": "gym_core.policy_gradient",
    "Policy": "gym_core.model",
    "Rollout": "gym_core.rollout",
    "CompletionBatch": "gym_core.batching",
    "SequenceBatch": "gym_core.batching",
    "StepTotals": "gym_core.losses",
    "LOSS_TYPES": "gym_core.losses",
    "aggregate_token_loss": "gym_core.losses",
    "k3_kl": "gym_core.losses",
    "mean_over_ranks": "gym_core.distributed",
    "sum_over_ranks": "gym_core.distributed",
    # data
    "Task": "gym_core.data",
    "read_jsonl": "gym_core.data",
    "unpair": "gym_core.data",
    "chat_messages": "gym_core.data",
    "render_turns": "gym_core.data",
    "extract_answer": "gym_core.rewards",
    # quantizers
    "Quantizer": "gym_core.delta",
    "MatrixQuantizer": "gym_core.delta",
    "PackedDelta": "gym_core.delta",
    "CalibrationContext": "gym_core.delta",
    "map_tensors": "gym_core.delta",
    "DeltaOperator": "gym_core.delta",
    "DenseOperator": "gym_core.delta",
    "RowGroups": "gym_core.delta",
    "save_packed": "gym_core.delta",
    "load_packed": "gym_core.delta",
    "pack_signs": "gym_core.bits",
    "unpack_signs": "gym_core.bits",
    # aggregators
    "Aggregator": "gym_core.aggregate",
    "Aggregate": "gym_core.aggregate",
    # running gym from a test or a notebook
    "compose": "gym_core.startup",
    "run_job": "gym_core.run",
}

__all__ = [
    "API_VERSION", "AlgorithmConfig", "DataConfig", "Families", "GroupPolicyConfig",
    "GymError", "MatrixQuantConfig", "OfflineAlgorithmConfig", "OnlineAlgorithmConfig",
    "Plugins", "QuantConfig", "Registry", "Reward", "SoupConfig", "atomic_path", "hookimpl",
    "hookspec", "write_json", "write_text",
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


if TYPE_CHECKING:
    pass
