"""The environment contract suite (gym_core.contracts.environment) run on the built-in
environments, as a plugin author runs it on theirs."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from gym_core.contracts.environment import EnvironmentContract
from gym_core.env.config import CalculatorConfig, PythonEnvConfig, WordleConfig
from gym_core.env.sandbox import confinement_problem


class TestCalculatorContract(EnvironmentContract):
    @pytest.fixture
    def env_factory(self):
        from gym_core.env.builtin import Calculator

        cfg = OmegaConf.structured(CalculatorConfig())
        return lambda: Calculator(cfg)

    @pytest.fixture
    def rows(self):
        return [{"prompt": "What is 2 + 3?", "answer": "5"}]


class TestWordleContract(EnvironmentContract):
    @pytest.fixture
    def env_factory(self):
        from gym_core.env.builtin import Wordle

        cfg = OmegaConf.structured(WordleConfig())
        return lambda: Wordle(cfg)

    @pytest.fixture
    def rows(self):
        return [{"prompt": "Let's play Wordle.", "answer": "crane"}]


@pytest.mark.skipif(confinement_problem() is not None, reason=str(confinement_problem()))
class TestPythonContract(EnvironmentContract):
    @pytest.fixture
    def env_factory(self):
        from gym_core.env.builtin import PythonCountdown

        cfg = OmegaConf.structured(PythonEnvConfig(wall_seconds=5))
        return lambda: PythonCountdown(cfg)

    @pytest.fixture
    def rows(self):
        return [{"prompt": "Make 10 from [2, 5]", "numbers": [2, 5], "target": 10}]
