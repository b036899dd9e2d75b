"""OpenEnv environments as gym environments (``env=openenv``, docs/agents.md
"Third-party environments"): an echo environment written against openenv-core's
``Environment`` / ``Action`` / ``Observation``, played in-process, through the
environment contract suite and one episode of the tiny model, both in-process and served
by OpenEnv's own FastAPI server on 127.0.0.1 (one WebSocket session per episode). Needs
openenv-core (``pip install --no-deps openenv-core && pip install fastmcp``)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from gym_core.api import Action, GymError
from gym_core.contracts.environment import EnvironmentContract
from tests.episode_helpers import check_episodes, tiny_episodes

pytest.importorskip("openenv.core.env_server.interfaces")

from openenv.core.env_server.interfaces import Environment as OpenEnvEnvironment  # noqa: E402
from openenv.core.env_server.types import Action as OpenEnvAction  # noqa: E402
from openenv.core.env_server.types import Observation as OpenEnvObservation  # noqa: E402
from openenv.core.env_server.types import State  # noqa: E402


class EchoAction(OpenEnvAction):
    message: str


class EchoObservation(OpenEnvObservation):
    echoed_message: str


class EchoEnvironment(OpenEnvEnvironment[EchoAction, EchoObservation, State]):
    """OpenEnv's echo environment (envs/echo_env in the OpenEnv repository) as its
    authors write it: the message back, reward 0.1 per character; the episode ends
    when the message says "bye"."""

    SUPPORTS_CONCURRENT_SESSIONS = True  # each session its own instance (served below)

    def __init__(self):
        super().__init__()
        self._state = State(episode_id="0", step_count=0)

    def reset(self, seed=None, episode_id=None, **kwargs):
        self._state = State(episode_id=episode_id or "0", step_count=0)
        return EchoObservation(echoed_message="Echo environment ready!", done=False, reward=0.0)

    def step(self, action, timeout_s=None, **kwargs):
        self._state.step_count += 1
        return EchoObservation(echoed_message=action.message, reward=0.1 * len(action.message),
                               done="bye" in action.message, metadata={"step": self._state.step_count})

    @property
    def state(self):
        return self._state


def openenv_cfg(**kw):
    from gym_openenv import OpenEnvConfig

    kw.setdefault("environment", "tests.test_env_openenv:EchoEnvironment")
    return OmegaConf.structured(OpenEnvConfig(**kw))


class TestOpenEnvContract(EnvironmentContract):
    @pytest.fixture
    def env_factory(self):
        from gym_openenv.env import OpenEnv

        cfg = openenv_cfg(max_turns=3)
        return lambda: OpenEnv(cfg)

    @pytest.fixture
    def rows(self):
        return [{"prompt": "Say something.", "seed": 1}]


def test_openenv_action_observation_and_reward():
    from gym_openenv.env import OpenEnv

    env = OpenEnv(openenv_cfg())
    assert env.action_cls.__name__ == "EchoAction" and env.field == "message"  # Environment[...]
    obs = env.reset({"prompt": "Say something."})
    assert obs.messages == [{"role": "user",
                             "content": "Say something.\n\nEcho environment ready!"}]
    assert env.step(Action("hello", [], [], None)) == ("hello", pytest.approx(0.5), False, {})
    assert env.step(Action("bye", [], [], None)) == (None, pytest.approx(0.3), True, {})
    env.close()
    with pytest.raises(GymError, match="env.environment='nope:Env' cannot be imported"):
        OpenEnv(openenv_cfg(environment="nope:Env"))
    with pytest.raises(GymError, match="action_field='text' is not a field of EchoAction"):
        OpenEnv(openenv_cfg(action_field="text"))
    with pytest.raises(GymError, match="needs one of env.environment"):
        OpenEnv(openenv_cfg(base_url="http://127.0.0.1:1"))
    with pytest.raises(GymError, match="set env.action_field"):
        OpenEnv(openenv_cfg(environment=None, base_url="http://127.0.0.1:1"))


def test_openenv_episode_with_the_tiny_model():
    from gym_openenv.env import OpenEnv

    out = tiny_episodes(OpenEnv, openenv_cfg(max_turns=3, max_tokens=96),
                        [{"prompt": "Say something."}])
    check_episodes(out)
    for rec in out.records:
        assert len(rec.rewards) == rec.turns  # a reward per turn: 0.1 per character echoed


# ------------------------------------------------------- the same environment, served


@pytest.fixture(scope="module")
def echo_server():
    """OpenEnv's own server (create_fastapi_app, no web UI) for EchoEnvironment on
    127.0.0.1, in a thread of this process."""
    import socket
    import threading
    import time

    import uvicorn
    from openenv.core.env_server.http_server import create_fastapi_app

    app = create_fastapi_app(EchoEnvironment, EchoAction, EchoObservation, max_concurrent_envs=8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def served_cfg(url, **kw):
    return openenv_cfg(environment=None, base_url=url, action_field="message", **kw)


class TestServedOpenEnvContract(EnvironmentContract):
    @pytest.fixture
    def env_factory(self, echo_server):
        from gym_openenv.env import OpenEnv

        cfg = served_cfg(echo_server, max_turns=3)
        return lambda: OpenEnv(cfg)

    @pytest.fixture
    def rows(self):
        return [{"prompt": "Say something.", "seed": 1}]


def test_a_served_openenv_plays_like_the_in_process_one(echo_server):
    from gym_openenv.env import OpenEnv

    env = OpenEnv(served_cfg(echo_server))
    obs = env.reset({"prompt": "Say something."})
    assert obs.messages[0]["content"] == "Say something.\n\nEcho environment ready!"
    assert env.step(Action("hello", [], [], None)) == ("hello", pytest.approx(0.5), False, {})
    assert env.step(Action("bye", [], [], None)) == (None, pytest.approx(0.3), True, {})
    env.close()


def test_served_openenv_episodes_with_the_tiny_model(echo_server):
    from gym_openenv.env import OpenEnv

    out = tiny_episodes(OpenEnv, served_cfg(echo_server, max_turns=3, max_tokens=96),
                        [{"prompt": "Say something."}])
    check_episodes(out)
    for rec in out.records:
        assert len(rec.rewards) == rec.turns


# ------------------------------------------------ an MCP environment: tools to call

from fastmcp import FastMCP  # noqa: E402  (openenv-core's own dependency)
from openenv.core.env_server.mcp_environment import MCPEnvironment  # noqa: E402


class CalculatorMCP(MCPEnvironment):
    """An OpenEnv tool environment as its authors write one: a FastMCP server with an
    ``add`` tool; each call is rewarded 0.25, and adding up to 42 ends the episode with
    reward 1."""

    def __init__(self):
        mcp = FastMCP("calculator")

        @mcp.tool()
        def add(a: int, b: int) -> int:
            """Add two integers."""
            return a + b

        super().__init__(mcp)
        self._state = State(episode_id="0", step_count=0)

    def reset(self, seed=None, episode_id=None, **kwargs):
        return OpenEnvObservation(done=False, reward=0.0)

    def step(self, action, timeout_s=None, **kwargs):
        obs = super().step(action, timeout_s=timeout_s, **kwargs)
        if getattr(obs, "tool_name", None) == "add" and obs.error is None:
            done = obs.result.data == 42
            obs = obs.model_copy(update={"reward": 1.0 if done else 0.25, "done": done})
        return obs

    def _step_impl(self, action, timeout_s=None, **kwargs):
        return OpenEnvObservation(done=True, reward=0.0)

    @property
    def state(self):
        return self._state


def mcp_cfg(**kw):
    return openenv_cfg(environment="tests.test_env_openenv:CalculatorMCP", **kw)


class TestMCPOpenEnvContract(EnvironmentContract):
    @pytest.fixture
    def env_factory(self):
        from gym_openenv.env import OpenEnv

        cfg = mcp_cfg(max_turns=3)
        return lambda: OpenEnv(cfg)

    @pytest.fixture
    def rows(self):
        return [{"prompt": "Make 42 with the add tool."}]


def test_mcp_tools_are_offered_called_and_rewarded():
    import json

    from gym_core.api import parse_tool_calls, tool_schema
    from gym_openenv.env import OpenEnv

    env = OpenEnv(mcp_cfg())
    obs = env.reset({"prompt": "Make 42 with the add tool."})
    assert obs.messages == [{"role": "user", "content": "Make 42 with the add tool."}]
    (add,) = obs.tools
    schema = tool_schema(add)["function"]
    assert schema["name"] == "add" and schema["parameters"]["required"] == ["a", "b"]

    def turn(args):
        text = "<tool_call>\n" + json.dumps({"name": "add", "arguments": args}) + "\n</tool_call>"
        calls, error = parse_tool_calls(text)
        return env.step(Action(text, [], calls, error))

    assert turn({"a": 2, "b": 3}) == ("5", 0.25, False, {"tool_calls": 1, "tool_errors": 0})
    out, reward, done, _ = turn({"a": 2})  # the schema's check, before the server is asked
    assert out.startswith("error: tool 'add' takes arguments") and reward == 0 and not done
    assert turn({"a": 40, "b": 2})[1:3] == (1.0, True)
    env.reset({"prompt": "x"})
    assert env.step(Action("no call", [], [], None)) == (None, 0.0, True, {})
    env.close()


def test_mcp_episode_with_the_tiny_model():
    from gym_openenv.env import OpenEnv

    out = tiny_episodes(OpenEnv, mcp_cfg(max_turns=3, max_tokens=400),
                        [{"prompt": "Make 42 with the add tool."}])
    check_episodes(out)
