"""The TextArena adapter (``env=textarena``): a TextArena game, one instance per episode,
driven through TextArena's own interface::

    game = ta.make(id)                       # unwrapped: the game's raw messages
    game.reset(num_players=n, seed=row["seed"])
    player, messages = game.get_observation()
    done, info = game.step(text)             # until done
    rewards, game_info = game.close()        # rewards[0]: the episode's reward

The model is player 0; in a game of several players (``env.players``) the others move by
``env.opponent`` between the model's turns, and their moves reach the model as the game
reports them (the next user turn).

TextArena seeds Python's global ``random`` in ``reset``; the adapter gives each game a
random state of its own and restores the caller's around every call, so a game neither
reads nor moves the trainer's random stream.
"""

from __future__ import annotations

import importlib
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

    #: opponents' moves in a row before the model's turn comes back: more is a game
    #: that never gives player 0 a turn
    max_opponent_moves = 1000

    def __init__(self, cfg):
        super().__init__(cfg)
        self.game = None
        self._random: Any = None
        self._opponent = None

    def check_row(self, row):
        """The row's seed, an opponent for a game of several players, and a game that
        starts with ``env.players`` players (the first training row is checked before any
        sampling: a game of another number of players stops the run there)."""
        if not isinstance(row.get("seed"), int):
            raise GymError(f"env={self.cfg.name} needs rows with an integer 'seed' "
                           f"(data=textarena); this row has {sorted(row)}")
        players = self.cfg.players
        if players > 1 and not self.cfg.opponent:
            raise GymError(f"env.players={players}: the other players need "
                           "env.opponent='package.module:function' (called as "
                           "function(observation, player_id) -> action text)")
        if players > 1:
            self._opponent_fn()
        if self.game is None:
            try:
                self.reset(row)
            except GymError:
                raise
            except Exception as e:
                raise GymError(f"env.game={self.cfg.game!r} does not start with "
                               f"env.players={players} ({type(e).__name__}: "
                               f"{str(e)[:120]}); set env.players to the game's number of "
                               "players") from e
            finally:
                self.close()

    def _opponent_fn(self):
        if self._opponent is None:
            module, _, name = str(self.cfg.opponent).partition(":")
            try:
                self._opponent = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError, ValueError) as e:
                raise GymError(f"env.opponent={self.cfg.opponent!r} cannot be imported "
                               f"({e}); give 'package.module:function'") from e
        return self._opponent

    def _move_of(self, messages, player: int) -> str:
        move = self._call(self._opponent_fn(), _text(messages), player)
        if not isinstance(move, str):
            raise GymError(f"env.opponent={self.cfg.opponent!r} returned "
                           f"{type(move).__name__} for player {player}, not the move's text")
        return move

    def _until_our_turn(self):
        """The other players move until it is player 0's turn: (done, info, player 0's
        new messages), or (True, info, None) when the game ended first."""
        info: dict = {}
        for _ in range(self.max_opponent_moves):
            player, messages = self._call(self.game.get_observation)
            if player == 0:
                return False, info, messages
            done, info = self._call(self.game.step, self._move_of(messages, player))
            if done:
                return True, info, None
        raise GymError(f"env.game={self.cfg.game!r}: {self.max_opponent_moves} moves of the "
                       "other players without a turn for player 0")

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
        self._call(game.reset, num_players=self.cfg.players, seed=row["seed"])
        done, _, messages = self._until_our_turn()
        if done:
            raise GymError(f"env.game={self.cfg.game!r} ended before player 0's first turn")
        return Observation([{"role": "user", "content": _text(messages)}])

    def step(self, action: Action):
        done, info = self._call(self.game.step, action.content)
        messages = None
        if not done:
            done, info, messages = self._until_our_turn()
        info = {k: v for k, v in (info or {}).items() if isinstance(v, (int, float, str))}
        if done:
            rewards, _ = self._call(self.game.close)
            reward = float((rewards or {}).get(0, 0.0))
            self.game = None
            return None, reward, True, info
        return _text(messages) or "(the game has nothing to say; your move)", 0.0, False, info

    def close(self) -> None:
        self.game = None
