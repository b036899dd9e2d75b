"""verifiers environments as gym environments (``env=verifiers``, docs/agents.md
"Third-party environments"): two environment modules written by this test as their
authors write them against verifiers 0.1.10 (a ``MultiTurnEnv`` game ending through
``final_env_response``, a ``ToolEnv`` with a calculator tool; each with a ``Rubric`` and
a ``load_environment``), put on ``sys.path`` and loaded through verifiers' own
``load_environment``; played with scripted turns, through the environment contract
suite, by the tiny model, and in a GRPO step. Needs ``pip install 'gym-core[verifiers]'``
(in ``[test]``)."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap

import pytest
from omegaconf import OmegaConf

from gym_core.api import Action, GymError, parse_tool_calls
from gym_core.contracts.environment import EnvironmentContract
from tests.episode_helpers import check_episodes, tiny_episodes

pytest.importorskip("verifiers")

GUESS = '''
"""Guess the number: "higher" / "lower" as user turns, the environment's last word
(final_env_response) when the guess is right; reward 1 for solving it."""
import re

import verifiers as vf
from datasets import Dataset


class GuessEnv(vf.MultiTurnEnv):
    async def setup_state(self, state):
        state["guesses"] = 0
        return state

    async def env_response(self, messages, state, **kwargs):
        if "boom" in messages[-1]["content"]:
            raise RuntimeError("the game crashed")
        numbers = re.findall(r"-?\\d+", messages[-1]["content"])
        if not numbers:
            return [{"role": "user", "content": "Say a number."}]
        state["guesses"] += 1
        guess, target = int(numbers[-1]), int(state["answer"])
        if guess == target:
            state["final_env_response"] = [{"role": "user", "content": "Correct!"}]
            return state["final_env_response"]
        return [{"role": "user", "content": "higher" if guess < target else "lower"}]


def solved(state) -> float:
    return 1.0 if state.get("final_env_response") else 0.0


async def guesses(state) -> float:  # an async reward function, awaited
    return float(state["guesses"])


def load_environment(max_value: int = 20, n: int = 12):
    rows = [{"question": f"Guess my number between 1 and {max_value}.",
             "answer": str(1 + (7 * i) % max_value)} for i in range(n)]
    rubric = vf.Rubric(funcs=[solved])
    rubric.add_metric(guesses)
    return GuessEnv(dataset=Dataset.from_list(rows), rubric=rubric, max_turns=8,
                    system_prompt="Answer with one number.")


class Forgetful(GuessEnv):
    """A "non-linear" rollout: each turn's prompt is the last reply alone."""

    async def get_prompt_messages(self, state):
        return (await super().get_prompt_messages(state))[-1:]


def load_forgetful():
    return Forgetful(dataset=Dataset.from_list([{"question": "Guess.", "answer": "3"}]),
                     rubric=vf.Rubric(funcs=[solved]))
'''

CALC = '''
"""A ToolEnv: an add tool, the final answer scored by the rubric."""
import verifiers as vf
from datasets import Dataset


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first integer
        b: the second integer
    """
    return a + b


def correct(completion, answer, parser) -> float:
    return 1.0 if (parser.parse_answer(completion) or "").strip().endswith(answer) else 0.0


def load_environment():
    rows = [{"question": "What is 2 + 3? Use the add tool.", "answer": "5"},
            {"question": "What is 20 + 22? Use the add tool.", "answer": "42"}]
    data = Dataset.from_list(rows)
    return vf.ToolEnv(tools=[add], dataset=data, eval_dataset=data.select([1]),
                      rubric=vf.Rubric(funcs=[correct]), max_turns=4)


def not_an_environment():
    return 42


def lookup(key: str, secrets: dict) -> str:
    """Look a key up in the vault.

    Args:
        key: the key
    """
    return secrets.get(key, "not found")


class Vault(vf.StatefulToolEnv):
    """A StatefulToolEnv: the tool's ``secrets`` come from the episode's state, hidden
    from the model's schema."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_tool(lookup, args_to_skip=["secrets"])

    def update_tool_args(self, tool_name, tool_args, messages, state, **kwargs):
        return {**tool_args, "secrets": state["info"]["secrets"]}


