"""Multi-turn, tool-using environments (docs/agents.md): tools and their schemas, the
chat rendering, episodes in the sampler (the tokens trained on are the tokens sampled,
environment tokens out of the loss), turn-level returns, misbehaving environments,
the configuration, and a training step with env=calculator."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from gym_core.api import (
    Action,
    EnvConfig,
    Environment,
    GymError,
    Observation,
    compose,
    discounted_returns,
    parse_tool_calls,
    tool_schema,
)
from gym_core.env.chat import hermes_messages, render, trace_segments
from gym_core.env.tools import ToolCall, call_tool
from gym_core.sampling.generation import Sampling


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first
        b: the second
    """
    return a + b


# ------------------------------------------------------------------------------ tools


def test_tool_schema_comes_from_the_signature_and_docstring():
    schema = tool_schema(add)
    fn = schema["function"]
    assert fn["name"] == "add" and fn["description"] == "Add two integers."
    assert fn["parameters"]["properties"] == {
        "a": {"type": "integer", "description": "the first"},
        "b": {"type": "integer", "description": "the second"}}
    assert fn["parameters"]["required"] == ["a", "b"]

    def untyped(x):
        """No types."""

    with pytest.raises(GymError, match="untyped"):
        tool_schema(untyped)


def test_tool_calls_are_parsed_and_malformed_ones_get_an_error():
    calls, err = parse_tool_calls('ok <tool_call>\n{"name": "add", "arguments": {"a": 1, '
                                  '"b": 2}}\n</tool_call>')
    assert err is None and calls == [ToolCall("add", {"a": 1, "b": 2})]
    calls, err = parse_tool_calls("<tool_call>{nope}</tool_call>")
    assert calls == [] and "not valid JSON" in err
    calls, err = parse_tool_calls('<tool_call>{"arguments": {}}</tool_call>')
    assert calls == [] and '"name"' in err
    calls, err = parse_tool_calls('<tool_call>{"name": "add", "arguments": [1]}</tool_call>')
    assert calls == [] and "JSON object" in err
    # cut off by the end of the turn: still read
    calls, err = parse_tool_calls('<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}')
    assert calls == [ToolCall("add", {"a": 1})] and err is None


def test_call_tool_reports_errors_as_observations():
    tools = {"add": add}
    assert call_tool(tools, ToolCall("add", {"a": 2, "b": 3}), 5) == "5"
    assert "no tool named 'sub'" in call_tool(tools, ToolCall("sub", {}), 5)
    assert "missing: ['b']" in call_tool(tools, ToolCall("add", {"a": 1}), 5)
    assert "unknown: ['c']" in call_tool(tools, ToolCall("add", {"a": 1, "b": 2, "c": 3}), 5)
    assert call_tool(tools, ToolCall("add", {"a": 1, "b": "x"}), 5).startswith("error: TypeError")


def test_a_hanging_tool_is_abandoned():
    import threading

    release = threading.Event()

    def hang(x: int) -> str:
        """Never returns on its own.

        Args:
            x: anything
        """
        release.wait(30)
        return "late"

    out = call_tool({"hang": hang}, ToolCall("hang", {"x": 1}), 0.2)
    release.set()
    assert out == "error: tool 'hang' did not finish within 0.2 s"


# ---------------------------------------------------------------------------- rendering


@pytest.fixture(scope="module")
def tok():
    from gym_core.model.policy import tiny_tokenizer

    return tiny_tokenizer()


def test_a_template_without_tools_gets_the_hermes_convention(tok):
    schemas = [tool_schema(add)]
    msgs = [{"role": "user", "content": "2+3?"}]
    text = render(tok, msgs, schemas, add_generation_prompt=True)
    assert "<tools>\n" + json.dumps(schemas[0]) + "\n</tools>" in text
    assert text.endswith("<|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n")
    trace = msgs + [
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
        {"role": "tool", "content": "5"},
        {"role": "assistant", "content": "5"}]
    out = hermes_messages(trace, schemas)
    assert out[2]["content"] == ('<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}'
                                 "\n</tool_call>")
    assert out[3] == {"role": "user", "content": "<tool_response>\n5\n</tool_response>"}


