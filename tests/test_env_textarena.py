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
    with pytest.raises(GymError, match="only single-player TextArena games"):
        TextArena(textarena_cfg(game="TicTacToe-v0")).check_row({"prompt": "x", "seed": 1})


def test_textarena_episode_with_the_tiny_model():
    from gym_textarena.env import TextArena

    out = tiny_episodes(TextArena, textarena_cfg(max_turns=3, max_tokens=384),
                        [{"prompt": "textarena", "seed": 7}])
    check_episodes(out)




def test_a_training_step_on_env_textarena(tiny_overrides, tmp_path):
    """The plugin's options compose (env=textarena, data=textarena) and a GRPO step runs."""
    import json

    from gym_core.api import compose
    from gym_core.train.job import run_job

    cfg = compose([*tiny_overrides, "env=textarena", "data=textarena", "algorithm=grpo",
                   "algorithm.num_generations=2", "trainer.max_steps=1", "env.max_turns=2",
                   "env.max_tokens=400", "trainer.eval_size=2"])
    assert cfg.env.game == "GuessTheNumber-v0"
    run_job(cfg, run_dir=tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if "loss" in r)
    assert step["env/turns"] >= 1 and step["env/errors"] == 0
