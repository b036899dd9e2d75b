"""An example gym plugin: an algorithm, a reward function and a quantizer.

This module is what the entry point names, so gym imports it at every start-up
(``--help`` included): it holds only config dataclasses and registration hooks, and
points ``registry.add`` at the implementations with ``"module:attribute"`` strings that
gym imports (with torch) only when a run selects them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gym_core.api import (
    MatrixQuantConfig,
    OnlineAlgorithmConfig,
    TokenLoss,
    bounded,
    hookimpl,
    one_of,
)

#: The gym plugin API this plugin was written against; gym refuses to load it, with a
#: message naming both versions, when the installed gym-core provides another.
GYM_API_VERSION = "2"


@dataclass
class ReinforceConfig(OnlineAlgorithmConfig):
    """REINFORCE with a moving-average baseline (Williams 1992, "Simple statistical
    gradient-following algorithms for connectionist reinforcement learning")."""

    name: str = "reinforce"
    lr: float = 5e-5  # LoRA adapters need a larger step than full fine-tuning's 1e-6
    # completions per prompt (gym's rollout engine samples at least 2)
    num_generations: int = 4
    # b <- decay * b + (1 - decay) * (the step's mean reward, over every rank); the first
    # step starts b at its own mean reward
    baseline_decay: float = bounded(0.9, ge=0, lt=1)
    # KL penalty folded into the reward: r - beta * sum_t (log pi - log pi_ref) (k1, as
    # Ziegler et al. 2019). 0 skips the reference forward pass.
    beta: float = bounded(0.05, ge=0)
    # How per-token losses are averaged (gym_core.api.TokenLoss); "dapo" is the
    # token-level mean over every completion token of the step. gym checks the value
    # (and every bounded one) before a run starts: docs/plugins.md, allowed values.
    loss_type: str = one_of(TokenLoss, "dapo")
    rewards: list[str] = field(default_factory=lambda: ["accuracy", "number_only"])
    reward_weights: list[float] | None = field(default_factory=lambda: [1.0, 0.1])


@dataclass
class AbsmaxConfig(MatrixQuantConfig):
    """Symmetric per-tensor integer quantization of each target matrix of the delta:
    q = round(d / s), s = max|d| / (2^(bits-1) - 1), packed two per byte at 4 bits
    (``targets``, the matrices quantized, comes from MatrixQuantConfig)."""

    name: str = "absmax"
    bits: int = one_of((8, 4), 8)


@hookimpl
def gym_add_algorithms(registry):
    registry.add("reinforce", ReinforceConfig, "gym_example_plugin.reinforce:Reinforce")


@hookimpl
def gym_add_rewards(registry):
    registry.add("number_only", None, "gym_example_plugin.rewards:number_only")


@hookimpl
def gym_add_quantizers(registry):
    registry.add("absmax", AbsmaxConfig, "gym_example_plugin.absmax:AbsmaxQuantizer")
