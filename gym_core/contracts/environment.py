"""The contract every environment plugin passes: what the rollout engine relies on.

Subclass :class:`EnvironmentContract` in a test file and provide an ``env_factory``
fixture (a callable returning a fresh environment, as the engine makes one per episode)
and a ``rows`` fixture (a few data rows it plays); pytest runs every check below::

    import pytest
    from omegaconf import OmegaConf
    from gym_core.contracts.environment import EnvironmentContract
    from gym_myenv import MyEnvConfig
    from gym_myenv.impl import MyEnv

    class TestMyEnvContract(EnvironmentContract):
        @pytest.fixture
        def env_factory(self):
            cfg = OmegaConf.structured(MyEnvConfig())
            return lambda: MyEnv(cfg)

        @pytest.fixture
        def rows(self):
            return [{"prompt": "What is 2 + 3?", "answer": "5"}]

The checks play each row with a few scripted turns (a plain answer, a malformed tool
call, a call of each tool with made-up arguments) through the same code the sampler
uses (:class:`gym_core.env.episode.Episode`) and assert that nothing raises, that every
value has the promised type and that episodes end within ``max_turns``.
"""

from __future__ import annotations

import json

import pytest

from gym_core.api import Action, Environment, GymError, Observation, parse_tool_calls, tool_schema

SCRIPTED = (
    "I think the answer is 42.",
    "<tool_call>\n{not json}\n</tool_call>",
    '<tool_call>\n{"name": "no_such_tool", "arguments": {}}\n</tool_call>',
)


def _made_up(schema: dict) -> dict:
    """Arguments of the right JSON types for a tool's schema."""
    out = {}
    for name, prop in schema["function"]["parameters"].get("properties", {}).items():
        out[name] = {"integer": 1, "number": 1.5, "boolean": True, "array": [],
                     "object": {}}.get(prop.get("type"), "1 + 1")
    return out


def _check_step(out, where: str):
    assert isinstance(out, tuple) and len(out) == 4, (
        f"{where}: step must return (observation, reward, done, info), returned {out!r:.200}")
    obs, reward, done, info = out
    assert isinstance(reward, (int, float)) and reward == reward, (
        f"{where}: reward must be a finite number, is {reward!r}")
    assert isinstance(done, bool), f"{where}: done must be a bool, is {done!r}"
    assert isinstance(info, dict), f"{where}: info must be a dict, is {type(info).__name__}"
    if not done:
        assert isinstance(obs, str) or (isinstance(obs, list) and all(
            isinstance(m, dict) and "role" in m and "content" in m for m in obs)), (
            f"{where}: an observation must be a string or chat messages, is {obs!r:.200}")
    return obs, reward, done, info


class EnvironmentContract:
    """Checks shared by every environment; subclasses provide ``env_factory`` and
    ``rows``. Every assertion says what was expected and what came back."""

    @pytest.fixture
    def env_factory(self):
        raise NotImplementedError("define an `env_factory` fixture returning a callable "
                                  "that makes a fresh environment")

    @pytest.fixture
    def rows(self):
        raise NotImplementedError("define a `rows` fixture: a few data rows it plays")

    def test_is_an_environment_with_limits(self, env_factory):
        env = env_factory()
        assert isinstance(env, Environment), (
            f"{type(env).__name__} must subclass gym_core.api.Environment")
        for key in ("name", "max_turns", "max_tokens", "max_seconds", "max_observation_tokens",
                    "gamma", "tool_timeout"):
            assert key in env.cfg, f"the config must derive from EnvConfig: no '{key}'"
        env.close()

    def test_rows_are_accepted(self, env_factory, rows):
        env = env_factory()
        for row in rows:
            env.check_row(row)  # raises GymError for rows it cannot play
        with pytest.raises(GymError):
            env.check_row({"unrelated": 1})
        env.close()

    def test_reset_gives_messages_and_tools_with_schemas(self, env_factory, rows):
        for row in rows:
            env = env_factory()
            obs = env.reset(row)
            assert isinstance(obs, Observation), (
                f"reset must return an Observation, returned {type(obs).__name__}")
            assert obs.messages and all(isinstance(m, dict) and m.get("role") in
                                        ("system", "user", "assistant") for m in obs.messages), (
                f"reset's messages must be chat messages, are {obs.messages!r:.200}")
            for tool in obs.tools:
                schema = tool_schema(tool)  # a GymError when the docstring/types are wrong
                json.dumps(schema)
                assert schema["function"]["name"] == tool.__name__
            env.close()

    def test_reset_is_the_same_for_the_same_row(self, env_factory, rows):
        """The G episodes of a row share its prefill: reset must not depend on chance."""
        for row in rows:
            a, b = env_factory(), env_factory()
            oa, ob = a.reset(row), b.reset(row)
            assert oa.messages == ob.messages, "two resets of one row gave other messages"
            assert [t.__name__ for t in oa.tools] == [t.__name__ for t in ob.tools]
            a.close()
            b.close()

    @pytest.mark.parametrize("turn", range(len(SCRIPTED)))
    def test_scripted_turns_never_raise(self, env_factory, rows, turn):
        for row in rows:
            env = env_factory()
            env.reset(row)
            text = SCRIPTED[turn]
            calls, error = parse_tool_calls(text)
            _check_step(env.step(Action(text, [], calls, error)), f"after {text!r}")
            env.close()

    def test_each_tool_called_with_made_up_arguments(self, env_factory, rows):
        env = env_factory()
        obs = env.reset(rows[0])
        for tool in obs.tools:
            args = _made_up(tool_schema(tool))
            text = "<tool_call>\n" + json.dumps({"name": tool.__name__, "arguments": args}) \
                + "\n</tool_call>"
            calls, error = parse_tool_calls(text)
            assert error is None and calls, f"the call {text!r} did not parse: {error}"
            out, _, done, _ = _check_step(env.step(Action(text, [], calls, None)),
                                          f"calling {tool.__name__}({args})")
            if not done:
                assert isinstance(out, (str, list)) and out, (
                    f"a tool call must get its result back, got {out!r:.200}")
        env.close()

    def test_plays_through_the_engine_without_errors(self, env_factory, rows):
        """Each row played by the engine's own episode code (the tiny test tokenizer):
        the prompt renders, each scripted turn gets tokens back or ends the episode, and
        nothing is recorded as an environment error."""
        from gym_core.env.episode import Episode
        from gym_core.model.policy import tiny_tokenizer

        tok = tiny_tokenizer()
        cls = type(env_factory())
        cfg = env_factory().cfg
        for row in rows:
            episode = Episode(cls, cfg, row, tok)
            prompt = episode.start()
            assert isinstance(prompt, str) and prompt, (
                f"the episode did not start: {episode.record.error}")
            for text in SCRIPTED * int(cfg.max_turns):
                ids = tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
                add = episode.after_turn(ids, True, budget=10_000)
                assert episode.record.error is None, episode.record.error
                if add is None:
                    break
                assert all(isinstance(i, int) for i in add) and add
            assert episode.record.turns <= int(cfg.max_turns)
            episode.close()
