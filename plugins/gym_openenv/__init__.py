"""OpenEnv environments as gym environments (``env=openenv``, docs/agents.md
"Third-party environments"; needs ``openenv-core``).

``env.environment`` names an OpenEnv ``Environment`` subclass (``"package.module:Class"``),
run in-process: one instance per episode, ``reset(seed=row["seed"])`` and
``step(Action)`` as OpenEnv's own server calls them. The model's turn fills the
action's text field (``env.action_field``; default: the action model's only required
string field), the observation's fields other than done / reward / metadata come back
as the next user turn, and ``observation.reward`` is the turn's reward.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from gym_core.api import EnvConfig, hookimpl


@dataclass
class OpenEnvConfig(EnvConfig):
    name: str = "openenv"
    environment: str = MISSING  # "package.module:Class", an openenv Environment subclass
    # the Action class ("package.module:Class"); None: the environment's generic
    # parameter (Environment[MyAction, MyObservation, State])
    action: str | None = None
    action_field: str | None = None  # the action's text field; None: its only str field


@hookimpl
def gym_add_environments(registry):
    registry.add("openenv", OpenEnvConfig, "gym_openenv.env:OpenEnv")
