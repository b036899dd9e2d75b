"""The OpenEnv adapter (``env=openenv``): an ``openenv.core.env_server.interfaces.Environment``
in-process, one instance per episode::

    env = EnvironmentClass()
    obs = env.reset(seed=row.get("seed"))      # an openenv Observation (pydantic)
    obs = env.step(ActionClass(**{field: turn_text}))
    obs.reward, obs.done                       # the turn's reward, the episode's end
"""

from __future__ import annotations

import importlib
import json
import typing
from typing import Any

from gym_core.api import Action, Environment, GymError, Observation

RESERVED = ("done", "reward", "metadata")  # openenv Observation's own fields


def _load(path: str, key: str):
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise GymError(f"{key}={path!r} cannot be imported ({e}); give 'package.module:Class'"
                       ) from e


def _action_class(env_cls):
    """The first type argument of the class's ``Environment[ActT, ObsT, StateT]`` base."""
    from openenv.core.env_server.types import Action as OpenEnvAction

    for klass in env_cls.__mro__:
        for base in getattr(klass, "__orig_bases__", ()):
            for arg in typing.get_args(base):
                if isinstance(arg, type) and issubclass(arg, OpenEnvAction):
                    return arg
    return None


def _text_field(action_cls, name: str | None, key: str) -> str:
    fields = action_cls.model_fields
    if name is not None:
        if name not in fields:
            raise GymError(f"{key}.action_field={name!r} is not a field of "
                           f"{action_cls.__name__} (fields: {sorted(fields)})")
        return name
    text = [n for n, f in fields.items() if f.annotation is str and f.is_required()]
    if len(text) != 1:
        raise GymError(f"{action_cls.__name__} has {len(text)} required str fields "
                       f"({text}); set env.action_field to the one the model's turn fills")
    return text[0]


def observation_text(obs) -> str:
    """An openenv Observation's own fields as text: the only one as it is, several as JSON."""
    data = obs.model_dump(exclude=set(RESERVED))
    if len(data) == 1:
        value = next(iter(data.values()))
        return value if isinstance(value, str) else json.dumps(value, default=str)
    return json.dumps(data, default=str)


class OpenEnv(Environment):
    """An OpenEnv environment (``env.environment``) played in-process."""

    def __init__(self, cfg):
        super().__init__(cfg)
        from openenv.core.env_server.interfaces import Environment as OpenEnvEnvironment

        self.env_cls = _load(cfg.environment, "env.environment")
        if not (isinstance(self.env_cls, type) and issubclass(self.env_cls, OpenEnvEnvironment)):
            raise GymError(f"env.environment={cfg.environment!r} is not an OpenEnv Environment "
                           "subclass (openenv.core.env_server.interfaces.Environment)")
        self.action_cls = (_load(cfg.action, "env.action") if cfg.action
                           else _action_class(self.env_cls))
        if self.action_cls is None:
            raise GymError(f"env.environment={cfg.environment!r} does not name its Action "
                           "type (Environment[MyAction, ...]); set env.action")
        self.field = _text_field(self.action_cls, cfg.action_field, "env")
        self.env = None

    def reset(self, row: dict[str, Any]) -> Observation:
        self.check_row(row)
        self.row = row
        self.env = self.env_cls()
        obs = self.env.reset(seed=row.get("seed"))
        text = "\n\n".join(t for t in (row.get("prompt"), observation_text(obs)) if t)
        return Observation([{"role": "user", "content": text}])

    def check_row(self, row):
        if not isinstance(row.get("prompt"), str):
            raise GymError(f"env={self.cfg.name} needs data rows with a 'prompt' (and "
                           f"optionally an integer 'seed'); this row has {sorted(row)}")

    def step(self, action: Action):
        from pydantic import ValidationError

        try:
            act = self.action_cls(**{self.field: action.content})
        except ValidationError as e:  # the environment's own check of the action
            return f"error: {str(e).splitlines()[0]}", 0.0, False, {"invalid": 1}
        obs = self.env.step(act)
        reward = 0.0 if obs.reward is None else float(obs.reward)
        if obs.done:
            return None, reward, True, {}
        return observation_text(obs), reward, False, {}

    def close(self) -> None:
        close = getattr(self.env, "close", None)
        if close is not None:
            close()
        self.env = None
