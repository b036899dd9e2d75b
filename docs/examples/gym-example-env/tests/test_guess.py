"""The gym environment contract on env=guess, and its rewards."""

from __future__ import annotations

import pytest
from gym_example_env import GuessConfig
from gym_example_env.env import Guess
from omegaconf import OmegaConf

from gym_core.api import Action, parse_tool_calls
from gym_core.contracts.environment import EnvironmentContract


@pytest.fixture
def factory():
    cfg = OmegaConf.structured(GuessConfig())
    return lambda: Guess(cfg)


class TestGuessContract(EnvironmentContract):
    @pytest.fixture
    def env_factory(self, factory):
        return factory

    @pytest.fixture
    def rows(self):
        return [{"prompt": "Guess my number (1-100).", "answer": 42}]


def test_hints_cost_and_the_right_guess_pays(factory):
    env = factory()
    env.reset({"answer": 42})
    calls, _ = parse_tool_calls('<tool_call>{"name": "hint", "arguments": {"guess": 50}}'
                                "</tool_call>")
    assert env.step(Action("", [], calls, None))[:3] == ("lower", -0.05, False)
    assert env.step(Action("It is 42.", [], [], None))[1:3] == (1.0, True)
