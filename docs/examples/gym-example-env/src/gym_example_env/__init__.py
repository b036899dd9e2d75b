"""An example environment plugin: ``env=guess``. Cheap to import (the config and the
registration hook); the environment class is loaded when a run selects it."""

from __future__ import annotations

from dataclasses import dataclass

from gym_core.api import EnvConfig, hookimpl

GYM_API_VERSION = "2"


@dataclass
class GuessConfig(EnvConfig):
    """Guess a secret integer in [low, high]; a ``hint`` tool says higher or lower."""

    name: str = "guess"
    max_turns: int = 5
    low: int = 1
    high: int = 100


@hookimpl
def gym_add_environments(registry):
    registry.add("guess", GuessConfig, "gym_example_env.env:Guess")
