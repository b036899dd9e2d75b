"""The OpenEnv adapter (``env=openenv``): an OpenEnv environment, one per episode, either
an ``openenv.core.env_server.interfaces.Environment`` in-process::

    env = EnvironmentClass()
    obs = env.reset(seed=row.get("seed"))      # an openenv Observation (pydantic)
    obs = env.step(ActionClass(**{field: turn_text}))
    obs.reward, obs.done                       # the turn's reward, the episode's end

or a running server through OpenEnv's own client (``GenericEnvClient``: plain dicts over
its WebSocket protocol)::

    client = GenericEnvClient(base_url=url).sync()
    result = client.reset(seed=...)            # StepResult(observation, reward, done)
    result = client.step({field: turn_text})

An ``MCPEnvironment`` (OpenEnv's tool environments, a FastMCP server inside) offers its
tools to the model: ``ListToolsAction`` at reset gives their names and JSON schemas, each
model tool call becomes a ``CallToolAction`` and its result the tool's reply; the tool
observations' rewards add up to the turn's reward and one that is ``done`` ends the
episode. A turn without a call goes to the environment as its text action when it names
one (``env.action`` / ``env.action_field``), else it ends the episode.
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


def _text_field(action_cls, name: str | None) -> str:
    fields = action_cls.model_fields
    if name is not None:
        if name not in fields:
            raise GymError(f"env.action_field={name!r} is not a field of "
                           f"{action_cls.__name__} (fields: {sorted(fields)})")
        return name
    text = [n for n, f in fields.items() if f.annotation is str and f.is_required()]
    if len(text) != 1:
        raise GymError(f"{action_cls.__name__} has {len(text)} required str fields "
                       f"({text}); set env.action_field to the one the model's turn fills")
    return text[0]


def observation_text(data: dict[str, Any]) -> str:
    """An observation's own fields (done / reward / metadata left out) as text: the only
    one as it is, several as JSON, none as ""."""
    data = {k: v for k, v in data.items() if k not in RESERVED}
    if not data:
        return ""
    if len(data) == 1:
        value = next(iter(data.values()))
        return value if isinstance(value, str) else json.dumps(value, default=str)
    return json.dumps(data, default=str)


class OpenEnv(Environment):
    """An OpenEnv environment (``env.environment`` in-process, or ``env.base_url``)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.env = self.client = None
        self.mcp = False  # an MCPEnvironment: its tools offered to the model
        if (cfg.environment is None) == (cfg.base_url is None):
            raise GymError("env=openenv needs one of env.environment=package.module:Class (an "
                           "OpenEnv Environment run in-process) or env.base_url=http://host:port "
                           "(a running OpenEnv server)")
        if cfg.base_url is not None:
            if cfg.action_field is None:
                raise GymError(f"env.base_url={cfg.base_url}: set env.action_field to the "
                               "action field the model's turn fills (the server's /schema "
                               "lists them)")
            self.field = cfg.action_field
            return
        from openenv.core.env_server.interfaces import Environment as OpenEnvEnvironment

        self.env_cls = _load(cfg.environment, "env.environment")
        if not (isinstance(self.env_cls, type) and issubclass(self.env_cls, OpenEnvEnvironment)):
            raise GymError(f"env.environment={cfg.environment!r} is not an OpenEnv Environment "
                           "subclass (openenv.core.env_server.interfaces.Environment)")
        from openenv.core.env_server.mcp_environment import MCPEnvironment

        self.mcp = issubclass(self.env_cls, MCPEnvironment)
        self.action_cls = (_load(cfg.action, "env.action") if cfg.action
                           else _action_class(self.env_cls))
        if self.action_cls is None and not self.mcp:
            raise GymError(f"env.environment={cfg.environment!r} does not name its Action "
                           "type (Environment[MyAction, ...]); set env.action")
        self.field = None if self.action_cls is None else _text_field(self.action_cls,
                                                                      cfg.action_field)
        self._tool_obs: list = []  # the tool observations of the current turn (MCP)

    def check_row(self, row):
        if not isinstance(row.get("prompt"), str):
            raise GymError(f"env={self.cfg.name} needs data rows with a 'prompt' (and "
                           f"optionally an integer 'seed'); this row has {sorted(row)}")

    def reset(self, row: dict[str, Any]) -> Observation:
        self.check_row(row)
        self.row = row
        kwargs = {} if row.get("seed") is None else {"seed": row["seed"]}
        if self.cfg.base_url is not None:
            from openenv.core.generic_client import GenericEnvClient

            self.client = GenericEnvClient(
                base_url=self.cfg.base_url, connect_timeout_s=float(self.cfg.connect_timeout),
                message_timeout_s=float(self.cfg.max_seconds)).sync()
            self.client.connect()
            data = self.client.reset(**kwargs).observation
        else:
            self.env = self.env_cls()
            data = self.env.reset(**kwargs).model_dump()
        text = "\n\n".join(t for t in (row["prompt"], observation_text(data)) if t)
        tools = self._mcp_tools() if self.mcp else []
        self._tools = {t.__name__: t for t in tools}
        return Observation([{"role": "user", "content": text}], tools)

    def _mcp_tools(self) -> list:
        """The MCP server's tools as callables carrying their JSON schemas; a call is a
        CallToolAction whose observation is kept for the turn's reward."""
        from openenv.core.env_server.mcp_types import CallToolAction, ListToolsAction

        def wrap(tool):
            def call(**arguments):
                obs = self.env.step(CallToolAction(tool_name=tool.name, arguments=arguments))
                self._tool_obs.append(obs)
                if obs.error is not None:
                    return f"error: {obs.error.message}"
                return tool_result_text(obs.result)

            call.__name__ = tool.name
            call.__tool_schema__ = {"type": "function", "function": {
                "name": tool.name, "description": tool.description or "",
                "parameters": tool.input_schema or {"type": "object", "properties": {}}}}
            return call

        return [wrap(t) for t in self.env.step(ListToolsAction()).tools]

    def step(self, action: Action):
        if self.mcp and (action.tool_calls or action.error):
            self._tool_obs = []
            text, _, _, info = super().step(action)  # the tool loop: CallToolActions
            reward = sum(float(o.reward) for o in self._tool_obs if o.reward is not None)
            if any(o.done for o in self._tool_obs):
                return None, reward, True, info
            return text, reward, False, info
        if self.mcp and self.field is None:
            return None, 0.0, True, {}  # no text action: a turn without a call ends it
        if self.client is not None:
            result = self.client.step({self.field: action.content})
            data, reward, done = result.observation, result.reward, result.done
        else:
            from pydantic import ValidationError

            try:
                act = self.action_cls(**{self.field: action.content})
            except ValidationError as e:  # the environment's own check of the action
                return f"error: {str(e).splitlines()[0]}", 0.0, False, {"invalid": 1}
            obs = self.env.step(act)
            data, reward, done = obs.model_dump(), obs.reward, obs.done
        reward = 0.0 if reward is None else float(reward)
        if done:
            return None, reward, True, {}
        return observation_text(data), reward, False, {}

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        elif self.env is not None:
            self.env.close()
        self.env = self.client = None


def tool_result_text(result) -> str:
    """An MCP tool's result as the model reads it: its text content, else its data."""
    content = getattr(result, "content", None)
    texts = [c.text for c in content or [] if getattr(c, "text", None) is not None]
    if texts:
        return "\n".join(texts)
    data = getattr(result, "data", result)
    return data if isinstance(data, str) else json.dumps(data, default=str)