def test_tool_use_traces_train_on_assistant_turns_only(tok):
    trace = [
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
        {"role": "tool", "content": "5"},
        {"role": "assistant", "content": "The answer is 5."}]
    segments = trace_segments(tok, trace, [tool_schema(add)])
    assert "".join(t for t, _ in segments) == render(tok, trace, [tool_schema(add)])
    trained = [t for t, on in segments if on]
    assert trained == ['<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n'
                       "</tool_call><|im_end|>", "The answer is 5.<|im_end|>"]
    assert not any("<tool_response>" in t or "2+3?" in t for t in trained)


# --------------------------------------------------------------------------- episodes


class Scripted(Environment):
    """Replies to every turn with an observation until ``turns`` turns; each turn's
    reward is 0.5, 1.0 on the last."""

    TURNS = 3

    def reset(self, row):
        self.row, self.n = row, 0
        return Observation([{"role": "user", "content": row["prompt"]}], [add])

    def step(self, action):
        self.n += 1
        if self.n >= self.TURNS:
            return None, 1.0, True, {}
        return f"observation {self.n} of {self.row['prompt']}", 0.5, False, {}


def env_cfg(**kw):
    return OmegaConf.structured(EnvConfig(name="scripted", **kw))


@pytest.fixture(scope="module")
def eos_policy():
    """The tiny random model with an LM-head bias towards its end-of-turn token, so its
    turns end within a few tokens."""
    from gym_core.config.schema import ModelConfig
    from gym_core.model.policy import load_policy

    torch.manual_seed(0)
    p = load_policy(OmegaConf.structured(ModelConfig(source="tiny")), torch.device("cpu"))
    hf = p.model.get_base_model()
    old = hf.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[p.tokenizer.eos_token_id] = 2.5
    hf.lm_head = head
    return p


def _run(policy, cls, cfg, rows, g=2, seeds=(1, 2), do_sample=True, fused=None, record=False):
    from gym_core.env import episode as episode_mod
    from gym_core.sampling.episodes import sample_episodes

    original = episode_mod.Episode.after_turn
    if record:
        def after_turn(self, ids, finished, budget):
            add_ids = original(self, ids, finished, budget)
            self.record.__dict__.setdefault("trace", []).append((list(ids), add_ids))
            return add_ids
        episode_mod.Episode.after_turn = after_turn
    try:
        return sample_episodes(policy.model, policy.tokenizer, cls, cfg, rows, num_samples=g,
                               sampling=Sampling(do_sample, 1.0), fused=fused,
                               row_seeds=[s * 10 + i for s in seeds[:len(rows)] for i in range(g)])
    finally:
        episode_mod.Episode.after_turn = original


ROWS = [{"prompt": "alpha"}, {"prompt": "beta gamma"}]


@pytest.fixture(scope="module")
def fused_episodes(eos_policy):
    return _run(eos_policy, Scripted, env_cfg(max_tokens=64, max_turns=5), ROWS, fused=True,
                record=True)


def test_the_tokens_trained_on_are_the_tokens_sampled(eos_policy, fused_episodes):
    """Token for token, nothing decoded or re-encoded: each episode's row is its turns'
    sampled ids followed by the environment's reply ids, in order; the action mask marks
    exactly the sampled ones; and the trainer's log-probs of that row (one fresh forward
    over prompt + row) equal the sampler's, so the cache saw the same sequence."""
    out = fused_episodes
    assert all(r.error is None for r in out.records)
    multi = 0
    for i, rec in enumerate(out.records):
        expected, act = [], []
        for ids, add_ids in rec.trace:
            expected += ids
            act += [1] * len(ids)
            if add_ids is not None:
                expected += add_ids
                act += [0] * len(add_ids)
        n = int(out.completion_mask[i].sum())
        assert out.completion_ids[i, :n].tolist() == expected
        assert out.action_mask[i, :n].tolist() == act
        multi += len(rec.trace) > 1
    assert multi >= 2, "the test needs episodes with several turns"
    assert out.completion_ids.shape[1] == int(out.completion_mask.sum(1).max())
    from gym_core.sampling.rollout import Rollout

    roll = Rollout(out.prompt_ids, out.prompt_mask, out.completion_ids, out.completion_mask,
                   out.truncated, torch.zeros(4), 2, [{}] * 4, [""] * 4,
                   action_mask=out.action_mask)
    with torch.no_grad():
        logp = eos_policy.logprobs(roll)
    act = out.action_mask.bool()
    assert torch.allclose(logp[act], out.logprobs[act], atol=2e-4)
    assert (out.logprobs[~act] == 0).all()


