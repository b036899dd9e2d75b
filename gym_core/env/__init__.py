"""Multi-turn, tool-using environments (docs/agents.md): the ``env`` plugin family.

An environment is a class registered through ``gym_add_environments``; the rollout engine
makes one instance per episode, calls ``reset(row)`` for the first observation (chat
messages and the tools the episode offers) and ``step(action)`` after each model turn.
Cheap to import: the config bases only (what registration hooks need); the classes are in
the submodules, exported through :mod:`gym_core.api`.
"""

from gym_core.env.config import CalculatorConfig, EnvConfig, PythonEnvConfig, WordleConfig

__all__ = ["CalculatorConfig", "EnvConfig", "PythonEnvConfig", "WordleConfig"]
