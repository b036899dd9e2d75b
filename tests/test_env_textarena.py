"""TextArena games as gym environments (``env=textarena``, docs/agents.md "Third-party
environments"): TextArena's own GuessTheNumber, run locally, through the environment
contract suite and one episode of the tiny model."""

from __future__ import annotations

import random

import pytest
from omegaconf import OmegaConf

from gym_core.api import Action, GymError
from gym_core.contracts.environment import EnvironmentContract
from tests.episode_helpers import check_episodes, tiny_episodes

pytest.importorskip("textarena")


def textarena_cfg(**kw):
    from gym_textarena import TextArenaConfig

    return OmegaConf.structured(TextArenaConfig(**kw))


class TestTextArenaContract(EnvironmentContract):
    @pytest.fixture
    def env_factory(self):
        from gym_textarena.env import TextArena

        cfg = textarena_cfg(max_turns=4)
        return lambda: TextArena(cfg)

    @pytest.fixture
    def rows(self):
        return [{"prompt": "textarena", "seed": 3}, {"prompt": "textarena", "seed": 4}]


def test_textarena_plays_guess_the_number_to_its_reward():
    """TextArena's own GuessTheNumber: hints come back as user turns, the game's reward
    ends the episode, and the trainer's random stream is left alone."""
    from gym_textarena.env import TextArena

    env = TextArena(textarena_cfg())
    random.seed(5)
    expected = random.random()
    random.seed(5)
    obs = env.reset({"prompt": "textarena", "seed": 3})
    assert random.random() == expected
    assert "Guess The Number" in obs.messages[0]["content"]
    low, high, reward, done = 1, 20, None, False
    for _ in range(8):  # bisection finds it within log2(20) + 1 guesses
        guess = (low + high) // 2
        text, reward, done, _ = env.step(Action(f"My guess: [{guess}]", [], [], None))
        if done:
            break
        assert text in ("The target number is higher.", "The target number is lower.")
        low, high = (guess + 1, high) if "higher" in text else (low, guess - 1)
    assert done and reward == 1.0
    with pytest.raises(GymError, match="env.game='Nope-v0'"):
        TextArena(textarena_cfg(game="Nope-v0")).check_row({"prompt": "x", "seed": 1})
    with pytest.raises(GymError, match="does not start with env.players=1"):
        TextArena(textarena_cfg(game="TicTacToe-v0")).check_row({"prompt": "x", "seed": 1})
    with pytest.raises(GymError, match="env.opponent="):
        TextArena(textarena_cfg(game="TicTacToe-v0", players=2)).check_row(
            {"prompt": "x", "seed": 1})


def first_free_cell(observation: str, player: int) -> str:
    """A scripted Tic Tac Toe player (``env.opponent``): the lowest free cell of the last
    board shown."""
    import re

    board = observation.rsplit("Current Board:", 1)[-1].split("Available")[0]
    free = [int(c) for c in re.findall(r"\b(\d)\b", board)]
    return f"[{min(free)}]"


def test_a_two_player_game_against_a_scripted_opponent():
    """TextArena's Tic Tac Toe: the opponent (env.opponent) moves between the model's
    turns, its moves come back in the next user turn, and the game's own reward for
    player 0 ends the episode (both playing the lowest free cell: player 0 takes 0, 2,
    4 and wins on the 2-4-6 diagonal at 6)."""
    from gym_textarena.env import TextArena

    env = TextArena(textarena_cfg(game="TicTacToe-v0", players=2,
                                  opponent="tests.test_env_textarena:first_free_cell"))
    env.check_row({"prompt": "textarena", "seed": 1})
    obs = env.reset({"prompt": "textarena", "seed": 1}).messages[0]["content"]
    assert "Player 0" in obs
    moves, done = [], False
    while not done:
        move = first_free_cell(obs, 0)
        moves.append(move)
        obs, reward, done, _ = env.step(Action(move, [], [], None))
        if not done:
            assert "Player 1 placed their symbol" in obs
    assert moves == ["[0]", "[2]", "[4]", "[6]"] and reward == 1.0
    bad = TextArena(textarena_cfg(game="TicTacToe-v0", players=2, opponent="nowhere:fn"))
    with pytest.raises(GymError, match="env.opponent='nowhere:fn' cannot be imported"):
        bad.check_row({"prompt": "textarena", "seed": 1})


def test_a_two_player_episode_with_the_tiny_model():
    from gym_textarena.env import TextArena

    cfg = textarena_cfg(game="TicTacToe-v0", players=2, max_turns=3, max_tokens=384,
                        opponent="tests.test_env_textarena:first_free_cell")
    check_episodes(tiny_episodes(TextArena, cfg, [{"prompt": "textarena", "seed": 2}]))


def test_textarena_episode_with_the_tiny_model():
    from gym_textarena.env import TextArena

    out = tiny_episodes(TextArena, textarena_cfg(max_turns=3, max_tokens=384),
                        [{"prompt": "textarena", "seed": 7}])
    check_episodes(out)




@pytest.mark.parametrize("game", [[], ["env.game=TicTacToe-v0", "env.players=2",
                                         "env.opponent=tests.test_env_textarena:first_free_cell"]],
                         ids=["one-player", "two-player"])
def test_a_training_step_on_env_textarena(tiny_overrides, tmp_path, game):
    """The plugin's options compose (env=textarena, data=textarena) and a GRPO step runs."""
    import json

    from gym_core.api import compose
    from gym_core.train.job import run_job

    cfg = compose([*tiny_overrides, "env=textarena", "data=textarena", "algorithm=grpo",
                   "algorithm.num_generations=2", "trainer.max_steps=1", "env.max_turns=2",
                   "env.max_tokens=400", "trainer.eval_size=2", *game])
    assert cfg.env.game == ("TicTacToe-v0" if game else "GuessTheNumber-v0")
    run_job(cfg, run_dir=tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if "loss" in r)
    assert step["env/turns"] >= 1 and step["env/errors"] == 0


def broken_opponent(observation: str, player: int) -> str:
    raise RuntimeError("the opponent crashed")


def test_an_opponent_that_raises_or_answers_no_text_fails_the_step():
    """The opponent's failure is the environment's: step raises, and the episode runner
    records it as the episode's error (tests/test_agents.py, a misbehaving environment)."""
    from gym_textarena.env import TextArena

    env = TextArena(textarena_cfg(game="TicTacToe-v0", players=2,
                                  opponent="tests.test_env_textarena:broken_opponent"))
    env.reset({"prompt": "textarena", "seed": 1})
    with pytest.raises(RuntimeError, match="the opponent crashed"):
        env.step(Action("[4]", [], [], None))
    env = TextArena(textarena_cfg(game="TicTacToe-v0", players=2,
                                  opponent="tests.test_env_textarena:silent_opponent"))
    env.reset({"prompt": "textarena", "seed": 1})
    with pytest.raises(GymError, match="returned NoneType for player 1"):
        env.step(Action("[4]", [], [], None))


def silent_opponent(observation: str, player: int):
    return None
