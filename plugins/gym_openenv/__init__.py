"""OpenEnv environments as gym environments (``env=openenv``, docs/agents.md
"Third-party environments"; needs ``openenv-core``).

Either ``env.environment`` names an OpenEnv ``Environment`` subclass
(``"package.module:Class"``), run in-process: one instance per episode,
``reset(seed=row["seed"])`` and ``step(Action)`` as OpenEnv's own server calls them; or
``env.base_url`` is a running OpenEnv server (``http://host:port``, its own container or
process), one WebSocket session per episode through OpenEnv's ``GenericEnvClient``. The
model's turn fills the action's text field (``env.action_field``; in-process, by default
the action model's only required string field), the observation's fields other than
done / reward / metadata come back as the next user turn, and its reward is the turn's.
"""

from __future__ import annotations

from dataclasses import dataclass

from gym_core.api import EnvConfig, bounded, hookimpl


@dataclass
class OpenEnvConfig(EnvConfig):
    name: str = "openenv"
    # "package.module:Class", an openenv Environment subclass played in-process...
    environment: str | None = None
    # ...or a running OpenEnv server, one WebSocket session per episode
    base_url: str | None = None
    # the Action class ("package.module:Class"); None: the environment's generic
    # parameter (Environment[MyAction, MyObservation, State])
    action: str | None = None
    # the action's text field; None: its only required str field (in-process only)
    action_field: str | None = None
    connect_timeout: float = bounded(10.0, gt=0)  # seconds to open a session (base_url)


@hookimpl
def gym_add_environments(registry):
    registry.add("openenv", OpenEnvConfig, "gym_openenv.env:OpenEnv")