def test_episodes_are_as_wide_as_the_longest_not_the_budget(eos_policy):
    """The training pass runs on every column of the episodes: a 256-token budget with
    short episodes must not give 256 columns (it cost 4x the memory of a GRPO step)."""
    out = _run(eos_policy, Scripted, env_cfg(max_tokens=256, max_turns=2), ROWS)
    lengths = out.completion_mask.sum(1)
    assert out.completion_ids.shape == out.action_mask.shape == out.logprobs.shape
    assert out.completion_ids.shape[1] == int(lengths.max()) < 256


def test_fused_and_plain_paths_sample_the_same_episodes(eos_policy, fused_episodes):
    """The model's own forward with its cache (architectures the fused decoder does not
    reproduce) gives the same episodes, so the token-for-token test covers it too."""
    plain = _run(eos_policy, Scripted, env_cfg(max_tokens=64, max_turns=5), ROWS, fused=False)
    assert torch.equal(plain.completion_ids, fused_episodes.completion_ids)
    assert torch.equal(plain.action_mask, fused_episodes.action_mask)


def test_turn_rewards_limits_and_masks_reach_the_rollout(eos_policy):
    from gym_core.config.schema import GroupPolicyConfig
    from gym_core.sampling.rollout import RolloutEngine

    acfg = OmegaConf.structured(GroupPolicyConfig(name="t", num_generations=2))
    engine = RolloutEngine(eos_policy, acfg, [], env=(Scripted, env_cfg(max_tokens=96,
                                                                         gamma=0.5)))
    roll = engine.generate([{"prompt": "alpha"}, {"prompt": "beta"}], seeds=[1, 2])
    for i, rec in enumerate(roll.episodes):
        assert rec.rewards == ([0.5, 0.5, 1.0] if rec.done else rec.rewards)
        if rec.done:
            assert roll.rewards[i].item() == pytest.approx(0.5 + 0.25 + 0.25)
            act = roll.action_mask[i].bool()
            # G_k per turn: 1.0, 1.0, 1.0 (0.5 + 0.5 * 1.0 = 1.0; 0.5 + 0.5 * 0.5 + ... )
            assert set(roll.token_returns[i][act].tolist()) <= {1.0}
            assert roll.turn_rewards[i].sum().item() == pytest.approx(2.0)
            assert (roll.token_returns[i][~act] == 0).all()
    assert (roll.trained_mask() <= roll.completion_mask).all()


def test_discounted_returns():
    assert discounted_returns([0.0, 0.0, 1.0], 0.9) == pytest.approx([0.81, 0.9, 1.0])
    assert discounted_returns([1.0, 2.0], 1.0) == [3.0, 2.0]
    assert discounted_returns([], 0.5) == []


