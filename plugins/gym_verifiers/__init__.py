"""verifiers environments as gym environments (``env=verifiers``, docs/agents.md
"Third-party environments"; needs ``verifiers==0.1.10``: ``pip install
'gym-core[verifiers]'``).

``env.environment`` names a verifiers environment: an environment id as verifiers'
``load_environment`` takes it (the installed package or importable module of that name,
its ``load_environment(**env.args)``), or ``"package.module:function"`` returning a
``verifiers.Environment``. Its ``MultiTurnEnv`` pieces run as gym episodes: the dataset's
rows (``data=verifiers``, the same environment's dataset) reset, each model turn goes to
``env_response`` until the environment's stop conditions (``is_completed``) end the
episode, and its ``Rubric`` scores it. A ``ToolEnv``'s tools are offered to the model
with their schemas and run by the environment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gym_core.api import DataConfig, EnvConfig, bounded, hookimpl


@dataclass
class VerifiersConfig(EnvConfig):
    name: str = "verifiers"
    # a verifiers environment id (load_environment: the module of that name) or
    # "package.module:function" returning a verifiers Environment
    environment: str | None = None
    args: dict[str, Any] = field(default_factory=dict)  # load_environment(**args)
    max_turns: int = bounded(6, ge=1)
    max_tokens: int = bounded(512, ge=2)


@dataclass
class VerifiersDataConfig(DataConfig):
    """The rows of the verifiers environment's own dataset (``env.environment``): its
    ``dataset`` for training, its ``eval_dataset`` held out (without one, ``test_size``
    rows of the dataset, chosen by ``seed``, are held out instead)."""

    name: str = "verifiers"
    # env.environment / env.args by default (an interpolation: None / {} without them)
    environment: str | None = "${oc.select:env.environment,null}"
    args: dict[str, Any] = "${oc.select:env.args,{}}"  # type: ignore[assignment]
    test_size: int = bounded(20, ge=1)


@hookimpl
def gym_add_environments(registry):
    registry.add("verifiers", VerifiersConfig, "gym_verifiers.env:Verifiers")


@hookimpl
def gym_add_datasets(registry):
    registry.add("verifiers", VerifiersDataConfig, "gym_verifiers.env:verifiers_task")
