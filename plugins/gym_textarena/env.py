"""The TextArena adapter (``env=textarena``): a single-player TextArena game, one
instance per episode, driven through TextArena's own interface::

    game = ta.make(id)                       # unwrapped: the game's raw messages
    game.reset(num_players=1, seed=row["seed"])
    player, messages = game.get_observation()
    done, info = game.step(text)             # until done
    rewards, game_info = game.close()        # rewards[0]: the episode's reward

TextArena seeds Python's global ``random`` in ``reset``; the adapter gives each game a
random state of its own and restores the caller's around every call, so a game neither
reads nor moves the trainer's random stream.
"""

from __future__ import annotations

import random
from typing import Any

from gym_core.api import Action, Environment, GymError, Observation, Task


def textarena_task(cfg) -> Task:
    """``data.train_size`` training seeds and ``data.test_size`` others, from ``data.seed``."""
    seeds = random.Random(cfg.seed).sample(range(10 ** 9), cfg.train_size + cfg.test_size)
    rows = [{"prompt": "textarena", "seed": s} for s in seeds]
    return Task("textarena", rows[cfg.test_size:], rows[:cfg.test_size], metric=None)


def _text(messages) -> str:
    """The game's messages to the player (its prompt, the board, hints, verdicts) without
    the player's own action echoed back."""
    import textarena as ta

    return "\n".join(m for _, m, kind in messages
                     if kind != ta.ObservationType.PLAYER_ACTION).strip()


class TextArena(Environment):
    """One TextArena game per episode (``env.game``); the model is player 0."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.game = None
        self._random: Any = None

    def check_row(self, row):
        """The row's seed, and a game that starts with one player (the first training
        row is checked before any sampling: a multi-player game stops the run there)."""
        if not isinstance(row.get("seed"), int):
            raise GymError(f"env={self.cfg.name} needs rows with an integer 'seed' "
                           f"(data=textarena); this row has {sorted(row)}")
        if self.game is None:
            try:
                self.reset(row)
            except GymError:
                raise
            except Exception as e:
                raise GymError(f"env.game={self.cfg.game!r} does not start with one player "
                               f"({type(e).__name__}: {str(e)[:120]}); only single-player "
                               "TextArena games are adapted") from e
            finally:
                self.close()

    def _call(self, fn, *args, **kwargs):
        """``fn`` with the game's own random state in place of the caller's."""
        outer = random.getstate()
        if self._random is not None:
            random.setstate(self._random)
        try:
            return fn(*args, **kwargs)
        finally:
            self._random = random.getstate()
            random.setstate(outer)

    def reset(self, row: dict[str, Any]) -> Observation:
        import textarena as ta

        if not isinstance(row.get("seed"), int):
            self.check_row(row)
        self.row, self._random = row, None
        try:
            game = self._call(ta.make, self.cfg.game)
        except Exception as e:  # an unknown id: TextArena's own message, one line
            raise GymError(f"env.game={self.cfg.game!r}: {str(e).splitlines()[0]}") from e
        while isinstance(game, ta.Wrapper):  # the raw game: new messages each turn
            game = game.env
        self.game = game
        self._call(game.reset, num_players=1, seed=row["seed"])
        _, messages = self._call(game.get_observation)
        return Observation([{"role": "user", "content": _text(messages)}])

    def step(self, action: Action):
        done, info = self._call(self.game.step, action.content)
        info = {k: v for k, v in (info or {}).items() if isinstance(v, (int, float, str))}
        if done:
            rewards, _ = self._call(self.game.close)
            reward = float((rewards or {}).get(0, 0.0))
            self.game = None
            return None, reward, True, info
        _, messages = self._call(self.game.get_observation)
        return _text(messages) or "(the game has nothing to say; your move)", 0.0, False, info

    def close(self) -> None:
        self.game = None
