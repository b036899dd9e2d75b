"""The config bases of the ``env`` family (cheap: no torch, no transformers)."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from gym_core.config.schema import DataConfig


@dataclass
class EnvConfig:
    """Base of every ``env=<name>`` option: the per-episode limits the core enforces."""

    name: str = MISSING
    max_turns: int = 4  # model turns per episode; the episode ends (done) after the last
    # tokens of the whole episode after the prompt, the model's and the environment's
    max_tokens: int = 256
    max_seconds: float = 60.0  # wall clock per episode (environment and tool time)
    # an observation longer than this (tokens) is cut, with a note saying so
    max_observation_tokens: int = 128
    gamma: float = 1.0  # discount of turn-level returns: G_k = sum_j gamma^(j-k) r_j
    tool_timeout: float = 10.0  # seconds one tool call may take before it is abandoned


@dataclass
class CalculatorConfig(EnvConfig):
    """Arithmetic with a calculator tool (``env=calculator``, rows of data=arithmetic)."""

    name: str = "calculator"
    max_turns: int = 3


@dataclass
class PythonEnvConfig(EnvConfig):
    """Countdown with a sandboxed Python tool (``env=python``)."""

    name: str = "python"
    cpu_seconds: int = 5  # CPU-time limit of one run (RLIMIT_CPU)
    memory_mb: int = 512  # address-space limit of one run (RLIMIT_AS)
    wall_seconds: float = 10.0  # killed after this long
    max_output_chars: int = 2000  # stdout+stderr kept, the rest cut with a note


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
    count: int = 3  # numbers per problem
    max_number: int = 20
    train_size: int = 500
    test_size: int = 50


@dataclass
class WordleDataConfig(DataConfig):
    """Wordle secrets (``data=wordle``, for ``env=wordle``) from a built-in word list."""

    name: str = "wordle"
    test_size: int = 20
