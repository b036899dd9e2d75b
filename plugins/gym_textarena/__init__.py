"""TextArena's single-player text games as gym environments (``env=textarena``,
docs/agents.md "Third-party environments"; needs ``pip install textarena``).

``env.game`` is a TextArena id (``ta.make``), e.g. ``GuessTheNumber-v0``,
``TowerOfHanoi-v0``, ``Minesweeper-v0``; rows come from ``data=textarena`` (one seed per
row: the G episodes of a row play the same game). The model plays player 0; each turn's
text is the game's action, the game's new messages come back as the next user turn, and
the reward is the game's own at its end (``env.close()``'s reward of player 0).
Multi-player games (``env.players`` > 1, e.g. ``TicTacToe-v0``, ``KuhnPoker-v0``): the
other players move by ``env.opponent``, a function ``"package.module:function"`` called as
``function(observation_text, player_id) -> action_text`` (a scripted player, a frozen copy
of a model, a served one through the ``openai`` client).
"""

from __future__ import annotations

from dataclasses import dataclass

from gym_core.api import DataConfig, EnvConfig, bounded, hookimpl


@dataclass
class TextArenaConfig(EnvConfig):
    name: str = "textarena"
    game: str = "GuessTheNumber-v0"  # a TextArena id, as ta.make takes it
    players: int = bounded(1, ge=1, le=16)  # the game's players; the model is player 0
    # the other players' moves: "package.module:function", fn(observation, player) -> text
    opponent: str | None = None
    max_turns: int = 10
    max_tokens: int = 512
    max_observation_tokens: int = 256


@dataclass
class TextArenaDataConfig(DataConfig):
    """Rows of ``{"prompt": <game id>, "seed": n}`` for ``env=textarena``: the seed picks
    the game's secret (its board, its number); the held-out seeds are others."""

    name: str = "textarena"
    train_size: int = bounded(1000, ge=1)
    test_size: int = bounded(20, ge=1)


@hookimpl
def gym_add_environments(registry):
    registry.add("textarena", TextArenaConfig, "gym_textarena.env:TextArena")


@hookimpl
def gym_add_datasets(registry):
    registry.add("textarena", TextArenaDataConfig, "gym_textarena.env:textarena_task")
