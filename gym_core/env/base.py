"""The environment interface (docs/agents.md): the smallest one the field shares.

The rollout engine makes one instance per episode (``EnvClass(cfg)``), then::

    obs = env.reset(row)                          # an Observation: messages + tools
    obs, reward, done, info = env.step(action)    # after each model turn, until done

``reset`` gets the data row (a dict: ``prompt``, ``answer``...) and returns the
conversation so far and the tools the episode offers (typed Python functions, their
schemas from :func:`gym_core.env.tools.tool_schema`). ``step`` gets an
:class:`~gym_core.env.tools.Action` (the turn's text, the tokens the model sampled and its
parsed tool calls) and returns the next observation (a string, rendered as a tool result
after a tool call and as a user turn otherwise, or a list of chat messages; None when
done), the turn's reward, whether the episode ended, and an info dict (logged, and kept
in the episode's record).

The default ``step`` is the tool loop most environments need: a turn with tool calls
gets their results back (a malformed call gets the parse error); a turn without tool
calls is the final answer, scored by :meth:`Environment.score`, and ends the episode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gym_core.env.config import EnvConfig
from gym_core.env.tools import Action, call_tool


@dataclass
class Observation:
    """The start of an episode: the conversation and the tools it offers."""

    messages: list[dict[str, Any]]
    tools: list[Callable] = field(default_factory=list)


class Environment:
    """Base of every ``env=<name>`` implementation. Subclasses set ``Config`` (a
    dataclass deriving from :class:`EnvConfig`) and override :meth:`tools` and
    :meth:`score`, or :meth:`reset` and :meth:`step` for anything else."""

    Config = EnvConfig

    def __init__(self, cfg):
        self.cfg = cfg
        self.row: dict[str, Any] = {}
        self._tools: dict[str, Callable] = {}

    # -- what subclasses override ------------------------------------------------------
    def check_row(self, row: dict[str, Any]) -> None:
        """Raise :class:`gym_core.base.errors.GymError` when the data rows cannot serve
        this environment (called once on the first training row, before any sampling)."""
        if "prompt" not in row:
            from gym_core.base.errors import GymError

            raise GymError(f"env={self.cfg.name} needs data rows with a 'prompt'; this row "
                           f"has {sorted(row)}")

    def tools(self) -> list[Callable]:
        """The tools each episode offers (default: none); the default :meth:`step` calls
        these (a :meth:`reset` of your own returns them in its Observation)."""
        return []

    def score(self, action: Action) -> float:
        """The reward of the final answer (a turn without tool calls); default 0."""
        return 0.0

    def reset(self, row: dict[str, Any]) -> Observation:
        """The first observation: the row's prompt as chat messages, with :meth:`tools`."""
        from gym_core.data.tasks import chat_messages

        self.row = row
        tools = self.tools()
        self._tools = {t.__name__: t for t in tools}
        return Observation(chat_messages(row["prompt"], None), tools)

    def step(self, action: Action):
        """(observation, reward, done, info) after a model turn: the tool loop."""
        if action.tool_calls or action.error:
            if not self._tools:  # a reset of its own: the tools of :meth:`tools`
                self._tools = {t.__name__: t for t in self.tools()}
            results = [call_tool(self._tools, c, self.cfg.tool_timeout)
                       for c in action.tool_calls]
            if action.error:
                results.append(f"error: {action.error}")
            return "\n".join(results), 0.0, False, {"tool_calls": len(action.tool_calls),
                                                   "tool_errors": sum(r.startswith("error:")
                                                                      for r in results)}
        return None, float(self.score(action)), True, {}

    def close(self) -> None:
        """Release what the episode holds (processes, files); called once it ends."""
