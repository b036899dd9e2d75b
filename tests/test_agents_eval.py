"""The held-out evaluation of a run with an environment (docs/agents.md, "Held-out
evaluation with an environment"): greedy episodes scored by the environment, with tool
statistics; and the tool-use SFT traces of docs/examples/calculator_traces.py, the
first stage of SFT -> GRPO on env=calculator."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from gym_core.api import compose
from gym_core.env.builtin import Calculator
from gym_core.env.config import CalculatorConfig
from gym_core.eval.heldout import evaluate_episodes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    from gym_core.model.policy import tiny_tokenizer

    return tiny_tokenizer()


class Plays:
    """ScriptedLM's "cache": the state of each row of one batched cache, repeated and
    dropped with the rows (as transformers' caches are)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.rows = [copy.deepcopy(st) for st in self.rows for _ in range(repeats)]

    def batch_select_indices(self, index: torch.Tensor) -> None:
        self.rows = [self.rows[i] for i in index.tolist()]


class ScriptedLM(torch.nn.Module):
    """A policy that plays given turns greedily: ``scripts`` maps a text found in the
    prompt to that episode's turns (each ends with the end-of-turn token). It reads the
    environment's replies (the tokens fed while it is not in a turn) until the next
    assistant header, then plays its next turn; after its last one it ends every turn at
    once. The sampler's fallback (the model's own forward, ``OwnForward``) drives it; its
    cache (:class:`Plays`) holds the rows' states."""

    def __init__(self, tok, scripts: dict[str, list[str]]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # a device for the sampler
        self.tok, self.vocab = tok, len(tok)
        self.scripts = {k: [tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id]
                            for t in turns] for k, turns in scripts.items()}
        self.header = tok("<|im_start|>assistant\n", add_special_tokens=False).input_ids

    def forward(self, input_ids, attention_mask=None, past_key_values=None, cache=None, **_):
        if attention_mask is None:  # no padding
            attention_mask = torch.ones_like(input_ids)
        cache = cache if cache is not None else past_key_values  # the name differs by version
        if cache is None:  # the prefill: each row's script
            rows = []
            for ids, m in zip(input_ids, attention_mask):
                text = self.tok.decode(ids[m.bool()])
                key = next(k for k in self.scripts if k in text)
                rows.append({"turns": self.scripts[key], "k": 0, "p": 0, "seen": []})
            cache = Plays(rows)
        else:  # every token fed: one, or a chunk (the environment's reply)
            for st, ids in zip(cache.rows, input_ids.tolist()):
                for t in ids:
                    if st["p"] is not None:  # in a turn: the token fed is the one played
                        st["p"] += 1
                        if st["k"] >= len(st["turns"]) or st["p"] == len(st["turns"][st["k"]]):
                            st["k"], st["p"], st["seen"] = st["k"] + 1, None, []
                    else:  # the environment's reply, up to the next assistant header
                        st["seen"].append(t)
                        if st["seen"][-len(self.header):] == self.header:
                            st["p"] = 0
        logits = torch.zeros(len(cache.rows), 1, self.vocab)
        for i, st in enumerate(cache.rows):
            k, p = st["k"], st["p"] or 0
            nxt = st["turns"][k][p] if k < len(st["turns"]) else self.tok.eos_token_id
            logits[i, 0, nxt] = 1.0
        from types import SimpleNamespace

        return SimpleNamespace(logits=logits, past_key_values=cache, cache=cache)


def call(expression: str) -> str:
    return ('<tool_call>\n{"name": "calculator", "arguments": {"expression": "'
            + expression + '"}}\n</tool_call>')


ROWS = [{"prompt": "What is 2 + 3?", "answer": "5"},
        {"prompt": "What is 4 + 4?", "answer": "8"},
        {"prompt": "What is 9 + 1?", "answer": "10"}]


def _evaluate(tok, scripts, rows=ROWS, batch_size=2, **limits):
    cfg = OmegaConf.structured(CalculatorConfig(max_tokens=400, **limits))
    return evaluate_episodes(ScriptedLM(tok, scripts), tok, Calculator, cfg, rows,
                             batch_size=batch_size, fused=False)


def test_a_policy_calling_the_tool_right_then_answering_right_scores_one(tok):
    scripts = {"2 + 3": [call("2 + 3"), "2 + 3 = 5"],
               "4 + 4": [call("4 + 4"), "The answer is 8."],
               "9 + 1": [call("9+1"), "10"]}
    out = _evaluate(tok, scripts)
    assert out == {"accuracy": 1.0, "mean_return": 1.0, "tool_call_share": 1.0,
                   "tool_ok_share": 1.0, "mean_turns": 2.0, "error_share": 0.0,
                   "truncated_share": 0.0, "episodes": 3}


def test_episode_counts_of_a_mixed_policy(tok):
    scripts = {"2 + 3": [call("2 + 3"), "2 + 3 = 5"],            # tool right, answer right
               "4 + 4": [call("4 +"), "The answer is 8."],       # tool error, answer right
               "9 + 1": ["11"]}                                  # no tool, answer wrong
    for batch_size in (1, 2, 8):  # batching changes nothing
        out = _evaluate(tok, scripts, batch_size=batch_size)
        assert out["accuracy"] == pytest.approx(2 / 3)
        assert out["mean_return"] == pytest.approx(2 / 3)
        assert out["tool_call_share"] == pytest.approx(2 / 3)
        assert out["tool_ok_share"] == pytest.approx(1 / 3)
        assert out["mean_turns"] == pytest.approx(5 / 3)
        assert out["error_share"] == 0.0 and out["truncated_share"] == 0.0


def test_an_episode_cut_by_the_turn_limit_is_not_solved(tok):
    # the right number is in the tool's turn, but the episode ends before any answer
    scripts = {"2 + 3": [call("2 + 3"), call("5"), "5"]}
    out = _evaluate(tok, scripts, rows=ROWS[:1], max_turns=2)
    assert out["accuracy"] == 0.0 and out["truncated_share"] == 1.0
    assert out["mean_turns"] == 2.0 and out["tool_ok_share"] == 1.0
    assert evaluate_episodes(None, tok, Calculator, None, []) is None


# ----------------------------------------------------------------------------- traces


@pytest.fixture(scope="module")
def traces_module():
    spec = importlib.util.spec_from_file_location(
        "calculator_traces", ROOT / "docs" / "examples" / "calculator_traces.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("data", [{}, {"max_value": 30, "test_size": 200, "seed": 3}])
def test_traces_never_ask_a_held_out_question(traces_module, data):
    from gym_core.config.schema import ArithmeticConfig
    from gym_core.data.tasks import arithmetic_task

    task = arithmetic_task(OmegaConf.structured(ArithmeticConfig(**data)))
    held_out = {ex["prompt"] for ex in task.test}
    rows = traces_module.traces(len(task.train), 1, **data)  # every training question
    questions = [r["messages"][0]["content"] for r in rows]
    assert len(set(questions)) == len(task.train) and not held_out & set(questions)
    assert traces_module.traces(50, 1, **data) == traces_module.traces(50, 1, **data)
    with pytest.raises(SystemExit, match="training split holds"):
        traces_module.traces(len(task.train) + 1, 1, **data)


def test_a_trace_renders_as_the_episode_and_sft_then_grpo_run(traces_module, tok, tmp_path,
                                                             tiny_overrides):
    from gym_core.env.episode import Episode
    from gym_core.plugin.startup import bootstrap
    from gym_core.train.job import run_job

    path = tmp_path / "traces.jsonl"
    traces_module.main(["--n", "40", "--out", str(path)])
    # the trace's prompt, as SFT renders it from the JSONL row, is the episode's prompt
    cfg = compose(["algorithm=sft", "data=jsonl", f"data.train_file={path}", "model=tiny"])
    row = bootstrap().component("data", "jsonl").load()(cfg.data).train[0]
    from gym_sft import SFTConfig
    from gym_sft.sft import SFT

    policy = type("P", (), {"tokenizer": tok, "system_prompt": None})()
    segments = SFT(OmegaConf.structured(SFTConfig()), policy).segments(row)
    question = row["messages"][0]["content"]
    episode = Episode(Calculator, OmegaConf.structured(CalculatorConfig()),
                      {"prompt": question, "answer": "0"}, tok)
    first = next(i for i, (_, on) in enumerate(segments) if on)
    assert "".join(t for t, _ in segments[:first]) == episode.start()
    trained = [t for t, on in segments if on]
    assert trained[0].startswith('<tool_call>\n{"name": "calculator"')

    common = [o for o in tiny_overrides if not o.startswith("algorithm.")]
    sft = run_job(compose([*common, "algorithm=sft", "data=jsonl", f"data.train_file={path}",
                           "trainer.max_steps=1"]), run_dir=tmp_path / "sft")
    assert sft["steps"] == 1
    rows = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert next(r for r in rows if "loss" in r)["target_tokens"] > 0
    grpo = run_job(compose([*common, "env=calculator", f"model.init={tmp_path / 'sft'}",
                            "algorithm.num_generations=2", "trainer.max_steps=1",
                            "env.max_tokens=24", "trainer.eval_size=3"]),
                   run_dir=tmp_path / "grpo")
    ev = grpo["eval"]
    assert ev["metric"] == "env=calculator accuracy"
    for when in ("before", "after"):
        assert ev["env"][when]["episodes"] == 3
        assert ev[when] == ev["env"][when]["accuracy"]
    saved = json.loads((tmp_path / "grpo" / "summary.json").read_text())
    assert saved["eval"]["env"]["after"] == ev["env"]["after"]