def test_turn_advantages_use_the_episode_baseline():
    from types import SimpleNamespace

    from gym_core.train.policy_gradient import turn_advantages

    batch = SimpleNamespace(
        rewards=torch.tensor([1.0, 0.0]),
        token_returns=torch.tensor([[2.0, 2.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]),
        scorable_mask=lambda: torch.tensor([True, True]))
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    adv = torch.tensor([0.5, -0.5])  # r - mean
    out = turn_advantages(adv, batch, None, mask)
    assert out.tolist() == [[1.5, 1.5, 0.0, 0.5], [-0.5, -0.5, -0.5, 0.0]]


def test_gae_skips_environment_tokens():
    """GAE over a row with a gap equals GAE over the same row with the gap removed."""
    from gym_ppo.ppo import gae

    rew = torch.tensor([[0.0, 0.2, 9.0, 9.0, 0.0, 1.0]])
    val = torch.tensor([[0.1, 0.3, 5.0, 5.0, 0.2, 0.4]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 1.0]])
    adv, ret = gae(rew, val, mask, 0.9, 0.8)
    keep = mask[0].bool()
    ref_adv, ref_ret = gae(rew[:, keep], val[:, keep], torch.ones(1, 4), 0.9, 0.8)
    assert torch.allclose(adv[:, keep], ref_adv) and (adv[:, ~keep] == 0).all()
    assert torch.allclose(ret[:, keep], ref_ret)


# ------------------------------------------------------------------ bad environments


class Raises(Scripted):
    def step(self, action):
        raise RuntimeError("boom")


class WrongTypes(Scripted):
    def step(self, action):
        return "obs", "high", False, {}


class NeverEnds(Scripted):
    def step(self, action):
        return "again", 0.0, False, {}


class Huge(Scripted):
    def step(self, action):
        self.n += 1
        return "x" * 5_000_000, 0.0, self.n > 1, {}


class ResetRaises(Scripted):
    def reset(self, row):
        raise ValueError("no reset")


@pytest.mark.parametrize("cls,check", [
    (Raises, lambda r: "step raised RuntimeError: boom" in r.error),
    (WrongTypes, lambda r: "reward 'high'" in r.error),
    (NeverEnds, lambda r: r.error is None and r.turns <= 2 and (r.truncated or not r.done)),
    (ResetRaises, lambda r: "reset raised ValueError: no reset" in r.error and r.turns == 0),
])
def test_a_misbehaving_environment_ends_its_episode_not_the_run(eos_policy, cls, check):
    out = _run(eos_policy, cls, env_cfg(max_tokens=64, max_turns=2), [{"prompt": "alpha"}])
    assert all(check(r) for r in out.records), [r.error for r in out.records]
    if cls is ResetRaises:
        assert int(out.completion_mask.sum()) == 0


def test_max_seconds_counts_the_environments_time_not_the_models(tok, monkeypatch):
    """env.max_seconds bounds the time spent in the environment: a batch of 64 greedy
    episodes on a busy machine took longer than 60 s to reach its first turn's end, and
    every episode was cut before its tool call ran (held-out accuracy then depended on
    the batch size). The model's turns are bounded by tokens instead."""
    from types import SimpleNamespace

    from gym_core.env import episode as episode_mod

    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(episode_mod, "time", SimpleNamespace(monotonic=lambda: clock.now))

    class Slow(Scripted):
        TURNS = 10

        def step(self, action):
            clock.now += 40.0  # the environment's own time
            return super().step(action)

    ep = episode_mod.Episode(Slow, env_cfg(max_turns=10, max_seconds=60), {"prompt": "a"}, tok)
    assert ep.start() is not None
    turn = tok.encode("hello", add_special_tokens=False) + [tok.eos_token_id]
    clock.now += 1000.0  # the model's first turn, however long, does not count
    assert ep.after_turn(turn, True, 100) is not None  # 40 s in the environment
    clock.now += 1000.0
    assert ep.after_turn(turn, True, 100) is None  # 80 s: over the limit
    assert ep.record.truncated and ep.record.turns == 2 and ep.record.rewards == [0.5, 0.5]


def test_a_huge_observation_is_cut(eos_policy):
    out = _run(eos_policy, Huge, env_cfg(max_tokens=200, max_observation_tokens=20,
                                         max_turns=3), [{"prompt": "alpha"}])
    for i, rec in enumerate(out.records):
        env_tokens = int((out.completion_mask[i] - out.action_mask[i]).sum())
        assert rec.error is None
        # at most one reply: the note and the template's tokens around 20 content tokens
        assert env_tokens <= 20 + 120
        if rec.turns >= 2:
            assert any("observation cut" in m["content"] for m in rec.messages)


# ---------------------------------------------------------------- configuration & runs


