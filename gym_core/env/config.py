"""The config bases of the ``env`` family (cheap: no torch, no transformers)."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from gym_core.config.fields import bounded
from gym_core.config.schema import DataConfig


@dataclass
class EnvConfig:
    """Base of every ``env=<name>`` option: the per-episode limits the core enforces."""

    name: str = MISSING
    max_turns: int = bounded(4, ge=1)  # model turns per episode; the episode ends (done) after the last
    # tokens of the whole episode after the prompt, the model's and the environment's
    max_tokens: int = bounded(256, ge=2)
    # seconds an episode may spend in the environment (creating it, reset, steps, tools)
    max_seconds: float = bounded(60.0, gt=0)
    # an observation longer than this (tokens) is cut, with a note saying so
    max_observation_tokens: int = bounded(128, ge=1)
    gamma: float = bounded(1.0, ge=0, le=1)  # discount of turn-level returns: G_k = sum_j gamma^(j-k) r_j
    tool_timeout: float = bounded(10.0, gt=0)  # seconds one tool call may take before it is abandoned


@dataclass
class CalculatorConfig(EnvConfig):
    """Arithmetic with a calculator tool (``env=calculator``, rows of data=arithmetic)."""

    name: str = "calculator"
    max_turns: int = 3


@dataclass
class PythonEnvConfig(EnvConfig):
    """Countdown with a sandboxed Python tool (``env=python``)."""

    name: str = "python"
    cpu_seconds: int = bounded(5, ge=1)  # CPU-time limit of one run (RLIMIT_CPU)
    memory_mb: int = bounded(512, ge=16)  # address-space limit of one run (RLIMIT_AS)
    wall_seconds: float = bounded(10.0, gt=0)  # killed after this long
    max_output_chars: int = bounded(2000, ge=1)  # stdout+stderr kept, the rest cut with a note


@dataclass
class WordleConfig(EnvConfig):
    """Wordle (``env=wordle``): six guesses of a five-letter word."""

    name: str = "wordle"
    max_turns: int = 6
    max_tokens: int = 384


@dataclass
class CountdownDataConfig(DataConfig):
    """Countdown problems (``data=countdown``, for ``env=python``): reach ``target``
    with each of ``numbers`` at most once and + - * /."""

    name: str = "countdown"
    count: int = bounded(3, ge=2, le=6)  # numbers per problem
    max_number: int = bounded(20, ge=1)
    train_size: int = bounded(500, ge=1)
    test_size: int = bounded(50, ge=1)


@dataclass
class WordleDataConfig(DataConfig):
    """Wordle secrets (``data=wordle``, for ``env=wordle``) from a built-in word list."""

    name: str = "wordle"
    test_size: int = bounded(20, ge=1)