def load_vault():
    rows = [{"question": "What opens the door?", "answer": "1234",
             "info": {"secrets": {"door": "1234"}}},
            {"question": "What opens the gate?", "answer": "77",
             "info": {"secrets": {"gate": "77"}}}]
    return Vault(dataset=Dataset.from_list(rows), rubric=vf.Rubric(funcs=[correct]))
'''


@pytest.fixture(scope="module")
def vf_envs(tmp_path_factory):
    """The two environment modules on sys.path (as an installed environment package
    would be): ``gym-vf-guess`` and ``gym-vf-calc`` for verifiers' load_environment."""
    root = tmp_path_factory.mktemp("vf_envs")
    (root / "gym_vf_guess.py").write_text(textwrap.dedent(GUESS))
    (root / "gym_vf_calc.py").write_text(textwrap.dedent(CALC))
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))


def vf_cfg(**kw):
    from gym_verifiers import VerifiersConfig

    kw.setdefault("environment", "gym-vf-guess")
    return OmegaConf.structured(VerifiersConfig(**kw))


def guess_row(answer="13"):
    return {"prompt": [{"role": "system", "content": "Answer with one number."},
                       {"role": "user", "content": "Guess my number between 1 and 20."}],
            "answer": answer, "task": "default", "example_id": 0}


def calc_row():
    from gym_verifiers.env import verifiers_task

    data = OmegaConf.structured({"environment": "gym-vf-calc", "args": {}, "test_size": 1,
                                 "seed": 0})
    return verifiers_task(data).train[0]


def turn(env, text):
    calls, error = parse_tool_calls(text)
    return env.step(Action(text, [], calls, error))


def call(name, **args):
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"


def test_a_multiturn_env_played_by_scripted_turns_gets_the_rubric_reward(vf_envs):
    """env_response's replies come back as user turns; the guess that solves it ends the
    episode (final_env_response) with the rubric's reward and its metrics in info."""
    from gym_verifiers.env import Verifiers

    env = Verifiers(vf_cfg())
    obs = env.reset(guess_row("13"))
    assert obs.messages == guess_row()["prompt"] and obs.tools == []
    low, high = 1, 20
    for _ in range(6):  # bisection finds it within log2(20) + 1 guesses
        guess = (low + high) // 2
        out, reward, done, info = turn(env, f"My guess is {guess}.")
        if done:
            break
        assert reward == 0.0 and out in ([{"role": "user", "content": "higher"}],
                                         [{"role": "user", "content": "lower"}])
        low, high = (guess + 1, high) if out[0]["content"] == "higher" else (low, guess - 1)
    assert done and out is None and reward == 1.0
    assert info["rubric/solved"] == 1.0 and info["rubric/guesses"] == 4  # 10, 15, 12, 13
    assert info["rubric/num_turns"] == 4  # the MultiTurnEnv's own monitor rubric
    env.close()
    # the same environment named by its function ("package.module:function", env.args)
    env = Verifiers(vf_cfg(environment="gym_vf_guess:load_environment", args={"n": 3}))
    assert env.reset(guess_row("13")).messages == guess_row()["prompt"]
    assert turn(env, "13")[1:3] == (1.0, True)

    async def inside_a_running_loop():  # a notebook's, a server's: run on a worker thread
        env = Verifiers(vf_cfg())
        env.reset(guess_row("13"))
        return turn(env, "13")[1:3]

    assert asyncio.run(inside_a_running_loop()) == (1.0, True)


def test_the_turn_limit_scores_the_episode_as_verifiers_does(vf_envs):
    """gym's env.max_turns ends the episode after its last turn; that turn carries the
    rubric's reward (as verifiers scores a rollout its own max_turns ends)."""
    from gym_verifiers.env import Verifiers

    env = Verifiers(vf_cfg(max_turns=2))
    env.reset(guess_row("13"))
    assert turn(env, "1")[1:3] == (0.0, False)
    out, reward, done, info = turn(env, "2")
    assert (out, reward, done) == ("", 0.0, False) and info["rubric/guesses"] == 1
    env.close()


def test_a_tool_env_offers_its_tools_and_returns_their_results(vf_envs):
    """A ToolEnv's tools come with the schemas verifiers gives them; the model's call
    (parsed by gym) runs in the environment's env_response and its result comes back as
    the tool's reply; the answer without a call ends the episode with the rubric's
    reward."""
    from gym_core.api import tool_schema
    from gym_verifiers.env import Verifiers

    env = Verifiers(vf_cfg(environment="gym-vf-calc"))
    row = calc_row()
    assert row["prompt"] == [{"role": "user", "content": "What is 2 + 3? Use the add tool."}]
    obs = env.reset(row)
    (add,) = obs.tools
    schema = tool_schema(add)["function"]
    assert schema["name"] == "add" and schema["parameters"]["required"] == ["a", "b"]
    assert schema["description"] == "Add two integers."
    assert turn(env, call("add", a=2, b=3)) == (
        [{"role": "tool", "content": "5"}], 0.0, False, {"tool_calls": 1, "tool_errors": 0})
    out, reward, done, _ = turn(env, call("add", a=2))  # the tool raises: its error, no crash
    assert out[0]["role"] == "tool" and "missing 1 required positional argument" in \
        out[0]["content"] and not done
    out, reward, done, info = turn(env, "2 + 3 = 5")
    assert (out, reward, done) == (None, 1.0, True)
    assert info["rubric/total_tool_calls"] == 2.0  # ToolEnv's own monitor rubric
    # what the rubric saw: the calls as an OpenAI server returns them, the results
    completion = env.state["completion"]
    assert completion[0]["tool_calls"][0]["function"] == {"name": "add",
                                                          "arguments": '{"a": 2, "b": 3}'}
    assert completion[0]["content"] == "" and completion[1]["content"] == "5"
    env.close()
    env = Verifiers(vf_cfg(environment="gym-vf-calc"))
    env.reset(calc_row())
    assert turn(env, "I think it is 4.")[1:3] == (0.0, True)  # no call: ToolEnv stops


def test_a_stateful_tool_env_injects_the_episodes_state_into_its_tool(vf_envs):
    """A StatefulToolEnv's hidden argument is not in the schema the model sees; its
    update_tool_args fills it from the row's info when the call runs."""
    from gym_core.api import tool_schema
    from gym_verifiers.env import Verifiers, verifiers_task

    env = Verifiers(vf_cfg(environment="gym_vf_calc:load_vault"))
    data = OmegaConf.structured({"environment": "gym_vf_calc:load_vault", "args": {},
                                 "test_size": 1, "seed": 0})
    row = next(r for r in verifiers_task(data).train + verifiers_task(data).test
               if r["answer"] == "1234")
    assert row["info"] == {"secrets": {"door": "1234"}}
    (tool,) = env.reset(row).tools
    assert list(tool_schema(tool)["function"]["parameters"]["properties"]) == ["key"]
    assert turn(env, call("lookup", key="door"))[0] == [{"role": "tool", "content": "1234"}]
    assert turn(env, "The code is 1234")[1:3] == (1.0, True)
    env.close()


class TestVerifiersMultiTurnContract(EnvironmentContract):
    @pytest.fixture
    def env_factory(self, vf_envs):
        from gym_verifiers.env import Verifiers

        cfg = vf_cfg(max_turns=3)
        return lambda: Verifiers(cfg)

    @pytest.fixture
    def rows(self):
        return [guess_row("13"), {"prompt": "Guess my number between 1 and 20.", "answer": "4"}]


class TestVerifiersToolEnvContract(EnvironmentContract):
    @pytest.fixture
    def env_factory(self, vf_envs):
        from gym_verifiers.env import Verifiers

        cfg = vf_cfg(environment="gym-vf-calc", max_turns=3)
        return lambda: Verifiers(cfg)

    @pytest.fixture
    def rows(self, vf_envs):
        return [calc_row()]


def test_data_verifiers_reads_the_environments_datasets(vf_envs):
    from gym_verifiers.env import verifiers_task

    def task(**kw):
        base = {"environment": "gym-vf-guess", "args": {}, "test_size": 2, "seed": 0}
        return verifiers_task(OmegaConf.structured({**base, **kw}))

    t = task()  # no eval_dataset: test_size rows held out
    assert len(t.train) == 10 and len(t.test) == 2
    assert not {r["example_id"] for r in t.test} & {r["example_id"] for r in t.train}
    assert t.train[0]["prompt"][0] == {"role": "system", "content": "Answer with one number."}
    assert len(task(args={"n": 5}).train) == 3  # env.args reach load_environment
    t = task(environment="gym-vf-calc", test_size=1)  # its eval_dataset
    assert len(t.train) == 2 and [r["answer"] for r in t.test] == ["42"]
    with pytest.raises(GymError, match="has 12 rows and no eval_dataset"):
        task(test_size=12)


def test_bad_environments_are_one_line_errors(vf_envs):
    from gym_verifiers.env import Verifiers

    for environment, match in [
            ("no-such-env", r"env.environment='no-such-env': Could not import"),
            ("nowhere.mod:fn", r"env.environment='nowhere.mod:fn' cannot be imported"),
            ("gym_vf_calc:not_an_environment", "gave int, not a verifiers MultiTurnEnv"),
            (None, "env=verifiers needs env.environment=")]:
        with pytest.raises(GymError, match=match) as e:
            Verifiers(vf_cfg(environment=environment))
        assert "\n" not in str(e.value)
    for environment in ("gym-vf-guess", "gym_vf_guess:load_environment"):
        with pytest.raises(GymError, match="unexpected keyword argument 'colour'"):
            Verifiers(vf_cfg(environment=environment, args={"colour": "red"}))


def test_a_rollout_that_rewrites_its_conversation_is_refused(vf_envs):
    """A get_prompt_messages that drops earlier turns cannot be extended token by token:
    the step raises (the episode's recorded error)."""
    from gym_verifiers.env import Verifiers

    env = Verifiers(vf_cfg(environment="gym_vf_guess:load_forgetful"))
    env.reset({"prompt": "Guess.", "answer": "3"})
    with pytest.raises(GymError, match="get_prompt_messages rewrote the conversation"):
        turn(env, "1")


def test_loading_leaves_the_runs_signal_handlers_in_place(vf_envs):
    """A verifiers Environment installs SIGINT / SIGTERM handlers (its teardown, then
    exit); the run's own stay."""
    import signal

    from gym_verifiers.env import load

    def handler(signum, frame):
        pass

    before = signal.signal(signal.SIGTERM, handler)
    try:
        load("gym-vf-guess", {"n": 4})
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, before)


def test_an_environment_that_raises_is_the_episodes_recorded_error(vf_envs):
    """env_response raising ends that episode with the error recorded (the episode runner
    of every environment), the run goes on."""
    from gym_core.env.episode import Episode
    from gym_core.model.policy import tiny_tokenizer
    from gym_verifiers.env import Verifiers

    tok = tiny_tokenizer()
    episode = Episode(Verifiers, vf_cfg(), guess_row(), tok)
    assert episode.start()
    ids = tok("boom", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert episode.after_turn(ids, True, budget=10_000) is None
    assert "step raised RuntimeError: the game crashed" in episode.record.error


def test_verifiers_episodes_with_the_tiny_model(vf_envs):
    from gym_verifiers.env import Verifiers

    for cfg, row in [(vf_cfg(max_turns=3, max_tokens=96), guess_row()),
                     (vf_cfg(environment="gym-vf-calc", max_turns=3, max_tokens=400),
                      calc_row())]:
        check_episodes(tiny_episodes(Verifiers, cfg, [row]))


def test_a_training_step_on_env_verifiers(vf_envs, tiny_overrides, tmp_path):
    """env=verifiers data=verifiers compose (the data reads env.environment's dataset)
    and a GRPO step runs on its episodes."""
    from gym_core.api import compose
    from gym_core.train.job import run_job

    cfg = compose([*tiny_overrides, "env=verifiers", "data=verifiers", "algorithm=grpo",
                   "env.environment=gym-vf-guess", "+env.args.n=6", "data.test_size=2",
                   "algorithm.num_generations=2", "trainer.max_steps=1", "env.max_turns=2",
                   "env.max_tokens=200", "trainer.eval_size=2"])
    assert cfg.data.environment == "gym-vf-guess" and cfg.data.args == {"n": 6}
    run_job(cfg, run_dir=tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if "loss" in r)
    assert step["env/turns"] >= 1 and step["env/errors"] == 0