def test_env_is_a_config_group_and_bad_names_are_one_line(tiny_overrides):
    cfg = compose([*tiny_overrides, "env=calculator"])
    assert cfg.env.name == "calculator" and cfg.env.max_turns == 3
    assert "env" not in compose(tiny_overrides) or compose(tiny_overrides).get("env") is None
    with pytest.raises(GymError, match="env=nope is not an installed option"):
        compose([*tiny_overrides, "env=nope"])


def test_env_with_an_offline_algorithm_or_bad_limits_is_refused(tiny_overrides):
    from gym_core.env.setup import selected_environment
    from gym_core.plugin.startup import bootstrap

    plugins = bootstrap()
    cfg = compose([*tiny_overrides, "env=calculator"])
    with pytest.raises(GymError, match="needs an online algorithm"):
        selected_environment(cfg, plugins, False, [])
    bad = compose([*tiny_overrides, "env=calculator", "env.gamma=2"])
    with pytest.raises(GymError, match="env.gamma=2"):  # declared in EnvConfig
        from gym_core.config.checks import preflight

        preflight(bad)
    with pytest.raises(GymError, match="needs rows with 'prompt' and 'answer'"):
        selected_environment(cfg, plugins, True, [{"prompt": "x"}])
    cls, ecfg = selected_environment(cfg, plugins, True, [{"prompt": "x", "answer": "1"}])
    assert cls.__name__ == "Calculator"


@pytest.mark.parametrize("algo", ["grpo", "rloo", "ppo"])
def test_a_training_step_on_env_calculator(tiny_overrides, tmp_path, algo):
    from gym_core.train.job import run_job

    overrides = [*tiny_overrides, "env=calculator", f"algorithm={algo}",
                 "algorithm.num_generations=2", "trainer.max_steps=1", "env.max_tokens=24",
                 "trainer.eval_size=2"]
    summary = run_job(compose(overrides), run_dir=tmp_path / algo)
    rows = [json.loads(x) for x in (tmp_path / algo / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if "loss" in r)
    assert step["env/turns"] >= 1 and step["env/errors"] == 0
    assert summary is not None


def test_calculator_tool_and_score():
    from gym_core.env.builtin import Calculator, calculator

    assert calculator("12 * (3 + 4)") == "84"
    assert calculator("2 ** 1000").startswith("error")
    assert calculator("__import__('os')").startswith("error")
    env = Calculator(OmegaConf.structured(EnvConfig(name="calculator")))
    env.reset({"prompt": "What is 2 + 3?", "answer": "5"})
    assert env.step(Action("It is 5.", [], [], None))[1:3] == (1.0, True)
    env.reset({"prompt": "What is 2 + 3?", "answer": "5"})
    calls, _ = parse_tool_calls('<tool_call>{"name": "calculator", "arguments": '
                                '{"expression": "2+3"}}</tool_call>')
    assert env.step(Action("", [], calls, None)) == ("5", 0.0, False,
                                                     {"tool_calls": 1, "tool_errors": 0})


def test_wordle_feedback():
    from gym_core.env.builtin import wordle_feedback

    assert wordle_feedback("crane", "crane") == "GGGGG"
    assert wordle_feedback("eagle", "apple") == "-Y-GG"
    assert wordle_feedback("llama", "hello") == "YY---"


def test_sft_trains_on_the_assistant_turns_of_a_tool_trace(eos_policy):
    from gym_sft import SFTConfig
    from gym_sft.sft import SFT

    algo = SFT(OmegaConf.structured(SFTConfig()), eos_policy)
    trace = [{"role": "user", "content": "2+3?"},
             {"role": "assistant", "content": "", "tool_calls": [
                 {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
             {"role": "tool", "content": "5"},
             {"role": "assistant", "content": "5"}]
    segments = algo.segments({"messages": trace, "tools": json.dumps([tool_schema(add)])})
    assert [t for t, on in segments if on] == [
        '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>',
        "5<|im_end|>"]
    batch = algo.collate([{"messages": trace}])
    assert int(batch.target_mask.sum()) > 0
